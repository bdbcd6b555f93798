"""Slices whose bounds are computed, and sequences from SplitToSequence: rules proving what they select.

Exporters rarely write a Slice's bounds as one constant. The unoptimised dynamo exporter writes
``Cast(const) -> Reshape([-1])`` pieces; the TorchScript exporter writes rotary's ``rotate_half``
as ``x[..., : d // 2]`` and ``x[..., d // 2 :]`` with ``d`` read by ``Shape``; masks are sliced to
the sequence length read from another tensor. The shape walk (`shapes.Shapes`) gives each bound
its value and, for a size read by ``Shape``, its origin slot. A bound on a static axis is then:

- a value known now and invariant under pruning (a constant, or arithmetic on read sizes: the
  walk blocks every slot whose size flows into arithmetic, so those sizes never change), cut
  like a constant bound and rewritten with the plan;
- the run-time size of the sliced axis itself (``x[:, : x.shape[1]]``; the same index space):
  it is the end of the axis before and after pruning;
- anything else (the size of another slot, a symbolic value) cannot be proven: the sliced axis
  and the slot read are blocked, with the reason.

When any bound stays a run-time size (a sequence length on a dynamic axis), the bounds are not
rewritten as constants, so a cut on a static axis of that Slice blocks instead.

``SplitToSequence`` with constant sizes followed by ``SequenceAt`` at constant positions (how the
unoptimised dynamo exporter writes ``qkv.split(n, dim=-1)``) is a Split whose parts are the
``SequenceAt`` outputs; any other use of the sequence blocks the split axis.
"""

from __future__ import annotations

import onnx_ir as ir

from slimc.passes.prune.graph import DependencyGraph, ShapeSite
from slimc.passes.prune.rules import _ranked, attr, block_node, ints, rule
from slimc.passes.prune.shapes import static
from slimc.passes.prune.symbolic import same_space

INT64_MAX = 2**63 - 1


def entries(g: DependencyGraph, value: ir.Value | None) -> list[tuple[int | None, tuple | None]] | None:
    """(value known now or None, origin slot or None) of each element of a small integer tensor."""
    if value is None:
        return None
    known = ints(value)
    if known is not None:
        return [(v, None) for v in known]
    elems = g.shapes.elements(value)
    return None if elems is None else [(static(e), o) for e, o in elems]


def _static_list(g: DependencyGraph, node: ir.Node, index: int) -> list[int] | None | bool:
    """A constant-valued optional input (axes, steps); False when present but not known."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    got = entries(g, node.inputs[index])
    if got is None or any(v is None or o is not None for v, o in got):
        return False
    return [v for v, _ in got]


def _origin_atom(g: DependencyGraph, origin: tuple) -> int | None:
    axes = g.axes(origin[0])
    return axes[origin[1]] if axes is not None and origin[1] < len(axes) else None


def _bound(g, node, atom, value, origin) -> int | None:
    """A bound on the static axis ``atom``: its index now, or None (blocked) if it is not proven."""
    if origin is None:
        if value is None:
            g.block(atom, f"Slice bound at {node.name} is computed at run time")
        return value
    src = _origin_atom(g, origin)
    if src is not None and len(origin) == 2 and same_space(g, src, atom):
        return g.atoms.size(atom)  # the axis's own size: its end, before and after pruning
    reason = f"Slice bound at {node.name} is the run-time size of another slot ({origin[0].name} axis {origin[1]})"
    g.block(atom, reason)
    g.block(src, reason)
    return None


def _dynamic_bound(g, node, value, origin) -> bool:
    """A bound on a dynamic axis: True if it is known now (a constant the rewrite may copy)."""
    if origin is not None:
        src = _origin_atom(g, origin)
        if src is not None and g.atoms.size(src) > 1:
            g.block(src, f"size read at run time by a Shape and used as a Slice bound at {node.name}")
        return False
    return value is not None


@rule("Slice")
def slice_(g: DependencyGraph, node: ir.Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    axes = _ranked(g, node, x, out)
    if axes is None:
        return
    xa, oa = axes
    starts, ends = entries(g, node.inputs[1]), entries(g, node.inputs[2])
    which, steps = _static_list(g, node, 3), _static_list(g, node, 4)
    if starts is None or ends is None or len(starts) != len(ends) or which is False or steps is False:
        block_node(g, node, "Slice bounds computed at run time")
        return
    which = [w % len(xa) for w in (which or range(len(starts)))]
    steps = steps or [1] * len(starts)
    cuts, constant = {}, True
    for k, (axis, step) in enumerate(zip(which, steps)):
        atom = xa[axis]
        if atom is None:
            known = [_dynamic_bound(g, node, *b) for b in (starts[k], ends[k])]
            constant = constant and all(known)
            continue
        n = g.atoms.size(atom)
        s, e = (_bound(g, node, atom, *b) for b in (starts[k], ends[k]))
        if s is None or e is None:
            g.block(oa[axis], f"Slice bound at {node.name} is not proven")
            constant = False
            continue
        s, e = (max(0, min(n, v + n if v < 0 else v)) for v in (s, e))
        if step != 1:
            g.block(atom, f"strided Slice at {node.name}")
            g.block(oa[axis], f"strided Slice at {node.name}")
        elif (s, e) != (0, n):
            cuts[axis] = (s, e)
    for i, (a, b) in enumerate(zip(xa, oa)):
        if i in cuts:
            tie_pieces(g, b, g.atoms.pieces(a, *cuts[i]))
        elif not any(i == w and st != 1 for w, st in zip(which, steps)):
            g.tie(a, b)
    if not cuts:
        return
    if not constant:
        for i in cuts:  # rewriting the cut would freeze a run-time bound of another axis
            g.block(xa[i], f"Slice at {node.name} cuts this axis next to a run-time bound it cannot rewrite")
        return
    g.sites.append(ShapeSite(node, "slice", {
        "cuts": {i: (xa[i], *c) for i, c in cuts.items()}, "axes": which,
        "starts": [v for v, _ in starts], "ends": [v for v, _ in ends]}))


def tie_pieces(g: DependencyGraph, atom: int | None, pieces: list[int]) -> None:
    """``atom`` is the concatenation of ``pieces`` (one piece: the same index space)."""
    if atom is None:
        return
    if len(pieces) == 1:
        g.tie(pieces[0], atom)
    else:
        g.atoms.make_sum(atom, pieces)


@rule("SplitToSequence")
def split_to_sequence(g: DependencyGraph, node: ir.Node) -> None:
    """Parts of a split the ``SequenceAt`` nodes pick; blocks the axis for any other use of the sequence."""
    x, seq = node.inputs[0], node.outputs[0]
    xa = g.axes(x)
    parts = g.shapes.sequence_parts(seq)
    picks = [use.node for use in seq.uses()]
    why = None
    if xa is None or parts is None:
        why = "SplitToSequence: sizes or rank unknown"
    elif attr(node, "keepdims", 1) == 0 or len(node.inputs) < 2 or node.inputs[1] is None:
        why = "SplitToSequence into single slices (keepdims=0 or no sizes)"
    elif any(p.op_type != "SequenceAt" or _position(g, p, len(parts)) is None for p in picks):
        why = "a use of SplitToSequence's sequence other than SequenceAt at a constant position"
    if why is not None:
        block_node(g, node, why)
        for p in picks:
            g.block_value(p.outputs[0], f"{why} at {node.name}")
        return
    axis = attr(node, "axis", 0) % len(xa)
    atom = xa[axis]
    if atom is None:
        return
    kids = [g.atoms.new(n) for n in parts]
    g.atoms.make_sum(atom, kids)
    g.sites.append(ShapeSite(node, "split", {"parts": kids}))
    for p in picks:
        pa = g.axes(p.outputs[0])
        if pa is None or len(pa) != len(xa):
            block_node(g, p, "SequenceAt: rank unknown")
            continue
        for i, (a, b) in enumerate(zip(xa, pa)):
            g.tie(kids[_position(g, p, len(parts))] if i == axis else a, b)


def _position(g: DependencyGraph, node: ir.Node, count: int) -> int | None:
    got = entries(g, node.inputs[1])
    if got is None or len(got) != 1 or got[0][0] is None or got[0][1] is not None or not -count <= got[0][0] < count:
        return None
    return got[0][0] % count


@rule("SequenceAt")
def sequence_at(g: DependencyGraph, node: ir.Node) -> None:
    """Coupled by its SplitToSequence's rule (which sees every position); anything else blocks."""
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    if producer is None or producer.op_type != "SplitToSequence":
        block_node(g, node, "SequenceAt of a sequence not made by SplitToSequence")
