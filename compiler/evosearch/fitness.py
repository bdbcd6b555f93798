"""Fitness of a search candidate: its divergence from the input model on calibration batches.

Per task (`slimc.evaluate.Fidelity` computes the metrics, streamed batch by batch):

- causal-lm: per-token ``KL(p_ref || p_cand)`` of the next-token distributions;
- classifier / image-classifier: ``KL`` of the class distributions;
- encoder: ``1 - embedding_cosine`` (mean-pooled sentence embeddings);
- anything else: ``1 - cosine`` of the main output.

Lower is better; 0 is the input model. The reference outputs are computed once (`Shared`) and
every candidate is compared with them on its first ``n`` batches (multi-fidelity: few batches
for many candidates, all of them for the survivors). A candidate is built by the passes
(`Space.build`), saved to a work folder and run in ONNX Runtime, as a worker process would.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from slimc.evosearch.space import Space

FITNESS = {"causal-lm": "kl_divergence", "classifier": "kl_divergence", "image-classifier": "kl_divergence",
           "encoder": "embedding_cosine"}
_MODELS: dict[str, Any] = {}  # model path -> loaded IR, one per worker process


@dataclasses.dataclass
class Shared:
    """What every evaluation needs, sent once to each worker (a Ray object, or kept in-process)."""

    model_path: str
    space: Space
    batches: list[dict[str, np.ndarray]]
    references: list[list[np.ndarray]]
    output_names: list[str]
    task: str
    inputs: list[Any]
    feed: dict[str, np.ndarray]  # one sample: MACs are counted at its sizes
    threads: int | None = None


def metric_name(task: str) -> str:
    return FITNESS.get(task, "cosine")


def fitness_of(metrics: dict[str, Any], task: str) -> float:
    """The number to minimise from `Fidelity.result` metrics (inf when it could not be computed)."""
    name = metric_name(task)
    value = metrics.get(name)
    if value is None or not math.isfinite(value):
        return math.inf
    return float(value) if name == "kl_divergence" else 1.0 - float(value)


def costs(model) -> dict[str, float]:
    """params and weight bytes of a built candidate."""
    from slimc.analysis import count_params

    params, size = count_params(model)
    return {"params": params, "size": size}


def macs(model, feed) -> int:
    """MACs per sample of ``model`` at the sizes of ``feed``."""
    from slimc.analysis import bind_sizes, count_macs, fed_shapes

    total, _ = count_macs(model, bind_sizes(model, feed), fed_shapes(model, feed))
    return int(total)


def _original(path: str):
    if path not in _MODELS:
        from slimc.onnx_io import load_onnx

        _MODELS.clear()  # one input model per process
        _MODELS[path] = load_onnx(path)
    return _MODELS[path]


def evaluate(shared: Shared, genome: tuple[int, ...], n_batches: int) -> dict[str, Any]:
    """Build ``genome``, count its costs and compare it with the input model on ``n_batches`` batches."""
    from slimc.backends import onnxruntime as ort_backend
    from slimc.evaluate import Fidelity
    from slimc.onnx_io import save_onnx

    model = shared.space.build(_original(shared.model_path), genome)
    row = {"genome": list(genome), **costs(model), "macs": macs(model, shared.feed), "batches": n_batches}
    with tempfile.TemporaryDirectory(prefix="slimc-search-") as tmp:
        path = Path(tmp) / "candidate.onnx"
        save_onnx(model, path)
        del model
        session = ort_backend.create_session(path, shared.threads)
        # the main output only (logits, embeddings): the fitness reads it, and KV-cache outputs change with
        # the blocks removed or the heads pruned
        main = [o.name for o in session.get_outputs()].index(shared.output_names[0])
        fidelity = Fidelity(shared.task, shared.output_names[:1], shared.inputs)
        for batch, reference in zip(shared.batches[:n_batches], shared.references):
            outputs = ort_backend.run(session, batch)
            fidelity.update(reference[:1], [outputs[main]], batch)
        del session
    metrics = fidelity.result()
    row["fitness"] = fitness_of(metrics, shared.task)
    row["metric"] = {metric_name(shared.task): metrics.get(metric_name(shared.task))}
    return row
