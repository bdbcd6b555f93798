"""Fidelity of a candidate model against a reference, streamed batch by batch.

Generic metrics over every float output (flattened per sample):

- max / mean abs error: ``max|r - c|``, ``mean|r - c|``;
- cosine: ``<r, c> / (|r| |c|)`` per sample, averaged (min also reported);
- SQNR (dB): ``10 log10(sum r^2 / sum (r - c)^2)``; ``inf`` when identical.

Task metrics on the main (first) output:

- classifier / image-classifier: top-1 agreement ``mean(argmax r == argmax c)`` and
  ``KL(softmax r || softmax c)`` averaged over samples;
- causal-lm: perplexity ``exp(mean NLL)`` of next-token prediction on the batch's own
  ``input_ids`` (positions with ``attention_mask == 0`` skipped) for both models, their
  ratio, and next-token top-1 agreement;
- encoder: sentence embeddings by mean pooling over ``attention_mask``; cosine between the
  reference and candidate embedding of each sentence, mean and min.

Accumulators keep sums, never outputs, so memory does not grow with the data set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from slimc import progress

Batch = dict[str, np.ndarray]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Fidelity:
    """Streaming accumulator. ``update`` per batch, ``result`` at the end."""

    def __init__(self, task: str = "generic", output_names: list[str] | None = None):
        self.task = task
        self.names = output_names
        self.samples = 0
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.count = 0
        self.signal = 0.0
        self.noise = 0.0
        self.cos_sum = 0.0
        self.cos_min = 1.0
        self.task_sums: dict[str, float] = {}
        self.task_min: dict[str, float] = {}

    def update(self, reference: list[np.ndarray], candidate: list[np.ndarray], batch: Batch | None = None) -> None:
        for ref, cand in zip(reference, candidate, strict=True):
            if not (np.issubdtype(ref.dtype, np.floating) and ref.shape == cand.shape) or ref.size == 0:
                continue
            r, c = ref.astype(np.float64), cand.astype(np.float64)
            diff = np.abs(r - c)
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.abs_sum += float(diff.sum())
            self.count += diff.size
            self.signal += float((r * r).sum())
            self.noise += float(((r - c) ** 2).sum())
        ref, cand = reference[0], candidate[0]
        n = ref.shape[0] if ref.ndim else 1
        if np.issubdtype(ref.dtype, np.floating) and ref.shape == cand.shape:
            cos = _cosine(ref.reshape(n, -1), cand.reshape(n, -1))
            self.cos_sum += float(cos.sum())
            self.cos_min = min(self.cos_min, float(cos.min()))
            self._task_update(ref.astype(np.float64), cand.astype(np.float64), batch or {})
        self.samples += n

    def _add(self, key: str, values: np.ndarray) -> None:
        self.task_sums[key] = self.task_sums.get(key, 0.0) + float(values.sum())
        self.task_sums[key + "#n"] = self.task_sums.get(key + "#n", 0.0) + values.size
        self.task_min[key] = min(self.task_min.get(key, math.inf), float(values.min()) if values.size else math.inf)

    def _task_update(self, ref: np.ndarray, cand: np.ndarray, batch: Batch) -> None:
        if self.task in ("classifier", "image-classifier") and ref.ndim == 2:
            self._add("top1", (ref.argmax(-1) == cand.argmax(-1)).astype(np.float64))
            lr, lc = _log_softmax(ref), _log_softmax(cand)
            self._add("kl", (np.exp(lr) * (lr - lc)).sum(-1))
        elif self.task == "causal-lm" and ref.ndim == 3 and "input_ids" in batch:
            ids = np.asarray(batch["input_ids"])[:, 1:]
            mask = np.asarray(batch.get("attention_mask", np.ones_like(batch["input_ids"])))[:, 1:].astype(bool)
            for key, logits in (("nll_ref", ref), ("nll_cand", cand)):
                lp = _log_softmax(logits[:, :-1])
                nll = -np.take_along_axis(lp, ids[..., None], axis=-1)[..., 0]
                self._add(key, nll[mask])
            self._add("next_top1", (ref[:, :-1].argmax(-1) == cand[:, :-1].argmax(-1))[mask].astype(np.float64))
        elif self.task == "encoder" and ref.ndim == 3:
            mask = np.asarray(batch.get("attention_mask", np.ones(ref.shape[:2])))[..., None].astype(np.float64)
            pooled = [(x * mask).sum(1) / np.maximum(mask.sum(1), 1.0) for x in (ref, cand)]
            self._add("embedding_cosine", _cosine(*pooled))

    def result(self) -> dict[str, Any]:
        if self.samples == 0:
            return {}
        out: dict[str, Any] = {
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.abs_sum / max(self.count, 1),
            "cosine": self.cos_sum / self.samples,
            "cosine_min": self.cos_min,
            "sqnr_db": math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-300) / self.noise),
        }
        mean = lambda k: self.task_sums[k] / max(self.task_sums[k + "#n"], 1)  # noqa: E731
        if "top1" in self.task_sums:
            out["top1_agreement"] = mean("top1")
            out["kl_divergence"] = mean("kl")
        if "nll_ref" in self.task_sums:
            out["perplexity_reference"] = math.exp(mean("nll_ref"))
            out["perplexity"] = math.exp(mean("nll_cand"))
            out["perplexity_ratio"] = out["perplexity"] / out["perplexity_reference"]
            out["next_token_top1_agreement"] = mean("next_top1")
            out["tokens"] = int(self.task_sums["nll_ref#n"])
        if "embedding_cosine" in self.task_sums:
            out["embedding_cosine"] = mean("embedding_cosine")
            out["embedding_cosine_min"] = self.task_min["embedding_cosine"]
        out["samples"] = self.samples
        return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    # Two all-zero vectors are identical: cosine 1, not 0/0.
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.abs(a - b).sum(-1) == 0, 1.0, 0.0))


def evaluate(
    run_reference: Callable[[Batch], list[np.ndarray]],
    run_candidate: Callable[[Batch], list[np.ndarray]],
    dataset: Iterable[Batch],
    task: str = "generic",
    output_names: list[str] | None = None,
) -> dict[str, Any]:
    """Run both models over ``dataset`` and return the fidelity metrics (see module docstring)."""
    acc = Fidelity(task, output_names)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    for batch in progress.bar(dataset, "evaluating fidelity", total=total, unit="batch"):
        acc.update(run_reference(batch), run_candidate(batch), batch)
    return acc.result()


def perplexity(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> float:
    """Perplexity of next-token prediction of one model on one batch (for passes and tests)."""
    acc = Fidelity("causal-lm")
    batch = {"input_ids": input_ids, **({"attention_mask": attention_mask} if attention_mask is not None else {})}
    acc.update([logits], [logits], batch)
    return acc.result()["perplexity_reference"]
