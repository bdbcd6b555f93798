"""A removed attention sub-layer takes its KV-cache entries with it (`slimc.kvcache`'s interface).

In a cached decoder graph each attention branch concatenates its layer's past key/value with
the new ones and returns them as ``present.{i}.key/value``: graph outputs inside the branch.
Removing the branch removes those outputs and the ``past_key_values.{i}.*`` inputs; the other
layers keep their indices (the interface allows gaps).

Exporters also read sizes from the past tensors outside the layer: the past length from layer
0's past key (positions, the mask), the batch from another's. By the interface every past tensor
has the same batch and past length, so such a ``Shape`` read is moved to a past tensor of a
layer that stays (same role, key or value), provided it reads no axis where the two differ (the
head count or head size). Anything else that reads a removed layer's past outside the branch
makes the sub-layer not removable, with the reason.
"""

from __future__ import annotations

import onnx_ir as ir

from slimc import kvcache
from slimc.errors import PassConfigError

PAST_AXES = (0, 2)  # batch and past length: the same in every layer's past by the interface


def _layer_of(value: ir.Value) -> tuple[int, str] | None:
    match = kvcache._PRESENT.match(value.name or "") if value.is_graph_output() else None
    return (int(match.group(1)), match.group(2)) if match else None


def _past(graph: ir.Graph, index: int, role: str) -> ir.Value | None:
    name = (kvcache.PAST_KEY if role == "key" else kvcache.PAST_VALUE).format(index)
    return next((v for v in graph.inputs if v.name == name), None)


def branch_cache(graph: ir.Graph, outputs: list[ir.Value], inside: set[ir.Node]) -> tuple[list[int], str]:
    """The cache layers whose present outputs are ``outputs`` (the graph outputs a sub-layer makes), or
    the reason removing the sub-layer would break the interface ('' when it would not)."""
    layers: dict[int, set[str]] = {}
    for value in outputs:
        found = _layer_of(value)
        if found is None:
            return [], (f"its value {value.name!r} is a graph output; removing it would change the interface")
        layers.setdefault(found[0], set()).add(found[1])
    for index, roles in sorted(layers.items()):
        if roles != {"key", "value"}:
            return [], f"it makes present.{index}.{roles.pop()} but not the layer's other cache output"
        for role in ("key", "value"):
            past = _past(graph, index, role)
            if past is None:
                return [], f"it makes present.{index}.{role} but the graph has no past_key_values.{index}.{role} input"
            for node, _ in past.uses():
                if node not in inside and node.op_type != "Shape":
                    return [], (f"{past.name} is also read outside the sub-layer (by {node.name or node.op_type}), "
                                "so its KV-cache entries cannot go with it")
    return sorted(layers), ""


def _read_axes(node: ir.Node, rank: int) -> range:
    start = node.attributes.get("start")
    end = node.attributes.get("end")
    lo, hi = (start.value if start is not None else 0), (end.value if end is not None else rank)
    lo, hi = (max(0, min(rank, v + rank if v < 0 else v)) for v in (lo, hi))
    return range(lo, hi)


def _same_static(a: ir.Value, b: ir.Value, axis: int) -> bool:
    da = a.shape[axis] if a.shape is not None and len(a.shape) == 4 else None
    db = b.shape[axis] if b.shape is not None and len(b.shape) == 4 else None
    return isinstance(da, int) and da == db


def drop_layers(graph: ir.Graph, removed: list[int]) -> None:
    """Remove the cache outputs of ``removed`` layers; call before dead-code removal (graph outputs
    keep their producers alive), then `drop_inputs` after it."""
    names = {kvcache.PRESENT_KEY.format(i) for i in removed} | {kvcache.PRESENT_VALUE.format(i) for i in removed}
    for value in [v for v in graph.outputs if v.name in names]:
        graph.outputs.remove(value)


def drop_inputs(graph: ir.Graph, removed: list[int]) -> None:
    """Move the size reads of the removed layers' past inputs to a remaining layer's, then remove the inputs.

    Raises PassConfigError when a read has no remaining source (every cached layer removed) or reads
    an axis that differs between the layers: the model (a copy) is then left as it was."""
    kept = sorted({int(m.group(1)) for v in graph.inputs if (m := kvcache._PAST.match(v.name or ""))} - set(removed))
    for index in removed:
        for role in ("key", "value"):
            past = _past(graph, index, role)
            if past is None:
                continue
            for node, slot in list(past.uses()):
                source = _source(graph, kept, role, node, past)
                node.replace_input_with(slot, source)
            graph.inputs.remove(past)


def _source(graph: ir.Graph, kept: list[int], role: str, node: ir.Node, past: ir.Value) -> ir.Value:
    """A remaining layer's past tensor whose shape gives ``node`` (a Shape read) the same numbers."""
    axes = _read_axes(node, 4)
    for index in kept:
        for other_role in (role, "value" if role == "key" else "key"):
            other = _past(graph, index, other_role)
            if other is not None and all(a in PAST_AXES or _same_static(past, other, a) for a in axes):
                return other
    raise PassConfigError(
        f"layerskip: {node.name or node.op_type} reads the shape of {past.name}, and no remaining layer's past tensor "
        "has the same sizes on the axes it reads, so the KV cache of the removed layers cannot go. Remove fewer "
        "attention units (keep one with protect_first/protect_last) or use unit=mlp.")
