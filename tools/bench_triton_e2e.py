"""End-to-end torch-backend benchmark: SmolLM2-135M float, int8 and int4 as lowered torch modules.

    python -m slimc.tools.bench_triton_e2e [--out benchmarks/kernels/smollm2_e2e.json] [--smoke]

Each model is compiled by slimc (``backend="triton"`` on CUDA: its quantized matmuls run as Triton
kernels) and timed in torch eager and under ``torch.compile``: a prefill of 1 x 128 tokens
(tokens/s = 128 / time) and a one-token step (1 x 1: the matmul work of a decode step; slimc's
export has no KV cache, so attention over earlier tokens is not part of it). Ratios are against
the float model lowered the same way, in the same run. ``--smoke`` runs a tiny random Llama on the
CPU (kernels as PyTorch references) so CI keeps the tool working where there is no GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from slimc.tools import write_json, write_results

SPECS = {"float": "cleanup", "int8": "smoothquant,int8(mode=dynamic, force=true)", "int4": "int4(force=true)"}


def _time(fn, cuda: bool, repeats: int) -> float:
    import torch

    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _decode_step(gm, first: dict[str, Any], prompt: dict[str, Any]) -> dict[str, Any]:
    """One new token's feed after ``first``: a KV-cache graph gets the prefill's present tensors as its
    past (what a decode step costs); a graph without a cache gets the whole prefix plus the token."""
    import numpy as np

    from slimc import kvcache
    from slimc.backends.triton import module as tm

    outputs = dict(zip(gm.output_names, tm.run(gm, first), strict=True))
    token = np.argmax(outputs[gm.output_names[0]][:, -1:], axis=-1).astype(np.int64)
    ids = np.concatenate([np.asarray(prompt["input_ids"]), token], axis=1)
    mask = np.ones(ids.shape, np.int64)
    pairs = kvcache.cache_pairs(gm.input_names, name=lambda item: item)
    if not pairs:
        return {"input_ids": ids, "attention_mask": mask}
    step = {"input_ids": token, "attention_mask": mask, "position_ids": kvcache.position_ids(mask, 1)}
    for index, key, value in pairs:
        step[key], step[value] = outputs[f"present.{index}.key"], outputs[f"present.{index}.value"]
    return step


def run(smoke: bool, out: Path | None, repeats: int = 20) -> dict[str, Any]:
    import numpy as np
    import torch

    import slimc
    from slimc import data
    from slimc.backends.triton import module as tm

    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --smoke for the CPU check, or on a GPU machine")
    if smoke:
        import transformers as tf

        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, use_cache=False, attn_implementation="eager")
        model = tf.LlamaForCausalLM(config).eval()
        ids = torch.randint(3, 128, (1, 16))
        source = slimc.load(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        calib, name, seq = data.synthetic(source.inputs, n_batches=2, seed=1), "tiny random Llama (smoke run)", 16
    else:
        from slimc.tools import bench_quant

        case = bench_quant.smollm2(Path("slimc-data"), calib_batches=4, eval_batches=2)
        source = case.load()
        calib, _ = case.data(source)
        name, seq = "SmolLM2-135M-Instruct (real weights)", 128
    prompt = {"input_ids": np.random.default_rng(0).integers(3, 100, (1, seq)), "attention_mask": np.ones((1, seq), np.int64)}
    rows = []
    result = {"model": name, "device": torch.cuda.get_device_name() if not smoke else "CPU smoke run",
              "torch": torch.__version__, "rows": rows}
    for label, spec in SPECS.items():
        compiled = slimc.compile(source, spec, calibration=calib if "smoothquant" in spec else None,
                                 measure_latency=False, backend="triton", device=device)
        gm = compiled.module
        first = data.complete_cache_inputs(prompt, compiled.loaded.inputs)
        step = _decode_step(gm, first, prompt)
        for mode in ("eager", "torch.compile"):
            module = gm if mode == "eager" else torch.compile(gm)
            for what, feed in (("prefill", first), ("step 1 token", step)):
                args = tm.feed(gm, feed)

                def call(module=module, args=args):
                    with torch.no_grad():
                        module(*args)

                seconds = _time(call, device == "cuda", repeats)
                rows.append({"model": label, "mode": mode, "what": what, "ms": seconds * 1e3,
                             "tokens_per_s": (feed["input_ids"].shape[1] if what == "prefill" else 1) / seconds,
                             "kernels": dict(compiled.receipt.backend["lowering"]["kernels"])})
        write_json(result, out)
    base = {(r["mode"], r["what"]): r["ms"] for r in rows if r["model"] == "float"}
    for r in rows:
        r["speedup_vs_float"] = base[(r["mode"], r["what"])] / r["ms"]
    write_json(result, out)
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} on {result['device']}, torch {result['torch']}", "",
             "| model | mode | feed | ms | tokens/s | vs float |", "|---|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['mode']} | {r['what']} | {r['ms']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['speedup_vs_float']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimc.tools.bench_triton_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/kernels/smollm2_e2e.json"))
    p.add_argument("--markdown", type=Path)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    result = run(args.smoke, args.out, args.repeats)
    write_results(result, markdown(result), None, args.markdown)  # run() wrote the JSON
    return 0


if __name__ == "__main__":
    sys.exit(main())
