"""``--report DIR``: pareto.json, search_log.jsonl, pareto.png and allocation.png (the pictures when
matplotlib is installed).

The plot puts fitness (the search's divergence on calibration batches, lower is better) against
the speed-up measured in ONNX Runtime: the timed finalists, the uniform allocations on the same
axes, and the rest of the Pareto front at its predicted speed-up (hollow markers).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("slimc")


def write_report(result, folder: Path) -> list[Path]:
    from slimc.evosearch.api import dumps

    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "pareto.json", folder / "search_log.jsonl"]
    written[0].write_text(dumps(result.to_json()))
    with open(written[1], "w") as f:
        for row in result.log:
            f.write(json.dumps(row, default=str) + "\n")
    png = plot(result, folder / "pareto.png")
    picture = plot_allocation(result, folder / "allocation.png") if png else None
    return written + [p for p in (png, picture) if p]


def plot(result, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("search report: matplotlib is not installed, no pareto.png (pip install matplotlib)")
        return None
    metric = result.settings["fitness"]
    label = metric if metric == "kl_divergence" else f"1 - {metric}"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    front = result.front
    ax.plot([r["predicted"]["speedup"] for r in front], [r["fitness"] for r in front], "o", mfc="none", color="tab:blue",
            label="search front (predicted speed-up)")
    fin = result.finalists
    ax.plot([r["measured_speedup"] for r in fin], [r["fitness"] for r in fin], "o", color="tab:blue",
            label="search finalists (measured)")
    uni = sorted(result.uniform, key=lambda r: r["measured_speedup"])
    ax.plot([r["measured_speedup"] for r in uni], [r["fitness"] for r in uni], "s--", color="tab:orange",
            label="uniform allocations (measured)")
    chosen = next((r for r in fin if r["genome"] == list(result.genome)), None)
    if chosen is not None:
        ax.plot([chosen["measured_speedup"]], [chosen["fitness"]], "*", ms=14, color="tab:red", label="chosen")
    bound = result.budget.get("speedup")
    if bound is not None:
        ax.axvline(bound.value, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("speed-up vs the input model (ONNX Runtime)")
    ax.set_ylabel(f"{label} on calibration data (lower is better)")
    shown = [r["fitness"] for r in (*front, *fin, *uni)]
    if shown and min(shown) > 0:  # a log axis needs positive values; an exact candidate (0) keeps it linear
        ax.set_yscale("log")
    ax.set_title(f"slimc search, budget {result.budget}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_allocation(result, path: Path) -> Path:
    """The chosen level of every block as a bar: its prune ratio, 1 for a removed block."""
    import matplotlib.pyplot as plt

    space = result.space
    heights, colors = [], []
    for g in result.genome:
        skipped = g == space.skip_level
        heights.append(1.0 if skipped else (space.prune_levels[g - 1] if g else 0.0))
        colors.append("tab:red" if skipped else "tab:blue")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(heights) + 2), 3.0))
    ax.bar(range(len(heights)), heights, color=colors)
    ax.set_xlabel("block (graph order)")
    ax.set_ylabel("prune ratio (red: removed)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"chosen allocation, budget {result.budget}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
