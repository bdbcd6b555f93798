"""`int4(embedding=true)`: token embedding tables to ONNX Runtime's ``GatherBlockQuantized``.

A ``Gather`` (axis 0) over a constant 2-D float table ``E`` [vocab, hidden] becomes
``com.microsoft.GatherBlockQuantized`` (``bits=4``, ``gather_axis=0``, ``quantize_axis=1``):
every row is cut into blocks of ``block_size`` along ``hidden``, one scale (and, asymmetric, one
4-bit zero point) per block; ``data`` is uint8 [vocab, padded_hidden / 2], two codes per byte,
low nibble first; without zero points ORT's default is 8, the same implicit zero point as
MatMulNBits' symmetric form. The op returns the padded width, so a ``Slice`` cuts the padding when
``hidden`` is not a whole number of blocks. Checked on ONNX Runtime 1.32's CPU kernel.

Tied lm_head: when the same table also feeds the lm_head as ``MatMul(h, Transpose(E))`` (how
tied embeddings are exported), the int4 pass has already quantized ``Eᵀ`` [K=hidden, N=vocab] for
MatMulNBits, whose ``B`` [vocab, n_blocks, block_size / 2] holds row ``v`` of ``E`` in blocks
along ``hidden`` — exactly GatherBlockQuantized's layout. The lookup then reads the lm_head's
initializers through a ``Reshape`` to [vocab, n_blocks · block_size / 2] (MatMulNBits refuses a
2-D ``B``), as ONNX Runtime GenAI's builder does with shared embeddings: the 4-bit table is
stored once and no float copy remains. A table the MatMul reads in another layout (not
transposed, or scaled by a Gemm's alpha) is quantized a second time for the lookup (reported).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from slimc.passes.quant import common, gptq
from slimc.passes.quant.common import attr

MS_DOMAIN = "com.microsoft"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
_INDEX_TYPES = (ir.DataType.INT32, ir.DataType.INT64)


@dataclasses.dataclass
class SharedWeight:
    """A MatMulNBits weight made from ``Eᵀ`` of a table ``E``: its initializers and sizes."""

    inputs: list[ir.Value]  # B [N, n_blocks, block_size/2], scales [N, n_blocks], zero points (asymmetric)
    k: int  # hidden
    n: int  # vocab
    method: str


def _why_not(node: ir.Node, table: ir.Value, block_size: int) -> str | None:
    """Why the Gather cannot become a GatherBlockQuantized, or None."""
    if attr(node, "axis", 0) not in (0, -2):
        return f"Gather along axis {attr(node, 'axis', 0)}, not the rows of the table"
    if table.is_graph_input():
        return "the table is also a graph input (a caller may replace it at run time)"
    if table.dtype not in _FLOATS:
        return f"table is {table.dtype.name if table.dtype else 'untyped'}; GatherBlockQuantized takes float32 or float16 scales"
    indices = node.inputs[1]
    if indices is None or indices.dtype not in _INDEX_TYPES:
        return "indices are not int32/int64"
    hidden = table.const_value.shape[1]
    if hidden < block_size:
        return f"row width {hidden} is smaller than one block (block_size={block_size}); left in float"
    return None


def quantize_gathers(graph: ir.Graph, shared: dict[int, SharedWeight], *, block_size: int, symmetric: bool,
                     exclude: Sequence[str] | None, new_initializer: Callable[[ir.Graph, str, np.ndarray], ir.Value]
                     ) -> tuple[list[dict], list[tuple[str, str]]]:
    """Rewrite every qualifying embedding Gather; return (what was done per table, what was left and why)."""
    done: dict[int, dict] = {}
    own: dict[int, list[ir.Value]] = {}  # tables quantized here (no usable lm_head copy): their initializers
    left = []
    for node in list(graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        table = node.inputs[0]
        if table.const_value is None or len(table.const_value.shape) != 2:
            continue  # index and shape gathers: not embeddings
        label = f"{node.name or 'Gather'} (Gather)"
        why = _why_not(node, table, block_size)
        if why is None and common.node_matches(node, exclude):
            why = "matches exclude="
        if why is not None:
            left.append((label, why))
            continue
        vocab, hidden = (int(d) for d in table.const_value.shape)
        entry = done.setdefault(id(table), {"table": table.name, "nodes": [], "vocab": vocab, "hidden": hidden,
                                            "float_bytes": int(table.const_value.nbytes)})
        weight = shared.get(id(table))
        if weight is not None:
            data = _reshaped(graph, weight.inputs[0], vocab)
            inputs = [data, node.inputs[1], *weight.inputs[1:]]
            entry.update(shared_with="lm_head MatMulNBits", int4_bytes=0, method=weight.method)
        else:
            if id(table) not in own:
                own[id(table)], nbytes = _quantize_table(graph, table, block_size, symmetric, new_initializer)
                entry.update(int4_bytes=nbytes, method="rtn")
                entry["shared_with"] = None
            data, *rest = own[id(table)]
            inputs = [data, node.inputs[1], *rest]
        _replace(graph, node, inputs, block_size, hidden)
        entry["nodes"].append(node.name)
    names = {entry["table"] for entry in done.values()}
    for value in [v for name, v in graph.initializers.items() if name in names]:
        # an untied table read by nothing else goes now; a tied one once the lm_head's Transpose is dropped
        if not (value.uses() or value.is_graph_output()):
            del graph.initializers[value.name]
    return list(done.values()), left


def _quantize_table(graph: ir.Graph, table: ir.Value, block_size: int, symmetric: bool,
                    new_initializer) -> tuple[list[ir.Value], int]:
    """The table's own 4-bit copy (round to nearest; a lookup has no input statistics for GPTQ)."""
    e = np.asarray(table.const_value.numpy())
    vocab = e.shape[0]
    packed = gptq.pack(gptq.rtn(e.T, block_size, symmetric), e.dtype.type)
    base = table.name or "embedding"
    values = [new_initializer(graph, f"{base}_Q4", packed.b.reshape(vocab, -1)),
              new_initializer(graph, f"{base}_scales", packed.scales)]
    if packed.zero_points is not None:
        values.append(new_initializer(graph, f"{base}_zero_points", packed.zero_points))
    return values, packed.nbytes


def _reshaped(graph: ir.Graph, b: ir.Value, vocab: int) -> ir.Value:
    """``b`` [vocab, n_blocks, block/2] as [vocab, n_blocks · block/2]: one Reshape per weight, reused."""
    for use in b.uses():
        if use.node.op_type == "Reshape" and use.node.name == f"{b.name}_as_table":
            return use.node.outputs[0]
    shape = ir.Value(name=f"{b.name}_table_shape", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.array([vocab, -1], np.int64), name=f"{b.name}_table_shape"))
    graph.register_initializer(shape)
    node = ir.Node("", "Reshape", [b, shape], name=f"{b.name}_as_table", num_outputs=1)
    node.outputs[0].name = f"{b.name}_table"
    node.outputs[0].dtype = ir.DataType.UINT8
    graph.insert_before(graph.node(0), node)
    return node.outputs[0]


def _replace(graph: ir.Graph, node: ir.Node, inputs: list[ir.Value], block_size: int, hidden: int) -> None:
    """GatherBlockQuantized (+ Slice of the padding) in place of ``node``; the output keeps its name and uses."""
    old = node.outputs[0]
    gbq = ir.Node(MS_DOMAIN, "GatherBlockQuantized", inputs, name=node.name, num_outputs=1, attributes=[
        ir.AttrInt64("bits", gptq.BITS), ir.AttrInt64("block_size", block_size),
        ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1)])
    for key, val in node.metadata_props.items():
        gbq.metadata_props[key] = val
    new_nodes, final = [gbq], gbq.outputs[0]
    padded = gptq.n_blocks(hidden, block_size) * block_size
    if padded != hidden:  # the op returns whole blocks: cut the padding
        final.name = f"{old.name}__padded"
        consts = []
        for label, val in (("starts", 0), ("ends", hidden), ("axes", -1)):
            name = f"{old.name}__slice_{label}"
            v = ir.Value(name=name, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(np.array([val], np.int64), name=name))
            graph.register_initializer(v)
            consts.append(v)
        cut = ir.Node("", "Slice", [final, *consts], name=f"{node.name}_unpad", num_outputs=1)
        new_nodes.append(cut)
        final = cut.outputs[0]
    name = old.name
    old.name = f"{name}__float"
    final.name, final.type, final.shape = name, old.type, old.shape
    ir.convenience.replace_all_uses_with(old, final, replace_graph_outputs=True)
    graph.insert_after(node, new_nodes)
    graph.remove(node, safe=True)


def summary(tables: list[dict], mb: Callable[[int], str]) -> str:
    """The pass summary's clause about the tables (empty when none was quantized)."""
    if not tables:
        return ""
    shared = sum(1 for t in tables if t.get("shared_with"))
    text = (f"; {len(tables)} embedding table(s) -> 4-bit GatherBlockQuantized "
            f"({mb(sum(t['float_bytes'] for t in tables))} float -> {mb(sum(t['int4_bytes'] for t in tables))} new")
    if shared:
        text += f", {shared} sharing the tied lm_head's 4-bit weight"
    return text + ")"
