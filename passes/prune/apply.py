"""Applying a pruning plan: slice every constant, rewrite every size, update every shape.

A plan maps leaf atoms to boolean keep masks. `apply_plan` computes each slot's keep mask from
the atom structure, slices the constants (initializers and ``Constant`` nodes), writes new
sizes into static value shapes (dynamic axes stay symbolic), and rewrites the recorded
`ShapeSite`s: Reshape/Expand targets, Slice offsets, Split sizes, Gather indices and Conv
``group``. Shape constants are often shared between nodes (one ``[-1]`` serves every head
reshape), so a rewritten constant is always a new initializer used by that node alone.

`zero_consumers` builds the correctness oracle's reference: the unpruned model with the
pruned channels' consumer weights set to zero.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

from slimc.backends.onnxruntime import release_mapped_pages
from slimc.passes.prune.graph import DependencyGraph, ShapeSite
from slimc.passes.prune.rules import const_array
from slimc.passes.prune.targets import rewrite_rebuild

_counter = itertools.count()


def _new_const(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name = f"{base or 'const'}__pruned{next(_counter)}"
    while name in graph.initializers:
        name = f"{base or 'const'}__pruned{next(_counter)}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replace the data of an initializer or of a ``Constant`` node's output in place."""
    tensor = ir.tensor(array, name=value.name)
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        for name in [n for n in producer.attributes if n.startswith("value")]:
            producer.attributes.pop(name)  # value_ints / value_floats: one value attribute only
        producer.attributes["value"] = ir.AttrTensor("value", tensor)
    value.const_value = tensor
    value.shape = ir.Shape(array.shape)


def _slot_masks(g: DependencyGraph, axes, plan) -> list[np.ndarray | None]:
    return [None if a is None else g.atoms.keep_mask(a, plan) for a in axes]


def apply_plan(g: DependencyGraph, plan: dict[int, np.ndarray]) -> None:
    """Prune the model of ``g`` in place according to ``plan`` ({leaf atom: keep mask})."""
    plan = {g.atoms.find(k): np.asarray(v, bool) for k, v in plan.items()}
    for site in g.sites:
        _REWRITE[site.kind](g, site, plan)
    for value, axes in list(g.slots.items()):
        if not axes:
            continue
        masks = _slot_masks(g, axes, plan)
        if all(m is None for m in masks):
            continue
        if value.const_value is not None:
            array = source = g.array(value)
            for axis, m in enumerate(masks):
                if m is not None:
                    array = np.compress(m, array, axis=axis)
            set_constant(value, array)
            g.forget(value)
            release_mapped_pages([source])  # a memory-mapped original: its pages leave as its pruned copy comes
        elif value.shape is not None:
            dims = list(value.shape)
            for axis, m in enumerate(masks):
                if m is not None and isinstance(dims[axis], int):
                    dims[axis] = int(m.sum())
            value.shape = ir.Shape(dims)


def _replace_input(g: DependencyGraph, node: ir.Node, index: int, array: np.ndarray) -> None:
    old = node.inputs[index]
    node.replace_input_with(index, _new_const(g.graph, old.name if old is not None else node.name, array))


def _rewrite_shape(g: DependencyGraph, site: ShapeSite, plan) -> None:
    node, index, entries = site.node, site.data["input"], site.data["entries"]
    changes: dict[int, dict[int, int]] = {}  # Concat input (-1: the constant itself) -> {position: size}
    for i, atom in enumerate(g.slots[node.outputs[0]] or []):
        if atom is None or i >= len(entries):
            continue
        m = g.atoms.keep_mask(atom, plan)
        old, (value, k, pos) = g.atoms.size(atom), entries[i]
        if m is not None and value == old:
            changes.setdefault(k, {})[pos] = int(m.sum())
    if not changes:
        return
    shape = node.inputs[index]

    def rewritten(source: ir.Value, updates: dict[int, int]) -> np.ndarray:
        if source.const_value is None:  # a piece folded from constants (layout_rules.folded)
            array = np.asarray([e[0][0] for e in g.shapes.elements(source)], np.int64)
        else:
            array = const_array(source).copy()
        for pos, n in updates.items():
            array.reshape(-1)[pos] = n
        return array

    if -1 in changes:
        _replace_input(g, node, index, rewritten(shape, changes[-1]))
        return
    concat = shape.producer()
    pieces = list(concat.inputs)
    for k, updates in changes.items():
        pieces[k] = _new_const(g.graph, pieces[k].name, rewritten(pieces[k], updates))
    new = ir.Node("", "Concat", pieces, attributes=[ir.AttrInt64("axis", 0)], name=f"{concat.name}__pruned{next(_counter)}")
    new.outputs[0].shape, new.outputs[0].type = shape.shape, shape.type
    g.graph.insert_before(node, new)
    node.replace_input_with(index, new.outputs[0])


def _rewrite_slice(g: DependencyGraph, site: ShapeSite, plan) -> None:
    node = site.node
    # the bounds known at analysis (constants, or computed from sizes that never change: slice_rules)
    starts, ends = np.asarray(site.data["starts"], np.int64), np.asarray(site.data["ends"], np.int64)
    changed = False
    for k, axis in enumerate(site.data["axes"]):
        if axis not in site.data["cuts"]:
            continue
        atom, s, e = site.data["cuts"][axis]
        m = g.atoms.keep_mask(atom, plan)
        if m is not None:
            starts[k], ends[k] = m[:s].sum(), m[:e].sum()
            changed = True
    if changed:
        _replace_input(g, node, 1, starts)
        _replace_input(g, node, 2, ends)


def _rewrite_split(g: DependencyGraph, site: ShapeSite, plan) -> None:
    node = site.node
    sizes = [g.atoms.size(p) if (m := g.atoms.keep_mask(p, plan)) is None else int(m.sum()) for p in site.data["parts"]]
    if sizes == [g.atoms.size(p) for p in site.data["parts"]]:
        return
    if "split" in node.attributes:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
        return
    node.attributes.pop("num_outputs", None)
    array = np.asarray(sizes, np.int64)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        _replace_input(g, node, 1, array)
    else:
        node.resize_inputs(2)
        node.replace_input_with(1, _new_const(g.graph, f"{node.name}_split", array))


def _rewrite_group(g: DependencyGraph, site: ShapeSite, plan) -> None:
    m = g.atoms.keep_mask(site.data["atom"], plan)
    if m is not None:
        site.node.attributes["group"] = ir.AttrInt64("group", int(m.sum()))


def _rewrite_gather(g: DependencyGraph, site: ShapeSite, plan) -> None:
    node = site.node
    m = g.atoms.keep_mask(site.data["atom"], plan)
    if m is None:
        return
    idx = const_array(node.inputs[1])
    position = np.cumsum(m) - 1
    flat = idx.reshape(-1)
    n = m.shape[0]
    flat = np.where(flat < 0, flat + n, flat)
    kept = flat[m[flat]]
    _replace_input(g, node, 1, position[kept].astype(idx.dtype).reshape(idx.shape if kept.size == flat.size else (-1,)))


_REWRITE = {"rebuild": rewrite_rebuild, "shape": _rewrite_shape, "slice": _rewrite_slice, "split": _rewrite_split, "group": _rewrite_group,
            "gather": _rewrite_gather}


def zero_consumers(g: DependencyGraph, plan: dict[int, np.ndarray]) -> None:
    """The oracle's reference, in place: consumer weights of pruned channels set to zero."""
    for c in g.contractions:
        atom = g.slots[c.weight][c.weight_axis]
        m = g.atoms.keep_mask(atom, {g.atoms.find(k): np.asarray(v, bool) for k, v in plan.items()})
        if m is None:
            continue
        array = np.asarray(c.weight.const_value.numpy()).copy()
        index = [slice(None)] * array.ndim
        index[c.weight_axis] = ~m
        array[tuple(index)] = 0
        set_constant(c.weight, array)
