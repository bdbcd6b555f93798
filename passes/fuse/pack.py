"""Packing: projections that read the same activation become one MatMul (or MatMulNBits) and a Split.

A transformer block multiplies one normalised activation by several weights: q, k and v in the
attention, gate and up in a gated MLP. Each is a separate GEMM over the same rows; one GEMM over
the weights concatenated along N does the same work with one dispatch, one pass over the
activation and, for 4-bit weights, one dequantisation setup instead of three (what ONNX Runtime
GenAI's model builder writes). Each output column of a MatMul is its own dot product over K, so
the packed product's columns are the separate products' columns: the rewrite is exact (the
pipeline verifies it like the other fusions).

What packs, proven from the graph:

- float ``MatMul`` nodes of the main graph reading the same value as their first input, each
  with a constant 2-D weight of one dtype and the same K;
- ``com.microsoft.MatMulNBits`` nodes reading the same value, with constant ``B``/``scales``
  (and ``zero_points`` on all or none) and equal ``K``, ``bits``, ``block_size``,
  ``accuracy_level`` and scale dtype, and no ``g_idx``/``bias`` inputs.

Members that differ in any of these form separate groups; a group of one is left as it is.
Nodes inside subgraphs (``If``/``Loop`` bodies) are not packed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from slimc.passes.fuse.match import STANDARD, const
from slimc.passes.quant.common import attr

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class Group:
    """Nodes that read ``x`` and can share one packed weight; ``kind`` is ``MatMul`` or ``MatMulNBits``."""

    kind: str
    x: ir.Value
    nodes: list[ir.Node]


def _nbits_key(node: ir.Node) -> tuple | None:
    """What two MatMulNBits must share to pack, or None when the node cannot pack."""
    inputs = list(node.inputs)
    while inputs and inputs[-1] is None:
        inputs.pop()
    if len(inputs) not in (3, 4) or any(const(v) is None for v in inputs[1:]):
        return None  # g_idx / bias inputs, or a weight that is not a constant
    b, scales = const(inputs[1]), const(inputs[2])
    n = attr(node, "N", 0)
    if b.ndim != 3 or b.shape[0] != n or scales.size % n:
        return None
    zp = const(inputs[3]) if len(inputs) == 4 else None
    if zp is not None and (zp.dtype != np.uint8 or zp.size % n):
        return None  # float zero points, or a layout that is not per row
    return ("MatMulNBits", attr(node, "K", 0), attr(node, "bits", 4), attr(node, "block_size", 0),
            attr(node, "accuracy_level", 0), scales.dtype.str, scales.ndim, b.shape[1:], zp is not None)


def _matmul_key(node: ir.Node) -> tuple | None:
    if len(node.inputs) != 2:
        return None
    w = const(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return None
    return ("MatMul", w.shape[0], w.dtype.str)


def find(graph: ir.Graph) -> list[Group]:
    """The groups of two or more projections of one value that pack, in graph order."""
    buckets: dict[tuple, list[ir.Node]] = {}
    for node in graph:
        if node.op_type == "MatMul" and node.domain in STANDARD:
            key = _matmul_key(node)
        elif node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            key = _nbits_key(node)
        else:
            continue
        x = node.inputs[0]
        if key is None or x is None:
            continue
        buckets.setdefault((id(x), *key), []).append(node)
    return [Group(nodes[0].op_type, nodes[0].inputs[0], nodes) for nodes in buckets.values() if len(nodes) > 1]


def _split_sizes(group: Group) -> list[int]:
    if group.kind == "MatMulNBits":
        return [attr(n, "N", 0) for n in group.nodes]
    return [int(const(n.inputs[1]).shape[1]) for n in group.nodes]


def rewrite(graph: ir.Graph, group: Group, opset: int) -> None:
    """One packed node + Split before the group's first node; each output keeps its name and readers."""
    first, sizes = group.nodes[0], _split_sizes(group)
    base = first.name or "packed"
    if group.kind == "MatMulNBits":
        parts = [[const(v) for v in n.inputs[1:] if v is not None] for n in group.nodes]
        tensors = [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]
        names = ["B", "scales", "zero_points"]
        weights = [_initializer(graph, f"{base}_packed_{names[i]}", t) for i, t in enumerate(tensors)]
        attrs = [a for key, a in first.attributes.items() if key != "N"] + [ir.AttrInt64("N", sum(sizes))]
        packed = ir.Node(MS_DOMAIN, "MatMulNBits", [group.x, *weights], attributes=attrs, name=f"{base}_packed",
                         num_outputs=1)
    else:
        w = np.concatenate([const(n.inputs[1]) for n in group.nodes], axis=1)
        packed = ir.Node("", "MatMul", [group.x, _initializer(graph, f"{base}_packed_weight", w)],
                         name=f"{base}_packed", num_outputs=1)
    packed.outputs[0].name = f"{base}_packed_out"
    packed.outputs[0].type = first.outputs[0].type
    split_inputs = [packed.outputs[0]]
    split_attrs = [ir.AttrInt64("axis", -1)]
    if opset >= 13:
        split_inputs.append(_initializer(graph, f"{base}_packed_split", np.asarray(sizes, np.int64)))
    else:
        split_attrs.append(ir.AttrInt64s("split", sizes))
    split = ir.Node("", "Split", split_inputs, attributes=split_attrs, name=f"{base}_packed_split",
                    num_outputs=len(sizes))
    for node, new in zip(group.nodes, split.outputs):
        old = node.outputs[0]
        name = old.name
        old.name = f"{name}__unpacked"
        new.name, new.type, new.shape = name, old.type, old.shape
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    graph.insert_before(first, [packed, split])


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    unique, i = name, 1
    while unique in graph.initializers:
        unique, i = f"{name}_{i}", i + 1
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=unique))
    graph.register_initializer(value)
    return value
