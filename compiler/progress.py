"""Progress bars and log verbosity, shared by every long step (export, calibration, latency).

Verbosity is process-wide like `logging`'s levels: the CLI sets it from ``--quiet`` /
``--verbose``; the Python API leaves bars on when stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger("slimc")

QUIET, NORMAL, VERBOSE = 0, 1, 2
_level = NORMAL


def set_verbosity(level: int) -> None:
    """QUIET: errors only, no bars. NORMAL: bars and warnings. VERBOSE: also info/debug logs."""
    global _level
    _level = level
    if level == QUIET:
        # Libraries slimc drives (transformers, huggingface_hub) draw their own bars; both
        # read this switch when first imported.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(format="slimc: %(message)s", stream=sys.stderr)
    log.setLevel({QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.DEBUG}[level])


def verbosity() -> int:
    return _level


def bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar on stderr (hidden when quiet or stderr is not a terminal)."""
    disable = _level == QUIET or not sys.stderr.isatty()
    yield from tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=False)


@contextlib.contextmanager
def step(desc: str) -> Iterator[None]:
    """A long step with no natural count (export, loading): a status line and its duration."""
    show = _level > QUIET and sys.stderr.isatty()
    if show:
        print(f"slimc: {desc} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    log.info("%s took %.1f s", desc, time.perf_counter() - start)
    if show:
        print(f"slimc: {desc} done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)


def tqdm_bar(total: int, desc: str):
    """A bar the caller updates itself (``update``, ``set_postfix``: a running loss); None when hidden."""
    if _level == QUIET or not sys.stderr.isatty():
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False)
