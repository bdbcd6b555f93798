"""Atomic output files: partial files named after their owner, cleaned when the owner is gone.

Every output slimc writes goes first to a *partial* file or folder in the destination folder,
named ``.slimc-<pid>-<host>-<random>``, and is renamed into place only when complete. A run
killed mid-write leaves its partial behind; the next write into that folder removes every
partial whose process no longer runs on this host (a partial of a live process, or one from
another host sharing the folder, is left alone). Renames that must happen together run under
an exclusive lock on the destination folder, so concurrent writers never interleave.

Files slimc writes follow the process umask (``0o666 & ~umask``), like any file created with
``open()``: temporary files are created ``0600`` by `tempfile` and would otherwise keep it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from slimc.errors import OutputPathError

PARTIAL_PREFIX = ".slimc-"
_PARTIAL = re.compile(r"\.slimc-(\d+)-([0-9a-f]{8})-")


def owner_tag() -> str:
    """``<pid>-<host hash>-``: who owns a partial or work folder (encoded in its name)."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{os.getpid()}-{host}-"


def owner_gone(name: str, pattern: re.Pattern[str] = _PARTIAL) -> bool:
    """True when ``name`` was made by a process of this host that no longer runs.

    Names without an owner tag (older slimc versions, other tools) are never considered gone.
    """
    match = pattern.match(name)
    if match is None or match.group(2) != owner_tag().split("-")[1]:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, owned by another user
        return False
    return False


def clean_stale(folder: str | os.PathLike, pattern: re.Pattern[str] = _PARTIAL) -> list[Path]:
    """Remove the leftovers of killed runs in ``folder`` (see `owner_gone`); return what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not owner_gone(entry.name, pattern):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def partial_dir(folder: str | os.PathLike) -> Path:
    """A new owner-tagged partial folder inside ``folder`` (stale ones are cleaned first)."""
    clean_stale(folder)
    return Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX + owner_tag(), dir=folder))


def umask() -> int:
    """The process umask (reading it means setting it; it is restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(*paths: str | os.PathLike) -> None:
    """Give files the mode ``open()`` would have given them: ``0o666 & ~umask``."""
    mode = 0o666 & ~umask()
    for path in paths:
        os.chmod(path, mode)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike):
    """An exclusive lock on ``folder`` for a group of renames (no-op where ``flock`` is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: renames are still atomic one by one
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock; so does the process dying


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ""):
    """A partial file beside ``path`` for the block to write; renamed onto ``path`` when the block
    succeeds and removed otherwise, so ``path`` is either the old file or the complete new one."""
    path = Path(path)
    clean_stale(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX + owner_tag(), suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise OutputPathError(f"could not write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        follow_umask(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputPathError(f"could not write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (receipts) via a partial file + rename."""
    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {path}: folder {folder} is missing or not writable.")
    with atomic_output(path) as tmp:
        tmp.write_text(text)
