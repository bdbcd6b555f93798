"""Where candidates are evaluated: in this process (``workers=1``) or as Ray tasks.

Both take the same calls: ``start(shared)`` once, then ``map(jobs)`` with ``(genome, n_batches)``
pairs, answering `slimc.evosearch.fitness.evaluate` rows in the order of the jobs. With Ray
(``pip install "slimc[search]"``) the shared part (input model path, calibration batches, reference
outputs) is put in the object store once and each candidate is one task of one CPU; a local Ray
instance is started with ``workers`` CPUs, or ``address`` joins a running cluster, whose nodes must
see the input model at the same path (a shared file system) and have slimc installed.
"""

from __future__ import annotations

from typing import Any

from slimc.errors import MissingExtraError, OptionError
from slimc.evosearch import fitness


class InProcess:
    """Evaluates one candidate after the other in this process."""

    name = "in-process"

    def __init__(self) -> None:
        self.shared: fitness.Shared | None = None

    def start(self, shared: fitness.Shared) -> None:
        self.shared = shared

    def map(self, jobs: list[tuple[tuple[int, ...], int]]) -> list[dict[str, Any]]:
        return [fitness.evaluate(self.shared, genome, n) for genome, n in jobs]

    def close(self) -> None:
        self.shared = None


def _remote_evaluate(shared, genome, n):  # a Ray task: ``shared`` arrives resolved from the object store
    from slimc.evosearch import fitness as remote_fitness

    return remote_fitness.evaluate(shared, tuple(genome), n)


class RayWorkers:
    """Evaluates candidates as Ray tasks, ``workers`` at a time on a local instance (or a cluster)."""

    def __init__(self, workers: int, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise MissingExtraError("workers > 1 (or --ray-address) evaluates candidates as Ray tasks: pip install "
                                    "'slimc[search]' (ray), or use --workers 1 to search in this process.") from None
        self.ray, self.workers, self.address = ray, workers, address
        self.name = f"ray ({'cluster ' + address if address else f'local, {workers} CPUs'})"
        self._started = False

    def start(self, shared: fitness.Shared) -> None:
        ray = self.ray
        if not ray.is_initialized():
            options = {"address": self.address} if self.address else {"num_cpus": self.workers}
            ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                     configure_logging=False, **options)
            self._started = True
        self._task = ray.remote(num_cpus=1)(_remote_evaluate)
        self._shared = ray.put(shared)

    def map(self, jobs: list[tuple[tuple[int, ...], int]]) -> list[dict[str, Any]]:
        refs = [self._task.remote(self._shared, list(genome), n) for genome, n in jobs]
        return self.ray.get(refs)

    def close(self) -> None:
        self._shared = None
        if self._started:
            self.ray.shutdown()
            self._started = False


def make(workers: int, address: str | None = None):
    """The evaluator for ``workers`` (1: in process) and an optional Ray ``address``."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise OptionError(f"workers={workers!r}: give a whole number >= 1 (1 evaluates in this process).")
    if workers == 1 and address is None:
        return InProcess()
    return RayWorkers(workers, address)
