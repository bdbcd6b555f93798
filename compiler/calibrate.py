"""Calibration statistics: per-channel sums, sums of squares, max |x| and X^T X of chosen graph values.

Passes that calibrate (activation-aware pruning, smoothing, quantization ranges) need only a few
statistics of an activation, never the activation itself: one hidden state of an LLM over a
calibration set is gigabytes, its per-channel sums are kilobytes. So instead of exporting the
values, :func:`collect` instruments a copy of the model with reduction nodes and makes their
results the graph outputs (the original outputs are dropped, so ONNX Runtime runs only what the
statistics need). For each requested value ``x`` and channel axis ``a``, in float32 (float16 and
bfloat16 are cast first; float64 stays float64)::

    sum[c]   = ReduceSum(x,   all axes but a)         sumsq[c] = ReduceSum(x * x, all axes but a)
    size     = Size(x)                                 gram     = X^T X,  X = x with a moved last, as [-1, C]
    absmax[c] = ReduceMax(Abs(x), all axes but a)      (only when a request asks for it)

Batches stream through one ORT session and every output is added into a float64 total (absmax:
the running np.maximum), so memory holds statistics only. Work on a value is shared between
requests (one Cast, one x * x, one Size, one Abs), and requests on the same value and axis share
their reductions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence, Set
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from slimc import progress, workdir
from slimc.backends.onnxruntime import create_session, run, shareable_initializers, shares_weights
from slimc.errors import DataError
from slimc.onnx_io import save_onnx

_FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


@dataclasses.dataclass(frozen=True)
class StatRequest:
    """Statistics of graph value ``value`` per channel along ``axis`` (negative counts from the end)."""

    value: str
    axis: int
    gram: bool = False  # also accumulate X^T X over the channel axis ([C, C])
    absmax: bool = False  # also track max |x| of each channel


@dataclasses.dataclass
class ChannelStats:
    """Sums over every calibration element of each channel; ``count`` elements per channel."""

    count: int
    sum: np.ndarray  # [C] float64
    sumsq: np.ndarray  # [C] float64
    gram: np.ndarray | None  # [C, C] float64, when requested
    absmax: np.ndarray | None = None  # [C] float64: max |x| over every element, when requested

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def var(self) -> np.ndarray:
        """Population variance, clipped at 0 (E[x²] − E[x]² can round below it)."""
        return np.maximum(self.sumsq / self.count - self.mean**2, 0.0)

    @property
    def norm(self) -> np.ndarray:
        """L2 norm of each channel over all calibration elements."""
        return np.sqrt(self.sumsq)

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(self.sumsq / self.count)


@dataclasses.dataclass(frozen=True)
class _Outputs:
    """Names of the instrumented model's outputs for one (value, axis)."""

    sum: str
    sumsq: str
    size: str
    gram: str | None
    absmax: str | None = None


def collect(
    model: ir.Model,
    requests: Sequence[StatRequest],
    dataset: Sequence[Mapping[str, np.ndarray]] | None,
    *,
    threads: int | None = None,
    desc: str = "calibration",
) -> dict[StatRequest, ChannelStats]:
    """Per-channel statistics of each requested value over every batch of ``dataset``.

    ``model`` is not modified. Raises `DataError` without data, `ValueError` for a request that
    names no float activation of the main graph or an axis out of range, `BackendError` when ONNX
    Runtime cannot build or run the instrumented model.
    """
    _require_data(dataset, desc)
    requests = list(dict.fromkeys(requests))
    values = _activations(model, requests)
    with workdir.new("calib") as tmp:
        path = Path(tmp) / "model.onnx"
        _save_lean(model, path)
        proto = onnx.load(str(path), load_external_data=False)
        types = _types(proto, values, {r.value for r in requests})
        axes = {r: _normalise_axis(r, types[r.value][1]) for r in requests}
        wanted: dict[tuple[str, int], tuple[bool, bool]] = {}  # (value, axis) -> (any wants X^T X, any wants max |x|)
        for r in requests:
            gram, absmax = wanted.get((r.value, axes[r]), (False, False))
            wanted[(r.value, axes[r])] = (gram or r.gram, absmax or r.absmax)
        plan = _instrument(proto, types, wanted)
        onnx.save(proto, str(path))
        maxima = {names.absmax for names in plan.values() if names.absmax}
        totals = _stream(_session(model, path, threads), dataset, desc, maxima)
    stats = {}
    for r in requests:
        names = plan[(r.value, axes[r])]
        channels = totals[names.sum].shape[0]
        stats[r] = ChannelStats(
            count=int(totals[names.size]) // channels, sum=totals[names.sum], sumsq=totals[names.sumsq],
            gram=totals[names.gram] if r.gram else None, absmax=totals[names.absmax] if r.absmax else None,
        )
    return stats


def _save_lean(model: ir.Model, path: Path) -> None:
    """Save for instrumenting: memory-mapped weights are streamed to external data (the instrumented
    proto then holds references, not the weights), others go external above ~1.8 GB."""
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    save_onnx(model, path, external_data=True if external else None)


def _session(model: ir.Model, path: Path, threads: int | None):
    """The instrumented model's session; a float model's uses the IR's weight arrays in place."""
    shared = shareable_initializers(model) if shares_weights(model) else None
    return create_session(path, threads, shared=shared)


def _require_data(dataset: Sequence[Mapping[str, np.ndarray]] | None, desc: str) -> None:
    if dataset is None or len(dataset) == 0:
        raise DataError(
            f"{desc} needs calibration data, and none was given. Pass it with calibration=... in "
            "slimc.compile(...), or --calib PATH on the command line (a text file, an image folder "
            "or an .npz of arrays keyed by input name)."
        )


def _activations(model: ir.Model, requests: Sequence[StatRequest]) -> dict[str, ir.Value]:
    """The requested values of the main graph by name; ValueError for weights and unknown names."""
    graph = model.graph
    values = {v.name: v for v in graph.inputs}
    values.update((v.name, v) for node in graph for v in node.outputs)
    for r in requests:
        if r.value in graph.initializers:
            raise ValueError(f"calibration: {r.value!r} is an initializer (a weight), not an activation.")
        if r.value not in values:
            raise ValueError(f"calibration: the main graph has no value named {r.value!r}.")
    return values


def _types(proto: onnx.ModelProto, values: dict[str, ir.Value], names: set[str]) -> dict[str, tuple[int, int]]:
    """(ONNX element type, rank) of each named value: from the IR, else from ONNX shape inference."""
    known = {}
    for name in names:
        value = values[name]
        if value.dtype is not None and value.shape is not None:
            known[name] = (int(value.dtype), len(value.shape))
    if len(known) < len(names):
        _read_types(onnx.shape_inference.infer_shapes(proto).graph, names, known)
    if len(known) < len(names):  # after ORT's com.microsoft ops only ORT's own inference knows them
        from slimc.typeinfer import ort_symbolic

        symbolic = ort_symbolic(proto)
        if symbolic is not None:
            _read_types(symbolic.graph, names, known)
    for name in names:
        if name not in known:
            raise ValueError(
                f"calibration: the rank of {name!r} is unknown (no shape in the graph and ONNX shape "
                "inference cannot derive one); run shape inference on the model or add its value_info."
            )
        if known[name][0] not in _FLOATS:
            dtype = TensorProto.DataType.Name(known[name][0])
            raise ValueError(f"calibration: {name!r} is {dtype}; statistics need a float value.")
    return known


def _read_types(graph: onnx.GraphProto, names: set[str], known: dict[str, tuple[int, int]]) -> None:
    """Add to ``known`` the (element type, rank) ``graph``'s value_info gives the named values it lacks."""
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if info.name in names and info.name not in known and tensor.HasField("shape"):
            known[info.name] = (tensor.elem_type, len(tensor.shape.dim))


def _normalise_axis(request: StatRequest, rank: int) -> int:
    if not -rank <= request.axis < rank:
        raise ValueError(
            f"calibration: axis {request.axis} is out of range for {request.value!r} of rank {rank}."
        )
    return request.axis % rank


class _Builder:
    """Appends nodes and initializers to a graph under names no existing value uses."""

    def __init__(self, proto: onnx.ModelProto):
        self.graph = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        if not self.opset:
            self.opset = 17
            proto.opset_import.append(helper.make_opsetid("", self.opset))
        self.used = {n for node in self.graph.node for n in [*node.input, *node.output]}
        self.used |= {v.name for v in [*self.graph.input, *self.graph.output, *self.graph.initializer]}

    def name(self, hint: str) -> str:
        index = 0
        while f"slimc.calib/{hint}/{index}" in self.used:
            index += 1
        self.used.add(name := f"slimc.calib/{hint}/{index}")
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        self.graph.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def reduce_sum(self, x: str, axes: list[int], hint: str) -> str:
        """ReduceSum over ``axes`` with keepdims=0: axes as an input from opset 13, an attribute before."""
        return self._reduce("ReduceSum", 13, x, axes, hint)

    def reduce_max(self, x: str, axes: list[int], hint: str) -> str:
        """ReduceMax over ``axes`` with keepdims=0: axes as an input from opset 18, an attribute before."""
        return self._reduce("ReduceMax", 18, x, axes, hint)

    def _reduce(self, op: str, axes_input_since: int, x: str, axes: list[int], hint: str) -> str:
        if not axes:  # a rank-1 value: every element is its own channel already
            return self.node("Identity", [x], hint)
        if self.opset < axes_input_since:
            return self.node(op, [x], hint, axes=axes, keepdims=0)
        axes_name = self.name(f"{hint}.axes")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(axes, np.int64), axes_name))
        return self.node(op, [x, axes_name], hint, keepdims=0)


def _instrument(
    proto: onnx.ModelProto, types: dict[str, tuple[int, int]], wanted: dict[tuple[str, int], tuple[bool, bool]]
) -> dict[tuple[str, int], _Outputs]:
    """Add the reductions for each (value, axis) (with X^T X, max |x| where flagged) and make them the outputs."""
    build = _Builder(proto)
    del proto.graph.output[:]  # only the statistics are computed; ORT prunes the rest of the graph

    def output(name: str, elem: int) -> str:
        proto.graph.output.append(helper.make_tensor_value_info(name, elem, None))
        return name

    shared: dict[str, tuple[str, str, str]] = {}  # value -> (float value, its square, its size)
    magnitudes: dict[str, str] = {}  # value -> Abs(float value), made once
    plan = {}
    for (value, axis), (gram, absmax) in wanted.items():
        elem, rank = types[value]
        if value not in shared:
            xf = value
            if elem in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
                xf = build.node("Cast", [value], "float", to=TensorProto.FLOAT)
            size = output(build.node("Size", [value], "size"), TensorProto.INT64)
            shared[value] = (xf, build.node("Mul", [xf, xf], "square"), size)
        xf, square, size = shared[value]
        stat_elem = TensorProto.DOUBLE if elem == TensorProto.DOUBLE else TensorProto.FLOAT
        others = [a for a in range(rank) if a != axis]
        gram_out = None
        if gram:
            last = xf if axis == rank - 1 else build.node("Transpose", [xf], "last", perm=[*others, axis])
            rows = build.node("Flatten", [last], "rows", axis=rank - 1)  # [-1, C]; [1, C] at rank 1
            rows_t = build.node("Transpose", [rows], "rows_t")
            gram_out = output(build.node("MatMul", [rows_t, rows], "gram"), stat_elem)
        absmax_out = None
        if absmax:
            if value not in magnitudes:
                magnitudes[value] = build.node("Abs", [xf], "abs")
            absmax_out = output(build.reduce_max(magnitudes[value], others, "absmax"), stat_elem)
        plan[(value, axis)] = _Outputs(
            output(build.reduce_sum(xf, others, "sum"), stat_elem),
            output(build.reduce_sum(square, others, "sumsq"), stat_elem), size, gram_out, absmax_out,
        )
    return plan


def _stream(
    session, dataset: Sequence[Mapping[str, np.ndarray]], desc: str, maxima: Set[str] = frozenset()
) -> dict[str, np.ndarray]:
    """Run every batch and add each output into a float64 total (int64 sizes stay exact).

    Outputs named in ``maxima`` keep the running element-wise maximum instead of a sum.
    """
    names = [o.name for o in session.get_outputs()]
    totals: dict[str, np.ndarray] = {}
    for index, batch in enumerate(progress.bar(dataset, desc, total=len(dataset), unit="batch")):
        for name, out in zip(names, run(session, dict(batch))):
            out = out.astype(np.int64 if out.dtype == np.int64 else np.float64)
            if name not in totals:
                totals[name] = out
            elif totals[name].shape != out.shape:
                raise ValueError(
                    f"calibration: batch {index} gives statistics of shape {out.shape}, earlier batches "
                    f"{totals[name].shape}: the channel axis must have the same size in every batch."
                )
            elif name in maxima:
                totals[name] = np.maximum(totals[name], out)
            else:
                totals[name] += out
    return totals


# ---------------------------------------------------------------- cosine similarity of value pairs


@dataclasses.dataclass(frozen=True)
class CosineRequest:
    """Cosine of graph values ``a`` and ``b`` (same shape) along ``axis``, at every other position.

    ``weights`` names an optional graph input (an attention mask ``[batch, seq]``) that weights the
    positions; it must have the rank of the per-position cosine (the values' rank minus one).
    """

    a: str
    b: str
    axis: int = -1
    weights: str | None = None


@dataclasses.dataclass
class CosineStats:
    """Weighted sums over every calibration position; ``weight`` is the number of positions (or the
    sum of their weights)."""

    weight: float
    sum: float  # Σ w·cos
    sumsq: float  # Σ w·cos²

    @property
    def mean(self) -> float:
        return self.sum / self.weight if self.weight else float("nan")

    @property
    def std(self) -> float:
        return float(np.sqrt(max(self.sumsq / self.weight - self.mean**2, 0.0))) if self.weight else float("nan")


def cosine(
    model: ir.Model,
    requests: Sequence[CosineRequest],
    dataset: Sequence[Mapping[str, np.ndarray]] | None,
    *,
    threads: int | None = None,
    desc: str = "cosine statistics",
) -> dict[CosineRequest, CosineStats]:
    """Per-position cosine similarity of each requested pair of values, summed over ``dataset``.

    For a pair ``(a, b)`` and channel axis ``k``, at every position ``p`` (an index of all axes but
    ``k``: a token of a ``[batch, seq, hidden]`` hidden state, a pixel of an NCHW feature map)::

        cos_p = <a_p, b_p> / (‖a_p‖ ‖b_p‖)        clipped to [-1, 1]
        cos_p = 1 where a_p = b_p exactly (two zero vectors included); 0 where just one is zero

    and the graph outputs ``Σ_p w_p cos_p``, ``Σ_p w_p cos_p²`` and ``Σ_p w_p`` (``w_p`` = 1, or the
    request's weights input). As in `collect`, a copy of the model is instrumented with these
    reductions as its only outputs and batches stream through one ORT session, so memory holds
    three numbers per pair, never the activations. ``model`` is not modified. Raises `DataError`
    without data and `ValueError` for a request naming no float value, an axis out of range, or
    weights of the wrong rank.
    """
    _require_data(dataset, desc)
    requests = list(dict.fromkeys(requests))
    names = {n for r in requests for n in (r.a, r.b)}
    values = _activations(model, [StatRequest(n, 0) for n in sorted(names)])
    graph_inputs = {v.name for v in model.graph.inputs}
    for r in requests:
        if r.weights is not None and r.weights not in graph_inputs:
            raise ValueError(f"calibration: weights {r.weights!r} is not a graph input.")
    with workdir.new("calib") as tmp:
        path = Path(tmp) / "model.onnx"
        _save_lean(model, path)
        proto = onnx.load(str(path), load_external_data=False)
        types = _types(proto, values, names)
        plan = _instrument_cosine(proto, types, requests)
        onnx.save(proto, str(path))
        totals = _stream(_session(model, path, threads), dataset, desc)
    return {r: CosineStats(weight=float(totals[plan[r][2]]), sum=float(totals[plan[r][0]]), sumsq=float(totals[plan[r][1]]))
            for r in requests}


def _instrument_cosine(
    proto: onnx.ModelProto, types: dict[str, tuple[int, int]], requests: Sequence[CosineRequest]
) -> dict[CosineRequest, tuple[str, str, str]]:
    """Add the per-position cosine reductions of each request; {request: (Σ w·cos, Σ w·cos², Σ w) output names}."""
    build = _Builder(proto)
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in proto.graph.input if i.type.tensor_type.HasField("shape")}
    del proto.graph.output[:]

    def output(name: str, elem: int) -> str:
        proto.graph.output.append(helper.make_tensor_value_info(name, elem, None))
        return name

    def const(value: float, hint: str) -> str:
        name = build.name(hint)
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    floats: dict[str, str] = {}
    squares: dict[tuple[str, int], str] = {}
    weights: dict[str, tuple[str, str]] = {}
    zero, one, tiny = const(0.0, "zero"), const(1.0, "one"), const(1e-30, "tiny")

    def as_float(value: str) -> str:
        if value not in floats:
            elem = types[value][0]
            floats[value] = value if elem == TensorProto.FLOAT else build.node("Cast", [value], "float", to=TensorProto.FLOAT)
        return floats[value]

    def norm2(value: str, axis: int) -> str:  # Σ_k x_k² along the channel axis
        if (value, axis) not in squares:
            xf = as_float(value)
            squares[(value, axis)] = build.reduce_sum(build.node("Mul", [xf, xf], "square"), [axis], "norm2")
        return squares[(value, axis)]

    plan = {}
    for r in requests:
        rank = types[r.a][1]
        if types[r.b][1] != rank:
            raise ValueError(f"calibration: {r.a!r} and {r.b!r} have different ranks ({rank} and {types[r.b][1]}).")
        if not -rank <= r.axis < rank:
            raise ValueError(f"calibration: axis {r.axis} is out of range for {r.a!r} of rank {rank}.")
        axis = r.axis % rank
        a, b = as_float(r.a), as_float(r.b)
        dot = build.reduce_sum(build.node("Mul", [a, b], "dot"), [axis], "dot")
        den = build.node("Sqrt", [build.node("Mul", [norm2(r.a, axis), norm2(r.b, axis)], "den2")], "den")
        cos = build.node("Div", [dot, build.node("Max", [den, tiny], "den_safe")], "cos")
        cos = build.node("Clip", [cos, const(-1.0, "lo"), one], "cos_clipped")
        diff = build.node("Sub", [a, b], "diff")
        same = build.node("Equal", [build.reduce_sum(build.node("Mul", [diff, diff], "diff2"), [axis], "dist2"), zero], "same")
        cos = build.node("Where", [same, one, cos], "cos_exact")
        positions = list(range(rank - 1))
        if r.weights is None:
            weighted, total = cos, output(build.node("Size", [cos], "positions"), TensorProto.INT64)
        else:
            if ranks.get(r.weights) != rank - 1:
                raise ValueError(
                    f"calibration: weights {r.weights!r} must have rank {rank - 1} (one weight per position of "
                    f"{r.a!r}); it has rank {ranks.get(r.weights)}."
                )
            if r.weights not in weights:  # (the weights as float, their total): made once per input
                w = build.node("Cast", [r.weights], "weights", to=TensorProto.FLOAT)
                weights[r.weights] = (w, output(build.reduce_sum(w, positions, "weight_sum"), TensorProto.FLOAT))
            w, total = weights[r.weights]
            weighted = build.node("Mul", [cos, w], "weighted")
        sq = build.node("Mul", [weighted, cos], "cos2")
        plan[r] = (output(build.reduce_sum(weighted, positions, "cos_sum"), TensorProto.FLOAT),
                   output(build.reduce_sum(sq, positions, "cos2_sum"), TensorProto.FLOAT), total)
    return plan
