"""Model statistics for the receipt: parameters, weight bytes, op histogram, MACs.

MACs (multiply-accumulates) are counted from value shapes for the ops that dominate cost:

- MatMul / MatMulInteger / QLinearMatMul / FusedMatMul: ``prod(output) * K`` with K the
  contracted dim of A;
- Gemm: ``M * N * K``;
- Conv / ConvInteger / QLinearConv: ``prod(output) * prod(W.shape[1:])`` (``Cin/group * k...``);
- ConvTranspose: ``prod(input) * prod(W.shape[1:])``;
- MatMulNBits (weight-only int4): ``prod(output) * K`` from its ``K`` attribute.

Symbolic dims (``batch``, ``seq``) are bound to concrete sizes; dims written as arithmetic on
those names (``seq + 1``) are evaluated. A node whose shapes still cannot be resolved is
counted in ``macs_unresolved`` rather than guessed.
"""

from __future__ import annotations

import ast
import collections
import logging
import math
import operator
from typing import Any

import onnx_ir as ir

log = logging.getLogger("slimc")

_WEIGHT_TYPES = {
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE,
    ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4,
}
_MATMULS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "FusedMatMul": (0, 1)}
_CONVS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}


def count_params(model: ir.Model) -> tuple[int, int]:
    """(parameter count, weight bytes): tensors of weight dtypes, int shape constants excluded.

    Initializers of every graph count, and so do ``Constant`` tensors inside ``If``/``Loop``/``Scan``
    bodies: converters keep weights there (load lifts only the main graph's, `slimc.normalize`).
    """
    params = nbytes = 0
    for tensor in _weight_tensors(model):
        if tensor.dtype in _WEIGHT_TYPES:
            params += math.prod(tensor.shape.numpy()) if tensor.shape is not None else 0
            nbytes += tensor.nbytes
    return params, nbytes


def _weight_tensors(model: ir.Model):
    for graph in model.graphs():
        yield from (v.const_value for v in graph.initializers.values() if v.const_value is not None)
        if graph is model.graph:
            continue
        for node in graph:
            value = node.attributes.get("value") if node.op_type == "Constant" else None
            if value is not None and value.type == ir.AttributeType.TENSOR:
                yield value.as_tensor()


def percent_fewer(before: int, after: int) -> str:
    """``"12.5% fewer"``; with nothing before there is no ratio to state (not "100% fewer")."""
    if before <= 0:
        return "no parameters before" if after == 0 else f"{after:,} added"
    return f"{1 - after / before:.1%} fewer"


def op_histogram(model: ir.Model) -> dict[str, int]:
    counts = collections.Counter(
        (f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type)
        for node in model.graph.all_nodes()
    )
    return dict(counts.most_common())


def concrete_shapes(model: ir.Model, sizes: dict[str, int], fed: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Shapes of all values when the graph inputs have concrete sizes (ONNX shape inference).

    Symbolic dims in the exported graph are often anonymous inside attention; with concrete
    input shapes ONNX's data propagation resolves them. The model is left unchanged: input
    shapes are restored and large weights are only lent to the inference as shape-only inputs.
    """
    import onnx

    saved = [(value, value.shape) for value in model.graph.inputs]
    for value, shape in saved:
        if shape is not None:
            given = (fed or {}).get(value.name) or [None] * len(shape)  # for dims without a name
            dims = [d if isinstance(d, int) else sizes.get(_dim_name(d) or "", given[i]) for i, d in enumerate(shape)]
            if all(isinstance(d, int) for d in dims):
                value.shape = ir.Shape(dims)

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)

    try:
        proto = _call_onnx_api(infer, model)
    except Exception as exc:  # inference is best effort; unresolved nodes are reported
        log.info("shape inference failed (%s); MACs fall back to annotated shapes", exc)
        return {}
    finally:
        for value, shape in saved:
            value.shape = shape
    shapes = {}
    for info in (*proto.graph.value_info, *proto.graph.output, *proto.graph.input):
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = [d.dim_value for d in dims]
    return shapes


def _dim_name(d) -> str | None:
    """A symbolic dim's name, None for an unnamed or anonymous ("?") one."""
    from slimc.input_rules import ANONYMOUS_DIMS

    name = d.value if isinstance(d, ir.SymbolicDim) else None
    return None if name in ANONYMOUS_DIMS else name


def _call_onnx_api(func, model: ir.Model):
    try:  # onnx_ir's helper lends big weights as shape-only inputs; keep a fallback if it moves
        from onnx_ir.passes.common._c_api_utils import call_onnx_api
    except ImportError:  # pragma: no cover - depends on the onnx_ir version
        return func(ir.serde.serialize_model(model))
    return call_onnx_api(func, model)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _eval_dim(expr: str, sizes: dict[str, int]) -> int | None:
    try:
        tree = ast.parse(expr.replace("/", "//").replace("////", "//"), mode="eval").body
    except SyntaxError:
        return None

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in sizes:
            return sizes[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        raise KeyError(expr)

    try:
        return int(walk(tree))
    except (KeyError, ZeroDivisionError):
        return None


def resolve_dims(value: ir.Value | None, sizes: dict[str, int], known: dict[str, list[int]] | None = None) -> list[int | None] | None:
    """Per-axis sizes of ``value`` (None for an axis that cannot be resolved), or None if rank unknown.

    Sources in order: inferred concrete shapes (``known``), constant tensors, the value's own
    annotation with symbolic dims bound to ``sizes``.
    """
    if value is None:
        return None
    if known and value.name in known:
        return list(known[value.name])
    if value.const_value is not None:
        return [int(d) for d in value.const_value.shape.numpy()]
    if value.shape is None:
        return None
    dims: list[int | None] = []
    for d in value.shape:
        if isinstance(d, int):
            dims.append(d)
        elif isinstance(d, ir.SymbolicDim) and d.value is not None:
            dims.append(sizes[d.value] if d.value in sizes else _eval_dim(d.value, sizes))
        else:
            dims.append(None)
    return dims


def resolve_shape(value: ir.Value | None, sizes: dict[str, int], known: dict[str, list[int]] | None = None) -> list[int] | None:
    """The full concrete shape of ``value``, or None if any axis is unresolved."""
    dims = resolve_dims(value, sizes, known)
    return None if dims is None or any(d is None for d in dims) else dims  # type: ignore[return-value]


def _first(*candidates: int | None) -> int | None:
    return next((c for c in candidates if c is not None), None)


def _matmul_macs(a: list | None, b: list | None, out: list | None) -> int | None:
    """``batch * M * N * K`` for numpy-style matmul, each axis taken from whichever operand knows it."""
    if a is None or b is None:
        return None
    m = 1 if len(a) == 1 else _first(a[-2], out[-2] if out and len(out) >= 2 else None)
    n = 1 if len(b) == 1 else _first(b[-1], out[-1] if out else None)
    k = _first(a[-1], b[0] if len(b) == 1 else b[-2])
    batch_rank = max(len(a), len(b), len(out or [])) - 2
    batch = 1
    for axis in range(1, batch_rank + 1):
        sources = [s[-2 - axis] for s in (a, b, out) if s is not None and len(s) >= axis + 2]
        sizes_here = [s for s in sources if s is not None]
        dim = max(sizes_here) if sizes_here else None
        if dim is None:
            return None
        batch *= dim
    return None if None in (m, n, k) else batch * m * n * k


def bind_sizes(model: ir.Model, feed: dict[str, Any] | None, per_sample: bool = True) -> dict[str, int]:
    """Map each symbolic input dim to its size in ``feed``; batch dims (axis 0) to 1 if per_sample."""
    sizes: dict[str, int] = {}
    for value in model.graph.inputs:
        if feed is None or value.name not in feed or value.shape is None:
            continue
        array_shape = getattr(feed[value.name], "shape", ())
        for axis, d in enumerate(value.shape):
            if _dim_name(d) is not None and axis < len(array_shape):
                sizes.setdefault(d.value, 1 if (per_sample and axis == 0) else int(array_shape[axis]))
    return sizes


def node_macs(node: ir.Node, sizes: dict[str, int], known: dict[str, list[int]] | None = None) -> int | None:
    """MACs of one node, 0 for ops that are not counted, None when shapes are unknown."""
    op = node.op_type
    out = resolve_shape(node.outputs[0], sizes, known) if node.outputs else None
    if op in _MATMULS:
        a_index, b_index = _MATMULS[op]
        return _matmul_macs(
            resolve_dims(node.inputs[a_index], sizes, known),
            resolve_dims(node.inputs[b_index], sizes, known),
            resolve_dims(node.outputs[0], sizes, known),
        )
    if op == "Gemm":
        a = resolve_shape(node.inputs[0], sizes, known)
        if a is None or out is None:
            return None
        k = a[0] if node.attributes.get_int("transA", 0) else a[1]
        return math.prod(out) * k
    if op in _CONVS:
        w = resolve_shape(node.inputs[_CONVS[op][1]], sizes, known)
        return None if w is None or out is None else math.prod(out) * math.prod(w[1:])
    if op == "ConvTranspose":
        x, w = resolve_shape(node.inputs[0], sizes, known), resolve_shape(node.inputs[1], sizes, known)
        return None if x is None or w is None else math.prod(x) * math.prod(w[1:])
    if op == "MatMulNBits":
        return None if out is None else math.prod(out) * node.attributes.get_int("K", 0)
    return 0


def fed_shapes(model: ir.Model, feed: dict[str, Any] | None) -> dict[str, list[int]]:
    """Per-sample shapes of the fed inputs (a dynamic axis 0 counts as one sample), for dims without a name."""
    shapes = {}
    for value in model.graph.inputs:
        if feed is not None and value.name in feed and value.shape is not None:
            dims = [int(d) for d in getattr(feed[value.name], "shape", ())]
            if len(dims) == len(value.shape):  # declared static dims win (a pinned batch of 1 stays 1)
                dims = [d if isinstance(d, int) else (1 if axis == 0 else dims[axis]) for axis, d in enumerate(value.shape)]
            shapes[value.name] = dims
    return shapes


def count_macs(model: ir.Model, sizes: dict[str, int], fed: dict[str, list[int]] | None = None) -> tuple[int, int]:
    """(total MACs, number of weighted nodes whose MACs could not be resolved)."""
    known = concrete_shapes(model, sizes, fed)
    total = unresolved = 0
    for node in model.graph.all_nodes():
        macs = node_macs(node, sizes, known)
        if macs is None:
            unresolved += 1
        else:
            total += macs
    return total, unresolved


def model_stats(model: ir.Model, feed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the receipt reports about one model. MACs are per sample at the feed's sizes."""
    sizes = bind_sizes(model, feed)
    params, weight_bytes = count_params(model)
    fed = fed_shapes(model, feed)
    macs, unresolved = count_macs(model, sizes, fed)
    return {
        "params": params,
        "weight_bytes": weight_bytes,
        "nodes": sum(1 for _ in model.graph.all_nodes()),
        "op_histogram": op_histogram(model),
        "macs": macs,
        "macs_unresolved_nodes": unresolved,
        "macs_sizes": sizes,
        "macs_inputs": fed,
    }
