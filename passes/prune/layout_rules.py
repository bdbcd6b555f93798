"""Layout rules: ops that move, split, join or index axes without computing on them.

Transpose (permutation), Reshape and friends (products of atoms between dynamic axes),
Expand (broadcast; GQA's ``repeat_kv``), Concat / Split / Slice (sums: offsets), Gather
(embeddings; constant indices), Shape / Size (run-time reads of a size block the axis). Each
records the constants it will need rewritten (`ShapeSite`). Registered into `rules.RULES`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimc.passes.prune.graph import DependencyGraph, ShapeSite
from slimc.passes.prune.rules import RULES, _ranked, attr, block_node, broadcast, ints, rule

__all__ = ["RULES", "block_node"]  # the full rule table, once this module has registered its rules

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
        size = int(np.prod([g.atoms.size(t) for t in a]))
        if size != int(np.prod([g.atoms.size(t) for t in b])):
            block_node(g, node, f"{node.op_type} moves elements across a dynamic axis")
            return False
        if size == 0:  # an empty tensor: no factorisation relates its axes (0 = 0 x 3 = 3 x 0)
            block_node(g, node, f"{node.op_type} of an empty tensor (an axis of size 0)")
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


def _tie_all_but(g: DependencyGraph, whole: list, parts: list[list], axis: int) -> None:
    """Concat / Split: every axis of each part is the whole's, except the joined ``axis``."""
    for part in parts:
        for i, (a, b) in enumerate(zip(part, whole)):
            if i != axis:
                g.tie(a, b)


@rule("Concat")
def concat(g: DependencyGraph, node: ir.Node) -> None:
    out = node.outputs[0]
    axes = _ranked(g, node, out, *node.inputs)
    if axes is None:
        return
    oa, ins = axes[0], axes[1:]
    axis = attr(node, "axis") % len(oa)
    _tie_all_but(g, oa, ins, axis)
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
    _tie_all_but(g, xa, outs, axis)
    parts = [oa[axis] for oa in outs]
    if xa[axis] is None or any(p is None for p in parts):
        return
    if len(node.inputs) > 1 and node.inputs[1] is not None and ints(node.inputs[1]) is None:
        block_node(g, node, "Split sizes computed at run time")
        return
    g.atoms.make_sum(xa[axis], parts)
    g.sites.append(ShapeSite(node, "split", {"parts": parts}))


def _tie_pieces(g: DependencyGraph, atom: int | None, pieces: list[int]) -> None:
    """``atom`` is the concatenation of ``pieces`` (one piece: the same index space)."""
    if atom is None:
        return
    if len(pieces) == 1:
        g.tie(pieces[0], atom)
    else:
        g.atoms.make_sum(atom, pieces)


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
            _tie_pieces(g, b, pieces)
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
                _tie_pieces(g, oa[axis], pieces)
            g.sites.append(ShapeSite(node, "gather", {"atom": da[axis], "first": lo}))
            return
    g.block(da[axis], f"indexed at run time by Gather {node.name}")


@rule("Shape", "Size")
def shape_of(g: DependencyGraph, node: ir.Node) -> None:
    xa = g.axes(node.inputs[0]) or []
    start, end = (attr(node, "start", 0), attr(node, "end", len(xa))) if node.op_type == "Shape" else (0, len(xa))
    for atom in xa[slice(start, end)]:
        g.block(atom, f"size read at run time by {node.op_type} {node.name}")
