"""Rebuilding a Reshape/Expand target from its proven entries when its constants cannot be rewritten in place.

The TorchScript exporter writes ``repeat_kv`` (grouped-query attention) as

```
Concat(b, kv_heads, 2, s, d) -> Reshape([-1]) -> Where(Equal(., -1), 1, .) -> Expand      (n_rep = 2)
Concat(b, kv_heads * 2, s, d) -> Reshape                                                  (heads = kv_heads * n_rep)
```

with ``b``, ``kv_heads``, ``s``, ``d`` read by ``Shape``. Pruning heads (``n_rep``) must change the
constant ``2`` in both, and it is not a piece of the Concat feeding the node (the Where stands in
between) or it is folded into a product (``kv_heads * 2``). Instead of locating it, the target is
rebuilt from what the shape walk proved of every entry:

| entry (`shapes`) | proven by `symbolic.check_target` as | rebuilt as |
|---|---|---|
| a constant ``c`` | the size of its axis, or a marker (-1, 0) | ``[c]``, or the axis's new size when ``c`` was its size |
| the size of slot ``(v, i)`` | the same index space as its axis | ``Gather(Shape(v), [i])``: follows the pruning by itself |
| ``c`` times the size of ``(v, i)`` | the product of ``(v, i)``'s space and factors of size ``c`` | ``Gather(Shape(v), [i]) * [new size of those factors]`` |

The rebuilt ``Concat`` feeds only this node; the original computation stays for its other users.
A target with any other entry (a symbolic value with no origin) is not rebuilt: its rule blocks the
axes whose sizes would need rewriting (`layout_rules._record`).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

from slimc.passes.prune.shapes import static
from slimc.passes.prune.symbolic import scaled_rest

_counter = itertools.count()


def rebuild_specs(g, target: ir.Value, out: ir.Value) -> list[tuple] | None:
    """One spec per target entry (see the module docstring), or None if some entry cannot be rebuilt."""
    elems, oa = g.shapes.elements(target), g.axes(out)
    if elems is None or oa is None or len(elems) > len(oa):
        return None
    offset, specs = len(oa) - len(elems), []
    for i, (e, origin) in enumerate(elems):
        atom = oa[i + offset]
        if origin is None:
            if static(e) is None:
                return None
            specs.append(("const", static(e), atom))
        elif len(origin) == 2:
            specs.append(("size", origin[0], origin[1]))
        else:
            src = g.axes(origin[0])
            src_atom = src[origin[1]] if src is not None and origin[1] < len(src) else None
            if (atom is None) != (src_atom is None):
                return None
            rest = [] if atom is None else scaled_rest(g, atom, src_atom, origin[2])
            if rest is None:
                return None
            specs.append(("scaled", origin[0], origin[1], rest, origin[2]))
    return specs


def needs_rebuild(specs: list[tuple]) -> bool:
    """A product entry with prunable factors: only a rebuilt target follows their pruning."""
    return any(s[0] == "scaled" and s[3] for s in specs)


def _new_sizes(g, specs: list[tuple], plan) -> list[int | None] | None:
    """The constant of each entry after ``plan`` (None for a plain size read); None if nothing changes."""
    out, changed = [], False
    for spec in specs:
        if spec[0] == "const":
            _, n, atom = spec
            m = g.atoms.keep_mask(atom, plan) if atom is not None else None
            new = int(m.sum()) if m is not None and n == g.atoms.size(atom) else n
            changed |= new != n
        elif spec[0] == "size":
            new = None
        else:
            rest, coef = spec[3], spec[4]
            new = int(np.prod([int(m.sum()) if (m := g.atoms.keep_mask(a, plan)) is not None else g.atoms.size(a)
                               for a in rest])) if rest else coef
            changed |= new != coef
        out.append(new)
    return out if changed else None


def rewrite_rebuild(g, site, plan) -> None:
    """Replace the target input of ``site.node`` by a Concat of its rebuilt entries, if a size changes."""
    node, specs = site.node, site.data["specs"]
    sizes = _new_sizes(g, specs, plan)
    if sizes is None:
        return
    graph, pieces, new_nodes = g.graph, [], []

    def const(n: int) -> ir.Value:
        name = f"{node.name}_target{next(_counter)}"
        value = ir.Value(name=name, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(np.array([n], np.int64), name=name))
        graph.register_initializer(value)
        return value

    def read(value: ir.Value, axis: int) -> ir.Value:
        shape = ir.Node("", "Shape", [value], name=f"{node.name}_shape{next(_counter)}")
        pick = ir.Node("", "Gather", [shape.outputs[0], const(axis)], attributes=[ir.AttrInt64("axis", 0)],
                       name=f"{node.name}_size{next(_counter)}")
        new_nodes.extend([shape, pick])
        return pick.outputs[0]

    for spec, new in zip(specs, sizes):
        if spec[0] == "const":
            pieces.append(const(new))
        elif spec[0] == "size":
            pieces.append(read(spec[1], spec[2]))
        else:
            scale = ir.Node("", "Mul", [read(spec[1], spec[2]), const(new)], name=f"{node.name}_scaled{next(_counter)}")
            new_nodes.append(scale)
            pieces.append(scale.outputs[0])
    concat = ir.Node("", "Concat", pieces, attributes=[ir.AttrInt64("axis", 0)], name=f"{node.name}_target{next(_counter)}")
    new_nodes.append(concat)
    for n in new_nodes:
        n.outputs[0].type = ir.TensorType(ir.DataType.INT64)
        rank = len(g.shapes.dims(n.inputs[0]) or []) if n.op_type == "Shape" else 1
        n.outputs[0].shape = ir.Shape([rank]) if rank else None
        graph.insert_before(node, n)
    concat.outputs[0].shape = ir.Shape([len(pieces)])
    node.replace_input_with(site.data["input"], concat.outputs[0])
