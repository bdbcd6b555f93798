"""Per-op handlers of the symbolic shape walk (`shapes.Shapes`): dims and shape-tensor elements.

Each handler sets the dims of a node's outputs and, for small integer tensors, their elements
(monomial and origin). A handler that cannot compute something leaves it unset; the walk then
takes the declared shape or ONNX's per-node inference, and the elements stay unknown.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimc.passes.prune.shapes import broadcast_dims, div, mul, product, static, symbolic_sum

HANDLERS = {}


def handler(*ops):
    def register(fn):
        for op in ops:
            HANDLERS[op] = fn
        return fn

    return register


def _attr(node, name, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _ints(S, value) -> list[int] | None:
    """A constant-valued integer input (all elements static), else None."""
    elems = S.elements(value)
    if elems is None or any(static(e) is None for e, _ in elems):
        return None
    return [static(e) for e, _ in elems]


@handler("Constant")
def constant(S, node):
    out = node.outputs[0]
    t = ir.convenience.get_const_tensor(out)  # value, value_int(s), value_float(s)
    if t is None:
        return
    S._set(out, [(int(n), ()) for n in t.shape])
    if t.dtype in (ir.DataType.INT64, ir.DataType.INT32) and len(t.shape) <= 1 and t.size <= 64:
        S.elems[out] = [((int(x), ()), None) for x in np.asarray(t.numpy()).reshape(-1)]


@handler("Shape")
def shape(S, node):
    x, out = node.inputs[0], node.outputs[0]
    dims = S.dims(x)
    if dims is None:
        return
    n = len(dims)
    start, end = _attr(node, "start", 0), _attr(node, "end", n)
    start, end = (max(0, min(n, v + n if v < 0 else v)) for v in (start, end))
    S._set(out, [(max(0, end - start), ())])
    S.elems[out] = [(dims[i], (x, i)) for i in range(start, end)]


@handler("Size")
def size(S, node):
    S._set(node.outputs[0], [])
    S.elems[node.outputs[0]] = [(product(S.dims(node.inputs[0]) or [None]), None)]


@handler("Add", "Sub", "Mul", "Div")
def arithmetic(S, node):
    """Broadcast dims; on shape tensors, the monomials of Mul/Div (origins are not kept)."""
    a, b = node.inputs[:2]
    out = node.outputs[0]
    S._set(out, broadcast_dims([S.dims(a), S.dims(b)]))
    ea, eb = S.elements(a), S.elements(b)
    if ea is None or eb is None or not (len(ea) == len(eb) or 1 in (len(ea), len(eb))):
        return
    n = max(len(ea), len(eb))
    pairs = [(ea[i if len(ea) > 1 else 0], eb[i if len(eb) > 1 else 0]) for i in range(n)]
    op = node.op_type
    out_elems, carried = [], op == "Mul"
    for (x, ox), (y, oy) in pairs:
        if op == "Mul":
            r = mul(x, y)
            origin = _scaled(ox, y, oy) or _scaled(oy, x, ox)
            carried = carried and (origin is not None or (ox is None and oy is None))
            out_elems.append((r, origin))
            continue
        elif op == "Div":
            r = div(x, y)
        else:
            sx, sy = static(x), static(y)
            r = None if sx is None or sy is None else ((sx + sy if op == "Add" else sx - sy), ())
            if r is None and y == (0, ()):
                r = x
            elif r is None and op == "Add":
                r = symbolic_sum([x, y])  # sym sizes added, e.g. past_seq + seq for a cache's Expand target
        out_elems.append((r, None))
    S.elems[out] = out_elems
    if carried:
        S.decided.add(node)  # every read size is carried with its coefficient: nothing escapes


def _scaled(origin, factor, factor_origin):
    """``size * c`` for a read size and a constant ``c``: the origin with the coefficient multiplied."""
    if origin is None or factor_origin is not None or static(factor) is None or static(factor) < 1:
        return None
    coef = (origin[2] if len(origin) > 2 else 1) * static(factor)
    return (origin[0], origin[1]) if coef == 1 else (origin[0], origin[1], coef)


def _syms(S, value) -> list | None:
    elems = S.elements(value)
    return None if elems is None else [e for e, _ in elems]


def _sym_slice(S, node, dims) -> list | None:
    """``x[:n]`` along one axis with a run-time ``n`` (positions sliced to the sequence length)."""
    starts, ends = _syms(S, node.inputs[1]), _syms(S, node.inputs[2])
    axes = _ints(S, node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
    steps = _ints(S, node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if not starts or not ends or axes is None or len(starts) != 1 or steps != [1] or starts[0] != (0, ()):
        return None
    if ends[0] is None or static(ends[0]) is not None:
        return None
    new = list(dims)
    new[axes[0] % len(dims)] = ends[0]
    return new


@handler("Slice")
def slice_(S, node):
    x, out = node.inputs[0], node.outputs[0]
    dims = S.dims(x)
    starts, ends = _ints(S, node.inputs[1]), _ints(S, node.inputs[2])
    axes = _ints(S, node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = _ints(S, node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if dims is None or starts is None or ends is None:
        if dims is not None:
            S._set(out, _sym_slice(S, node, dims) or [None] * len(dims))
        return
    axes = [a % len(dims) for a in (axes or range(len(starts)))]
    steps = steps or [1] * len(starts)
    new = list(dims)
    for axis, s, e, step in zip(axes, starts, ends, steps):
        n = static(dims[axis])
        if n is None:
            full = step == 1 and s == 0 and e >= 2**62
            new[axis] = dims[axis] if full else None
            continue
        idx = range(n)[slice(s, e, step)]
        new[axis] = (len(idx), ())
    S._set(out, new)
    elems = S.elements(x)
    if elems is not None and len(dims) == 1 and axes == [0]:
        S.elems[out] = [elems[i] for i in range(len(elems))[slice(starts[0], ends[0], steps[0])]]


@handler("Gather")
def gather(S, node):
    data, idx = node.inputs
    out = node.outputs[0]
    dd, di = S.dims(data), S.dims(idx)
    if dd is None or di is None:
        return
    axis = _attr(node, "axis", 0) % len(dd)
    S._set(out, dd[:axis] + di + dd[axis + 1:])
    elems, picked = S.elements(data), _ints(S, idx)
    if elems is not None and picked is not None and len(dd) == 1:
        n = len(elems)
        if all(-n <= p < n for p in picked):
            S.elems[out] = [elems[p] for p in picked]


@handler("Concat")
def concat(S, node):
    out = node.outputs[0]
    shapes = [S.dims(v) for v in node.inputs]
    if any(s is None for s in shapes) or not shapes:
        return
    axis = _attr(node, "axis") % len(shapes[0])
    new = list(shapes[0])
    parts = [s[axis] for s in shapes]
    statics = [static(p) for p in parts]
    new[axis] = symbolic_sum(parts)  # past_seq + seq for the KV cache's Concat
    for i in range(len(new)):
        if i != axis:
            known = [s[i] for s in shapes if s[i] is not None]
            new[i] = known[0] if known else None
    S._set(out, new)
    elems = [S.elements(v) for v in node.inputs]
    if len(new) == 1 and all(e is not None for e in elems):
        S.elems[out] = [e for es in elems for e in es]


@handler("Unsqueeze", "Squeeze")
def squeeze(S, node):
    x, out = node.inputs[0], node.outputs[0]
    dims = S.dims(x)
    axes = _ints(S, node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else _attr(node, "axes")
    if dims is None:
        return
    if node.op_type == "Unsqueeze":
        if axes is None:
            return
        rank = len(dims) + len(axes)
        axes = {a % rank for a in axes}
        it = iter(dims)
        new = [(1, ()) if i in axes else next(it) for i in range(rank)]
    else:
        if axes is None:
            if any(d is None for d in dims):
                return
            axes = [i for i, d in enumerate(dims) if d == (1, ())]
        axes = {a % len(dims) for a in axes}
        new = [d for i, d in enumerate(dims) if i not in axes]
    S._set(out, new)
    elems = S.elements(x)
    if elems is not None and len(new) <= 1:
        S.elems[out] = list(elems)


@handler("Reshape")
def reshape(S, node):
    x, target = node.inputs[:2]
    out = node.outputs[0]
    dims, elems = S.dims(x), S.elements(target)
    if elems is None:
        tdims = S.dims(target)
        if tdims is not None and len(tdims) == 1 and static(tdims[0]) is not None:
            S._set(out, [None] * static(tdims[0]))
        return
    allowzero = _attr(node, "allowzero", 0)
    new = []
    for i, (e, _) in enumerate(elems):
        if e == (0, ()) and not allowzero:
            e = dims[i] if dims is not None and i < len(dims) else None
        new.append(e)
    if (-1, ()) in new:
        known = product([d for d in new if d != (-1, ())])
        total = product(dims) if dims is not None else None
        new[new.index((-1, ()))] = div(total, known)
    S._set(out, new)
    xe = S.elements(x)
    if xe is not None and len(new) <= 1:
        S.elems[out] = list(xe)


@handler("Expand")
def expand(S, node):
    x, target = node.inputs
    elems = S.elements(target)
    dims = S.dims(x)
    if elems is None:
        return
    out = broadcast_dims([dims, [e for e, _ in elems]])
    S._set(node.outputs[0], out)
    own = S.elements(x)  # a shape tensor expanded to [n] (unoptimised exports size a zero bias so)
    n = static(out[0]) if out is not None and len(out) == 1 else None
    if own is not None and n is not None and len(own) in (1, n):
        S.elems[node.outputs[0]] = own * n if len(own) == 1 else list(own)


@handler("Transpose")
def transpose(S, node):
    dims = S.dims(node.inputs[0])
    if dims is None:
        return
    perm = _attr(node, "perm") or list(reversed(range(len(dims))))
    S._set(node.outputs[0], [dims[p] for p in perm])


@handler("MatMul")
def matmul(S, node):
    a, b = (S.dims(v) for v in node.inputs)
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return
    batch = broadcast_dims([a[:-2], b[:-2]])
    S._set(node.outputs[0], None if batch is None else batch + [a[-2], b[-1]])


@handler("Gemm")
def gemm(S, node):
    a, b = (S.dims(v) for v in node.inputs[:2])
    if a is None or b is None:
        return
    S._set(node.outputs[0], [a[1 if _attr(node, "transA", 0) else 0], b[0 if _attr(node, "transB", 0) else 1]])


@handler("ConstantOfShape")
def constant_of_shape(S, node):
    elems = S.elements(node.inputs[0])
    if elems is None:
        return
    S._set(node.outputs[0], [e for e, _ in elems])
    n = [static(e) for e, _ in elems]
    a = node.attributes.get("value")
    fill = int(np.asarray(a.value.numpy()).reshape(-1)[0]) if a is not None else 0
    if len(n) == 1 and n[0] is not None and n[0] <= 64:
        S.elems[node.outputs[0]] = [((fill, ()), None)] * n[0]


@handler("Equal")
def equal(S, node):
    """torch's ``expand(b, -1, s, s)`` asks ``shape == -1`` of its sizes: a size is never negative."""
    S._set(node.outputs[0], broadcast_dims([S.dims(v) for v in node.inputs]))
    ea, eb = S.elements(node.inputs[0]), S.elements(node.inputs[1])
    if ea is None or eb is None or len(ea) != len(eb):
        return
    out, decided = [], True
    for (x, ox), (y, oy) in zip(ea, eb):
        sx, sy = static(x), static(y)
        if sx is not None and sy is not None:
            out.append(((int(sx == sy), ()), None))
            # a read size compared with a negative number is never equal to it, whatever the size
            decided = decided and (ox is None or sy < 0) and (oy is None or sx < 0)
        elif x is not None and y is not None and min(v for v in (sx, sy) if v is not None) < 0:
            out.append(((0, ()), None))
        else:
            return
    S.elems[node.outputs[0]] = out
    if decided:
        S.decided.add(node)


@handler("Range")
def range_(S, node):
    start, limit, delta = (_syms(S, v) for v in node.inputs)
    if start and limit and delta and None not in (start[0], limit[0], delta[0]):
        if static(start[0]) == 0 and static(delta[0]) == 1:
            S._set(node.outputs[0], [limit[0]])
        elif static(start[0]) is not None and static(limit[0]) is not None and static(delta[0]):
            n = -(-(static(limit[0]) - static(start[0])) // static(delta[0]))
            S._set(node.outputs[0], [(max(0, n), ())])


@handler("Flatten")
def flatten(S, node):
    dims = S.dims(node.inputs[0])
    if dims is None:
        return
    axis = _attr(node, "axis", 1) % (len(dims) + 1) if dims else 0
    S._set(node.outputs[0], [product(dims[:axis]), product(dims[axis:])])


@handler("Split")
def split(S, node):
    dims = S.dims(node.inputs[0])
    if dims is None:
        return
    axis = _attr(node, "axis", 0) % len(dims)
    sizes = _ints(S, node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else _attr(node, "split")
    n = static(dims[axis])
    if sizes is None and n is not None:
        k = len(node.outputs)
        chunk = -(-n // k)
        sizes = [chunk] * (k - 1) + [n - chunk * (k - 1)]
    for i, out in enumerate(node.outputs):
        new = list(dims)
        new[axis] = (sizes[i], ()) if sizes is not None else None
        S._set(out, new)


@handler("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
         "ReduceSumSquare", "ReduceLogSumExp")
def reduce(S, node):
    dims = S.dims(node.inputs[0])
    if dims is None:
        return
    axes = _ints(S, node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else _attr(node, "axes")
    if axes is None:
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            return
        axes = [] if _attr(node, "noop_with_empty_axes", 0) else list(range(len(dims)))
    axes = {a % len(dims) for a in axes}
    keep = _attr(node, "keepdims", 1)
    S._set(node.outputs[0], [(1, ()) if i in axes else d for i, d in enumerate(dims) if keep or i not in axes])


@handler("Where")
def where(S, node):
    """On shape tensors with a known condition, each element (and its origin) is picked."""
    S._set(node.outputs[0], broadcast_dims([S.dims(v) for v in node.inputs]))
    cond, a, b = (S.elements(v) for v in node.inputs)
    if cond is None or a is None or b is None or not len(cond) == len(a) == len(b):
        return
    if any(static(c) is None for c, _ in cond):
        return
    S.elems[node.outputs[0]] = [x if static(c) else y for (c, _), x, y in zip(cond, a, b)]


@handler("Cast", "Identity")
def cast(S, node):
    """Same dims; a shape tensor keeps its elements and their origins (sizes cast to int64)."""
    S._set(node.outputs[0], S.dims(node.inputs[0]))
    elems = S.elements(node.inputs[0])
    if elems is not None:
        S.elems[node.outputs[0]] = list(elems)


@handler("SplitToSequence")
def split_to_sequence(S, node):
    """The parts' sizes (constant ``split``: a list of sizes, or one chunk size) for SequenceAt."""
    dims = S.dims(node.inputs[0])
    if dims is None or len(node.inputs) < 2 or node.inputs[1] is None:
        return
    axis = _attr(node, "axis", 0) % len(dims)
    sizes, n = _ints(S, node.inputs[1]), static(dims[axis])
    if sizes is None or n is None:
        return
    if len(S.dims(node.inputs[1]) or []) == 0:  # a scalar: chunks of that size, the last one shorter
        sizes = [min(sizes[0], n - i) for i in range(0, n, sizes[0])]
    if sum(sizes) == n and all(v > 0 for v in sizes):
        S.sequences[node.outputs[0]] = (list(dims), axis, sizes)


@handler("SequenceAt")
def sequence_at(S, node):
    got = S.sequences.get(node.inputs[0])
    pos = _ints(S, node.inputs[1])
    if got is None or pos is None or len(pos) != 1 or not -len(got[2]) <= pos[0] < len(got[2]):
        return
    dims, axis, sizes = got
    new = list(dims)
    new[axis] = (sizes[pos[0] % len(sizes)], ())
    S._set(node.outputs[0], new)
