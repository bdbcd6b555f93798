"""Fidelity of a candidate model against its reference, streamed batch by batch.

Generic metrics, for every floating output ``r`` (reference) and ``c`` (candidate):

- ``max_abs_error = max|r − c|``, ``mean_abs_error = mean|r − c|``;
- ``cosine``: ``<r_i, c_i> / (‖r_i‖ ‖c_i‖)`` per sample ``i`` (the output flattened per entry of
  axis 0), averaged; ``cosine_min`` the worst sample. Two all-zero samples count as cosine 1;
- ``sqnr_db = 10 log10(Σ r² / Σ (r − c)²)``. Identical outputs give +inf, which JSON cannot
  hold: ``sqnr_db`` is then ``None`` and ``exact`` is True (``exact`` says Σ (r − c)² = 0).
- ``nonfinite``: elements where ``r − c`` is NaN/inf (then the errors are ``None``);
  ``nonfinite_introduced`` (over all outputs, only when not 0): elements where ``c`` is NaN/inf
  but ``r`` is finite — the candidate broke them.

The flat keys describe the main (first) output; ``worst`` holds the worst value of each over
all compared outputs (max errors, min cosine, min SQNR). Integer, boolean and string outputs
have no error magnitude: ``non_floating`` counts, per such output, the elements that differ.

Task metrics on the main output, with ``p = softmax(r)``, ``q = softmax(c)`` over the last axis:

- classifier / image-classifier: ``top1_agreement = mean[argmax r = argmax c]`` and
  ``kl_divergence = mean_i Σ_k p_ik (log p_ik − log q_ik)``;
- causal-lm (logits ``[batch, seq, vocab]``, ids ``x``, mask ``m``): next-token negative
  log-likelihood ``NLL = −mean_t log p_t[x_{t+1}]`` over positions with ``m_t = m_{t+1} = 1``;
  ``perplexity = exp(NLL)`` of the candidate, ``perplexity_reference`` of the reference, their
  ``perplexity_ratio``; ``next_token_top1_agreement`` and per-token ``kl_divergence`` over
  positions with ``m_t = 1``;
- encoder (hidden states ``[batch, seq, dim]`` or pooled ``[batch, dim]``): sentence embedding
  ``e = Σ_t m_t h_t / Σ_t m_t`` (mean pooling over the mask), ``embedding_cosine`` mean and
  ``embedding_cosine_min`` over sentences.

Only sums, counts and extrema are kept, so memory does not grow with the data and streaming
gives the same numbers as one pass over all data (up to float summation order).

Memory is bounded per step, not per batch: every float64 temporary covers at most
``CHUNK_ELEMENTS`` elements (a chunk of rows, or of one row's columns), and `evaluate` with
``max_output_bytes`` runs the models on sub-batches of rows, so a causal LM's logits
``[batch, seq, vocab]`` are never held for a whole batch (with a 262k vocabulary, 4 x 128
tokens of float32 logits are 537 MB per model). One row's outputs must fit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from slimc import progress
from slimc.errors import DataError
from slimc.model import TASKS, InputSpec
from slimc.subbatch import RowBudget

Batch = dict[str, np.ndarray]
Outputs = Sequence[np.ndarray] | Mapping[str, np.ndarray]

# Elements per float64 temporary (32 MB): rows of a [rows, vocab] block, or columns of one wide row.
CHUNK_ELEMENTS = 1 << 22


def _blocks(rows: int, width: int) -> list[tuple[slice, slice]]:
    """(row slice, column slice) pairs covering a [rows, width] array, each at most CHUNK_ELEMENTS."""
    if width >= CHUNK_ELEMENTS:
        cols = [slice(c, c + CHUNK_ELEMENTS) for c in range(0, width, CHUNK_ELEMENTS)]
        return [(slice(r, r + 1), c) for r in range(rows) for c in cols]
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return [(slice(r, r + step), slice(None)) for r in range(0, rows, step)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of 2-D arrays; two all-zero rows are identical (1), one zero row is 0."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return _cosine_of_sums((a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1), (a == b).all(axis=-1))


def _cosine_of_sums(dot: np.ndarray, rr: np.ndarray, cc: np.ndarray, same: np.ndarray) -> np.ndarray:
    """`_cosine` from per-row sums ``<a, b>``, ``‖a‖²``, ``‖b‖²`` and whether the rows are identical."""
    den = np.sqrt(rr) * np.sqrt(cc)
    with np.errstate(invalid="ignore"):  # NaN rows give NaN, counted as non-finite elsewhere
        cos = np.clip(dot / np.where(den > 0, den, 1.0), -1.0, 1.0)
    return np.where(same, 1.0, np.where(den > 0, cos, 0.0))


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclasses.dataclass
class _Mean:
    """Running sum, count and minimum of a per-item metric."""

    total: float = 0.0
    count: int = 0
    low: float = math.inf

    def add(self, values: np.ndarray) -> None:
        if values.size:
            self.total += float(values.sum())
            self.count += int(values.size)
            self.low = min(self.low, float(values.min()))

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


@dataclasses.dataclass
class _OutputStats:
    """Generic error statistics of one output over all batches."""

    max_abs: float = 0.0
    abs_sum: float = 0.0
    elements: int = 0
    signal: float = 0.0  # Σ r²
    noise: float = 0.0  # Σ (r − c)²
    nonfinite: int = 0  # elements where r − c is NaN or ±inf
    introduced: int = 0  # elements where c is NaN or ±inf but r is finite: the candidate broke them
    cosine: _Mean = dataclasses.field(default_factory=_Mean)

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        n = ref.shape[0] if ref.ndim else 1
        ref2, cand2 = ref.reshape(n, -1), cand.reshape(n, -1)
        # per-sample sums for the cosine, accumulated over column chunks of wide samples
        dot, rr, cc = np.zeros(n), np.zeros(n), np.zeros(n)
        same = np.ones(n, bool)
        for rows, cols in _blocks(n, ref2.shape[1]):
            r, c = ref2[rows, cols].astype(np.float64), cand2[rows, cols].astype(np.float64)
            diff = r - c
            finite = np.isfinite(diff)
            self.nonfinite += int(diff.size - finite.sum())
            if not finite.all():  # elements the candidate broke (the reference is finite there)
                self.introduced += int(np.count_nonzero(~np.isfinite(c) & np.isfinite(r)))
            if finite.any():
                self.max_abs = max(self.max_abs, float(np.abs(diff[finite]).max()))
            self.abs_sum += float(np.abs(diff).sum())
            self.elements += diff.size
            self.signal += float((r * r).sum())
            self.noise += float((diff * diff).sum())
            dot[rows] += (r * c).sum(-1)
            rr[rows] += (r * r).sum(-1)
            cc[rows] += (c * c).sum(-1)
            same[rows] &= (r == c).all(-1)
        self.cosine.add(_cosine_of_sums(dot, rr, cc, same))

    def result(self) -> dict[str, Any]:
        exact = self.noise == 0.0
        sqnr = None if exact or self.signal == 0.0 else _finite(10 * math.log10(self.signal / self.noise))
        out = {
            "max_abs_error": None if self.nonfinite else _finite(self.max_abs),
            "mean_abs_error": None if self.nonfinite else _finite(self.abs_sum / max(self.elements, 1)),
            "cosine": _finite(self.cosine.mean),
            "cosine_min": _finite(self.cosine.low),
            "sqnr_db": sqnr,
            "exact": exact,
        }
        return {**out, "nonfinite": self.nonfinite} if self.nonfinite else out


def _worst(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst of each generic metric over outputs; None (NaN, or +inf SQNR) ranks as noted."""
    def pick(key: str, fn: Callable[[list[float]], float]) -> float | None:
        values = [r[key] for r in results if r[key] is not None]
        return fn(values) if values else None

    return {
        # a None error means NaN/inf in an output: nothing can be worse
        "max_abs_error": None if any(r["max_abs_error"] is None for r in results) else pick("max_abs_error", max),
        "mean_abs_error": None if any(r["mean_abs_error"] is None for r in results) else pick("mean_abs_error", max),
        "cosine": pick("cosine", min),
        "sqnr_db": pick("sqnr_db", min),  # exact outputs (None) are never the worst
        "exact": all(r["exact"] for r in results),
    }


def _token_inputs(batch: Mapping[str, np.ndarray], inputs: Sequence[InputSpec] | None) -> tuple[str | None, str | None]:
    """Names of the token-id and attention-mask inputs: from the specs, else by convention."""
    if inputs:
        tokens = next((s.name for s in inputs if s.kind == "tokens"), None)
        mask = next((s.name for s in inputs if s.kind == "attention_mask"), None)
        return tokens, mask
    return ("input_ids" if "input_ids" in batch else None), ("attention_mask" if "attention_mask" in batch else None)


class _Classification:
    """Top-1 agreement and KL(p‖q) over every row of the last axis."""

    def __init__(self) -> None:
        self.top1, self.kl = _Mean(), _Mean()

    def update(self, ref: np.ndarray, cand: np.ndarray, batch: Mapping[str, np.ndarray]) -> None:
        r, c = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
        step = max(1, CHUNK_ELEMENTS // max(r.shape[-1], 1))  # bounded float64 copies for wide outputs
        for start in range(0, len(r), step):
            lr, lc = _log_softmax(r[start:start + step]), _log_softmax(c[start:start + step])
            self.top1.add((lr.argmax(-1) == lc.argmax(-1)).astype(np.float64))
            # KL ≥ 0 exactly; clipping removes rounding's tiny negatives for identical inputs
            self.kl.add(np.maximum((np.exp(lr) * (lr - lc)).sum(-1), 0.0))

    def result(self) -> dict[str, Any]:
        return {"top1_agreement": _finite(self.top1.mean), "kl_divergence": _finite(self.kl.mean)}


class _NextToken:
    """Perplexity of both models on the batch's own tokens, next-token agreement and KL."""

    def __init__(self, tokens: str | None, mask: str | None, notes: list[str]) -> None:
        self.tokens, self.mask, self.notes = tokens, mask, notes
        self.nll_ref, self.nll_cand, self.top1, self.kl = _Mean(), _Mean(), _Mean(), _Mean()

    def update(self, ref: np.ndarray, cand: np.ndarray, batch: Mapping[str, np.ndarray]) -> None:
        ids = np.asarray(batch[self.tokens]) if self.tokens in batch else None
        if ref.ndim != 3 or ids is None or ids.shape != ref.shape[:2] or ids.max() >= ref.shape[-1]:
            _note(self.notes, f"perplexity needs logits [batch, seq, vocab] for the token ids; got {ref.shape}")
            return
        mask = np.asarray(batch[self.mask]).astype(bool) if self.mask in batch else np.ones(ids.shape, bool)
        seq = ref.shape[1]
        step = max(1, CHUNK_ELEMENTS // max(ref.shape[-1], 1))  # float64 log-probs of step × vocab at a time
        for i in range(ref.shape[0]):
            for s in range(0, seq, step):
                e = min(seq, s + step)
                lr, lc = _log_softmax(ref[i, s:e]), _log_softmax(cand[i, s:e])
                t = np.arange(s, min(e, seq - 1))
                pos = t[mask[i, t] & mask[i, t + 1]]  # position t predicts token t + 1
                self.nll_ref.add(-lr[pos - s, ids[i, pos + 1]])
                self.nll_cand.add(-lc[pos - s, ids[i, pos + 1]])
                seen = mask[i, s:e]
                self.top1.add((lr[seen].argmax(-1) == lc[seen].argmax(-1)).astype(np.float64))
                self.kl.add(np.maximum((np.exp(lr[seen]) * (lr[seen] - lc[seen])).sum(-1), 0.0))

    def result(self) -> dict[str, Any]:
        if not self.nll_ref.count:
            return {}
        ppl_ref, ppl = math.exp(self.nll_ref.mean), math.exp(self.nll_cand.mean)
        return {
            "perplexity_reference": _finite(ppl_ref),
            "perplexity": _finite(ppl),
            "perplexity_ratio": _finite(ppl / ppl_ref),
            "next_token_top1_agreement": _finite(self.top1.mean),
            "kl_divergence": _finite(self.kl.mean),
            "tokens": self.nll_ref.count,
        }


class _Embedding:
    """Cosine between mean-pooled sentence embeddings of reference and candidate."""

    def __init__(self, mask: str | None, notes: list[str]) -> None:
        self.mask, self.notes, self.cosine = mask, notes, _Mean()

    def update(self, ref: np.ndarray, cand: np.ndarray, batch: Mapping[str, np.ndarray]) -> None:
        if ref.ndim == 3:
            m = np.asarray(batch[self.mask], np.float64) if self.mask in batch else np.ones(ref.shape[:2])
            if m.shape != ref.shape[:2]:
                _note(self.notes, f"attention mask {m.shape} does not match hidden states {ref.shape}: not pooled")
                return
            den = np.maximum(m.sum(1, keepdims=True), 1.0)
            ref, cand = [(x * m[..., None]).sum(1) / den for x in (ref.astype(np.float64), cand.astype(np.float64))]
        elif ref.ndim != 2:
            _note(self.notes, f"embedding cosine needs [batch, seq, dim] or [batch, dim]; got {ref.shape}")
            return
        self.cosine.add(_cosine(ref, cand))

    def result(self) -> dict[str, Any]:
        if not self.cosine.count:
            return {}
        return {"embedding_cosine": _finite(self.cosine.mean), "embedding_cosine_min": _finite(self.cosine.low)}


def _listed(outputs: Outputs) -> list[np.ndarray]:
    return list(outputs.values()) if isinstance(outputs, Mapping) else list(outputs)


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


class Fidelity:
    """Streaming fidelity accumulator: `update` once per batch, `result` at the end.

    ``inputs`` (the model's `InputSpec`s) name the token-id and mask inputs; without them the
    names ``input_ids`` and ``attention_mask`` are used.
    """

    def __init__(self, task: str = "generic", output_names: Sequence[str] | None = None,
                 inputs: Sequence[InputSpec] | None = None):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
        self.task, self.names, self.inputs = task, list(output_names) if output_names else None, inputs
        self.stats: list[_OutputStats | None] = []
        self.discrete: dict[int, list[int]] = {}  # non-floating output -> [elements that differ, elements]
        self.notes: list[str] = []
        self.batches = self.samples = 0
        self._task: Any = None

    def _task_metric(self, batch: Mapping[str, np.ndarray]) -> Any:
        if self._task is None:
            tokens, mask = _token_inputs(batch, self.inputs)
            self._task = {
                "classifier": _Classification, "image-classifier": _Classification,
                "causal-lm": lambda: _NextToken(tokens, mask, self.notes),
                "encoder": lambda: _Embedding(mask, self.notes),
            }.get(self.task, lambda: False)()
        return self._task

    def _name(self, k: int) -> str:
        return self.names[k] if self.names and k < len(self.names) else f"output {k}"

    def update(self, reference: Outputs, candidate: Outputs, batch: Mapping[str, np.ndarray] | None = None) -> None:
        """Add one batch: both models' outputs (lists in graph order, or dicts by name) and its inputs."""
        self.add_rows(reference, candidate, batch)
        self.batches += 1

    def add_rows(self, reference: Outputs, candidate: Outputs, batch: Mapping[str, np.ndarray] | None = None) -> None:
        """`update` for part of a batch (a sub-batch of its rows): the batch count stays."""
        for outputs in (reference, candidate):
            if isinstance(outputs, Mapping):
                self.names = self.names or list(outputs)
        reference, candidate = [_listed(o) for o in (reference, candidate)]
        if len(reference) != len(candidate):
            raise ValueError(f"reference has {len(reference)} outputs, candidate {len(candidate)}: not comparable")
        self.stats += [_OutputStats() for _ in range(len(reference) - len(self.stats))]
        for k, (ref, cand) in enumerate(zip(reference, candidate)):
            ref, cand = np.asarray(ref), np.asarray(cand)
            if ref.shape != cand.shape:
                _note(self.notes, f"{self._name(k)} changed shape {ref.shape} -> {cand.shape}: not compared")
            elif not (np.issubdtype(ref.dtype, np.floating) and np.issubdtype(cand.dtype, np.floating)):
                # integers, booleans, strings: no error magnitude, only equal or not, element by element
                seen = self.discrete.setdefault(k, [0, 0])
                seen[0] += int(np.sum(ref.astype(object) != cand.astype(object))) if ref.size else 0
                seen[1] += int(ref.size)
            elif ref.size:
                self.stats[k].update(ref, cand)
                if k == 0 and self._task_metric(batch or {}):
                    self._task.update(ref, cand, batch or {})
        first = np.asarray(reference[0]) if len(reference) else np.zeros(())
        self.samples += first.shape[0] if first.ndim else 1

    def per_output(self) -> dict[str, dict[str, Any]]:
        """Generic metrics of every compared output, by name."""
        return {self._name(k): s.result() for k, s in enumerate(self.stats) if s.elements}

    def result(self) -> dict[str, Any]:
        """Metrics of the main output, task metrics, worst case over outputs (see module docstring)."""
        compared = [s.result() for s in self.stats if s.elements]
        main = self.stats[0].result() if self.stats and self.stats[0].elements else {}
        out: dict[str, Any] = {**main, **(self._task.result() if self._task else {})}
        if len(compared) > 1:
            out["worst"] = _worst(compared)
        introduced = sum(s.introduced for s in self.stats if s is not None)
        if introduced:  # over all outputs: the fidelity guard refuses such a result
            out["nonfinite_introduced"] = introduced
        if self.discrete:
            out["non_floating"] = {self._name(k): {"elements_differing": d, "elements": n, "exact": d == 0}
                                   for k, (d, n) in sorted(self.discrete.items())}
        out.update(output=self._name(0), samples=self.samples, batches=self.batches)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def evaluate(
    run_reference: Callable[[Batch], Outputs],
    run_candidate: Callable[[Batch], Outputs],
    dataset: Iterable[Batch],
    task: str = "generic",
    output_names: Sequence[str] | None = None,
    *,
    inputs: Sequence[InputSpec] | None = None,
    max_output_bytes: int | None = None,
) -> dict[str, Any]:
    """Run both models over ``dataset`` batch by batch and return `Fidelity.result`.

    ``max_output_bytes``: run the models on sub-batches of rows whose outputs stay near this size
    (at least one row; the first row of the first batch measures the size of a row's outputs).
    Only for run functions that accept any number of rows; None runs whole batches (for run
    functions that look outputs up by batch).
    """
    fidelity = Fidelity(task, output_names, inputs)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    rows = RowBudget(max_output_bytes)
    for batch in progress.bar(dataset, "measuring fidelity", total=total, unit="batch"):
        for part in rows.split(batch):
            reference = run_reference(part)
            rows.observe(reference, part)
            fidelity.add_rows(reference, run_candidate(part), part)
            del reference  # one sub-batch's outputs at a time
        fidelity.batches += 1
    if fidelity.batches == 0:
        source = getattr(dataset, "source", "the data")
        raise DataError(f"no batches to evaluate in {source}: give at least one sample of evaluation data.")
    return fidelity.result()


def perplexity(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> float:
    """Next-token perplexity of one model's ``logits`` [batch, seq, vocab] on ``input_ids``."""
    metric = _NextToken("input_ids", "attention_mask", [])
    batch = {"input_ids": input_ids, **({"attention_mask": attention_mask} if attention_mask is not None else {})}
    metric.update(np.asarray(logits), np.asarray(logits), batch)
    if not metric.nll_ref.count:
        raise DataError(f"no next-token positions to score in input_ids {np.shape(input_ids)} with this mask.")
    return math.exp(metric.nll_ref.mean)
