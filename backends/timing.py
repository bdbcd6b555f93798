"""Fair latency for any runtime: warm-up, then the models alternate in rounds; median and spread.

Each model is a no-argument callable that runs one inference on a prepared input. Alternating
rounds make drift on a busy machine (thermal, other processes) hit every model alike; the
reported figure is the median of all timed runs, with p10/p90 for the spread. When one run is
slow the repeat count is cut so the whole measurement stays near ``budget_s`` (never below 3).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

from slimc import progress


@dataclasses.dataclass
class Latency:
    """Milliseconds per run of one model on one feed."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def interleaved(
    calls: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeats: int = 20,
    rounds: int = 5,
    budget_s: float = 60.0,
    desc: str = "measuring latency",
) -> dict[str, Latency]:
    """Median latency of each callable, interleaved in ``rounds`` after ``warmup`` runs each."""
    warm_times = {}
    for name, call in progress.bar(calls.items(), "latency warm-up", total=len(calls)):
        start = time.perf_counter()
        for _ in range(max(1, warmup)):
            call()
        warm_times[name] = (time.perf_counter() - start) / max(1, warmup)
    affordable = int(budget_s / max(sum(warm_times.values()), 1e-6))
    repeats = max(3, min(repeats, affordable))
    rounds = max(1, min(rounds, repeats))
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    for count in progress.bar(per_round, desc, total=rounds, unit="round"):
        for name, call in calls.items():
            for _ in range(count):
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: stats(values) for name, values in times.items()}


def one_at_a_time(
    builders: Mapping[str, Callable[[], Callable[[], Any]]],
    *,
    warmup: int = 2,
    repeats: int = 15,
    rounds: int = 3,
    budget_s: float = 60.0,
    desc: str = "measuring latency (one model in memory at a time)",
) -> dict[str, Latency]:
    """`interleaved` for models too large to hold together: in each round every model is built
    (``builders[name]()`` returns its no-argument call), warmed up, timed for its share of the
    runs and dropped before the next is built. Rounds still alternate, so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in builders}
    count = max(1, repeats // max(rounds, 1))
    for _ in progress.bar(range(max(rounds, 1)), desc, total=max(rounds, 1), unit="round"):
        for name, build in builders.items():
            call = build()
            start = time.perf_counter()
            for _ in range(max(1, warmup)):
                call()
            per_run = (time.perf_counter() - start) / max(1, warmup)
            # the same cut as `interleaved`: the whole measurement near budget_s
            runs = max(1, min(count, int(budget_s / max(per_run * rounds * len(builders), 1e-6))))
            for _ in range(runs):
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
            del call  # the model's session (and its weights) go before the next one is built
    return {name: stats(values) for name, values in times.items()}


def stats(values: list[float]) -> Latency:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return Latency(median_ms=statistics.median(ordered), p10_ms=pick(0.1), p90_ms=pick(0.9), runs=len(ordered))


def comparison(stats: Mapping[str, Latency], feed: Mapping[str, Any], machine: str) -> dict[str, Any]:
    """A receipt's latency entry: each model's numbers; with a ``"before"`` model, the speed-up of
    ``"after"`` and whether it is inside the p10-p90 spread; the feed's shape; the machine."""
    from slimc.receipt import within_noise

    out: dict[str, Any] = {name: s.to_json() for name, s in stats.items()}
    if "before" in stats:
        out["speedup"] = stats["before"].median_ms / stats["after"].median_ms
        out["within_noise"] = within_noise(out)
    shape = tuple(getattr(next(iter(feed.values())), "shape", ())) if feed else ()
    out["feed"] = "x".join(map(str, shape)) if shape else "scalar"
    out["machine"] = machine
    return out


def latency_feed(batch: Mapping[str, Any], inputs: Any, batch_size: int | None = None) -> dict[str, Any]:
    """The deployment feed to time: ``batch_size`` (default one) samples of a batch the model ran,
    cut along each input's batch axis (`slimc.data.first_samples`): a declared static batch (a fixed
    batch of 3) and 0-d or unbatched inputs are fed whole, since the model accepts nothing else."""
    from slimc.data import first_samples

    return first_samples(batch, inputs, batch_size or 1)
