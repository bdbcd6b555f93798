"""`slimc search` benchmark on a real model: the searched allocation against every uniform allocation of
the same methods, held-out fidelity at the measured speed-up.

Run::

    python -m slimc.tools.bench_search [--model minilm|smollm2] [--budget "speedup>=1.3"]
                                       [--generations 10] [--offspring 6] [--batches 2] [--calib-batches 4]
                                       [--eval-batches 4] [--workers 1] [--threads N] [--data slimc-data]
                                       [--out results.json] [--markdown table.md] [--report DIR]

Data (`slimc.tools.bench_quant`): calibration on the Lee news corpus (the search's fitness), evaluation on
held-out Wikipedia, windows of 128 tokens in batches of 4. After the search, the chosen allocation and
every uniform allocation (each prune level on every block; every unprotected block removed) are compiled
by `slimc.compile` with the same passes and measured on the held-out data (perplexity for SmolLM2,
embedding cosine for MiniLM), then timed together in one interleaved ONNX Runtime run (batch 1, 128
tokens, median; speed-up against the input model in the same run). Timings are reported, never
asserted; the machine's load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

MODELS = ("minilm", "smollm2")


def _case(name: str, folder: Path, calib_batches: int, eval_batches: int):
    from slimc.tools.bench_quant import make_case

    case = make_case(name, folder, calib_batches, eval_batches)
    loaded = case.load()
    calib, evaluation = case.data(loaded)
    return loaded, calib, evaluation


def _held_out(compiled, task: str) -> dict[str, Any]:
    metrics = compiled.receipt.fidelity.get("metrics", {})
    keys = ("perplexity", "perplexity_reference", "perplexity_ratio", "kl_divergence") if task == "causal-lm" else (
        "embedding_cosine", "embedding_cosine_min")
    return {k: metrics.get(k) for k in keys}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import slimc
    from slimc.backends.onnxruntime import machine_description
    from slimc.evosearch.api import _time

    loaded, calib, evaluation = _case(args.model, Path(args.data), args.calib_batches, args.eval_batches)
    start = time.perf_counter()
    result = slimc.search(loaded, args.budget, calibration=calib, evaluation=evaluation, generations=args.generations,
                          offspring=args.offspring, survivors=2, batches=args.batches, low_batches=1, finalists=3,
                          seed=args.seed, workers=args.workers, threads=args.threads, report=args.report)
    search_s = time.perf_counter() - start
    space = result.space
    configs = {"search": result.genome, **{r["label"]: tuple(r["genome"]) for r in result.uniform}}
    rows = []
    for label, genome in configs.items():
        compiled = result.compiled if label == "search" else slimc.compile(
            loaded, space.passes(genome), evaluation=evaluation, threads=args.threads, measure_latency=False)
        rows.append({"config": label, "genome": list(genome), "params": compiled.receipt.after["params"],
                     **_held_out(compiled, loaded.task)})
    feed = result.feed
    times = _time(loaded.model, space, [r["genome"] for r in rows], feed, args.threads)
    for row, ms in zip(rows, times[1:]):
        row.update(latency_ms=round(ms, 3), speedup=round(times[0] / ms, 3))
    return {"model": args.model, "budget": args.budget, "budget_met": result.budget_met, "search_seconds": round(search_s, 1),
            "allocation": result.allocation, "settings": result.settings,
            "input_latency_ms": round(times[0], 3), "rows": rows, "machine": machine_description(args.threads),
            "load_average": os.getloadavg()}


def markdown(report: dict[str, Any]) -> str:
    lm = any("perplexity" in r for r in report["rows"])
    metric = "held-out perplexity" if lm else "held-out embedding cosine"
    lines = [f"| allocation | params | measured speed-up | {metric} |", "|---|---:|---:|---:|"]
    for r in sorted(report["rows"], key=lambda r: r["speedup"]):
        value = r.get("perplexity") if lm else r.get("embedding_cosine")
        shown = "n/a" if value is None else (f"{value:.2f}" if lm else f"{value:.4f}")
        name = f"**{r['config']}** ({report['budget']})" if r["config"] == "search" else r["config"]
        lines.append(f"| {name} | {r['params']:,} | {r['speedup']:.2f}x | {shown} |")
    load = ", ".join(f"{x:.1f}" for x in report["load_average"])
    lines.append("")
    lines.append(f"{report['machine']}; load average {load}; search {report['search_seconds']:.0f} s "
                 f"({report['settings']['generations']} generations x {report['settings']['offspring']} children, "
                 f"{report['settings']['workers']}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="minilm")
    p.add_argument("--budget", default="speedup>=1.3")
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--offspring", type=int, default=6)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--data", default="slimc-data")
    p.add_argument("--report", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    table = markdown(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
