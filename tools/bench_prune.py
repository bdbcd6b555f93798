"""Side-by-side benchmark: slimc's ``prune`` pass against Torch-Pruning on the same models.

Run::

    python -m slimc.tools.bench_prune [--models resnet50,bert-base] [--ratio 0.5] [--repeats 20]
                                      [--threads N] [--out results.json] [--markdown results.md]

Needs the bench-only dependency Torch-Pruning (``pip install torch-pruning``), plus torch and
transformers. What it does, per model (random weights, seeded; no downloads):

- ``resnet50``: ``ResNetForImageClassification(ResNetConfig())`` (the defaults are ResNet-50's
  bottleneck layout, with transformers' default 2-label head), input ``pixel_values`` 1x3x224x224;
- ``bert-base``: ``BertModel(BertConfig())`` with eager attention, ``input_ids`` +
  ``attention_mask`` of batch 1 x sequence 128;
- ``bert-base-sdpa``: the same model with transformers' default SDPA attention, exported as a user
  would: ``torch.onnx.export(dynamo=True)`` at its defaults (onnxscript-optimised; run-time
  ``Shape -> Reshape`` of K, split q/k scaling, ``Where`` masks) and loaded from the file.

1. baseline: the unmodified module exported to ONNX by slimc's PyTorch front end (``bert-base-sdpa``:
   by ``torch.onnx.export`` at its defaults, as above);
2. Torch-Pruning: ``MagnitudePruner`` (group L2 magnitude, ``pruning_ratio=ratio``, uniform per
   layer, ``global_pruning=False``). ResNet: the classifier is left alone. BERT: as Torch-Pruning's
   ``examples/transformers/prune_hf_bert.py``: whole heads removed (``num_heads`` per q/k/v,
   ``prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio``), hidden width and
   FFN pruned by ``ratio``, the pooler left alone; heads/sizes are written back to the attention
   modules and the config so the forward runs. The pruned module is exported like the baseline;
3. slimc: ``slimc.compile(baseline, passes=["prune(ratio=R, importance=magnitude)"])``; for BERT
   followed by ``prune(ratio=R, target=hidden, change_interface=true)``, as Torch-Pruning prunes
   the hidden width too. ``--no-hidden``: ``prune(ratio=R)`` alone (heads and FFN), Torch-Pruning
   not run (it prunes the hidden width with them, so it is no comparison).

Measured: MACs and parameters with ``slimc.analysis`` on each ONNX graph (per sample), their
ratios baseline/pruned, ONNX Runtime CPU latency (all models in one ``measure_latency`` call:
same session options and threads, warm-up, alternating rounds, median) and its speedup
baseline/pruned, the speedup divided by the MACs ratio (how much of the MAC reduction the latency
shows), and each tool's own analysis + pruning time (export excluded: Torch-Pruning's
dependency graph + pruning step; slimc's pass time from its receipt). Timings are reported,
never asserted. Random weights make accuracy meaningless here; only cost is compared.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = ("torch-pruning", "slimc")


@dataclasses.dataclass
class Case:
    """One benchmark model: a seeded builder, its example inputs and how Torch-Pruning treats it."""

    name: str
    build: Callable[[], Any]  # -> a fresh nn.Module in eval mode, same weights every call
    example: dict[str, Any]  # input name -> torch.Tensor (batch 1)
    kind: str  # "cnn" (keep the classifier) or "bert" (head-aware attention pruning)
    export: str = "slimc"  # "slimc": slimc's PyTorch front end; "dynamo": torch.onnx.export at its defaults

    def feed(self) -> dict[str, np.ndarray]:
        return {name: t.numpy() for name, t in self.example.items()}


def resnet_case(config=None, size: int = 224, name: str = "resnet50") -> Case:
    import torch
    import transformers as tf

    config = config or tf.ResNetConfig()

    def build():
        torch.manual_seed(0)
        return tf.ResNetForImageClassification(config).eval()

    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return Case(name, build, {"pixel_values": pixels}, "cnn")


def bert_case(config=None, seq: int = 128, name: str = "bert-base", export: str = "slimc") -> Case:
    import torch
    import transformers as tf

    config = config or tf.BertConfig(attn_implementation="eager")

    def build():
        torch.manual_seed(0)
        return tf.BertModel(copy.deepcopy(config)).eval()  # pruning edits the config: keep ours intact

    ids = torch.randint(1, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    return Case(name, build, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "bert", export)


def bert_sdpa_case(config=None, seq: int = 128, name: str = "bert-base-sdpa") -> Case:
    """BERT-base with SDPA attention (transformers' default), exported by torch.onnx at its defaults."""
    import transformers as tf

    return bert_case(config or tf.BertConfig(attn_implementation="sdpa"), seq, name, export="dynamo")


CASES: dict[str, Callable[[], Case]] = {"resnet50": resnet_case, "bert-base": bert_case, "bert-base-sdpa": bert_sdpa_case}


def load_export(module, case: Case, folder: Path, label: str):
    """``module`` as an ONNX model slimc loaded: through slimc's front end, or (``export="dynamo"``)
    written by ``torch.onnx.export(dynamo=True)`` at its defaults (batch and sequence dynamic) and read
    back from the file, as a user's file would be."""
    import warnings

    import torch

    from slimc import frontends

    if case.export == "slimc":
        return frontends.load(module, case.example)
    path = folder / f"{label}-export.onnx"
    dim = torch.export.Dim
    axes = {0: dim("batch", max=64), 1: dim("seq", max=512)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (), str(path), kwargs=case.example, dynamo=True,
                          dynamic_shapes={name: axes for name in case.example}, external_data=False, verbose=False)
    return frontends.load(str(path))


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise SystemExit(
            "bench_prune needs Torch-Pruning, a bench-only dependency: pip install torch-pruning"
        ) from None
    return torch_pruning


def torch_pruning_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        return getattr(_torch_pruning(), "__version__", "unknown")


def prune_with_torch_pruning(module, case: Case, ratio: float) -> tuple[float, str]:
    """Prune ``module`` in place; returns (seconds of graph analysis + pruning, configuration)."""
    import torch

    tp = _torch_pruning()
    options: dict[str, Any] = {}
    start = time.perf_counter()
    if case.kind == "bert":
        attentions = [m for m in module.modules() if _is_self_attention(m)]
        num_heads = {lin: m.num_attention_heads for m in attentions for lin in (m.query, m.key, m.value)}
        options = dict(num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
                       ignored_layers=[module.pooler], output_transform=lambda out: out.pooler_output.sum())
        config = f"heads by group L2 (head_pruning_ratio={ratio}, head dims kept), hidden+FFN ratio {ratio}, pooler kept"
    else:
        classifier = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1:]
        options = dict(ignored_layers=classifier, output_transform=lambda out: out.logits.sum())
        config = f"channels by group L2, ratio {ratio} per layer, classifier kept"
    pruner = tp.pruner.MagnitudePruner(
        module, case.example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, global_pruning=False, **options,
    )
    pruner.step()
    if case.kind == "bert":
        _fix_attention_sizes(module, pruner.num_heads)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        module(**case.example)  # the pruned forward must still run
    return seconds, config


def _is_self_attention(module) -> bool:
    return all(hasattr(module, a) for a in ("query", "key", "value", "num_attention_heads", "attention_head_size"))


def _fix_attention_sizes(model, num_heads: dict) -> None:
    """After head pruning: per-module head counts/sizes, and the shared config to match."""
    heads = None
    for m in model.modules():
        if _is_self_attention(m) and m.query in num_heads:
            m.num_attention_heads = heads = num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
    config = getattr(model, "config", None)
    if config is not None and heads is not None:  # uniform per layer (global_pruning=False)
        config.num_attention_heads = heads
        config.hidden_size = model.embeddings.word_embeddings.embedding_dim
        config.intermediate_size = model.encoder.layer[0].intermediate.dense.out_features


def prune_with_slimc(loaded, ratio: float, kind: str = "cnn", hidden: bool = True) -> dict[str, Any]:
    """slimc's ``prune`` pass on the baseline export (its time from the receipt, export excluded)."""
    import slimc

    spec = f"prune(ratio={ratio}, importance=magnitude)"
    if kind == "bert" and hidden:  # as Torch-Pruning does: heads and FFN, then the hidden width (the output changes)
        spec += f",prune(ratio={ratio}, importance=magnitude, target=hidden, change_interface=true)"
    start = time.perf_counter()
    try:
        result = slimc.compile(loaded, passes=spec, measure_latency=False, verify=True)
    except slimc.SlimcError as exc:
        return {"status": "failed", "note": f"{type(exc).__name__}: {exc}"}
    wall = time.perf_counter() - start
    seconds = sum(report.seconds for report in result.receipt.passes)
    summary = "; ".join(report.summary for report in result.receipt.passes)
    return {"status": "ok", "model": result.model, "prune_seconds": seconds, "compile_seconds": wall,
            "config": spec, "note": summary}


def graph_stats(model, feed: dict[str, np.ndarray]) -> dict[str, int]:
    """MACs per sample (at the feed's sizes) and parameters of an onnx_ir model."""
    from slimc.analysis import bind_sizes, count_macs, count_params

    macs, unresolved = count_macs(model, bind_sizes(model, feed))
    params, weight_bytes = count_params(model)
    return {"macs": macs, "macs_unresolved_nodes": unresolved, "params": params, "weight_bytes": weight_bytes}


def _torch_pruning_entry(case: Case, module, ratio: float, folder: Path, feed) -> tuple[dict[str, Any], Any]:
    """Torch-Pruning on its own copy of the same weights: (report entry, pruned ONNX model or None)."""
    try:
        pruned = copy.deepcopy(module)
        seconds, config = prune_with_torch_pruning(pruned, case, ratio)
        model = load_export(pruned, case, folder, "torch-pruning").model
    except Exception as exc:  # report and go on: one tool failing must not hide the other
        return {"status": "failed", "note": f"{type(exc).__name__}: {exc}"}, None
    return {"status": "ok", "prune_seconds": seconds, "config": config, **graph_stats(model, feed)}, model


def bench_model(case: Case, ratio: float, repeats: int, threads: int | None = None,
                workdir: str | Path | None = None, hidden: bool = True) -> dict[str, Any]:
    """Baseline, Torch-Pruning and slimc for one model: stats, latency, ratios, pruning times.
    ``hidden=False``: slimc's ``prune(ratio)`` alone (BERT: heads and FFN), Torch-Pruning not run."""
    from slimc.backends import onnxruntime as ort_backend
    from slimc.onnx_io import save_onnx

    with tempfile.TemporaryDirectory(prefix="bench-prune-", dir=workdir) as tmp:
        feed = case.feed()
        module = case.build()
        baseline = load_export(module, case, Path(tmp), "baseline")
        paths = {"baseline": Path(tmp) / "baseline.onnx"}
        save_onnx(baseline.model, paths["baseline"])
        entries: dict[str, dict[str, Any]] = {"baseline": {"status": "ok", **graph_stats(baseline.model, feed)}}

        if hidden or case.kind != "bert":
            entries["torch-pruning"], model = _torch_pruning_entry(case, module, ratio, Path(tmp), feed)
            if model is not None:
                paths["torch-pruning"] = Path(tmp) / "torch_pruning.onnx"
                save_onnx(model, paths["torch-pruning"])
        else:
            entries["torch-pruning"] = {"status": "not run", "note": "--no-hidden (Torch-Pruning's BERT example prunes "
                                                                    "the hidden width with heads and FFN)"}
        del module
        entries["slimc"] = prune_with_slimc(baseline, ratio, case.kind, hidden)
        if entries["slimc"]["status"] == "ok":
            model = entries["slimc"].pop("model")
            entries["slimc"].update(graph_stats(model, feed))
            paths["slimc"] = Path(tmp) / "slimc.onnx"
            save_onnx(model, paths["slimc"])

        sessions = {name: ort_backend.create_session(path, threads) for name, path in paths.items()}
        latency = ort_backend.measure_latency(sessions, feed, repeats=repeats, rounds=min(5, repeats), budget_s=1e6)
        del sessions

    for name, stats in latency.items():
        entries[name]["latency"] = stats.to_json()
    base = entries["baseline"]
    for name in TOOLS:
        entry = entries[name]
        if entry["status"] == "ok":
            entry["macs_ratio"] = base["macs"] / entry["macs"] if entry["macs"] else None
            entry["params_ratio"] = base["params"] / entry["params"] if entry["params"] else None
            entry["speedup"] = base["latency"]["median_ms"] / entry["latency"]["median_ms"]
            entry["speedup_per_macs_ratio"] = entry["speedup"] / entry["macs_ratio"] if entry["macs_ratio"] else None
    shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in feed.items())
    return {"model": case.name, "input": shapes, "results": entries}


def run(cases: list[Case], ratio: float = 0.5, repeats: int = 20, threads: int | None = None,
        hidden: bool = True) -> dict[str, Any]:
    """The whole benchmark: one `bench_model` per case, plus versions and the machine."""
    import onnxruntime
    import torch

    from slimc import __version__
    from slimc.backends.onnxruntime import machine_description

    if not 0 < ratio < 1:
        raise SystemExit(f"--ratio must be between 0 and 1 (exclusive), got {ratio}")
    if repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {repeats}")
    return {
        "ratio": ratio,
        "repeats": repeats,
        "machine": machine_description(threads),
        "versions": {"slimc": __version__, "torch-pruning": torch_pruning_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "hidden": hidden,
        "models": [bench_model(case, ratio, repeats, threads, hidden=hidden) for case in cases],
    }


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    """A Markdown table of every model x (baseline, tools), with the machine and versions."""
    lines = [
        f"Structured pruning at ratio {report['ratio']}: slimc `prune` vs Torch-Pruning "
        f"{report['versions']['torch-pruning']}",
        "",
        f"Machine: {report['machine']}. Latency: ONNX Runtime CPU, batch 1, median of "
        f"{max(3, report['repeats'])} runs per model in alternating rounds. Ratios are baseline / pruned.",
        "",
        "| model | tool | GMACs | MACs ratio | params (M) | params ratio | ORT median (ms) | speedup | speedup ÷ MACs ratio "
        "| prune time (s) | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for item in report["models"]:
        for name in ("baseline", *TOOLS):
            e = item["results"][name]
            if e["status"] != "ok":
                lines.append(f"| {item['model']} | {name} | - | - | - | - | - | - | - | - | {e['status']}: {e['note']} |")
                continue
            macs = e["macs"] / 1e9
            params = e["params"] / 1e6
            notes = e.get("config", f"input {item['input']}")
            if e.get("macs_unresolved_nodes"):
                notes += f"; {e['macs_unresolved_nodes']} nodes' MACs unresolved"
            lines.append(
                f"| {item['model']} | {name} | {macs:.3f} | {_fmt(e.get('macs_ratio'), '.2f')} | {params:.2f} | "
                f"{_fmt(e.get('params_ratio'), '.2f')} | {e['latency']['median_ms']:.2f} | "
                f"{_fmt(e.get('speedup'), '.2f')} | {_fmt(e.get('speedup_per_macs_ratio'), '.2f')} | "
                f"{_fmt(e.get('prune_seconds'), '.2f')} | {notes} |"
            )
    return "\n".join(lines) + "\n"


def prune_time_scaling(depths: list[int], ratio: float, repeats: int = 3) -> list[dict[str, Any]]:
    """Analysis + pruning time of slimc's ``prune`` (export excluded) on BERT-base at several depths."""
    import onnx_ir as ir
    import transformers as tf

    from slimc import frontends
    from slimc.passes.prune.prune_pass import Prune
    from slimc.pipeline import PassContext

    rows = []
    for depth in depths:
        case = bert_case(tf.BertConfig(num_hidden_layers=depth, attn_implementation="eager"), name=f"bert-base-{depth}")
        exported = frontends.load(case.build(), case.example).model
        proto = ir.serde.serialize_model(exported)
        times = []
        for _ in range(repeats):
            model = ir.serde.deserialize_model(proto)
            start = time.perf_counter()
            Prune(ratio=ratio).apply(model, PassContext())
            times.append(time.perf_counter() - start)
        rows.append({"layers": depth, "nodes": len(exported.graph), "seconds": sorted(times)[len(times) // 2]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slimc.tools.bench_prune", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,bert-base", help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio for both tools (default 0.5)")
    parser.add_argument("--repeats", type=int, default=20, help="timed ORT runs per model (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown table here")
    parser.add_argument("--no-hidden", action="store_true",
                        help="BERT: prune(ratio) alone (heads and FFN), without the hidden width; Torch-Pruning not run")
    parser.add_argument("--scaling", help="instead: time slimc's analysis + pruning on BERT-base at these depths, e.g. 4,12,24")
    args = parser.parse_args(argv)
    if args.scaling:
        rows = prune_time_scaling([int(d) for d in args.scaling.split(",")], args.ratio)
        table = "\n".join(["| BERT-base layers | nodes | analysis + pruning (s, median of 3) |", "|---:|---:|---:|",
                           *(f"| {r['layers']} | {r['nodes']} | {r['seconds']:.2f} |" for r in rows)]) + "\n"
        return _emit(table, rows, args)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        parser.error(f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    for path in (args.out, args.markdown):
        if path is not None and not path.parent.is_dir():
            parser.error(f"{path}: folder {path.parent} does not exist")
    if not args.no_hidden or "resnet50" in names:
        _torch_pruning()  # fail before any slow build when the dependency is missing
    report = run([CASES[n]() for n in names], args.ratio, args.repeats, args.threads, hidden=not args.no_hidden)
    return _emit(markdown(report), report, args)


def _emit(table: str, data: Any, args: argparse.Namespace) -> int:
    """Print the table; write it (--markdown) and the data (--out) where asked."""
    print(table)
    if args.out:
        args.out.write_text(json.dumps(data, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
