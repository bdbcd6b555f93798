"""Where slimc keeps its work files: one folder per user, one sub-folder per run or step.

Every intermediate model (the staged model after each pass, calibration graphs, quantizer
candidates, target conversions) lives under `root()`:

- ``$SLIMC_WORKDIR`` when set (created if missing), else
- ``<system temp dir>/slimc-<uid>/`` (``$TMPDIR``, else ``/tmp``), created ``0700``.

Sub-folders are named ``<label>-<pid>-<host>-<random>`` and removed when their step ends. A
killed run cannot remove its own; the next `new()` removes every sub-folder whose process no
longer runs on this host (see `slimc.atomic`).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path

from slimc.atomic import clean_stale, owner_tag
from slimc.errors import OutputPathError

ENV = "SLIMC_WORKDIR"
_WORK = re.compile(r"[a-z0-9]+-(\d+)-([0-9a-f]{8})-")


def root() -> Path:
    """The folder all work folders go in (see the module docstring); made on first use."""
    configured = os.environ.get(ENV)
    if configured:
        folder = Path(configured).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(
                f"{ENV}={configured}: cannot create it ({exc.strerror}). Point it at a writable folder."
            ) from None
        return folder
    uid = os.getuid() if hasattr(os, "getuid") else 0
    folder = Path(tempfile.gettempdir()) / f"slimc-{uid}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        raise OutputPathError(f"cannot create the work folder {folder} ({exc.strerror}); set {ENV} to a writable "
                              "folder.") from None
    # In a shared temp dir someone else could have made the folder (or a link) first.
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != uid):
        raise OutputPathError(f"{folder} is not a folder owned by you; set {ENV} to a folder of your own.")
    return folder


def new(label: str) -> tempfile.TemporaryDirectory:
    """A fresh work folder ``<root>/<label>-<pid>-<host>-<random>``, removed by ``cleanup()``
    (or on garbage collection); leftovers of killed runs are removed first."""
    folder = root()
    clean_stale(folder, _WORK)
    return tempfile.TemporaryDirectory(prefix=f"{label}-{owner_tag()}", dir=folder)
