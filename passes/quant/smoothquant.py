"""`smoothquant`: move activation outliers into the weights before int8 quantization (exact).

SmoothQuant (Xiao et al., ICML 2023, arXiv:2211.10438). Transformer activations have a few
input channels whose magnitude is 10-100x the rest; quantizing X per tensor wastes the int8
range on them, while the weights are easy to quantize. For a linear layer ``y = X W`` (W is
[K, N], row j multiplies channel j of X) pick one scale per input channel

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(``max|X_j|`` over the calibration set, ``max|W_j|`` over row j of W, and over every linear
that reads the same X: q/k/v or gate/up projections share one s), then X' = X / s and
W' = diag(s) W. ``X' W' = X W`` exactly, X' is flatter (``alpha`` says how much of the
difficulty moves to the weights: 0.5 splits it evenly) and W' is still easy to quantize.

The graph keeps its size: the division of X is folded into the constants of whatever produced
X, so only weights change. Folds (each exact in real arithmetic, since s > 0):

- ``LayerNormalization`` / ``RMSNormalization`` / ``SimplifiedLayerNormalization``: divide its
  scale (gamma) and bias (beta) by s;
- ``Mul`` by a constant (the weight of a decomposed RMSNorm, ``x * rsqrt(...) * w``): divide
  the constant;
- a linear producer, ``MatMul`` / ``Gemm`` with a constant weight: divide its output columns
  (and a ``Gemm`` bias);
- ``Add`` of a constant (a bias after a MatMul): divide the constant and fold into the other
  input;
- ``Mul`` of two activations (SwiGLU's ``silu(gate) * up`` before down_proj): fold into the
  factor that can take it (up_proj's output columns);
- on the way up, ops that keep channel j in place and commute with a positive per-channel
  scale are passed through: ``Reshape`` / ``Flatten`` / ``Squeeze`` / ``Unsqueeze`` whose input
  and output both end in the C channels (row-major order keeps every element's channel),
  ``Transpose`` that keeps the last axis last, ``Identity``, same-type ``Cast``, ``Relu``.

Every value on the path must be read only by the next op on it, and X only by the smoothed
linears: any other reader (a residual ``Add``, a graph output, attention) would see X / s. What
cannot be folded is left alone and reported with the reason, never guessed: X is a graph
input, X is also read by a non-linear op (post-LN models such as BERT feed the LayerNorm output
to the residual too), the producer is a non-linear op (GELU before an FFN's second linear),
the channels are regrouped on the way (attention output -> o_proj: heads are merged by a
Reshape of a [.., heads, head_dim] tensor), a weight is float16 (rounding W * s there is not
exact: smooth the float32 model, before fp16), Conv layers (channels on axis 1; out of scope).

Scales come from the original model (activation maxima are streamed through an instrumented
copy, `slimc.calibrate`), are clipped to [1e-5, 1e5], and are 1 for channels whose activation
or weight row is all zero. A constant that something else also reads (exporters share one
deduplicated ``ones`` vector between every norm) is copied before it is changed. The pass
declares itself exact: ``compile()`` checks the outputs against its input (fp32 rounding of the
rescaled constants moves them by a few ulps).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np
import onnx_ir as ir

from slimc.backends.onnxruntime import release_mapped_pages
from slimc.data import first_batches
from slimc.errors import DataError, PassConfigError
from slimc.passes.quant.common import WeightedOp, attr, module_path, node_matches, refuse_quantized, weighted_ops
from slimc.pipeline import Pass, PassContext, PassReport

MIN_SCALE, MAX_SCALE = 1e-5, 1e5
_STANDARD = ("", "ai.onnx")
_NORMS = {  # op -> input indices of its per-channel constants (scale, bias)
    ("", "LayerNormalization"): (1, 2),
    ("", "RMSNormalization"): (1,),
    ("", "SimplifiedLayerNormalization"): (1,),
    ("com.microsoft", "SimplifiedLayerNormalization"): (1,),
}
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
_MAX_DEPTH = 64  # nested folds (Mul / Add recursions) before giving up


@dataclasses.dataclass(frozen=True)
class _Edit:
    """Scale the constant input ``index`` of ``node`` per channel along ``axis`` (-1: last)."""

    node: ir.Node
    index: int
    axis: int


@dataclasses.dataclass
class _Fold:
    """How to divide channel j of a value by s_j: the constants to divide, the ops passed."""

    kind: str
    edits: list[_Edit]
    through: list[ir.Node]


@dataclasses.dataclass
class _Group:
    """Linear layers reading the same activation ``x`` (C channels), and the fold for X / s."""

    x: ir.Value
    linears: list[WeightedOp]
    channels: int
    fold: _Fold


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name or '?'}'"


def _const(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant (initializer or ``Constant`` node output); None for activations."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in _STANDARD:
        tensor = attr(node, "value", None)
        if tensor is not None:
            return tensor.numpy()
    return None



class _Shapes:
    """Shapes of values: from the graph's annotations, else (once, lazily) ONNX shape inference."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.inferred: dict[str, tuple] | None = None

    def __call__(self, value: ir.Value) -> tuple | None:
        if value.shape is not None:
            return tuple(d if isinstance(d, int) else None for d in value.shape)
        if self.inferred is None:
            self.inferred = self._infer()
        return self.inferred.get(value.name or "")

    def last_dim(self, value: ir.Value) -> int | None:
        shape = self(value)
        return shape[-1] if shape else None

    def _infer(self) -> dict[str, tuple]:
        import onnx

        from slimc.analysis import _call_onnx_api

        def infer(proto):
            return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)

        try:
            proto = _call_onnx_api(infer, self.model)
        except Exception:  # best effort: unknown shapes make the fold refuse, with a reason
            return {}
        shapes = {}
        for info in (*proto.graph.value_info, *proto.graph.output, *proto.graph.input):
            tensor = info.type.tensor_type
            if tensor.HasField("shape"):
                shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        return shapes


def _private(value: ir.Value, reader: ir.Node) -> str | None:
    """Why ``value`` cannot be rescaled for ``reader`` alone (another reader, a graph output)."""
    if value.is_graph_output():
        return f"'{value.name}' is a graph output (the model's output would change)"
    others = [u.node for u in value.uses() if u.node is not reader]
    if others:
        return f"'{value.name}' is also read by {_label(others[0])} (it would see the scaled values)"
    if len(value.uses()) != 1:
        return f"'{value.name}' is read twice by {_label(reader)}"
    return None


class _Tracer:
    """Finds, for a value whose last axis holds C channels, the constants to divide by s upstream."""

    def __init__(self, shapes: _Shapes):
        self.shapes = shapes

    def vector(self, node: ir.Node, index: int, value: ir.Value, channels: int) -> str | None:
        """Why constant input ``index`` of ``node`` cannot carry a per-channel division (None: it can).

        Its last axis must hold the C channels, or broadcast (size 1) into an output that does.
        """
        arr = _const(node.inputs[index])
        if arr is None:
            return f"{_label(node)}: input {index} is not a constant"
        last = arr.shape[-1] if arr.ndim else 1
        if last == channels:
            return None
        if last == 1 and self.shapes.last_dim(value) == channels:
            return None
        return f"{_label(node)}: constant of shape {list(arr.shape)} does not hold the {channels} channels on its last axis"

    def trace(self, value: ir.Value, channels: int, depth: int = 0) -> _Fold | str:
        """The fold dividing channel j (last axis) of ``value`` by s_j, or why there is none.

        The caller has checked that ``value``'s readers all see the scaled value correctly.
        """
        through: list[ir.Node] = []
        while True:
            node = value.producer()
            if node is None:
                if value.is_graph_input():
                    return f"'{value.name}' is a graph input (no producer to fold 1/s into)"
                return f"'{value.name}' is a constant"
            step = self._pass_through(node, value, channels)
            if isinstance(step, ir.Value):
                reason = _private(step, node)
                if reason:
                    return reason
                through.append(node)
                value = step
                continue
            if step is not None:
                return step
            fold = self._fold(node, value, channels, depth)
            if isinstance(fold, _Fold):
                fold.through = through + fold.through
            return fold

    def _pass_through(self, node: ir.Node, value: ir.Value, channels: int) -> ir.Value | str | None:
        """The input to continue from when ``node`` keeps channels in place; a reason; None: not such an op."""
        if node.domain not in _STANDARD or not node.inputs or node.inputs[0] is None:
            return None
        op, src = node.op_type, node.inputs[0]
        if op in _RESHAPES:
            if self.shapes.last_dim(src) != channels:
                shape = self.shapes(src)
                shown = "unknown" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
                return (f"{_label(node)} forms the {channels} channels from an input of shape {shown} whose last axis "
                        "is not those channels (attention heads merged back, NCHW features flattened), so one scale "
                        "per channel cannot be folded through it")
            return src
        if op == "Transpose":
            perm = attr(node, "perm", None)
            if perm is None or list(perm)[-1] != len(perm) - 1:
                return f"{_label(node)} moves the channel axis"
            return src
        if op in ("Identity", "Relu") and node.outputs[0] is value:
            return src
        if op == "Cast" and src.dtype is not None and src.dtype == value.dtype:
            return src
        return None

    def _fold(self, node: ir.Node, value: ir.Value, channels: int, depth: int) -> _Fold | str:
        op, key = node.op_type, (node.domain if node.domain != "ai.onnx" else "", node.op_type)
        if depth > _MAX_DEPTH:
            return f"{_label(node)}: fold nested too deep"
        if key in _NORMS:
            if node.outputs[0] is not value:
                return f"'{value.name}' is a statistics output of {_label(node)}"
            # Y = normalized(X) * scale + bias, element-wise: whatever the normalized axes, dividing
            # scale and bias along Y's last axis divides Y's channels.
            indices = [i for i in _NORMS[key] if i < len(node.inputs) and node.inputs[i] is not None]
            for i in indices:
                reason = self.vector(node, i, value, channels)
                if reason:
                    return reason
            return _Fold(op, [_Edit(node, i, -1) for i in indices], [])
        if node.domain not in _STANDARD:
            return f"'{value.name}' is produced by {_label(node)} ({node.domain}), which slimc does not fold into"
        if op in ("MatMul", "Gemm"):
            return self._linear(node, value, channels)
        if op == "Mul":
            return self._mul(node, value, channels, depth)
        if op == "Add":
            consts = [i for i in (0, 1) if _const(node.inputs[i]) is not None]
            if len(consts) != 1:
                operands = "two constants" if consts else "two activations (a residual connection)"
                return f"'{value.name}' is produced by {_label(node)} of {operands}"
            reason = self.vector(node, consts[0], value, channels)
            other = node.inputs[1 - consts[0]]
            reason = reason or _private(other, node)
            if reason:
                return reason
            inner = self.trace(other, channels, depth + 1)
            if isinstance(inner, str):
                return f"{_label(node)} adds a bias to '{other.name}', which cannot be scaled: {inner}"
            return _Fold(f"{inner.kind} + bias", [_Edit(node, consts[0], -1), *inner.edits], inner.through)
        return (f"'{value.name}' is produced by {_label(node)}, which does not commute with a per-channel scale "
                "(folds: LayerNormalization, Mul by a constant, MatMul/Gemm with constant weights, Mul of a linear's output)")

    def _linear(self, node: ir.Node, value: ir.Value, channels: int) -> _Fold | str:
        weight = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or weight.ndim != 2:
            return f"'{value.name}' is produced by {_label(node)} without a constant 2-D weight"
        n_axis = 0 if node.op_type == "Gemm" and attr(node, "transB", 0) else 1
        if weight.shape[n_axis] != channels:
            return f"{_label(node)} has {weight.shape[n_axis]} output channels, not {channels}"
        edits = [_Edit(node, 1, n_axis)]
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            reason = self.vector(node, 2, value, channels)
            if reason:
                return reason
            edits.append(_Edit(node, 2, -1))
        return _Fold(f"{node.op_type} (output columns)", edits, [])

    def _mul(self, node: ir.Node, value: ir.Value, channels: int, depth: int) -> _Fold | str:
        consts = [i for i in (0, 1) if _const(node.inputs[i]) is not None]
        if consts:
            reason = self.vector(node, consts[0], value, channels)
            return reason or _Fold("Mul by a constant", [_Edit(node, consts[0], -1)], [])
        reasons = []
        for i in (0, 1):  # (a / s) * b = (a * b) / s: one factor takes the scale
            factor = node.inputs[i]
            reason = _private(factor, node)
            inner = reason or self.trace(factor, channels, depth + 1)
            if isinstance(inner, _Fold):
                return _Fold(f"Mul of activations, factor from {inner.kind}", inner.edits, inner.through)
            reasons.append(f"'{factor.name}': {inner}")
        return f"{_label(node)} multiplies two activations and neither factor can take the scale ({'; '.join(reasons)})"


@dataclasses.dataclass
class SmoothQuant(Pass):
    """Fold per-channel activation scales into the producers and the weights (exact), for int8.

    Options:
        alpha: migration strength in [0, 1]: how much of the activations' range moves into the
            weights (0.5 splits it evenly; 0.75-0.85 for models with strong outliers).
        calibration_batches: calibration batches streamed for the per-channel max |x|.
        exclude: glob patterns (node name, op type, module path or weight name); a group is left
            alone when a pattern matches any node whose constants it would change.
    """

    alpha: float = 0.5
    calibration_batches: int = 16
    exclude: Optional[list[str]] = None

    name = "smoothquant"
    exact = True
    description = "SmoothQuant: migrate activation outliers into the weights (exact; run before int8)"

    def __post_init__(self) -> None:
        super().__init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise PassConfigError(
                f"smoothquant: alpha={self.alpha} is out of range; use a value in [0, 1] (0.5 splits the "
                "difficulty evenly; 0.75-0.85 for models with strong outliers)."
            )
        if self.calibration_batches < 1:
            raise PassConfigError("smoothquant: calibration_batches must be >= 1, e.g. calibration_batches=16.")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]

    # ------------------------------------------------------------ analysis

    def groups(self, model: ir.Model) -> tuple[list[_Group], list[tuple[str, str]], int]:
        """The groups that can be smoothed exactly, (what, why) for what cannot, and how many groups there are."""
        by_input: dict[ir.Value, list[WeightedOp]] = {}
        convs = []
        for op in weighted_ops(model):
            if op.node.op_type == "Conv":
                convs.append(op.node)
            elif op.node.inputs[0] is not None:
                by_input.setdefault(op.node.inputs[0], []).append(op)
        shapes = _Shapes(model)
        tracer = _Tracer(shapes)
        groups, left = [], []
        for x, linears in by_input.items():
            nodes = {op.node for op in linears}
            what = f"{len(linears)} linear(s) reading '{x.name}': {', '.join(module_path(op.node) for op in linears)}"
            result = self._group(x, linears, nodes, tracer)
            if isinstance(result, str):
                left.append((what, result))
            else:
                groups.append(result)
        if convs:
            names = ", ".join(n.name or "?" for n in convs[:3]) + (", ..." if len(convs) > 3 else "")
            left.append((f"{len(convs)} Conv layer(s) ({names})",
                         "smoothquant smooths MatMul/Gemm inputs; conv channels (axis 1) are not handled"))
        return groups, left, len(by_input)

    def _group(self, x: ir.Value, linears: list[WeightedOp], nodes: set, tracer: _Tracer) -> _Group | str:
        channels = {op.array.shape[op.k_axis] for op in linears}
        if len(channels) != 1:
            return f"the weights disagree on the input channels ({sorted(channels)})"
        (c,) = channels
        for op in linears:
            if op.node.op_type == "Gemm" and attr(op.node, "transA", 0):
                return f"{_label(op.node)} has transA=1 (its input channels are not the last axis)"
        if x.is_graph_output():
            return f"'{x.name}' is also a graph output (it would change)"
        others = [u.node for u in x.uses() if u.node not in nodes or u.idx != 0]
        if others:
            return (f"'{x.name}' is also read by {_label(others[0])}, which is not one of its linear layers "
                    "and would see X / s (e.g. a residual connection)")
        fold = tracer.trace(x, c)
        if isinstance(fold, str):
            return fold
        touched = [*nodes, *(e.node for e in fold.edits)]
        if self.exclude and any(node_matches(n, self.exclude) for n in touched):
            hit = next(n for n in touched if node_matches(n, self.exclude))
            return f"exclude= matches {_label(hit)}, whose weights this group would change"
        edited = [(op.node, op.index) for op in linears] + [(e.node, e.index) for e in fold.edits]
        for node, index in edited:
            dtype = _const(node.inputs[index]).dtype
            if dtype not in (np.float32, np.float64):
                return (f"{_label(node)} has a {dtype} constant: rounding it times s is not exact; "
                        "run smoothquant on the float32 model, before fp16")
        return _Group(x, linears, c, fold)

    # ------------------------------------------------------------ the pass

    def scales(self, act_absmax: np.ndarray, weight_absmax: np.ndarray) -> np.ndarray:
        """s = max|X|^alpha / max|W|^(1-alpha), 1 where either is zero, clipped to [1e-5, 1e5]."""
        a, w = np.asarray(act_absmax, np.float64), np.asarray(weight_absmax, np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s = np.power(a, self.alpha) / np.power(w, 1.0 - self.alpha)
        s = np.where((a > 0) & (w > 0) & np.isfinite(s), s, 1.0)
        return np.clip(s, MIN_SCALE, MAX_SCALE)

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        start = time.perf_counter()
        refuse_quantized(model, self.name)
        if ctx.calibration is None:
            raise DataError(
                "smoothquant needs calibration data (the per-channel activation maxima set the scales). "
                "Pass calibration=... to slimc.compile(...), or --calib PATH on the command line."
            )
        groups, left, total = self.groups(model)
        stats = {}
        if groups:
            from slimc.calibrate import StatRequest, collect

            data = ctx.calibration
            data = first_batches(data, self.calibration_batches)
            requests = {g.x.name: StatRequest(g.x.name, -1, absmax=True) for g in groups}
            collected = collect(model, list(requests.values()), data, desc="smoothquant statistics")
            stats = {name: collected[r].absmax for name, r in requests.items()}

        # the scalings of every changed constant, in order: each weight is read and scaled (in float64) when it
        # is needed, one at a time, never all of them as float64 copies (`_scaled`)
        work: dict[tuple[ir.Node, int], list[tuple[int, np.ndarray]]] = {}

        def scale(node: ir.Node, index: int, axis: int, factor: np.ndarray) -> None:
            work.setdefault((node, index), []).append((axis, factor))

        def absmax(op) -> np.ndarray:
            """max |W| along the output axis of ``op``'s weight as scaled so far."""
            source = _const(op.node.inputs[op.index])
            try:
                return np.abs(_scaled(source, work.get((op.node, op.index), []))).max(axis=op.n_axis)
            finally:
                release_mapped_pages([source])  # a memory-mapped weight is read again only when written

        smoothed = []
        for g in groups:
            act = stats[g.x.name]
            if act.shape != (g.channels,):
                left.append((f"linears reading '{g.x.name}'", f"calibration gave {act.shape} channels, expected {g.channels}"))
                continue
            wmax = np.max([absmax(op) for op in g.linears], axis=0)
            s = self.scales(act, wmax)
            for op in g.linears:
                scale(op.node, op.index, op.k_axis, s)
            for edit in g.fold.edits:
                scale(edit.node, edit.index, edit.axis, 1.0 / s)
            after_w = np.max([absmax(op) for op in g.linears], axis=0)
            smoothed.append({
                "input": g.x.name, "channels": g.channels,
                "linears": [module_path(op.node) for op in g.linears], "nodes": [op.node.name for op in g.linears],
                "producer": g.fold.kind,
                "folded_into": sorted({_label(e.node) for e in g.fold.edits}),
                "through": [_label(n) for n in g.fold.through],
                "scale_min": float(s.min()), "scale_max": float(s.max()),
                "act_absmax_before": float(act.max()), "act_absmax_after": float((act / s).max()),
                "act_channel_ratio_before": _ratio(act), "act_channel_ratio_after": _ratio(act / s),
                "weight_absmax_before": float(wmax.max()), "weight_absmax_after": float(after_w.max()),
            })
        _write(model, work)

        if smoothed:
            lo = min(g["scale_min"] for g in smoothed)
            hi = max(g["scale_max"] for g in smoothed)
            ratio_b = max(g["act_channel_ratio_before"] for g in smoothed)
            ratio_a = max(g["act_channel_ratio_after"] for g in smoothed)
            summary = (f"{len(smoothed)} of {total} linear-input groups smoothed (alpha={self.alpha}); "
                       f"scales in [{lo:.3g}, {hi:.3g}]; worst activation channel max/median {ratio_b:.3g} -> {ratio_a:.3g}")
        else:
            summary = f"nothing smoothed: {total} linear-input group(s), none can be folded exactly (see left_alone)"
        return PassReport(
            name=self.name, modified=bool(smoothed), summary=summary,
            details={"alpha": self.alpha, "groups_smoothed": smoothed, "constants_changed": len(work),
                     "scale_range": [min((g["scale_min"] for g in smoothed), default=1.0),
                                     max((g["scale_max"] for g in smoothed), default=1.0)]},
            left_alone=left, seconds=time.perf_counter() - start,
        )


def _ratio(absmax: np.ndarray) -> float:
    """max / median of per-channel maxima: how much the largest channel stands out."""
    median = float(np.median(absmax))
    return float(absmax.max() / median) if median > 0 else float("inf")


def _scaled(source: np.ndarray, steps: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """``source`` in float64 with the scalings ``steps`` applied in order: (axis, one factor per
    channel); a broadcast (size-1) axis takes one value per channel."""
    arr = source.astype(np.float64)
    for axis, factor in steps:
        if arr.ndim == 0:
            arr = arr.reshape(1)
        axis = axis % arr.ndim
        if arr.shape[axis] != factor.size:
            arr = np.repeat(arr, factor.size, axis=axis)
        shape = [1] * arr.ndim
        shape[axis] = factor.size
        arr = arr * factor.reshape(shape)
    return arr


def _scaled_tensor(value: ir.Value, steps: list[tuple[int, np.ndarray]], name: str | None) -> ir.TensorProtocol:
    """The constant of ``value`` scaled by ``steps``, in its own dtype. A memory-mapped initializer gives a
    lazy tensor (scaled when read: when the stage file is written, which then maps it), so the pass holds
    no weight; other constants are scaled now."""
    source = value.const_value  # None for a Constant node's output (scaled now)
    dtype = _const(value).dtype

    def make() -> ir.Tensor:
        array = source.numpy() if source is not None else _const(value)
        try:
            return ir.Tensor(_scaled(array, steps).astype(dtype), name=name)
        finally:
            if isinstance(source, ir.ExternalTensor):
                release_mapped_pages([array])

    if not isinstance(source, ir.ExternalTensor):
        return make()
    out_shape = _scaled_shape(tuple(source.shape), steps)
    return ir.LazyTensor(make, dtype=source.dtype, shape=ir.Shape(out_shape), name=name)


def _scaled_shape(shape: tuple[int, ...], steps: list[tuple[int, np.ndarray]]) -> tuple[int, ...]:
    """The shape `_scaled` gives ``shape`` (a 0-d constant becomes 1-d; broadcast axes are repeated)."""
    dims = list(shape)
    for axis, factor in steps:
        if not dims:
            dims = [1]
        axis = axis % len(dims)
        if dims[axis] != factor.size:
            dims[axis] *= factor.size
    return tuple(dims)


def _write(model: ir.Model, work: dict[tuple[ir.Node, int], list[tuple[int, np.ndarray]]]) -> None:
    """Store each changed constant: in place when only that input reads it, else as a new initializer."""
    graph = model.graph
    taken = {v.name for v in graph.initializers.values()} | {v.name for v in graph.inputs}
    taken |= {v.name for node in graph.all_nodes() for v in node.outputs}
    for (node, index), steps in work.items():
        value = node.inputs[index]
        if value.is_initializer() and not value.is_graph_input() and not value.is_graph_output() and len(value.uses()) == 1:
            tensor = _scaled_tensor(value, steps, value.name)
            value.const_value = tensor
            value.shape = ir.Shape(tensor.shape)
            continue
        base, n = f"{value.name or 'const'}.smoothed", 0
        while (name := base if n == 0 else f"{base}.{n}") in taken:
            n += 1
        taken.add(name)
        tensor = _scaled_tensor(value, steps, name)
        new = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(new)
        node.replace_input_with(index, new)
        if value.uses() or value.is_graph_input() or value.is_graph_output():
            continue
        if value.is_initializer():
            graph.initializers.pop(value.name)
        elif (producer := value.producer()) is not None and producer.op_type == "Constant" and producer.graph is graph:
            graph.remove(producer)  # the graph keeps its size: the new initializer replaces it
