"""Keep memory-mapped weights out of the resident set while ONNX Runtime runs on them.

A float stage session uses the IR's memory-mapped weight arrays in place (`create_session(shared=)`):
while it runs, every page it reads becomes resident in this process, so after one run its whole
weights are (1x). Verification and fidelity run that model next to the compressed one, whose ORT
session holds its own prepacked copy of its weights (int8: 0.25x): the two are resident together.

`released` drops the mapped weights' resident pages (``MADV_DONTNEED``; the file stays in the page
cache, so a later read maps them again without disk I/O) every ``interval_s`` from a background
thread while the block runs. A page is then resident only for the time between its read and the
next release: the run's resident weights stay at a fraction of the whole. The cost is page faults
on the page cache: measured ~1.3x slower runs, so it is used for the verification and fidelity
runs of large models only, never for latency measurements.

Dropping the pages of a read-only file mapping is safe at any time: ORT reads them again from the
file. The weight maps slimc makes (onnx_ir's external tensors, `slimc.onnx_io.map_saved_weights`)
are read-only; never pass arrays of a writable map (its unsaved changes would be dropped).
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Iterable, Iterator

import numpy as np

# How often the background thread releases the pages (seconds).
INTERVAL_S = 0.02


def mapped_buffers(arrays: Iterable[np.ndarray]) -> list[mmap.mmap]:
    """The distinct ``mmap`` objects the arrays are views of (arrays not backed by a map are skipped)."""
    seen: dict[int, mmap.mmap] = {}
    for array in arrays:
        base = array
        while isinstance(base, (np.ndarray, memoryview)):  # array views -> the buffer they were made from
            base = base.obj if isinstance(base, memoryview) else base.base
        if isinstance(base, mmap.mmap):
            seen.setdefault(id(base), base)
    return list(seen.values())


def release(maps: Iterable[mmap.mmap]) -> None:
    """``MADV_DONTNEED`` on each map (a closed map is skipped; no-op where the platform lacks it)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    for m in maps:
        with contextlib.suppress(ValueError, OSError):  # closed meanwhile: nothing resident to drop
            m.madvise(mmap.MADV_DONTNEED)


class _Releaser(threading.Thread):
    def __init__(self, maps: list[mmap.mmap], interval_s: float):
        super().__init__(name="slimc-release-pages", daemon=True)
        self.maps, self.interval_s, self.stop = maps, interval_s, threading.Event()
        self.rounds = 0

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            release(self.maps)
            self.rounds += 1


@contextlib.contextmanager
def released(arrays: Iterable[np.ndarray], interval_s: float = INTERVAL_S) -> Iterator[_Releaser | None]:
    """While the block runs, the resident pages of the memory-mapped ``arrays`` are dropped every
    ``interval_s`` by a background thread, and once more at the end. Yields the thread (its ``rounds``
    counts the releases), or None when no array is memory-mapped or the platform has no ``madvise``."""
    maps = mapped_buffers(arrays)
    if not maps or not hasattr(mmap, "MADV_DONTNEED"):
        yield None
        return
    thread = _Releaser(maps, interval_s)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop.set()
        thread.join()
        release(maps)
