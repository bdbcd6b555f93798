"""Axes of symbolic size in the dependency graph: reshapes through them, and *mixed* axes.

A static axis is a slot (an atom). A dynamic axis usually carries nothing to prune, but a
Reshape may fold a static axis into a dynamic one: SDPA's decomposition reshapes k from
``[batch, heads, seq, d]`` to ``[heads*batch, seq, d]`` and back. Such an axis is *mixed*: a
row-major product of factors, each a static atom or a symbolic size (``g.mixed[value][axis]``
lists ``(size, atom or None)``). Transpose, elementwise ops, MatMul batch dims and reshapes
carry mixed axes along; any other op that meets one blocks its atoms (`guard_mixed`).

`regroup` matches the row-major factors of a reshape's input and output with symbolic sizes
(monomials from `shapes`), so ``[b, s, 64] -> [b, s, 4, 16]``, ``[b, 4, s, 16] -> [4*b, s, 16]``
and ``[4*b, 16, s] -> [b, 4, 16, s]`` all keep the heads atom. `check_target` proves each entry
of a run-time Reshape/Expand target: a constant (rewritten when pruned) or the run-time size of
a slot that the target's axis is coupled to (it follows the pruning by itself).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimc.passes.prune.atoms import Conflict
from slimc.passes.prune.shapes import div, mul, static, text

MIXED_AWARE = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "MatMul", "Add", "Sub", "Mul", "Div", "Pow",
               "Max", "Min", "Where", "Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "Neg", "Sqrt", "Reciprocal", "Cast",
               "CastLike", "Exp", "Log", "Abs", "Clip", "Identity", "Dropout", "IsNaN", "IsInf", "Not", "Equal", "Softmax"}


def mixed_atoms(g, value: ir.Value, axis: int | None = None) -> list[int]:
    table = g.mixed.get(value) or {}
    return [a for i, factors in table.items() if axis is None or i == axis for _, a in factors if a is not None]


def guard_mixed(g, node: ir.Node) -> None:
    """An op without mixed-axis handling blocks the atoms folded into the axes it touches."""
    if node.op_type in MIXED_AWARE and node.domain in ("", "ai.onnx"):
        return
    for value in (*node.inputs, *node.outputs):
        if value is not None:
            for atom in mixed_atoms(g, value):
                g.block(atom, f"folded into a dynamic axis that {node.op_type} {node.name} does not follow")


def couple(g, node: ir.Node, src: ir.Value, i: int, dst: ir.Value, j: int) -> None:
    """Axis ``i`` of ``src`` is axis ``j`` of ``dst`` (an output of ``node``), where either is mixed."""
    a, b = (g.mixed.get(src) or {}).get(i), (g.mixed.get(dst) or {}).get(j)
    if a is None and b is None:
        return
    sa = g.shapes.dims(src)[i] if g.shapes.dims(src) is not None else None
    if a is None:
        if sa != (1, ()):  # a plain axis of the same run-time size would keep every index
            for _, atom in b:
                g.block(atom, f"meets an axis of unproven structure at {node.name}")
        return
    if b is None:
        g.mixed.setdefault(dst, {})[j] = list(a)
        return
    if [s for s, _ in a] != [s for s, _ in b]:
        for _, atom in (*a, *b):
            g.block(atom, f"folded axes of different structure meet at {node.name}")
        return
    for (_, x), (_, y) in zip(a, b):
        if (x is None) != (y is None):
            g.block(x if x is not None else y, f"folded axes of different structure meet at {node.name}")
        elif x is not None:
            g.tie(x, y)


def _factors(g, value: ir.Value) -> list | None:
    """Row-major factors (size, atom or None) of every axis of ``value``; None if any is unknown."""
    dims, axes = g.shapes.dims(value), g.axes(value)
    if dims is None or axes is None:
        return None
    out = []
    for i, (d, atom) in enumerate(zip(dims, axes)):
        if atom is not None:
            out.append(((g.atoms.size(atom), ()), atom))
        elif i in (g.mixed.get(value) or {}):
            out.extend(g.mixed[value][i])
        elif d is None:
            return None
        else:
            out.append((d, None))
    return [f for f in out if f[0] != (1, ())]


def _fold(g, out, j, items, pos, target) -> tuple[int, list] | None:
    """Take factors from ``pos`` whose product is the symbolic size ``target``; returns the new
    position and the factor list (a symbolic factor may have been split)."""
    acc, taken = (1, ()), []
    while acc != target and pos < len(items):
        size, atom = items[pos]
        if div(target, mul(acc, size)) is None:
            # a symbolic input axis (batch*seq) that the output splits (batch, seq): it holds no
            # atom, so only the sizes have to agree, and the rest of it stays for the next axes
            part = div(target, acc)
            rest = div(size, part) if part is not None and atom is None else None
            if rest is None or rest == (1, ()):
                break
            items = items[:pos] + [(part, None), (rest, None)] + items[pos + 1:]
            continue
        acc = mul(acc, size)
        taken.append(items[pos])
        pos += 1
    if acc != target:
        return None
    if any(a is not None for _, a in taken):
        g.mixed.setdefault(out, {})[j] = taken
    return pos, items


def regroup(g, node: ir.Node, x: ir.Value, out: ir.Value) -> bool:
    """Couple a reshape's input and output factor by factor; block the node if they do not match."""
    from slimc.passes.prune.rules import block_node

    items, od, oa = _factors(g, x), g.shapes.dims(out), g.axes(out)
    why = None
    if items is None or od is None or oa is None:
        why = "an axis of unknown size"
    pos, j = 0, 0
    while why is None and j < len(od):
        if oa[j] is not None:
            run = []
            while j < len(od) and oa[j] is not None:
                run.append(oa[j])
                j += 1
            n, taken, acc = int(np.prod([g.atoms.size(a) for a in run])), [], 1
            while acc < n and pos < len(items) and items[pos][1] is not None:
                acc *= static(items[pos][0])
                taken.append(items[pos][1])
                pos += 1
            if acc != n:
                why = "static axes do not line up"
                break
            try:
                g.atoms.unify_products(taken, run)
            except Conflict as exc:
                why = str(exc)
        elif od[j] is None:
            why = f"output axis {j} has unknown size"
        elif od[j] == (1, ()):
            j += 1
        else:
            folded = _fold(g, out, j, items, pos, od[j])
            if folded is not None:
                pos, items = folded
            else:
                why = f"output axis {j} ({text(od[j])}) is not a product of input axes"
            j += 1
    if why is None and pos != len(items):
        why = "input axes left over"
    if why is not None:
        block_node(g, node, f"{node.op_type} regroups axes it cannot follow: {why}")
        for value in (x, out):
            for atom in mixed_atoms(g, value):
                g.block(atom, f"{node.op_type} {node.name} regroups axes it cannot follow")
        return False
    return True


def same_space(g, a: int, b: int) -> bool:
    """Two slots index the same space: one atom, or products of the same leaves in the same order."""
    if g.atoms.find(a) == g.atoms.find(b):
        return True
    return [g.atoms.find(x) for x in g.atoms.flat_product([a])] == [g.atoms.find(x) for x in g.atoms.flat_product([b])]


def scaled_rest(g, atom: int, src: int, coef: int) -> list[int] | None:
    """``coef`` times the size of slot ``src`` sizes ``atom`` when ``atom`` is the row-major product of
    ``src``'s space and factors of total size ``coef`` (``kv_heads * n_rep``): those factors, else None.
    The factors' size is a constant in the target, rewritten when they are pruned (`targets`)."""
    flat, lead = [g.atoms.find(x) for x in g.atoms.flat_product([atom])], [g.atoms.find(x) for x in g.atoms.flat_product([src])]
    rest = flat[len(lead):]
    if flat[:len(lead)] != lead or not rest or int(np.prod([g.atoms.size(x) for x in rest])) != coef:
        return None
    return rest


def check_target(g, node: ir.Node, target: ir.Value, out: ir.Value, what: str) -> None:
    """Prove every entry of a Reshape/Expand target, or block the slots it sizes."""
    elems, oa = g.shapes.elements(target), g.axes(out) or []
    offset = len(oa) - len(elems) if elems is not None else 0  # Expand targets are right-aligned
    for i, atom in enumerate(oa):
        e = elems[i - offset] if elems is not None and 0 <= i - offset < len(elems) else None
        value, origin = e if e is not None else (None, None)
        if origin is not None:
            src = g.axes(origin[0])
            src_atom = src[origin[1]] if src is not None and origin[1] < len(src) else None
            if atom is not None and src_atom is not None and len(origin) == 2 and same_space(g, atom, src_atom):
                continue
            if atom is not None and src_atom is not None and len(origin) > 2 and scaled_rest(g, atom, src_atom, origin[2]):
                continue
            if atom is None and src_atom is None:
                continue
            reason = f"{what} entry {i} at {node.name} is the run-time size of another slot ({origin[0].name} axis {origin[1]})"
            g.block(atom, reason)
            g.block(src_atom, reason)
        elif atom is not None and g.atoms.size(atom) > 1 and static(value) is None:
            g.block(atom, f"{what} size of axis {i} at {node.name} is computed at run time")
    for value, axis in (o[:2] for _, o in elems or [] if o is not None):
        src = g.axes(value)
        if src is not None and axis < len(src) and g.axes(out) is None:
            g.block(src[axis], f"{what} at {node.name} has an output of unknown rank")
