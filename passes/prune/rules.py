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

Rule = Callable[[DependencyGraph, ir.Node], None]
RULES: dict[str, Rule] = {}
_INT_MAX = 2**62


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
    if value is None or value.const_value is None:
        return None
    return [int(x) for x in np.asarray(value.const_value.numpy()).reshape(-1)]


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def shape_entries(value: ir.Value | None) -> list[tuple[int | None, int, int]] | None:
    """Entries of a shape tensor: (constant or None, which Concat input holds it, index there).

    Handles a constant (input index -1) and a ``Concat`` of 1-D pieces (constants and run-time
    sizes), which is how torch.export writes ``view(batch, seq, 12, 64)``. The same constant
    piece may serve several entries; each entry is rewritten through its own position.
    """
    if value is None:
        return None
    if value.const_value is not None:
        return [(x, -1, i) for i, x in enumerate(ints(value))]
    node = value.producer()
    if node is None or node.op_type != "Concat":
        return None
    out: list[tuple[int | None, int, int]] = []
    for k, piece in enumerate(node.inputs):
        known = ints(piece)
        if known is not None:
            out.extend((x, k, i) for i, x in enumerate(known))
        elif piece is not None and piece.shape is not None and len(piece.shape) == 1 and isinstance(piece.shape[0], int):
            out.extend((None, k, 0) for _ in range(piece.shape[0]))
        else:
            return None
    return out


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
            if a is None or g.atoms.size(a) == 1:
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


def _contract(g, node, a, a_axis, b, b_axis) -> None:
    """Couple a contracted axis; record which side is the weight (the channel's consumer)."""
    ax, bx = g.axes(a)[a_axis], g.axes(b)[b_axis]
    g.tie(ax, bx)
    if g.is_weight(b) and not g.is_weight(a):
        g.contractions.append(Contraction(node, b, b_axis, a, a_axis, -1))
    elif g.is_weight(a) and not g.is_weight(b):
        g.contractions.append(Contraction(node, a, a_axis, b, b_axis, -1))
    elif not g.is_weight(a):
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
    _contract(g, node, a, len(aa) - 1, b, len(ba) - 2)
    g.tie(aa[-2], oa[-2])
    g.tie(ba[-1], oa[-1])
    if g.contractions and g.contractions[-1].node is node:
        c = g.contractions[-1]
        c.out_axis = len(ba) - 1 if c.weight is b else len(aa) - 2
    _batch_dims(g, node, [(aa, len(aa) - 2), (ba, len(ba) - 2)], oa[:-2])


def _batch_dims(g, node, operands, out_batch) -> None:
    for axes, n in operands:
        offset = len(out_batch) - n
        for i in range(n):
            a, b = axes[i], out_batch[i + offset]
            if a is not None and g.atoms.size(a) > 1:
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
    _contract(g, node, a, 0 if ta else 1, b, 1 if tb else 0)
    g.tie(aa[1 if ta else 0], oa[0])
    g.tie(ba[0 if tb else 1], oa[1])
    if g.contractions and g.contractions[-1].node is node:
        c = g.contractions[-1]
        c.out_axis = (0 if tb else 1) if c.weight is b else (1 if ta else 0)
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
    g.tie(wa[0], oa[1]) if not transposed else g.tie(wa[0], xa[1])
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
    reduced = ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else attr(node, "axes")
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


@rule("Transpose")
def transpose(g: DependencyGraph, node: ir.Node) -> None:
    axes = _ranked(g, node, node.inputs[0], node.outputs[0])
    if axes is None:
        return
    xa, oa = axes
    perm = attr(node, "perm") or list(reversed(range(len(xa))))
    for i, p in enumerate(perm):
        g.tie(xa[p], oa[i])


def _runs(axes: list[int | None], dims: list) -> tuple[list[list[int]], list[tuple[str, ...]]]:
    """Split axes at dynamic ones: the static runs, and the names of each block of dynamic axes."""
    runs, current, blocks, names = [], [], [], []
    for a, d in zip(axes, dims):
        if a is None:
            names.append(str(d))
            continue
        if names or not runs:
            if names:
                blocks.append(tuple(names))
                names = []
            runs.append(current)
            current = []
        current.append(a)
    if names:
        blocks.append(tuple(names))
        runs.append(current)
        current = []
    runs.append(current)
    return runs, blocks


def regroup(g: DependencyGraph, node: ir.Node, x: ir.Value, out: ir.Value) -> bool:
    """Reshape-like ops: static runs between blocks of dynamic axes are products of the same atoms.

    ``[b, s, 768] -> [b, s, 12, 64]`` and ``[b, s, 768] -> [b*s, 768]`` keep the static runs
    aligned; with more than one dynamic block the blocks must carry the same names, so a
    reshape that reorders batch and sequence is never taken for a no-op.
    """
    axes = _ranked(g, node, x, out)
    if axes is None:
        return False
    xdims = list(x.shape) if x.shape is not None else list(x.const_value.shape)
    (rin, bin_), (rout, bout) = _runs(axes[0], xdims), _runs(axes[1], list(out.shape))
    same = len(bin_) == len(bout) and (len(bin_) <= 1 or (bin_ == bout and "None" not in str(bin_)))
    if not same or len(rin) != len(rout):
        block_node(g, node, f"{node.op_type} moves static axes across dynamic ones")
        return False
    for a, b in zip(rin, rout):
        if int(np.prod([g.atoms.size(t) for t in a])) != int(np.prod([g.atoms.size(t) for t in b])):
            block_node(g, node, f"{node.op_type} moves elements across a dynamic axis")
            return False
        g.atoms.unify_products(a, b)
    return True


def _check_entries(g, node, out_axes, entries, what: str) -> None:
    """Static target axes whose size is computed at run time cannot be rewritten: block them."""
    for i, atom in enumerate(out_axes):
        if atom is None or g.atoms.size(atom) == 1:
            continue
        if entries is None or i >= len(entries) or (entries[i][0] is None):
            g.block(atom, f"{what} size of axis {i} at {node.name} is computed at run time")


@rule("Reshape")
def reshape(g: DependencyGraph, node: ir.Node) -> None:
    x, shape = node.inputs[:2]
    out = node.outputs[0]
    if out.shape is None or not regroup(g, node, x, out):
        if out.shape is None:
            block_node(g, node, "Reshape with unknown output shape")
        return
    entries = shape_entries(shape)
    _check_entries(g, node, g.axes(out), entries, "Reshape target")
    if entries is not None:
        g.sites.append(ShapeSite(node, "shape", {"input": 1, "entries": entries}))


@rule("Flatten", "Squeeze", "Unsqueeze")
def reshape_like(g: DependencyGraph, node: ir.Node) -> None:
    if node.outputs[0].shape is None:
        block_node(g, node, f"{node.op_type} with unknown output shape")
        return
    regroup(g, node, node.inputs[0], node.outputs[0])


@rule("Expand")
def expand(g: DependencyGraph, node: ir.Node) -> None:
    x, shape = node.inputs
    out = node.outputs[0]
    axes = _ranked(g, node, x, out)
    if axes is None:
        return
    broadcast(g, node, [x], out)
    entries = shape_entries(shape)
    _check_entries(g, node, axes[1], entries, "Expand")
    if entries is not None:
        g.sites.append(ShapeSite(node, "shape", {"input": 1, "entries": entries}))


@rule("Concat")
def concat(g: DependencyGraph, node: ir.Node) -> None:
    out = node.outputs[0]
    axes = _ranked(g, node, out, *node.inputs)
    if axes is None:
        return
    oa, ins = axes[0], axes[1:]
    axis = attr(node, "axis") % len(oa)
    for ia in ins:
        for i, (a, b) in enumerate(zip(ia, oa)):
            if i != axis:
                g.tie(a, b)
    parts = [ia[axis] for ia in ins]
    if oa[axis] is not None and all(p is not None for p in parts):
        g.atoms.make_sum(oa[axis], parts)
    elif oa[axis] is not None or any(p is not None for p in parts):
        block_node(g, node, "Concat of static and dynamic sizes")


@rule("Split")
def split(g: DependencyGraph, node: ir.Node) -> None:
    x = node.inputs[0]
    axes = _ranked(g, node, x, *node.outputs)
    if axes is None:
        return
    xa, outs = axes[0], axes[1:]
    axis = attr(node, "axis", 0) % len(xa)
    for oa in outs:
        for i, (a, b) in enumerate(zip(xa, oa)):
            if i != axis:
                g.tie(a, b)
    parts = [oa[axis] for oa in outs]
    if xa[axis] is None or any(p is None for p in parts):
        return
    if len(node.inputs) > 1 and node.inputs[1] is not None and ints(node.inputs[1]) is None:
        block_node(g, node, "Split sizes computed at run time")
        return
    g.atoms.make_sum(xa[axis], parts)
    g.sites.append(ShapeSite(node, "split", {"parts": parts}))


@rule("Slice")
def slice_(g: DependencyGraph, node: ir.Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    axes = _ranked(g, node, x, out)
    if axes is None:
        return
    xa, oa = axes
    starts, ends = ints(node.inputs[1]), ints(node.inputs[2])
    which = ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None and which is None):
        block_node(g, node, "Slice bounds computed at run time")
        return
    which = [w % len(xa) for w in (which or range(len(starts)))]
    steps = steps or [1] * len(starts)
    cuts = {}
    for axis, s, e, step in zip(which, starts, ends, steps):
        if xa[axis] is None:
            continue
        n = g.atoms.size(xa[axis])
        s, e = (max(0, min(n, v + n if v < 0 else v)) for v in (s, e))
        if step != 1:
            g.block(xa[axis], f"strided Slice at {node.name}")
            g.block(oa[axis], f"strided Slice at {node.name}")
        elif (s, e) != (0, n):
            cuts[axis] = (s, e)
    for i, (a, b) in enumerate(zip(xa, oa)):
        if i in cuts:
            pieces = g.atoms.pieces(a, *cuts[i])
            g.tie(pieces[0], b) if len(pieces) == 1 else g.atoms.make_sum(b, pieces)
        elif not any(i == w and st != 1 for w, st in zip(which, steps)):
            g.tie(a, b)
    if cuts:
        g.sites.append(ShapeSite(node, "slice", {"cuts": {i: (xa[i], *c) for i, c in cuts.items()}, "axes": which}))


@rule("Gather")
def gather(g: DependencyGraph, node: ir.Node) -> None:
    data, idx = node.inputs
    out = node.outputs[0]
    axes = _ranked(g, node, data, idx, out)
    if axes is None:
        return
    da, ia, oa = axes
    axis = attr(node, "axis", 0) % len(da)
    for i in range(axis):
        g.tie(da[i], oa[i])
    for i in range(axis + 1, len(da)):
        g.tie(da[i], oa[i - 1 + len(ia)])
    for i, a in enumerate(ia):
        g.tie(a, oa[axis + i])
    picked = ints(idx)
    if da[axis] is None:
        return
    n = g.atoms.size(da[axis])
    if picked is not None and len(picked) >= 1:
        picked = [p + n if p < 0 else p for p in picked]
        lo, hi = picked[0], picked[-1] + 1
        if picked == list(range(lo, hi)):
            pieces = g.atoms.pieces(da[axis], lo, hi)
            if ia:
                g.tie(pieces[0], oa[axis]) if len(pieces) == 1 else g.atoms.make_sum(oa[axis], pieces)
            g.sites.append(ShapeSite(node, "gather", {"atom": da[axis], "first": lo}))
            return
    g.block(da[axis], f"indexed at run time by Gather {node.name}")


@rule("Shape", "Size")
def shape_of(g: DependencyGraph, node: ir.Node) -> None:
    xa = g.axes(node.inputs[0]) or []
    start, end = (attr(node, "start", 0), attr(node, "end", len(xa))) if node.op_type == "Shape" else (0, len(xa))
    for atom in xa[slice(start, end)]:
        g.block(atom, f"size read at run time by {node.op_type} {node.name}")


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
