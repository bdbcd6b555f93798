"""Layer-skip benchmark on SmolLM2-135M (real weights): perplexity and measured speed-up of removing
2/4/6 of its 30 blocks, or of its 30 MLP sub-layers, chosen by Block Influence or by greedy loss.

Run::

    python -m slimc.tools.bench_layerskip [--counts 2,4,6] [--units block,mlp] [--scores influence,loss]
                                          [--calib-batches 4] [--eval-batches 4] [--loss-batches 2]
                                          [--repeats 10] [--threads N] [--data slimc-data]
                                          [--out results.json] [--markdown table.md]
    python -m slimc.tools.bench_layerskip --remeasure results.json [--repeats 10] --out results.json --markdown table.md

Full runs belong in ``benchmarks/layerskip/``. Data (`slimc.tools.bench_quant.smollm2`): calibration
on the Lee news corpus, evaluation on held-out Wikipedia, windows of 128 tokens in batches of 4.

Per configuration (unit x score x count): ``layerskip(count=N, unit=U, score=S, protect_first=1,
protect_last=1)`` on a copy of the fp32 export, scored on the calibration batches (the greedy loss
search on the first ``--loss-batches`` of them, among its default shortlist of the ``2N+2``
lowest-influence units). Measured:

- perplexity: absolute, next-token, pooled over every evaluation token (never calibration data);
- latency: ONNX Runtime CPU, batch 1, at a 128-token prompt (prefill) and at one token (the export
  has no KV cache: the model run on one token), the fp32 model and the configuration measured
  interleaved in one `measure_latency` call per feed (same session options, warm-up, alternating
  rounds), median; speed-up = fp32 median / configuration median. Timings are reported, never
  asserted; on a shared machine they are noisy (the load average is recorded). ``--remeasure``
  times the configurations of an earlier report again, all interleaved in one call per feed
  (the models rebuilt from the removed units it lists, no scoring).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

COUNTS = (2, 4, 6)
UNITS = ("block", "attention", "mlp")
DEFAULT_UNITS = ("block", "mlp")
SCORES = ("influence", "loss")


def perplexity(session, batches, tokens: str = "input_ids", mask: str = "attention_mask") -> float:
    """exp(mean next-token NLL) over every valid position of every batch (pooled, not per batch)."""
    from slimc.backends.onnxruntime import run
    from slimc.evaluate import perplexity as batch_perplexity

    nll = count = 0.0
    for batch in batches:
        logits = run(session, batch)[0]
        m = np.asarray(batch[mask]) if mask in batch else np.ones_like(batch[tokens])
        n = float(((m[:, :-1] != 0) & (m[:, 1:] != 0)).sum())
        nll += n * math.log(batch_perplexity(logits, batch[tokens], batch.get(mask)))
        count += n
    return math.exp(nll / count)


def _measure(base, session, feeds: dict[str, dict], repeats: int) -> dict[str, dict[str, float]]:
    from slimc.backends.onnxruntime import measure_latency

    out = {}
    for label, feed in feeds.items():
        stats = measure_latency({"fp32": base, "skip": session}, feed, warmup=2, repeats=repeats,
                                rounds=min(5, repeats), budget_s=1e6)
        out[label] = {"fp32_ms": stats["fp32"].median_ms, "ms": stats["skip"].median_ms,
                      "speedup": stats["fp32"].median_ms / stats["skip"].median_ms}
    return out


def run(folder: Path, counts: Sequence[int] = COUNTS, units: Sequence[str] = DEFAULT_UNITS, scores: Sequence[str] = SCORES,
        calib_batches: int = 4, eval_batches: int = 4, loss_batches: int = 2, repeats: int = 10,
        threads: int | None = None) -> dict[str, Any]:
    """Every configuration on SmolLM2-135M; returns the JSON-ready report."""
    from slimc.backends.onnxruntime import create_session, machine_description
    from slimc.onnx_io import copy_model, save_onnx
    from slimc.passes.skip.layerskip import LayerSkip
    from slimc.pipeline import PassContext
    from slimc.tools.bench_quant import _load_average, smollm2, versions

    load_before = _load_average()
    case = smollm2(folder, calib_batches, eval_batches)
    loaded = case.load()
    calib, evaluation = case.data(loaded)
    feeds = case.feeds(loaded, evaluation)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slimc-bench-layerskip-") as tmp:
        save_onnx(loaded.model, Path(tmp) / "fp32.onnx")
        base = create_session(Path(tmp) / "fp32.onnx", threads)
        baseline = perplexity(base, evaluation)
        print(f"bench_layerskip: fp32 perplexity {baseline:.3f}", file=sys.stderr, flush=True)
        for unit in units:
            for score in scores:
                for count in counts:
                    options = {"count": count, "unit": unit, "score": score, "protect_first": 1, "protect_last": 1,
                               "calibration_batches": calib_batches, "measure_latency": False}
                    if score == "loss":
                        options["loss_batches"] = min(loss_batches, calib_batches)
                    spec = "layerskip(" + ", ".join(f"{k}={v}" for k, v in options.items() if k != "measure_latency") + ")"
                    print(f"bench_layerskip: {spec}", file=sys.stderr, flush=True)
                    model = copy_model(loaded.model)
                    start = time.perf_counter()
                    report = LayerSkip(**options).apply(model, PassContext(loaded=loaded, calibration=calib))
                    seconds = time.perf_counter() - start
                    path = Path(tmp) / "skip.onnx"
                    save_onnx(model, path)
                    session = create_session(path, threads)
                    row = {"unit": unit, "score": score, "count": count, "spec": spec, "pass_seconds": seconds,
                           "removed": [r["label"] for r in report.details["removed"]],
                           "removed_influence": [r["influence"] for r in report.details["removed"]],
                           "params_before": report.details["params_before"], "params_after": report.details["params_after"],
                           "perplexity": perplexity(session, evaluation), "latency": _measure(base, session, feeds, repeats)}
                    if "loss" in report.details:
                        loss = report.details["loss"]
                        row["loss"] = {k: loss[k] for k in ("metric", "baseline", "batches", "evaluations", "shortlist_size")}
                        row["loss"]["after"] = [r["loss_after"] for r in report.details["removed"]]
                    if not any(r.get("influence_ranking") for r in rows if r["unit"] == unit):
                        row["influence_ranking"] = sorted(((c["label"], c["influence"]) for c in report.details["candidates"]),
                                                          key=lambda item: item[1])
                    rows.append(row)
                    del session
                    print(f"bench_layerskip:   perplexity {row['perplexity']:.3f}, removed {', '.join(row['removed'])}",
                          file=sys.stderr, flush=True)
    return {"model": "SmolLM2-135M", "source": loaded.source, "baseline_perplexity": baseline,
            "calibration": calib.source, "evaluation": evaluation.source, "calib_batches": calib_batches,
            "eval_batches": eval_batches, "loss_batches": loss_batches, "repeats": repeats,
            "feeds": {label: {k: list(v.shape) for k, v in feed.items()} for label, feed in feeds.items()},
            "machine": machine_description(threads), "load_average": {"start": load_before, "end": _load_average()},
            "versions": versions(), "results": rows}


def remeasure(report: dict[str, Any], folder: Path, repeats: int = 10, threads: int | None = None) -> dict[str, Any]:
    """Time every configuration of an earlier ``report`` again, all in one interleaved
    `measure_latency` call per feed with the fp32 model (no scoring: each model is rebuilt by
    removing the units the report names). For a quieter or more comparable timing than the
    per-configuration pairs of `run`; adds ``latency_remeasured`` to each row."""
    from slimc.backends.onnxruntime import create_session, machine_description, measure_latency
    from slimc.onnx_io import copy_model, save_onnx
    from slimc.passes.skip import blocks
    from slimc.passes.skip.layerskip import rewire
    from slimc.tools.bench_quant import _load_average, smollm2

    load_before = _load_average()
    case = smollm2(folder, 1, report["eval_batches"])
    loaded = case.load()
    _, evaluation = case.data(loaded)
    feeds = case.feeds(loaded, evaluation)
    with tempfile.TemporaryDirectory(prefix="slimc-bench-layerskip-") as tmp:
        save_onnx(loaded.model, Path(tmp) / "fp32.onnx")
        sessions = {"fp32": create_session(Path(tmp) / "fp32.onnx", threads)}
        for k, row in enumerate(report["results"]):
            model = copy_model(loaded.model)
            units = {u.label: u for u in blocks.analyse(model).units(row["unit"])}
            missing = [label for label in row["removed"] if label not in units]
            if missing:
                raise SystemExit(f"--remeasure: the export has no {row['unit']} unit(s) {', '.join(missing)}")
            rewire(model, [units[label] for label in row["removed"]])
            save_onnx(model, Path(tmp) / f"{k}.onnx")
            sessions[str(k)] = create_session(Path(tmp) / f"{k}.onnx", threads)
            del model
        for label, feed in feeds.items():
            stats = measure_latency(sessions, feed, warmup=2, repeats=repeats, rounds=min(5, repeats), budget_s=1e6)
            base = stats["fp32"].median_ms
            for k, row in enumerate(report["results"]):
                row.setdefault("latency_remeasured", {})[label] = {
                    "fp32_ms": base, "ms": stats[str(k)].median_ms, "speedup": base / stats[str(k)].median_ms}
    report["remeasured"] = {"repeats": repeats, "machine": machine_description(threads),
                            "load_average": {"start": load_before, "end": _load_average()}}
    return report


def markdown(report: dict[str, Any]) -> str:
    """The table (one row per configuration, fp32 first), the per-count loss-vs-influence
    comparison, and the setup."""
    feeds = list(report["feeds"])
    head = " | ".join(f"{label} speed-up" for label in feeds)
    lines = [
        f"Layer skip on {report['model']} ({report['source']}): perplexity on held-out Wikipedia, ONNX Runtime CPU "
        "latency vs the unmodified model",
        "",
        f"| unit | score | removed | perplexity | ppl ratio | {head} | params | pass s | removed units |",
        "|---|---|---:|---:|---:|" + "---:|" * len(feeds) + "---:|---:|---|",
        f"| - | fp32 | 0 | {report['baseline_perplexity']:.3f} | 1.000 | " + " | ".join("1.00" for _ in feeds)
        + " | - | - | - |",
    ]
    for r in report["results"]:
        timing = r.get("latency_remeasured") or r["latency"]
        speed = " | ".join(f"{timing[label]['speedup']:.2f}" for label in feeds)
        params = f"{r['params_after'] / 1e6:.1f}M"
        removed = ", ".join(label.rsplit(".", 1)[-1] for label in r["removed"])
        lines.append(f"| {r['unit']} | {r['score']} | {r['count']} | {r['perplexity']:.3f} | "
                     f"{r['perplexity'] / report['baseline_perplexity']:.3f} | {speed} | {params} | {r['pass_seconds']:.0f} | "
                     f"{removed} |")
    lines += ["", "Loss vs influence (perplexity, lower is better):", ""]
    by_key = {(r["unit"], r["score"], r["count"]): r for r in report["results"]}
    for (unit, score, count), r in by_key.items():
        other = by_key.get((unit, "influence", count))
        if score == "loss" and other is not None:
            verdict = "loss <= influence" if r["perplexity"] <= other["perplexity"] else "loss > influence"
            lines.append(f"- {unit} x{count}: loss {r['perplexity']:.3f} vs influence {other['perplexity']:.3f} ({verdict})")
    feeds_text = "; ".join(f"{label}: " + ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in shapes.items())
                           for label, shapes in report["feeds"].items())
    load = report.get("load_average") or {}
    lines += [
        "",
        f"Calibration: {report['calibration']}. Evaluation: {report['evaluation']}. Greedy loss search: perplexity on "
        f"the first {report['loss_batches']} calibration batches, shortlist 2N+2 lowest-influence units. "
        "protect_first=1, protect_last=1 (30 units each: 28 removable).",
        f"Latency: batch 1 ({feeds_text}); fp32 and each configuration measured interleaved, median of "
        f"{report['repeats']} runs; speed-up = fp32 / configuration. The decode row is the model run on one token "
        "(the export has no KV cache). Removed units: layer indices (model.model.layers.N), '/mlp' and '/attention' "
        "for sub-layers.",
        f"Machine: {report['machine']}. Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
        + (f". Load average (1/5/15 min) at start {'/'.join(map(str, load['start']))}, at end "
           f"{'/'.join(map(str, load['end']))}: another process may share the cores, so ratios are noisy."
           if load.get("start") and load.get("end") else "."),
    ]
    again = report.get("remeasured")
    if again:
        load = again.get("load_average") or {}
        lines.append(
            f"The speed-ups in the table were measured again after the run (`--remeasure`): fp32 and every "
            f"configuration in one interleaved call per feed, median of {again['repeats']} runs"
            + (f", load average at start {'/'.join(map(str, load['start']))}, at end {'/'.join(map(str, load['end']))}"
               if load.get("start") and load.get("end") else "")
            + "; the per-configuration pairs of the run itself are the JSON's `latency`.")
    return "\n".join(lines) + "\n"


def _ints(text: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--counts takes whole numbers separated by commas, got {text!r}")
    if not values or min(values) < 1:
        parser.error("--counts needs at least one count >= 1")
    return values


def main(argv: list[str] | None = None) -> int:
    from slimc.tools import comma_names

    parser = argparse.ArgumentParser(prog="python -m slimc.tools.bench_layerskip", description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="units to remove, comma-separated (default 2,4,6)")
    parser.add_argument("--units", default=",".join(DEFAULT_UNITS),
                        help=f"comma-separated, from: {', '.join(UNITS)} (default {','.join(DEFAULT_UNITS)})")
    parser.add_argument("--scores", default=",".join(SCORES), help=f"comma-separated, from: {', '.join(SCORES)}")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 4x128 tokens (default 4)")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out evaluation batches of 4x128 tokens (default 4)")
    parser.add_argument("--loss-batches", type=int, default=2,
                        help="calibration batches each greedy loss evaluation runs (default 2; bounds the cost)")
    parser.add_argument("--repeats", type=int, default=10, help="timed ORT runs per model and feed (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    parser.add_argument("--data", type=Path, default=Path("slimc-data"), help="folder for the text files")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown table here")
    parser.add_argument("--remeasure", type=Path,
                        help="re-time the configurations of this earlier JSON report (no scoring) and rewrite its table")
    args = parser.parse_args(argv)
    counts = _ints(args.counts, parser)
    units = comma_names(args.units, UNITS, "unit(s)", parser)
    scores = comma_names(args.scores, SCORES, "score(s)", parser)
    for path in (args.out, args.markdown):
        if path is not None and not path.parent.is_dir():
            parser.error(f"{path}: folder {path.parent} does not exist")
    if min(args.calib_batches, args.eval_batches, args.loss_batches, args.repeats) < 1:
        parser.error("--calib-batches, --eval-batches, --loss-batches and --repeats must be at least 1")
    if args.remeasure is not None:
        if not args.remeasure.is_file():
            parser.error(f"--remeasure: {args.remeasure} is not a file")
        report = remeasure(json.loads(args.remeasure.read_text()), args.data, args.repeats, args.threads)
    else:
        report = run(args.data, counts, units, scores, args.calib_batches, args.eval_batches, args.loss_batches,
                     args.repeats, args.threads)
    from slimc.tools import write_results

    write_results(report, markdown(report), args.out, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
