"""`slimc.search()`: the most faithful per-block allocation of prune/layerskip levels under a budget.

    load -> blocks and levels (space) -> uniform allocations built, scored and timed (baseline +
    cost model) -> evolution (workers: in process or Ray tasks) -> finalists timed in ORT ->
    the fittest that meets the measured budget, compiled by slimc.compile (verified, receipt)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from slimc.errors import BudgetError, OptionError
from slimc.evosearch import evolve, fitness, space as spaces, workers as worker_pool
from slimc.evosearch.budget import Budget, parse_budget

log = logging.getLogger("slimc")


@dataclasses.dataclass
class SearchResult:
    """The chosen allocation, its compiled model (``result.compiled.save(path)``) and the search record."""

    budget: Budget
    genome: tuple[int, ...]
    allocation: list[dict[str, Any]]  # per block: label, level
    passes: list[Any]
    compiled: Any  # slimc.api.CompileResult of the chosen allocation (held-out fidelity, latency)
    budget_met: bool
    front: list[dict[str, Any]]
    uniform: list[dict[str, Any]]
    log: list[dict[str, Any]]
    finalists: list[dict[str, Any]]
    settings: dict[str, Any]
    space: spaces.Space = dataclasses.field(repr=False, default=None)
    feed: dict[str, np.ndarray] = dataclasses.field(repr=False, default=None)  # the sample latency is timed on

    def save(self, path) -> list[Path]:
        return self.compiled.save(path)

    def to_json(self) -> dict[str, Any]:
        return {"budget": str(self.budget), "budget_met": self.budget_met, "genome": list(self.genome),
                "allocation": self.allocation, "passes": [p.spec() for p in self.passes], "settings": self.settings,
                "finalists": self.finalists, "front": self.front, "uniform": self.uniform}


def search(model: Any, budget: str | Budget, *, space: str | tuple[str, ...] = spaces.METHODS,
           calibration: Any = None, evaluation: Any = None, prune_levels: tuple[float, ...] = spaces.PRUNE_LEVELS,
           protect: int = 1, generations: int = 20, offspring: int = 8, survivors: int = 2, batches: int = 4,
           low_batches: int = 1, finalists: int = 4, seed: int = 0, workers: int = 1, ray_address: str | None = None,
           seq_len: int = 128, threads: int | None = None, kv_cache: bool | None = None,
           report: str | Path | None = None) -> SearchResult:
    """Search per-block levels of ``space`` (``prune``, ``layerskip``) for the model that stays closest to
    ``model`` on the calibration data while meeting ``budget`` (``"speedup>=1.5,size<=60MB"``).

    Fitness is measured on ``calibration`` (KL for LMs/classifiers, 1 - cosine for encoders); the
    chosen model is then compiled with ``evaluation`` as held-out data (its receipt). ``workers > 1``
    or ``ray_address`` evaluates candidates as Ray tasks. ``report``: a folder for pareto.json,
    search_log.jsonl and pareto.png. Refuses a malformed or impossible budget with `BudgetError`.
    """
    from slimc import data, frontends
    from slimc.api import compile as compile_model
    from slimc.onnx_io import save_onnx
    from slimc.workdir import new as new_workdir

    budget = parse_budget(budget)
    methods = tuple(m.strip() for m in space.split(",")) if isinstance(space, str) else tuple(space)
    settings = evolve.Settings(generations, offspring, survivors, low_batches, batches, seed)
    _check(settings, finalists, protect, prune_levels)
    pool = worker_pool.make(workers, ray_address)
    loaded = frontends.load(model, kv_cache=kv_cache)
    found = spaces.discover(loaded.model, methods, tuple(prune_levels), protect)
    calib = (data.load(calibration, loaded, seq_len=seq_len, role="calibration") if calibration is not None
             else data.synthetic(loaded.inputs, n_batches=batches, seed=seed, sizes={"seq": min(seq_len, 64)}))
    if calibration is None:
        log.warning("search: no calibration data; fitness is measured on synthetic inputs (pass calibration=/--calib)")
    workdir = new_workdir("search")
    work = Path(workdir.name)
    input_path = work / "input.onnx"
    save_onnx(loaded.model, input_path)
    shared = _shared(loaded, found, calib, batches, input_path, threads)
    reference = {**fitness.costs(loaded.model), "macs": fitness.macs(loaded.model, shared.feed)}
    pool.start(shared)
    try:
        uniform = _uniform(found, pool, batches)
        times = _time(loaded.model, found, [r["genome"] for r in uniform], shared.feed, threads)
        reference["latency_ms"] = times[0]
        for row, ms in zip(uniform, times[1:]):
            row.update(latency_ms=ms, measured_speedup=times[0] / ms)
        model_ = evolve.cost_model(found, reference, {_level(found, r["genome"]): r for r in uniform},
                                   _block_weights(loaded.model, found))
        evolution = evolve.Evolution(model_, budget, settings, pool.map)
        start = time.perf_counter()
        best = _evolve(evolution, generations)
        elapsed = time.perf_counter() - start
    finally:
        pool.close()
    chosen, final_rows = _finalists(evolution, best, finalists, loaded.model, found, shared.feed, threads, budget, reference)
    passes = found.passes(chosen)
    compiled = compile_model(loaded, passes or "cleanup", calibration=calib, evaluation=evaluation, threads=threads,
                             seq_len=seq_len, seed=seed)
    met = any(r["genome"] == list(chosen) and r["meets_budget"] for r in final_rows)
    result = SearchResult(
        budget=budget, genome=chosen, allocation=[{"block": b.label, "level": found.describe(g)} for b, g in zip(found.blocks, chosen)],
        passes=passes, compiled=compiled, budget_met=met,
        front=evolve.pareto([r for r in evolution.full.values() if r["exact_fits"]]), uniform=uniform, log=evolution.log,
        finalists=final_rows,
        settings={**dataclasses.asdict(settings), "workers": pool.name, "space": spaces.as_json(found),
                  "fitness": fitness.metric_name(loaded.task), "search_seconds": round(elapsed, 1),
                  "reference": reference, "latency_fit_ms": list(model_.latency_fit),
                  "calibration": getattr(calib, "source", None)},
        space=found, feed=shared.feed)
    if report is not None:
        from slimc.evosearch.report import write_report

        write_report(result, Path(report))
    workdir.cleanup()
    return result


def _check(settings: evolve.Settings, finalists: int, protect: int, prune_levels) -> None:
    for name in ("generations", "offspring", "survivors", "low_batches", "batches"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "generations" else 1):
            raise OptionError(f"search: {name}={value!r} must be a whole number >= {0 if name == 'generations' else 1}.")
    if settings.low_batches > settings.batches:
        raise OptionError(f"search: low_batches={settings.low_batches} must be <= batches={settings.batches} (the "
                          "first selection uses fewer batches than the final one).")
    if finalists < 1 or protect < 0:
        raise OptionError("search: finalists must be >= 1 and protect >= 0.")
    if any(not 0 < r < 1 for r in prune_levels) or list(prune_levels) != sorted(set(prune_levels)):
        raise OptionError(f"search: prune_levels={list(prune_levels)} must be increasing fractions in (0, 1).")


def _shared(loaded, found, calib, n: int, path: Path, threads) -> fitness.Shared:
    from slimc.backends import onnxruntime as ort_backend
    from slimc.backends.timing import latency_feed
    from slimc.data import first_batches

    batches = [dict(b) for b in first_batches(calib, n)]
    if len(batches) < n:
        raise OptionError(f"search: batches={n} but the calibration data has {len(batches)} batch(es); lower "
                          "batches or give more calibration data.")
    session = ort_backend.create_session(path, threads)
    references = [ort_backend.run(session, b)[:1] for b in batches]  # the main output: what the fitness reads
    names = [o.name for o in session.get_outputs()]
    del session
    return fitness.Shared(str(path), found, batches, references, names, loaded.task, list(loaded.inputs),
                          latency_feed(batches[0], loaded.inputs), threads)


def _uniform_genomes(found: spaces.Space) -> list[tuple[int, ...]]:
    n = len(found.blocks)
    out = [tuple([k] * n) for k in range(1, len(found.prune_levels) + 1)]
    if found.skip_level is not None and any(b.skippable for b in found.blocks):
        out.append(tuple(found.skip_level if b.skippable else 0 for b in found.blocks))
    return out


def _level(found: spaces.Space, genome) -> int:
    return max(genome)


def _uniform(found: spaces.Space, pool, n: int) -> list[dict[str, Any]]:
    genomes = _uniform_genomes(found)
    rows = pool.map([(g, n) for g in genomes])
    for g, row in zip(genomes, rows):
        row["label"] = ("skip every unprotected block" if max(g) == found.skip_level
                        else f"uniform prune {found.prune_levels[max(g) - 1]:g}")
    return rows


def _block_weights(model, found: spaces.Space) -> np.ndarray:
    inits = model.graph.initializers
    return np.array([sum(int(np.prod(inits[n].shape.numpy())) for n in b.initializers if n in inits and inits[n].shape is not None)
                     for b in found.blocks], float)


def _time(model, found: spaces.Space, genomes, feed, threads) -> list[float]:
    """Median ORT latency (ms) of the input model and of each genome, interleaved in one run of 6 rounds
    (more than a pass's guard: the chosen model's speed-up decides whether it meets the budget)."""
    from slimc.backends import onnxruntime as ort_backend
    from slimc.onnx_io import save_onnx, tensor_bytes
    from slimc.workdir import new as new_workdir

    models = {"input": model, **{f"g{i}": found.build(model, tuple(g)) for i, g in enumerate(genomes)}}
    with new_workdir("search-timing") as tmp:
        paths = {}
        for name, m in models.items():
            paths[name] = Path(tmp) / f"{name}.onnx"
            save_onnx(m, paths[name])
        weight_bytes = tensor_bytes(model)
        del models
        stats = ort_backend.measure_latency_files(paths, dict(feed), threads, weight_bytes=weight_bytes, warmup=3,
                                                  repeats=36, rounds=6, budget_s=90.0)
    return [stats[name].median_ms for name in paths]


def _evolve(evolution: evolve.Evolution, generations: int) -> tuple[int, ...]:
    from tqdm.auto import tqdm

    from slimc import progress

    bar = tqdm(total=generations, desc="search", unit="gen", leave=False,
               disable=progress.verbosity() == progress.QUIET or not sys.stderr.isatty())

    def tick(gen: int, best: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(best=f"{best['fitness']:.4g}", speedup=f"{best['predicted']['speedup']:.2f}x")
        log.info("search: generation %d/%d, best fitness %.4g (predicted speed-up %.2fx)", gen, generations,
                 best["fitness"], best["predicted"]["speedup"])

    try:
        return evolution.run(tick)
    finally:
        bar.close()


def _finalists(evolution, best, n, model, found, feed, threads, budget: Budget, reference) -> tuple[tuple[int, ...], list]:
    """Time the best and the fittest other candidates inside the predicted budget; pick the fittest whose
    measured speed-up (and exact costs) meet the budget. Falls back to the best, marked as missing it."""
    pool = sorted((r for r in evolution.full.values() if r["exact_fits"]), key=lambda r: r["fitness"])
    chosen = [tuple(r["genome"]) for r in pool if evolution.model.fits(r["predicted"], budget)][:n]
    if tuple(best) not in chosen:
        chosen = [tuple(best), *chosen][:n]
    times = _time(model, found, chosen, feed, threads)
    rows = []
    for g, ms in zip(chosen, times[1:]):
        row = dict(evolution.full[g])
        row.update(latency_ms=ms, measured_speedup=times[0] / ms)
        values = {**{m: row[m] for m in evolve.COST_MEASURES}, "speedup": row["measured_speedup"]}
        row["meets_budget"] = all(b.holds(values[b.measure], reference) for b in budget.bounds)
        rows.append(row)
    passing = [r for r in rows if r["meets_budget"]]
    pick = min(passing or rows, key=lambda r: r["fitness"])
    return tuple(pick["genome"]), rows


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
