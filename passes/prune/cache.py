"""The KV cache of a causal-LM graph in the dependency graph (`slimc.kvcache`'s interface).

A cached graph concatenates each layer's past key/value with the new ones along the sequence
axis (``Concat(past, new, axis=2)``) and returns the result as ``present``: the Concat rule ties
the head axis (axis 1) of the past, the new k/v and the present, so that axis belongs to the
layer's KV group. Pruning that group must remove the same heads from the cache input and
output of the layer: a deliberate interface change the pass reports (`changes`).

The other graph inputs and outputs keep blocking as before. The head axis of a cache tensor
is released only when the engine proves the layer's four cache tensors (past key/value,
present key/value) index one space along it: otherwise pruning could leave a cache whose
key and value, or past and present, disagree on the head count, and the group is blocked with
the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimc import kvcache
from slimc.passes.prune.symbolic import same_space

HEAD_AXIS = 1  # [batch, kv_heads, sequence, head_dim]
CACHE = "cache"  # blocker kind of a cache head axis whose coupling is proven: every target may prune it


def _layers(graph: ir.Graph) -> dict[int, dict[str, ir.Value]]:
    """{layer index: {past_key, past_value, present_key, present_value: value}} as named in the graph."""
    layers: dict[int, dict[str, ir.Value]] = {}
    for value in graph.inputs:
        match = kvcache._PAST.match(value.name or "")
        if match:
            layers.setdefault(int(match.group(1)), {})["past_" + match.group(2)] = value
    for value in graph.outputs:
        match = kvcache._PRESENT.match(value.name or "")
        if match:
            layers.setdefault(int(match.group(1)), {})["present_" + match.group(2)] = value
    return layers


def _unproven(g, values: dict[str, ir.Value]) -> str | None:
    """Why the head axes of one layer's cache tensors are not proven one index space, or None."""
    if set(values) != {"past_key", "past_value", "present_key", "present_value"}:
        return f"the layer has only {', '.join(sorted(values))} of its past/present key/value"
    atoms = {}
    for role, value in values.items():
        axes = g.axes(value)
        if axes is None or len(axes) != 4 or axes[HEAD_AXIS] is None:
            return f"{value.name} has no static head axis (shape {value.shape})"
        atoms[role] = axes[HEAD_AXIS]
    first = atoms["past_key"]
    for role, atom in atoms.items():
        if not same_space(g, first, atom):
            return f"the head axis of {values[role].name} is not proven to be that of {values['past_key'].name}"
    return None


def block_interface(g, kind: str | None) -> None:
    """Block every graph input and output (``kind``: HARD or ``interface``), releasing the head
    axis of the cache tensors whose coupling is proven (those block with kind ``cache`` only)."""
    cache_axes: dict[ir.Value, str | None] = {}
    for index, values in _layers(g.graph).items():
        why = _unproven(g, values)
        for value in values.values():
            cache_axes[value] = None if why is None else f"KV cache of layer {index}: {why}"
    for value in (*g.graph.inputs, *g.graph.outputs):
        where = f"graph {'input' if value.is_graph_input() else 'output'} '{value.name}'"
        if value not in cache_axes:
            g.block_value(value, where, kind)
            continue
        axes = g.axes(value) or []
        for axis, atom in enumerate(axes):
            if axis != HEAD_AXIS:
                g.block(atom, where, kind)
            elif cache_axes[value] is None:
                g.block(atom, f"{where} (KV cache: its head count changes with the group)", CACHE)
            else:
                g.block(atom, cache_axes[value])  # hard: the cache would be left inconsistent
        for factors in (g.mixed.get(value) or {}).values():
            for _, atom in factors:
                g.block(atom, where, kind)


def changes(g, plan: dict[int, np.ndarray]) -> list[dict]:
    """The cache layers whose head count the plan changes: [{layer, kv_heads_before, kv_heads_after}]."""
    out = []
    for index, values in sorted(_layers(g.graph).items()):
        value = values.get("past_key")
        axes = g.axes(value) if value is not None else None
        if not axes or len(axes) != 4 or axes[HEAD_AXIS] is None:
            continue
        mask = g.mask(axes[HEAD_AXIS], plan)
        if mask is not None and not mask.all():
            out.append({"layer": index, "kv_heads_before": int(mask.size), "kv_heads_after": int(mask.sum())})
    return out
