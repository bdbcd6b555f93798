"""Draw the benchmark plots of the docs from the JSON results in benchmarks/ (no model is run).

    python -m slimc.tools.plot_benchmarks                 # writes docs/img/*.png
    python -m slimc.tools.plot_benchmarks --out FOLDER

Plots (each one only from measured rows; a configuration that failed or was refused is left out):

- ``smollm2_fidelity_vs_speedup.png``: SmolLM2-135M, perplexity ratio to fp32 against the
  measured ONNX Runtime speed-up, for every `layerskip` configuration and the quantization
  passes, at a 128-token prompt and at one token (``benchmarks/layerskip``, ``benchmarks/quant``);
- ``targets_size_vs_speedup.png``: artifact size against speed-up over the dense model in the
  same runtime, every export target (``benchmarks/targets``);
- ``sparsify_fidelity_vs_size.png``: `sparsify` on SmolLM2, perplexity ratio against zip size
  (``benchmarks/sparsify``);
- ``quant_fidelity_vs_speedup.png``: slimc, ONNX Runtime's quantizer and NNCF side by side,
  speed-up against held-out fidelity per model (``benchmarks/quant/nospin_*``).

Needs matplotlib (in the ``bench`` and ``dev`` extras).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from slimc.errors import DataError

FEEDS = ("prefill 128", "decode 1")
UNIT_MARKERS = {"block": "s", "mlp": "^", "attention": "o"}
# The held-out fidelity metric each quantization benchmark model is judged by (higher is better
# except the perplexity ratio).
QUANT_METRIC = {"bert-base": "sqnr_db", "resnet50": "sqnr_db", "minilm": "embedding_cosine",
                "efficientnet": "top1_agreement", "smollm2": "perplexity_ratio"}


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the benchmark results ({exc}); run the benchmark that writes it.") from None


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DataError('plotting needs matplotlib: pip install matplotlib (or pip install -e ".[bench]")') from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def layerskip_points(bench: Path) -> list[dict[str, Any]]:
    """One point per layerskip row: unit, score, count, perplexity ratio, speed-up per feed."""
    points = []
    for name in ("smollm2.json", "smollm2_attention.json"):
        path = bench / "layerskip" / name
        if not path.is_file():
            continue
        data = _read(path)
        base = data["baseline_perplexity"]
        for row in data["results"]:
            latency = row.get("latency_remeasured") or row.get("latency") or {}
            speed = {feed: latency[feed]["speedup"] for feed in FEEDS if feed in latency}
            if "perplexity" in row and speed:
                points.append({"label": f"{row['unit']} ×{row['count']} ({row['score']})", "unit": row["unit"],
                               "score": row["score"], "ratio": row["perplexity"] / base, "speedup": speed})
    return points


def quant_points(bench: Path, model: str, files: tuple[str, ...], tools_prefix: str = "") -> list[dict[str, Any]]:
    """Rows of the quantization benchmark for ``model``: tool, speed-up per feed, fidelity metrics."""
    points = []
    for name in files:
        path = bench / "quant" / name
        if not path.is_file():
            continue
        for entry in _read(path)["models"]:
            if entry["model"] != model:
                continue
            for tool, res in entry["results"].items():
                if "error" in res or not res.get("speedup") or not res.get("fidelity") or not tool.startswith(tools_prefix):
                    continue
                points.append({"label": tool, "speedup": res["speedup"], "fidelity": res["fidelity"],
                               "bytes": res.get("size_bytes")})
    return points


def plot_smollm2(bench: Path, out: Path, plt) -> Path:
    skip = layerskip_points(bench)
    quant = quant_points(bench, "smollm2", ("nospin_smollm2.json", "nospin_smollm2_int4.json"), "slimc")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, feed in zip(axes, FEEDS):
        for unit, marker in UNIT_MARKERS.items():
            for score, fill in (("influence", "none"), ("loss", None)):
                pts = [p for p in skip if p["unit"] == unit and p["score"] == score and feed in p["speedup"]]
                if pts:
                    ax.scatter([p["speedup"][feed] for p in pts], [p["ratio"] for p in pts], marker=marker, s=50,
                               facecolors=fill, edgecolors="tab:blue" if score == "loss" else "tab:gray",
                               color="tab:blue" if score == "loss" else None, label=f"layerskip {unit} ({score})")
                    for p in pts:
                        ax.annotate(p["label"].split(" (")[0].split(" ")[1], (p["speedup"][feed], p["ratio"]),
                                    fontsize=7, xytext=(3, 3), textcoords="offset points")
        for p in (q for q in quant if feed in q["speedup"]):
            ax.scatter(p["speedup"][feed], p["fidelity"]["perplexity_ratio"], marker="D", s=60, color="tab:red")
            ax.annotate(p["label"].replace("slimc ", "").replace("(latency_seq=1)", "").replace(", latency_seq=1", ""),
                        (p["speedup"][feed], p["fidelity"]["perplexity_ratio"]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points", color="tab:red")
        ax.axvline(1.0, color="black", lw=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("measured speed-up in ONNX Runtime CPU, " + ("128-token prompt" if feed == "prefill 128" else "one token"))
        ax.set_title(f"SmolLM2-135M, {feed.split()[0]} ({feed.split()[1]} token{'s' if feed != 'decode 1' else ''})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity ratio to fp32 (held-out Wikipedia, lower is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], marker="D", color="tab:red", ls="none"))
    labels.append("quantization (slimc)")
    axes[0].legend(handles, labels, fontsize=7, loc="upper left")
    return _save(fig, out / "smollm2_fidelity_vs_speedup.png", bench / "layerskip", plt)


def plot_targets(bench: Path, out: Path, plt) -> Path:
    data = _read(bench / "targets" / "targets.json")
    rows = [r for r in data["rows"] if "refused" not in r and isinstance(r.get("latency"), dict) and "speedup" in r["latency"]]
    models = sorted({r["model"] for r in rows})
    targets = sorted({r["target"] for r in rows})
    configs = sorted({r["config"] for r in rows})
    markers = dict(zip(configs, "osD^vP*X"))
    colors = dict(zip(targets, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5))
    for ax, model in zip(axes if len(models) > 1 else [axes], models):
        for r in (r for r in rows if r["model"] == model):
            ax.scatter(r["bytes"] / 1e6, r["latency"]["speedup"], marker=markers[r["config"]], color=colors[r["target"]], s=55)
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_xlabel("artifact size (MB)")
        ax.set_ylabel("speed-up over the dense model in the same runtime")
        ax.set_title({"efficientnet": "EfficientNet-Lite0", "minilm": "all-MiniLM-L6-v2"}.get(model, model))
        ax.grid(True, alpha=0.3)
    legend = [plt.Line2D([], [], marker="o", color=colors[t], ls="none", label=t) for t in targets]
    legend += [plt.Line2D([], [], marker=markers[c], color="gray", ls="none", label=c) for c in configs]
    (axes[0] if len(models) > 1 else axes).legend(handles=legend, fontsize=7, loc="upper center", ncol=2)
    fig.suptitle(f"Every export target ({data.get('machine', 'machine not recorded')}; batch 1)", fontsize=10)
    return _save(fig, out / "targets_size_vs_speedup.png", None, plt)


def plot_sparsify(bench: Path, out: Path, plt) -> Path:
    data = _read(bench / "sparsify" / "smollm2.json")
    rows = [r for r in data["rows"] if r.get("zip_bytes_after") and r.get("perplexity_ratio")]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in rows:
        ax.scatter(r["zip_bytes_after"] / 1e6, r["perplexity_ratio"], color="tab:purple", s=50)
        label = r["spec"].replace("sparsify(", "").rstrip(")")
        ax.annotate(label, (r["zip_bytes_after"] / 1e6, r["perplexity_ratio"]), fontsize=6, xytext=(4, 2),
                    textcoords="offset points")
    dense = rows[0].get("zip_bytes_before") if rows else None
    if dense:
        ax.axvline(dense / 1e6, color="black", lw=0.5)
        ax.annotate("dense", (dense / 1e6, min(r["perplexity_ratio"] for r in rows)), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("zip size of the ONNX file (MB)")
    ax.set_ylabel("perplexity ratio to fp32 (held-out Wikipedia)")
    ax.set_title(f"sparsify on SmolLM2-135M ({data.get('machine', '')})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out / "sparsify_fidelity_vs_size.png", None, plt)


def plot_quant(bench: Path, out: Path, plt) -> Path:
    files = ("nospin_bert_resnet.json", "nospin_minilm_efficientnet.json", "nospin_smollm2.json", "nospin_smollm2_int4.json")
    fig, grid = plt.subplots(2, 3, figsize=(13, 8))
    axes = list(grid.flat)
    axes[-1].axis("off")
    for ax, (model, metric) in zip(axes, QUANT_METRIC.items()):
        for p in quant_points(bench, model, files):
            value = p["fidelity"].get(metric)
            # Pruned random-weight models have no meaningful fidelity (the benchmark says so): speed only.
            if value is None or "prune(" in p["label"]:
                continue
            speed = next(iter(p["speedup"].values()))  # the first feed: the prompt / the image
            slimc = p["label"].startswith("slimc")
            ax.scatter(speed, value, color="tab:red" if slimc else "tab:gray", marker="D" if slimc else "o", s=45)
            ax.annotate(p["label"].replace("(latency_seq=1)", "").replace(", latency_seq=1", ""), (speed, value),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        if metric == "perplexity_ratio":
            ax.set_yscale("log")
        ax.axvline(1.0, color="black", lw=0.5)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("speed-up over fp32 (ORT CPU)")
        ax.set_ylabel(metric + (" (lower is better)" if metric == "perplexity_ratio" else ""))
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("int8 / int4 quantizers side by side (held-out fidelity; AMD EPYC 2 cores, AVX-512 VNNI)", fontsize=10)
    return _save(fig, out / "quant_fidelity_vs_speedup.png", None, plt)


def _save(fig, path: Path, _source: Path | None, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # No timestamp in the file: the same results give the same bytes, so regenerating is a no-op in git.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


PLOTS = (plot_smollm2, plot_targets, plot_sparsify, plot_quant)


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(prog="python -m slimc.tools.plot_benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", type=Path, default=root / "benchmarks", help="the folder of JSON results")
    parser.add_argument("--out", type=Path, default=root / "docs" / "img", help="where the PNG files go")
    args = parser.parse_args(argv)
    try:
        plt = _pyplot()
        for plot in PLOTS:
            print(f"wrote {plot(args.benchmarks, args.out, plt)}")
    except DataError as exc:
        print(f"slimc: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
