"""Edge-target benchmark: every target x (dense, pruned, int8, pruned+int8), run in the target runtime.

    python -m slimc.tools.bench_targets [--models efficientnet minilm] [--targets onnx ort-mobile ...]
                                        [--out benchmarks/targets/targets.json] [--markdown FILE]

For each real model (EfficientNet-Lite0, all-MiniLM-L6-v2) each configuration is compiled once
(slimc's passes, static shapes pinned for the edge runtimes), then exported to every target
with `slimc.export.export`: the artifact is loaded in the target's runtime on this CPU, compared
on held-out data with the *dense input model* run in ORT (top-1 agreement / embedding cosine:
what the whole compile cost on that runtime), and timed interleaved with the dense model
converted to the same target (batch 1, median). A target that refuses a configuration (int8 on
ncnn or LiteRT, an op its converter lacks) gets its one-line reason instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from slimc.tools import write_json, write_results

CONFIGS = {
    # EfficientNet-Lite0 barely survives channel pruning without fine-tuning (docs/passes/prune.md): 5% with FLAP
    # round_to=8: widths that are not multiples of 8 lose x86's blocked (NCHWc) conv kernels and ncnn's packing
    "efficientnet": {"dense": "cleanup", "pruned": "prune(ratio=0.05, importance=flap)", "int8": "int8(force=true)",
                     "pruned+int8": "prune(ratio=0.05, importance=flap),int8(force=true)",
                     "pruned round_to=8": "prune(ratio=0.05, importance=flap, round_to=8)",
                     "pruned round_to=8+int8": "prune(ratio=0.05, importance=flap, round_to=8),int8(force=true)"},
    "minilm": {"dense": "cleanup", "pruned": "prune(ratio=0.2, target=ffn, importance=flap, compensate=bias)",
               "int8": "int8(force=true)",
               "pruned+int8": "prune(ratio=0.2, target=ffn, importance=flap, compensate=bias),int8(force=true)"},
}
SHAPES = {"efficientnet": "x=1x3x224x224", "minilm": "input_ids=1x128,attention_mask=1x128,token_type_ids=1x128"}
TARGETS = ("onnx", "ort-mobile", "openvino", "ncnn", "tflite", "executorch")


def _case(name: str, folder: Path):
    from slimc.tools import bench_quant

    if name == "efficientnet":
        return bench_quant.efficientnet(calib_batches=4, eval_batches=4)
    return bench_quant.minilm(folder, calib_batches=4, eval_batches=4)


def _metric(fidelity: dict[str, Any]) -> dict[str, Any]:
    keys = ("top1_agreement", "embedding_cosine", "cosine", "sqnr_db", "max_abs_error")
    return {k: fidelity.get(k) for k in keys if k in fidelity}


def bench_model(name: str, targets: list[str], folder: Path, work: Path, only: list[str] | None = None) -> list[dict[str, Any]]:
    import slimc
    from slimc.backends.onnxruntime import create_session, run
    from slimc.backends.targets import chunked
    from slimc.errors import SlimcError
    from slimc.export import ExportOptions, export
    from slimc.onnx_io import save_onnx
    from slimc.passes.quant.int8 import STATIC_TARGETS

    case = _case(name, folder)
    configs = {c: s for c, s in CONFIGS[name].items() if only is None or c in only or c == "dense"}
    loaded = case.load()
    calib, evaluation = case.data(loaded)
    paths: dict[str, Path] = {}
    rows = []
    for config, spec in configs.items():
        print(f"bench_targets: {name} {config}: {spec}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = slimc.compile(loaded, spec, calibration=calib, evaluation=evaluation, static_shapes=SHAPES[name],
                               measure_latency=False)
        paths[config] = work / f"{name}-{config}.onnx"
        save_onnx(result.model, paths[config])
        compile_s = time.perf_counter() - start
        sessions = {c: create_session(p) for c, p in ((config, paths[config]), ("dense", paths["dense"]))}
        runs = tuple(chunked(lambda b, s=sessions[c]: run(s, b), 1) for c in (config, "dense"))
        names = [o.name for o in sessions[config].get_outputs()]
        for target in targets:
            print(f"bench_targets:   -> {target}", file=sys.stderr, flush=True)
            row: dict[str, Any] = {"model": name, "config": config, "spec": spec, "target": target,
                                   "compile_seconds": round(compile_s, 1)}
            options = ExportOptions(target=target, static_shapes=SHAPES[name])
            start = time.perf_counter()
            try:
                if target in STATIC_TARGETS and "int8" in spec:
                    # int8 built for the target (static QDQ at 8 bits, what its runtime runs): compile again
                    r = slimc.compile(loaded, spec, calibration=calib, evaluation=evaluation, target=target,
                                      static_shapes=SHAPES[name]).receipt.target
                    row["spec"] = f"{spec} (compiled with --target {target})"
                else:
                    r = export(paths[config], paths["dense"], options, work, evalset=evaluation, task=loaded.task,
                               inputs=loaded.inputs, reference_runs=runs, output_names=names,
                               stem=f"{name}-{config}").report
            except SlimcError as exc:
                row["refused"] = str(exc).split(". Nothing was written")[0][:300]
            else:
                row.update(runtime=r["runtime"], bytes=r["bytes"], fidelity_vs_dense=_metric(r["fidelity_vs_input"]),
                           fidelity_vs_onnx=_metric(r["fidelity_vs_onnx"]), latency=r.get("latency"),
                           notes=r.get("notes") or None)
            row["export_seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    targets = list(dict.fromkeys(r["target"] for r in result["rows"]))
    lines = [f"Edge targets, measured in each target's runtime on {result['machine']}.", "",
             "| model | config | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    by = {(r["model"], r["config"], r["target"]): r for r in result["rows"]}
    for model, config in dict.fromkeys((r["model"], r["config"]) for r in result["rows"]):
        cells = []
        for t in targets:
            r = by.get((model, config, t))
            if r is None:
                cells.append("")
            elif "refused" in r:
                cells.append("refused: " + _short(r["refused"]))
            else:
                cells.append(_cell(r))
        lines.append(f"| {model} | {config} | " + " | ".join(cells) + " |")
    lines += ["", "Cell: fidelity vs the dense model in ORT (top-1 agreement for EfficientNet-Lite0, embedding "
              "cosine for MiniLM), artifact size, median latency at batch 1 in that runtime and the speed-up "
              "over the dense model converted to the same target (interleaved, same run)."]
    return "\n".join(lines) + "\n"


def _cell(r: dict[str, Any]) -> str:
    f = r["fidelity_vs_dense"]
    fid = (f"top-1 {f['top1_agreement']:.3f}" if "top1_agreement" in f else
           f"cos {f['embedding_cosine']:.4f}" if "embedding_cosine" in f else f"cos {f.get('cosine', 0):.4f}")
    lat = r.get("latency") or {}
    speed = f"{lat['after']['median_ms']:.1f} ms ({lat['speedup']:.2f}x)" if "speedup" in lat else "-"
    return f"{fid}, {r['bytes'] / 1e6:.1f} MB, {speed}"


def _short(reason: str) -> str:
    for key, text in (("QuantizeLinear", "int8 QDQ"), ("MatMulInteger", "int8 ops"), ("cannot convert node", "")):
        if key in reason and text:
            return f"{text} (see JSON)"
    return reason.split(": ", 1)[-1][:80].replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    from slimc.backends.onnxruntime import machine_description

    parser = argparse.ArgumentParser(prog="python -m slimc.tools.bench_targets", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--configs", nargs="+", help="only these configurations (dense always runs: the reference)")
    parser.add_argument("--merge", action="store_true", help="add the rows to --out's existing results (replacing equal cells)")
    parser.add_argument("--data", type=Path, default=Path("slimc-data"), help="folder for the text files")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/targets/targets.json"))
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"machine": machine_description(None).split(", onnxruntime")[0], "rows": []}
    if args.merge and args.out.exists():
        result = json.loads(args.out.read_text())
    with tempfile.TemporaryDirectory(prefix="slimc-bench-targets-") as tmp:
        for name in args.models:
            rows = bench_model(name, args.targets, args.data, Path(tmp), args.configs)
            if args.configs:  # the dense reference row is re-measured, but the table keeps the first one
                rows = [r for r in rows if r["config"] in args.configs]
            keys = {(r["model"], r["config"], r["target"]) for r in rows}
            result["rows"] = [r for r in result["rows"] if (r["model"], r["config"], r["target"]) not in keys] + rows
            write_json(result, args.out)  # kept after every model
    write_results(result, markdown(result), None, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
