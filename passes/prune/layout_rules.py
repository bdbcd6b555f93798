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
from slimc.passes.prune.shapes import static
from slimc.passes.prune.slice_rules import tie_pieces  # also registers the Slice and sequence rules
from slimc.passes.prune.symbolic import check_target, couple, regroup
from slimc.passes.prune.targets import needs_rebuild, rebuild_specs

__all__ = ["RULES", "block_node"]  # the full rule table, once this module has registered its rules

_FOLDABLE = {"Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape", "Constant"}


def folded(g: DependencyGraph, value: ir.Value | None, depth: int = 4) -> list[int] | None:
    """The values of a small integer tensor computed from constants alone (TorchScript writes
    ``Constant -> Unsqueeze -> Concat``): such a piece can be replaced by a rewritten constant."""
    if value is None or depth == 0:
        return None
    if value.const_value is not None:
        return ints(value)
    node = value.producer()
    if node is None or node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx"):
        return None
    if any(folded(g, v, depth - 1) is None for v in node.inputs if v is not None):
        return None
    elems = g.shapes.elements(value)
    if elems is None or any(static(e) is None or o is not None for e, o in elems):
        return None
    return [static(e) for e, _ in elems]


def shape_entries(g: DependencyGraph, value: ir.Value | None) -> list[tuple[int | None, int, int]] | None:
    """Entries of a shape tensor: (constant or None, which Concat input holds it, index there).

    Handles a constant (input index -1) and a ``Concat`` of 1-D pieces (constants and run-time
    sizes), which is how torch.export writes ``view(batch, seq, 12, 64)``. The same constant
    piece may serve several entries; each entry is rewritten through its own position.
    """
    if value is None:
        return None
    whole = ints(value)
    if whole is not None:
        return [(x, -1, i) for i, x in enumerate(whole)]
    node = value.producer()
    if node is None or node.op_type != "Concat":
        return None
    out: list[tuple[int | None, int, int]] = []
    for k, piece in enumerate(node.inputs):
        known = ints(piece) if piece is not None and piece.const_value is not None else folded(g, piece)
        if known is not None:
            out.extend((x, k, i) for i, x in enumerate(known))
        elif piece is not None and (d := g.shapes.dims(piece)) is not None and len(d) == 1 and static(d[0]) is not None:
            out.extend((None, k, 0) for _ in range(static(d[0])))
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
        couple(g, node, node.inputs[0], p, node.outputs[0], i)


def _record(g: DependencyGraph, node: ir.Node, out: ir.Value, what: str) -> None:
    """Record the target's constant entries for rewriting; a static slot sized by a constant that
    cannot be located (a target computed some other way) is blocked: it could not follow."""
    entries = shape_entries(g, node.inputs[1])
    oa = g.axes(out) or []
    if entries is not None and len(entries) != len(oa):
        entries = None
    specs = rebuild_specs(g, node.inputs[1], out)
    if specs is not None and (entries is None or needs_rebuild(specs)):
        g.sites.append(ShapeSite(node, "rebuild", {"input": 1, "specs": specs}))  # targets.py
        return
    elems = g.shapes.elements(node.inputs[1])
    offset = len(oa) - len(elems) if elems is not None else 0
    for i, atom in enumerate(oa):
        if atom is None or g.atoms.size(atom) < 2 or (entries is not None and entries[i][0] is not None):
            continue
        e = elems[i - offset] if elems is not None and 0 <= i - offset < len(elems) else None
        if e is not None and e[1] is None and static(e[0]) == g.atoms.size(atom):
            g.block(atom, f"{what} at {node.name} holds this size in a constant it cannot rewrite")
        elif e is not None and e[1] is not None and len(e[1]) > 2:
            g.block(atom, f"{what} at {node.name} sizes this axis as a multiple of a read size it cannot rewrite")
    if entries is not None:
        g.sites.append(ShapeSite(node, "shape", {"input": 1, "entries": entries}))


@rule("Reshape")
def reshape(g: DependencyGraph, node: ir.Node) -> None:
    x, shape = node.inputs[:2]
    out = node.outputs[0]
    if not regroup(g, node, x, out):
        g.deferred.append(lambda: check_target(g, node, shape, out, "Reshape target"))  # blocks the slots it reads
        return
    g.deferred.append(lambda: (check_target(g, node, shape, out, "Reshape target"), _record(g, node, out, "Reshape target")))


@rule("Flatten", "Squeeze", "Unsqueeze")
def reshape_like(g: DependencyGraph, node: ir.Node) -> None:
    regroup(g, node, node.inputs[0], node.outputs[0])


@rule("Expand")
def expand(g: DependencyGraph, node: ir.Node) -> None:
    x, shape = node.inputs
    out = node.outputs[0]
    axes = _ranked(g, node, x, out)
    if axes is None:
        g.deferred.append(lambda: check_target(g, node, shape, out, "Expand"))
        return
    broadcast(g, node, [x], out)
    g.deferred.append(lambda: (check_target(g, node, shape, out, "Expand"), _record(g, node, out, "Expand")))


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
                tie_pieces(g, oa[axis], pieces)
            g.sites.append(ShapeSite(node, "gather", {"atom": da[axis], "first": lo}))
            return
    g.block(da[axis], f"indexed at run time by Gather {node.name}")


@rule("Shape", "Size")
def shape_of(g: DependencyGraph, node: ir.Node) -> None:
    """A size read at run time is fine where it only sizes a target the rules prove (`shapes`:
    it then follows the pruning by itself); used in any other way, the axis is blocked."""
    x = node.inputs[0]
    xa = g.axes(x) or []
    start, end = (attr(node, "start", 0), attr(node, "end", len(xa))) if node.op_type == "Shape" else (0, len(xa))
    for axis in range(len(xa))[slice(start, end)]:
        used = g.shapes.escaped.get((x, axis)) if node.op_type == "Shape" else f"{node.op_type} {node.name}"
        if used is not None:
            g.block(xa[axis], f"size read at run time by {node.op_type} {node.name} and used by {used}")
