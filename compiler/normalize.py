"""What slimc does to every bare graph on load, so passes see the same thing whatever tool exported it.

Converters spell the same model differently. slimc's passes and statistics read weights from
initializers and dims from the graph inputs' shapes, so two spellings are brought to that form:

- **Weights in ``Constant`` nodes** (PaddlePaddle's paddle2onnx, spox, some TensorFlow exports keep
  every weight as a ``Constant`` node and no initializer). A ``Constant`` node and an initializer
  holding the same tensor compute the same thing, so each main-graph ``Constant`` whose value is a
  tensor (``value``, ``value_float(s)``, ``value_int(s)``) becomes an initializer of that name, of any
  size: a 4-element bias is as much a weight as a 4x4 kernel, and pruning slices both. ``Constant``
  nodes inside ``If``/``Loop``/``Scan`` bodies stay where they are (passes work on the main graph;
  moving a body's constants would change nothing they act on), and so does a ``Constant`` that is
  itself a graph output. Weights left in bodies still count as parameters (`analysis.count_params`).
- **No intermediate shapes** (no ``value_info``): when most node outputs have no shape, ONNX shape
  inference fills them in, so analyses that follow axes see ranks (`infer_missing_shapes`).
- **Negative dims** (``-1`` written as a dim value, which ONNX does not define; paddle2onnx does it for
  the batch axis) on graph inputs and outputs become unnamed dynamic dims, their evident meaning.
- **ONNX Runtime's ops in the ONNX domain**: ORT's transformer optimizer writes RMS norms as
  ``SimplifiedLayerNormalization`` in the *default* domain, which ORT runs but the ONNX checker (and
  every other runtime) rejects. Each becomes its definition in standard ops
  (`decompose_simplified_layer_norms`); ORT fuses it back when it builds a session.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

log = logging.getLogger("slimc")

# Constant attributes that hold a numeric tensor, and the dtype of the list forms.
_TENSOR_ATTRS = {"value": None, "value_float": ir.DataType.FLOAT, "value_floats": ir.DataType.FLOAT,
                 "value_int": ir.DataType.INT64, "value_ints": ir.DataType.INT64}
# Initializers that are not graph inputs need IR version 4 (before it, initializers were inputs).
_MIN_IR_FOR_INITIALIZERS = 4


def normalize(model: ir.Model) -> list[str]:
    """Lift constants and fix negative dims in place; return notes for the receipt (empty if nothing changed)."""
    notes = []
    lifted = lift_constants(model)
    if lifted:
        notes.append(f"{lifted} Constant nodes of the main graph became initializers on load (the converter "
                     "stored weights as Constant nodes; they are the same tensors)")
    decomposed = decompose_simplified_layer_norms(model)
    if decomposed:
        notes.append(f"{decomposed} SimplifiedLayerNormalization nodes (ONNX Runtime's RMS norm, written in the ONNX "
                     "domain, which the ONNX checker rejects) were rewritten in standard ops on load")
    fixed = fix_negative_dims(model)
    if fixed:
        notes.append(f"negative dims on {', '.join(fixed)} were read as dynamic (ONNX defines no negative dim)")
    if infer_missing_shapes(model):
        notes.append("the file carries no shapes for intermediate values; they were inferred on load (ONNX shape "
                     "inference)")
    return notes


def infer_missing_shapes(model: ir.Model) -> bool:
    """Run ONNX shape inference when main-graph node outputs lack shapes; True if it ran and succeeded.

    Exporters that write no ``value_info`` leave every intermediate rank unknown, and analyses that
    follow axes (pruning) must then block everything. Files that carry shapes are left as they are.
    """
    outputs = [v for node in model.graph for v in node.outputs if v.name]
    if not outputs or sum(v.shape is None for v in outputs) * 2 < len(outputs):
        return False
    try:
        infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # best effort: an analysis that needs shapes blocks with its own reason
        log.info("shape inference on load failed (%s); intermediate shapes stay unknown", exc)
        return False
    return True


def infer_shapes(model: ir.Model, **options) -> None:
    """onnx_ir's ``ShapeInferencePass(**options)`` on ``model``, sequence and optional values keeping
    their type: onnx_ir's merge writes an inferred sequence/optional as a tensor of its element type,
    which ONNX Runtime refuses to load and a float16 conversion then retypes (the checker rejects a
    SequenceAt reading a float16 tensor). Such values keep the type they had (usually none)."""
    from onnx_ir.passes.common import ShapeInferencePass

    kept = {v: v.type for node in model.graph.all_nodes() if node.op_type in _NON_TENSOR_OPS for v in node.outputs}
    try:
        ShapeInferencePass(**options)(model)
    finally:
        for value, type_ in kept.items():
            if value.type != type_:
                value.type, value.shape = type_, None


# Ops whose outputs are sequences or optionals, not tensors.
_NON_TENSOR_OPS = ("SplitToSequence", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
                   "SequenceMap", "Optional")


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The numeric tensor a ``Constant`` node holds, or None (strings, sparse, malformed)."""
    if len(node.attributes) != 1:
        return None
    name, attr = next(iter(node.attributes.items()))
    if name not in _TENSOR_ATTRS:
        return None
    if name == "value":
        tensor = attr.as_tensor()
        return None if tensor.dtype == ir.DataType.STRING else tensor
    return ir.tensor(attr.value, dtype=_TENSOR_ATTRS[name], name=node.outputs[0].name)


def lift_constants(model: ir.Model) -> int:
    """Turn main-graph ``Constant`` nodes into initializers of the same name; return how many."""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0]
        tensor = _constant_tensor(node)
        if tensor is None or out.is_graph_output() or not out.name or out.name in graph.initializers:
            continue
        value = ir.Value(name=out.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        graph.register_initializer(value)
        count += 1
    if count and (model.ir_version or 0) < _MIN_IR_FOR_INITIALIZERS:
        model.ir_version = _MIN_IR_FOR_INITIALIZERS
    return count


def fix_negative_dims(model: ir.Model) -> list[str]:
    """Replace negative dim values on graph inputs/outputs by unnamed dynamic dims; return the values' names."""
    fixed = []
    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.shape is not None and any(isinstance(d, int) and d < 0 for d in value.shape):
            value.shape = ir.Shape([None if isinstance(d, int) and d < 0 else d for d in value.shape])
            fixed.append(value.name or "?")
    return fixed


def decompose_simplified_layer_norms(model: ir.Model) -> int:
    """Rewrite each main-graph ``SimplifiedLayerNormalization`` of the ONNX domain (ORT-only: an RMS norm,
    ``y = x / sqrt(mean(x**2 over axis..-1) + epsilon) * scale``, second output ``1 / sqrt(...)``) in
    standard ops; return how many. A node whose normalised axes cannot be told (a non-negative ``axis``
    on an input of unknown rank) or whose input is not float32 stays, and the checker names it."""
    opset = model.opset_imports.get("", 0)
    count = 0
    for node in [n for n in model.graph if n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "ai.onnx")]:
        x, scale = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        axis = node.attributes["axis"].value if "axis" in node.attributes else -1
        rank = len(x.shape) if x.shape is not None else None
        if scale is None or x.dtype not in (ir.DataType.FLOAT, None) or (axis >= 0 and rank is None):
            continue
        axes = list(range(axis - rank, 0)) if axis >= 0 else list(range(axis, 0))
        eps = node.attributes["epsilon"].value if "epsilon" in node.attributes else 1e-5
        _replace_rms_norm(model.graph, node, x, scale, axes, float(eps), opset)
        count += 1
    return count


def _replace_rms_norm(graph: ir.Graph, node: ir.Node, x: ir.Value, scale: ir.Value, axes: list[int], eps: float,
                      opset: int) -> None:
    """The standard-op nodes of one RMS norm, put in ``node``'s place (its outputs' names and uses kept)."""
    import numpy as np

    name = node.name or "SimplifiedLayerNormalization"

    def const(suffix: str, array) -> ir.Value:
        value = ir.Value(name=f"{name}/{suffix}", const_value=ir.tensor(array, name=f"{name}/{suffix}"))
        graph.register_initializer(value)
        return value

    def op(op_type: str, inputs, **attrs) -> ir.Node:
        made = ir.Node("", op_type, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                       name=f"{name}/{op_type}_{len(nodes)}")
        nodes.append(made)
        return made

    nodes: list[ir.Node] = []
    square = op("Mul", [x, x]).outputs[0]
    if opset >= 18:  # ReduceMean takes axes as an input from opset 18
        mean = op("ReduceMean", [square, const("axes", np.array(axes, np.int64))], keepdims=1).outputs[0]
    else:
        mean = op("ReduceMean", [square], axes=axes, keepdims=1).outputs[0]
    std = op("Sqrt", [op("Add", [mean, const("epsilon", np.array(eps, np.float32))]).outputs[0]]).outputs[0]
    inverse = op("Reciprocal", [std]).outputs[0]
    y = op("Mul", [op("Mul", [x, inverse]).outputs[0], scale]).outputs[0]
    olds, news = [node.outputs[0]], [y]
    if len(node.outputs) > 1 and node.outputs[1].name:
        olds.append(node.outputs[1])
        news.append(inverse)
    ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, olds, news)
