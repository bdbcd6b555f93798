"""Per-op pruning rules: how each ONNX op couples the axes of its inputs and outputs.

A rule receives the `DependencyGraph` and one node. It unifies atoms (`g.tie`, products and
sums on `g.atoms`), records the constants that carry a pruned size or offset (`ShapeSite`),
records weighted contractions (the consumers whose weights the correctness oracle zeroes),
and blocks what it cannot map, always with a reason. An op with no rule blocks every slot it
touches (`DependencyGraph.__init__`).

Blocker kinds: ``None`` (hard: never pruned) or a group kind that the user can opt into
(``hidden``: the axis is normalised over by LayerNorm/RMSNorm, so pruning it changes the
statistic; ``head_dim``: contracted between two activations, q·kᵀ, so pruning changes scores).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from slimc.passes.prune.graph import STRUCTURAL, Contraction, DependencyGraph, ShapeSite
from slimc.passes.prune.shapes import static
from slimc.passes.prune.symbolic import couple, mixed_atoms

Rule = Callable[[DependencyGraph, ir.Node], None]
RULES: dict[str, Rule] = {}


def rule(*ops: str):
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def block_node(g: DependencyGraph, node: ir.Node, reason: str, kind: str | None = None) -> None:
    where = f"{reason} at {node.name or node.op_type}"
    for value in (*node.inputs, *node.outputs):
        g.block_value(value, where, kind)


def ints(value: ir.Value | None) -> list[int] | None:
    """A constant integer input as a list (None if absent or computed at run time)."""
    array = const_array(value)
    return None if array is None else [int(x) for x in array.reshape(-1)]


def known_ints(g: DependencyGraph, value: ir.Value | None) -> list[int] | None:
    """A small integer input known at analysis time: a constant, or computed from constants alone
    (unoptimised exports write ``Reshape(Constant, [-1])``); None if any element is a run-time size."""
    got = ints(value)
    if got is not None or value is None:
        return got
    elems = g.shapes.elements(value)
    if elems is None or any(static(e) is None or o is not None for e, o in elems):
        return None
    return [static(e) for e, _ in elems]


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The data of an initializer or of a ``Constant`` node's output (None if computed at run time)."""
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    # any of value / value_int(s) / value_float(s): unoptimised dynamo exports write value_ints
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else np.asarray(tensor.numpy())


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _ranked(g: DependencyGraph, node: ir.Node, *values) -> list | None:
    axes = [g.axes(v) for v in values]
    if any(a is None for v, a in zip(values, axes) if v is not None):
        block_node(g, node, f"{node.op_type}: a tensor's rank is unknown")
        return None
    return axes


def broadcast(g: DependencyGraph, node: ir.Node, inputs, out: ir.Value) -> None:
    """Numpy broadcasting: right-aligned axes of equal static size are the same slot."""
    out_axes = g.axes(out)
    for value in inputs:
        if value is None:
            continue
        in_axes = g.axes(value)
        if in_axes is None or out_axes is None:
            block_node(g, node, f"{node.op_type}: a tensor's rank is unknown")
            return
        offset = len(out_axes) - len(in_axes)
        for i, a in enumerate(in_axes):
            b = out_axes[i + offset] if i + offset >= 0 else None
            if i + offset >= 0:
                couple(g, node, value, i, out, i + offset)
            if a is None:
                # an input axis of unproven size broadcast into a static one: it may be that size
                # at run time, and it would then keep every index the output loses
                if b is not None and g.atoms.size(b) > 1:
                    g.block(b, f"broadcast from an axis of unproven size at {node.name}")
                continue
            if g.atoms.size(a) == 1:
                continue
            if b is None:
                g.block(a, f"broadcast against a dynamic axis at {node.name}")
            elif g.atoms.size(b) == g.atoms.size(a):
                g.tie(a, b)
            else:
                g.block(a, f"incompatible broadcast at {node.name}")


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
      "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "BitShift")
def elementwise(g: DependencyGraph, node: ir.Node) -> None:
    broadcast(g, node, node.inputs, node.outputs[0])


@rule("Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "Neg", "Sqrt", "Reciprocal", "Cast", "CastLike", "Exp", "Log",
      "Abs", "Clip", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "LeakyRelu", "Elu", "Selu", "Celu",
      "Mish", "Identity", "Dropout", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN", "IsInf",
      "ThresholdedRelu", "Swish")
def unary(g: DependencyGraph, node: ir.Node) -> None:
    broadcast(g, node, node.inputs[:1], node.outputs[0])


_LAYOUT_ONLY = ("Transpose", "Identity")


def weight_source(g: DependencyGraph, value: ir.Value | None) -> tuple[ir.Value, list[int]] | None:
    """The initializer an operand is, through layout-only ops, and where each operand axis lies in it.

    Unoptimised exports write ``linear`` as ``MatMul(x, Transpose(W))``: the operand is the weight
    ``W`` with its axes permuted, and zeroing or scoring a channel must address ``W``'s own axis.
    Returns ``(initializer, axis map)`` (operand axis i is initializer axis ``map[i]``), or None.
    """
    perm: list[int] | None = None
    while value is not None and not g.is_weight(value):
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _LAYOUT_ONLY:
            return None
        value = node.inputs[0]
        if node.op_type == "Transpose":
            rank = len(g.axes(value) or [])
            p = list(attr(node, "perm") or reversed(range(rank)))
            perm = p if perm is None else [p[j] for j in perm]
    if value is None:
        return None
    return value, perm if perm is not None else list(range(len(value.const_value.shape)))


def _contract(g, node, a, a_axis, b, b_axis, a_out: int = -1, b_out: int = -1) -> None:
    """Couple a contracted axis; record which side is the weight (the channel's consumer).
    ``a_out`` / ``b_out``: the operand's output-channel axis (for compensation)."""
    ax, bx = g.axes(a)[a_axis], g.axes(b)[b_axis]
    g.tie(ax, bx)
    wa, wb = weight_source(g, a), weight_source(g, b)
    if wb is not None and wa is None:
        g.contractions.append(Contraction(node, wb[0], wb[1][b_axis], a, a_axis, wb[1][b_out] if b_out >= 0 else -1))
    elif wa is not None and wb is None:
        g.contractions.append(Contraction(node, wa[0], wa[1][a_axis], b, b_axis, wa[1][a_out] if a_out >= 0 else -1))
    elif wa is None:
        g.block(ax, f"contracted between two activations at {node.name} (pruning changes the product)", "head_dim")


@rule("MatMul")
def matmul(g: DependencyGraph, node: ir.Node) -> None:
    a, b = node.inputs
    out = node.outputs[0]
    axes = _ranked(g, node, a, b, out)
    if axes is None:
        return
    aa, ba, oa = axes
    if len(aa) < 2 or len(ba) < 2:
        block_node(g, node, "MatMul with a 1-D operand")
        return
    _contract(g, node, a, len(aa) - 1, b, len(ba) - 2, len(aa) - 2, len(ba) - 1)
    g.tie(aa[-2], oa[-2])
    g.tie(ba[-1], oa[-1])
    # axes with static atoms folded into a dynamic size (symbolic.py): carried to the output, or blocked
    for atom in mixed_atoms(g, a, len(aa) - 1) + mixed_atoms(g, b, len(ba) - 2):
        g.block(atom, f"folded into a contracted axis at {node.name}")
    couple(g, node, a, len(aa) - 2, out, len(oa) - 2)
    couple(g, node, b, len(ba) - 1, out, len(oa) - 1)
    for value, axes in ((a, aa), (b, ba)):
        for i in range(len(axes) - 2):
            if i + len(oa) - len(axes) >= 0:
                couple(g, node, value, i, out, i + len(oa) - len(axes))
    _batch_dims(g, node, [(aa, len(aa) - 2), (ba, len(ba) - 2)], oa[:-2])


def _batch_dims(g, node, operands, out_batch) -> None:
    for axes, n in operands:
        offset = len(out_batch) - n
        for i in range(n):
            a, b = axes[i], out_batch[i + offset]
            if a is None:
                if b is not None and g.atoms.size(b) > 1:
                    g.block(b, f"broadcast from an axis of unproven size at {node.name}")
            elif g.atoms.size(a) > 1:
                if b is None:
                    g.block(a, f"broadcast against a dynamic axis at {node.name}")
                else:
                    g.tie(a, b)


@rule("Gemm")
def gemm(g: DependencyGraph, node: ir.Node) -> None:
    a, b = node.inputs[:2]
    out = node.outputs[0]
    axes = _ranked(g, node, a, b, out)
    if axes is None:
        return
    aa, ba, oa = axes
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
    _contract(g, node, a, 0 if ta else 1, b, 1 if tb else 0, 1 if ta else 0, 0 if tb else 1)
    g.tie(aa[1 if ta else 0], oa[0])
    g.tie(ba[0 if tb else 1], oa[1])
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        broadcast(g, node, node.inputs[2:3], out)


@rule("Conv", "ConvTranspose")
def conv(g: DependencyGraph, node: ir.Node) -> None:
    x, w = node.inputs[:2]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    out = node.outputs[0]
    axes = _ranked(g, node, x, w, out, bias)
    if axes is None:
        return
    xa, wa, oa = axes[:3]
    groups = attr(node, "group", 1)
    transposed = node.op_type == "ConvTranspose"
    in_w, out_w = (0, 1) if transposed else (1, 0)
    g.tie(xa[0], oa[0])
    for axis in range(2, len(xa)):
        g.block(xa[axis], f"spatial axis of {node.op_type} {node.name}", STRUCTURAL)
        g.block(oa[axis], f"spatial axis of {node.op_type} {node.name}", STRUCTURAL)
    for axis in range(2, len(wa)):
        g.block(wa[axis], f"kernel axis of {node.op_type} {node.name}", STRUCTURAL)
    if bias is not None:
        g.tie(axes[3][0], oa[1])
    if xa[1] is None or oa[1] is None:
        block_node(g, node, f"{node.op_type} with a dynamic channel count")
        return
    cin, cout = g.atoms.size(xa[1]), g.atoms.size(oa[1])
    per_in, per_out = cin // groups, cout // groups
    if groups == 1:
        g.tie(xa[1], wa[in_w])
        g.tie(wa[out_w], oa[1])
        g.contractions.append(Contraction(node, w, in_w, x, 1, out_w))
        return
    if transposed and not (per_in == 1 and per_out == 1):
        block_node(g, node, "grouped ConvTranspose")
        return
    # group g: input channels are prod [G, C/g], output channels prod [G, M/g]; `group` follows G.
    g.tie(wa[0], xa[1] if transposed else oa[1])
    if per_in == 1:
        lead = xa[1]
    else:
        lead = g.atoms.new(groups)
        g.atoms.unify_products([xa[1]], [lead, wa[in_w]])
        g.contractions.append(Contraction(node, w, in_w, x, 1, out_w))
    if per_out == 1:
        g.tie(lead, oa[1])
    else:
        g.atoms.unify_products([oa[1]], [lead, g.atoms.new(per_out)])
    g.sites.append(ShapeSite(node, "group", {"atom": lead}))


@rule("BatchNormalization", "InstanceNormalization")
def channel_norm(g: DependencyGraph, node: ir.Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    xa = g.axes(x)
    if xa is None or len(xa) < 2:
        block_node(g, node, f"{node.op_type}: rank unknown")
        return
    broadcast(g, node, [x], out)
    for param in node.inputs[1:]:
        pa = g.axes(param)
        if pa:
            g.tie(pa[0], xa[1])


@rule("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
def layer_norm(g: DependencyGraph, node: ir.Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    xa = g.axes(x)
    if xa is None:
        block_node(g, node, f"{node.op_type}: rank unknown")
        return
    broadcast(g, node, [x], out)
    broadcast(g, node, [p for p in node.inputs[1:] if p is not None], x)
    axis = attr(node, "axis", -1) % len(xa)
    for atom in xa[axis:]:
        g.block(atom, f"normalised over by {node.op_type} {node.name}", "hidden")
    for extra in node.outputs[1:]:
        g.block_value(extra, f"statistics output of {node.name}")


_SOFT_REDUCE = {"ReduceMean", "ReduceL2", "ReduceSumSquare"}


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
      "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin")
def reduce(g: DependencyGraph, node: ir.Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    axes = _ranked(g, node, x, out)
    if axes is None:
        return
    xa, oa = axes
    reduced = known_ints(g, node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else attr(node, "axes")
    if node.op_type in ("ArgMax", "ArgMin"):
        reduced = [attr(node, "axis", 0)]
    if reduced is None:
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            block_node(g, node, f"{node.op_type} over axes computed at run time")
            return
        reduced = [] if attr(node, "noop_with_empty_axes", 0) else list(range(len(xa)))
    reduced = {r % len(xa) for r in reduced}
    keep = attr(node, "keepdims", 1)
    kind = "hidden" if node.op_type in _SOFT_REDUCE else None
    j = 0
    for i, atom in enumerate(xa):
        if i in reduced:
            g.block(atom, f"reduced by {node.op_type} {node.name}", kind)
            j += 1 if keep else 0
        else:
            g.tie(atom, oa[j])
            j += 1


@rule("Softmax", "LogSoftmax", "Hardmax", "CumSum", "Trilu")
def along_axis(g: DependencyGraph, node: ir.Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    broadcast(g, node, [x], out)
    xa = g.axes(x) or []
    if node.op_type == "Trilu":
        fixed = [len(xa) - 2, len(xa) - 1]
    elif node.op_type == "CumSum":
        fixed = ints(node.inputs[1]) or list(range(len(xa)))
    else:
        fixed = [attr(node, "axis", -1)]
    for axis in fixed:
        if xa:
            g.block(xa[axis % len(xa)], f"mixed along this axis by {node.op_type} {node.name}")
            for atom in mixed_atoms(g, x, axis % len(xa)):
                g.block(atom, f"mixed along this axis by {node.op_type} {node.name}")


@rule("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Pad", "Resize")
def spatial(g: DependencyGraph, node: ir.Node) -> None:
    """Ops that act on spatial axes only: batch and channels pass through, spatial axes are new."""
    axes = _ranked(g, node, node.inputs[0], node.outputs[0])
    if axes is None:
        return
    xa, oa = axes
    if node.op_type in ("Pad", "Resize"):
        params = [ints(v) for v in node.inputs[1:] if v is not None]
        if any(p is None for p in params):
            block_node(g, node, f"{node.op_type} parameters computed at run time")
            return
        if node.op_type == "Pad" and params and any(params[0][i] or params[0][i + len(xa)] for i in range(min(2, len(xa)))):
            block_node(g, node, "Pad on the batch or channel axis")
            return
    for i, (a, b) in enumerate(zip(xa, oa)):
        if i < 2:
            g.tie(a, b)
        else:
            g.block(a, f"spatial axis of {node.op_type} {node.name}", STRUCTURAL)
            g.block(b, f"spatial axis of {node.op_type} {node.name}", STRUCTURAL)


@rule("Constant")
def constant(g: DependencyGraph, node: ir.Node) -> None:
    """A constant has no inputs to couple; its own axes are coupled by its consumers."""
