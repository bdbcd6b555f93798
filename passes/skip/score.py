"""Scores for `layerskip`: Block Influence, and the greedy search on a measured loss.

**Block Influence** (ShortGPT, Men et al. 2024): for a unit with input ``x`` and output ``y``,
``BI = 1 - E_p[cos(x_p, y_p)]``, the cosine taken along the hidden (channel) axis at every
position ``p`` (a token, or a pixel of an NCHW map) of the calibration set, mask-weighted when
the model has an attention mask of the stream's ``[batch, seq]`` shape. A unit that barely turns
its input is cheap to skip. ``BI`` lies in [0, 2]; exactly 0 when the unit passes its input
through unchanged. The statistics come from `slimc.calibrate.cosine`, streamed, one ORT session.

**Greedy loss**: the model is instrumented once with a boolean input ``gate_u`` per candidate
unit and ``out_u := Where(gate_u, out_u, x_u)`` (every use of the unit's output reads the
selection), so any set of removals is evaluated by feeding gates to one ORT session, with the
same numbers as the rewired model. Each step tries every remaining candidate on top of the
removals chosen so far and keeps the one with the lowest loss on the calibration batches:

- causal LMs: perplexity of the model's next-token predictions on the calibration tokens;
- otherwise: relative squared error ``Σ (r - c)² / Σ r²`` of the first float output ``c``
  against the unmodified model's ``r`` (computed once through the same session, gates on).

That is ``count x candidates`` evaluations of the calibration set, so the caller may restrict
the candidates to a shortlist (the lowest-influence units).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from slimc import progress, workdir
from slimc.backends.onnxruntime import create_session, run
from slimc.calibrate import CosineRequest, cosine
from slimc.onnx_io import save_onnx
from slimc.passes.skip.blocks import Unit

Batch = Mapping[str, np.ndarray]
REFERENCE_CACHE_BYTES = 256 << 20  # reference outputs kept in memory for the relative error


def influence(model: ir.Model, units: Sequence[Unit], batches: Sequence[Batch], *, mask: str | None = None,
              threads: int | None = None) -> dict[Unit, float]:
    """Block Influence of every unit; ``mask`` (a ``[batch, seq]`` input) weights tokens where it fits."""
    requests = {}
    for u in units:
        shape = u.x.shape
        weights = mask if mask is not None and shape is not None and len(shape) == 3 and u.channel_axis == -1 else None
        requests[u] = CosineRequest(u.x.name, u.out.name, u.channel_axis, weights)
    stats = cosine(model, list(dict.fromkeys(requests.values())), batches, threads=threads, desc="layerskip influence")
    return {u: float(min(max(1.0 - stats[r].mean, 0.0), 2.0)) for u, r in requests.items()}


@dataclasses.dataclass
class Greedy:
    """The outcome of the greedy search: removal order, and every loss measured on the way."""

    metric: str
    baseline: float  # the metric of the unmodified model
    order: list[Unit]
    steps: list[dict]  # per step: {"losses": {label: loss}, "chosen": label, "loss": loss}

    def loss_of(self, unit: Unit) -> float | None:
        """The loss after removing ``unit`` together with those chosen before it."""
        for step in self.steps:
            if step["chosen"] == unit.label:
                return step["loss"]
        return None


def greedy(model: ir.Model, candidates: Sequence[Unit], count: int, batches: Sequence[Batch], *,
           tokens: str | None = None, mask: str | None = None, threads: int | None = None) -> Greedy:
    """Choose ``count`` of ``candidates`` greedily by loss (perplexity when ``tokens`` names the
    token-id input of a causal LM, else the relative squared error of the outputs)."""
    with workdir.new("layerskip") as tmp:
        gated = _Gated(model, candidates, Path(tmp) / "gated.onnx", threads)
        loss = _Perplexity(gated, batches, tokens, mask) if tokens else _RelativeError(gated, batches)
        baseline = loss(frozenset())
        order: list[Unit] = []
        steps = []
        for step in range(count):
            left = [u for u in candidates if u not in order]
            losses = {}
            for u in progress.bar(left, f"layerskip loss, step {step + 1}/{count}", total=len(left), unit="candidate"):
                losses[u] = loss(frozenset([*order, u]))
            best = min(left, key=lambda u: (_finite(losses[u]), candidates.index(u)))
            order.append(best)
            steps.append({"losses": {u.label: _json(v) for u, v in losses.items()}, "chosen": best.label,
                          "loss": _json(losses[best])})
    return Greedy(loss.name, baseline, order, steps)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _json(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class _Gated:
    """One ORT session of the model with a bool gate input per unit (see the module docstring)."""

    def __init__(self, model: ir.Model, units: Sequence[Unit], path: Path, threads: int | None):
        save_onnx(model, path)
        proto = onnx.load(str(path), load_external_data=False)
        graph = proto.graph
        used = {n for node in graph.node for n in [*node.input, *node.output]}
        used |= {v.name for v in [*graph.input, *graph.output, *graph.initializer]}
        self.gates: dict[Unit, str] = {}
        renames = []
        for k, u in enumerate(units):
            gate, out = _fresh(f"slimc.layerskip/gate/{k}", used), _fresh(f"slimc.layerskip/gated/{k}", used)
            graph.input.append(helper.make_tensor_value_info(gate, TensorProto.BOOL, []))
            renames.append((u.out.name, out, helper.make_node("Where", [gate, u.out.name, u.x.name], [out], name=out)))
            self.gates[u] = gate
        for old, new, _ in renames:  # every use of a unit's output now reads its selection,
            for node in graph.node:
                _rename_input(node, old, new)
            for _, _, where in renames:  # chained units' skips included (a Where's own output input stays)
                if where.input[2] == old:
                    where.input[2] = new
        after = {old: where for old, _, where in renames}  # each Where right after its unit's output
        nodes = []
        for node in graph.node:
            nodes.append(node)
            nodes.extend(after[o] for o in node.output if o in after)
        del graph.node[:]
        graph.node.extend(nodes)
        floats = [o for o in graph.output if o.type.tensor_type.elem_type in
                  (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)]
        if not floats:
            raise ValueError("layerskip: the model has no float output to measure a loss on.")
        main = onnx.ValueInfoProto()
        main.CopyFrom(floats[0])
        self.output = main.name
        for old, new, _ in renames:
            if main.name == old:
                main.name = new
        del graph.output[:]
        graph.output.append(main)
        onnx.checker.check_model(proto)  # a wrong rewiring fails here, not as an ORT message
        onnx.save(proto, str(path))
        self.session = create_session(path, threads)  # topological order is ORT's to find

    def __call__(self, batch: Batch, off: frozenset) -> np.ndarray:
        gates = {name: np.array(u not in off) for u, name in self.gates.items()}
        return run(self.session, {**batch, **gates})[0]


def _fresh(base: str, used: set[str]) -> str:
    name, k = base, 0
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def _rename_input(node: onnx.NodeProto, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new
    for attr in node.attribute:  # subgraphs may read outer values by name
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in sub.node:
                _rename_input(inner, old, new)


class _Perplexity:
    """exp(mean next-token NLL) over positions t with mask[t] = mask[t+1] = 1, all batches pooled."""

    name = "perplexity on the calibration tokens"

    def __init__(self, gated: _Gated, batches: Sequence[Batch], tokens: str, mask: str | None):
        self.gated, self.batches, self.tokens, self.mask = gated, batches, tokens, mask

    def __call__(self, off: frozenset) -> float:
        total, count = 0.0, 0
        for batch in self.batches:
            logits = self.gated(batch, off)
            ids = np.asarray(batch[self.tokens])
            valid = np.ones(ids.shape, bool)
            if self.mask is not None and self.mask in batch:
                m = np.asarray(batch[self.mask]).astype(bool)
                valid = m
            valid = valid[:, :-1] & valid[:, 1:]
            nll, n = _nll(logits[:, :-1], ids[:, 1:], valid)
            total, count = total + nll, count + n
        return math.exp(total / count) if count else math.nan


def _nll(logits: np.ndarray, targets: np.ndarray, valid: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of ``targets`` under ``logits`` at the ``valid`` positions."""
    rows = logits[valid].astype(np.float32)  # [n, vocab]
    if not rows.size:
        return 0.0, 0
    top = rows.max(axis=-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=-1))
    picked = np.take_along_axis(rows, targets[valid][:, None].astype(np.int64), axis=-1)[:, 0]
    return float(np.sum(lse.astype(np.float64) - picked)), int(rows.shape[0])


class _RelativeError:
    """Σ (r - c)² / Σ r² of the main output against the unmodified model, all batches pooled."""

    def __init__(self, gated: _Gated, batches: Sequence[Batch]):
        self.gated, self.batches = gated, batches
        self.name = f"relative squared error of output '{gated.output}' vs the unmodified model"
        self.cache: dict[int, np.ndarray] = {}
        self.cached_bytes = 0

    def _reference(self, index: int, batch: Batch) -> np.ndarray:
        if index in self.cache:
            return self.cache[index]
        ref = self.gated(batch, frozenset()).astype(np.float64)
        if self.cached_bytes + ref.nbytes <= REFERENCE_CACHE_BYTES:
            self.cache[index] = ref
            self.cached_bytes += ref.nbytes
        return ref

    def __call__(self, off: frozenset) -> float:
        err = norm = 0.0
        for index, batch in enumerate(self.batches):
            ref = self._reference(index, batch)
            got = ref if not off else self.gated(batch, off).astype(np.float64)
            err += float(np.sum((ref - got) ** 2))
            norm += float(np.sum(ref**2))
        return err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
