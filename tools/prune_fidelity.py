"""Fidelity of `prune` on real pretrained models: the tables in docs/passes/prune.md come from this script.

    python -m slimc.tools.prune_fidelity [--models smollm2,minilm,efficientnet] [--out prune_fidelity.json]
                                         [--markdown prune_fidelity.md] [--eval-batches 12]

- SmolLM2-135M (causal LM): perplexity on held-out Wikipedia text (gensim test data), calibration
  on the Lee news corpus, at 20% and 40% FFN pruning and one of three KV groups removed per
  layer, for magnitude / wanda / flap, without and with bias compensation.
- all-MiniLM-L6-v2 (sentence encoder): embedding cosine to the dense model at 30% and 50%.
- EfficientNet-Lite0 (ImageNet classifier): top-1 agreement with the dense model on
  scikit-image photos with crops and flips (calibration on the other photos).

Every number is measured on held-out data against the dense model in the same run; the
models are exported once and each configuration is compiled from that export.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SMOLLM2 = [("ffn 20%", "ratio=0.2, target=ffn"), ("ffn 40%", "ratio=0.4, target=ffn"),
           ("1 of 3 KV groups", "ratio=0.34, target=kv_heads")]
MINILM = [("30%", "ratio=0.3"), ("50%", "ratio=0.5")]
EFFICIENTNET = [("channels 5%", "ratio=0.05, target=channels"), ("channels 10%", "ratio=0.1, target=channels"),
                ("channels 20%", "ratio=0.2, target=channels")]
METHODS = [("magnitude", "none"), ("magnitude", "bias"), ("wanda", "none"), ("wanda", "bias"), ("flap", "none"), ("flap", "bias")]
QUICK = [("magnitude", "none"), ("wanda", "none"), ("wanda", "bias"), ("flap", "none"), ("flap", "bias")]


def _text_data(loaded, eval_batches: int, folder: Path):
    from slimc import data, datasets

    lee, wiki = datasets.text_files(folder)
    calib = data.load(lee, loaded, seq_len=128, batch_size=4, max_batches=8, role="calibration")
    evaluation = data.load(wiki, loaded, seq_len=128, batch_size=4, max_batches=eval_batches, role="evaluation")
    return calib, evaluation


def _run(loaded, spec: str, calib, evaluation) -> dict:
    import slimc

    start = time.perf_counter()
    result = slimc.compile(loaded, f"prune({spec})", calibration=calib, evaluation=evaluation, measure_latency=False)
    r = result.receipt
    metrics = r.fidelity["metrics"]
    keep = ("perplexity_reference", "perplexity", "perplexity_ratio", "cosine", "cosine_min", "top1_agreement", "sqnr_db")
    return {
        "spec": f"prune({spec})",
        "params_ratio": r.before["params"] / r.after["params"],
        "macs_ratio": r.before["macs"] / max(r.after["macs"], 1),
        "metrics": {k: metrics[k] for k in keep if k in metrics},
        "seconds": round(time.perf_counter() - start, 1),
    }


def _model(name: str, folder: Path, eval_batches: int):
    from slimc import datasets, frontends
    from slimc.tools import models

    if name == "smollm2":
        loaded = frontends.load(models.smollm2_gguf())
        return loaded, SMOLLM2, METHODS, *_text_data(loaded, eval_batches, folder)
    if name == "minilm":
        loaded = frontends.load(models.minilm_path())
        return loaded, MINILM, METHODS, *_text_data(loaded, eval_batches, folder)
    import torch

    loaded = frontends.load(models.efficientnet_lite0(), torch.randn(1, 3, 224, 224))
    calib = datasets.photo_dataset(224, n=32, seed=1, split="calibration")
    evaluation = datasets.photo_dataset(224, n=32, seed=0, split="evaluation")
    return loaded, EFFICIENTNET, METHODS, calib, evaluation


def run(names: list[str], folder: Path, eval_batches: int, quick: bool = False) -> dict:
    results: dict = {}
    for name in names:
        loaded, points, methods, calib, evaluation = _model(name, folder, eval_batches)
        if quick:
            points, methods = points[::2], QUICK
        rows = []
        for label, spec in points:
            for importance, comp in methods:
                row = _run(loaded, f"{spec}, importance={importance}, compensate={comp}", calib, evaluation)
                row.update(point=label, importance=importance, compensate=comp)
                print(name, label, importance, comp, row["metrics"], f"{row['seconds']} s", flush=True)
                rows.append(row)
        results[name] = {"calibration": calib.source, "evaluation": evaluation.source, "rows": rows}
    return results


def markdown(results: dict) -> str:
    metric = {"smollm2": ("perplexity", "perplexity (dense {ref:.2f})"), "minilm": ("cosine", "embedding cosine"),
              "efficientnet": ("top1_agreement", "top-1 agreement")}
    lines = []
    for name, res in results.items():
        key, title = metric[name]
        ref = next((r["metrics"].get("perplexity_reference") for r in res["rows"]), None) or 0.0
        points = list(dict.fromkeys(r["point"] for r in res["rows"]))
        lines += [f"**{name}** ({title.format(ref=ref)}; calibration: {res['calibration']}; evaluation: {res['evaluation']})", "",
                  "| importance | compensate | " + " | ".join(points) + " |", "|---|---|" + "---|" * len(points)]
        for importance, comp in dict.fromkeys((r["importance"], r["compensate"]) for r in res["rows"]):
            cells = []
            for p in points:
                row = next(r for r in res["rows"] if r["point"] == p and r["importance"] == importance and r["compensate"] == comp)
                cells.append(f"{row['metrics'].get(key, float('nan')):.4g} (params /{row['params_ratio']:.2f})")
            lines.append(f"| {importance} | {comp} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimc.tools.prune_fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,minilm,efficientnet")
    p.add_argument("--out", type=Path, default=Path("prune_fidelity.json"))
    p.add_argument("--markdown", type=Path, default=Path("prune_fidelity.md"))
    p.add_argument("--data", type=Path, default=Path("slimc-data"), help="folder for the text files")
    p.add_argument("--eval-batches", type=int, default=12, help="held-out batches of 4 x 128 tokens (text models)")
    p.add_argument("--quick", action="store_true", help="first and last point only, 5 method/compensation pairs")
    args = p.parse_args(argv)
    results = run(args.models.split(","), args.data, args.eval_batches, args.quick)
    args.out.write_text(json.dumps(results, indent=2))
    args.markdown.write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
