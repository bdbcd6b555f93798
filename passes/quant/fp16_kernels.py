"""Which nodes ONNX Runtime can run in float16: asked of the runtime itself, one op signature at a time.

The float16 converter retypes every float tensor, but some ops have no float16 kernel on ORT's CPU
provider (``Celu``, ``MeanVarianceNormalization``'s function body) or fix their output type by an
attribute (``HannWindow(output_datatype=1)``, ``EyeLike(dtype=...)``, ``LayerNormalization``'s
``Mean``/``InvStdDev`` under ``stash_type``): the converted model then fails to load, and the whole
model would be refused for one op. ORT's converter keeps a fixed block list for this; slimc asks the
installed runtime instead, so the answer follows its version:

For each distinct signature (domain, op type, opset, input types, outputs present, attributes) of a
node with a float32 input or output, a one-node model is built twice, once with the node's types and
once with float32 turned into float16, and loaded in an ORT CPU session (after the full ONNX checker,
where the float32 model passes it: slimc verifies with it). A node whose float32 model loads but whose
float16 model does not stays float32 (the converter puts Casts around it). Answers are
cached per process; nodes with subgraphs or calling model-local functions are not probed.
"""

from __future__ import annotations

import functools
import logging

import onnx
import onnx.numpy_helper
import onnx_ir as ir

log = logging.getLogger("slimc")

_FLOAT, _HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16


def without_fp16_kernel(model: ir.Model, nodes: list[ir.Node]) -> list[ir.Node]:
    """The nodes among ``nodes`` that load in ORT with their own types but not with float16 for float32."""
    local_functions = {(f.domain, f.name) for f in model.functions.values()}
    found = []
    for node in nodes:
        if _probe_skipped(node, local_functions):
            continue
        signature = _signature(node, model.opset_imports)
        if signature is None or not _loads(signature, half=False, check=False):
            continue  # the op does not load as it is (an unknown domain): nothing to learn
        # slimc verifies with the full checker where the input model passes it: hold float16 to the same
        check = _loads(signature, half=False, check=True)
        if not _loads(signature, half=True, check=check):
            found.append(node)
    return found


def _probe_skipped(node: ir.Node, local_functions: set[tuple[str, str]]) -> bool:
    if (node.domain, node.op_type) in local_functions:
        return True
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        # The converter rewrites a Constant's tensor itself; blocking one (inside an If/Loop body the ORT
        # converter then casts it in the wrong graph) would only keep a constant float32.
        return True
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        return True
    values = [v for v in (*node.inputs, *node.outputs) if v is not None]
    return not any(v.dtype == _FLOAT for v in values) or any(v.dtype is None for v in values)


def _signature(node: ir.Node, opsets: dict[str, int]) -> tuple | None:
    """A hashable description of what the probe model needs (None: an attribute it cannot copy)."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    version = opsets.get(domain, opsets.get("ai.onnx") if domain == "" else None)
    if version is None:
        return None
    try:
        attrs = tuple(sorted(ir.serde.serialize_attribute(attr).SerializeToString() for attr in node.attributes.values()))
    except Exception:  # noqa: BLE001 - an attribute the serializer rejects: do not probe
        return None
    inputs = tuple(None if v is None else (int(v.dtype), _rank(v)) for v in node.inputs)
    outputs = tuple(None if not v.name and not v.uses() and not v.is_graph_output() else (int(v.dtype), _rank(v))
                    for v in node.outputs)
    return (domain, node.op_type, version, inputs, outputs, attrs)


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


@functools.lru_cache(maxsize=4096)
def _loads(signature: tuple, *, half: bool, check: bool) -> bool:
    """Whether the one-node model of ``signature`` loads in an ORT CPU session (and passes the full
    ONNX checker, with ``check``)."""
    import onnxruntime as ort

    domain, op_type, version, inputs, outputs, attrs = signature

    def info(name: str, entry: tuple[int, int | None]) -> onnx.ValueInfoProto:
        dtype, rank = entry
        if half and dtype == int(_FLOAT):
            dtype = int(_HALF)
        shape = None if rank is None else [None] * rank
        return onnx.helper.make_tensor_value_info(name, dtype, shape)

    in_names = ["" if e is None else f"i{k}" for k, e in enumerate(inputs)]
    out_names = ["" if e is None else f"o{k}" for k, e in enumerate(outputs)]
    node = onnx.helper.make_node(op_type, in_names, out_names, domain=domain)
    for blob in attrs:
        attr = onnx.AttributeProto()
        attr.ParseFromString(blob)
        # the converter retypes these itself (Cast's target, the dtype of EyeLike, Random*, ...)
        if half and attr.type == onnx.AttributeProto.INT and attr.i == int(_FLOAT) and (
                attr.name == "dtype" or (attr.name == "to" and op_type == "Cast")):
            attr.i = int(_HALF)
        if half and attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == int(_FLOAT):
            # and its float tensor attributes (ConstantOfShape's value, Constant's value)
            half_tensor = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(attr.t).astype("float16"), attr.t.name)
            attr.t.CopyFrom(half_tensor)
        node.attribute.append(attr)
    graph = onnx.helper.make_graph([node], "probe", [info(n, e) for n, e in zip(in_names, inputs) if e is not None],
                                   [info(n, e) for n, e in zip(out_names, outputs) if e is not None])
    imports = [onnx.helper.make_opsetid(domain, version)] + ([onnx.helper.make_opsetid("", 17)] if domain else [])
    model = onnx.helper.make_model(graph, opset_imports=imports)
    model.ir_version = min(model.ir_version, 10)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:  # slimc's verification runs the strict checker too: a float16 type it rejects is a failure
        if check:
            onnx.checker.check_model(model, full_check=True)
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure is the answer
        log.debug("fp16 probe %s(%s) %s: %s", op_type, version, "float16" if half else "float32", exc)
        return False
    return True


def runtime_failure(converted: ir.Model, original: ir.Model, feed: dict | None) -> tuple[ir.Node, str] | None:
    """The node of ``original`` that ORT fails on when running ``converted`` on ``feed``, and why.

    Some kernels load in float16 but refuse it at run time (``ScatterND``/``ScatterElements`` with a
    reduction: "MLFloat16 data type is not supported"). None when the converted model runs, when the
    error names no node of ``original``, or when ``original`` fails on ``feed`` too (the feed is at fault).
    """
    import re

    from slimc.errors import first_line

    if feed is None:
        return None
    try:
        _run(converted, feed)
        return None
    except Exception as exc:  # noqa: BLE001 - ORT's own errors name the node
        message = str(exc)
    match = re.search(r"node\. Name:'([^']*)'|node with name '([^']*)'|node \(([^)]*)\)", message)
    name = next((g for g in match.groups() if g), None) if match else None
    node = next((n for n in original.graph.all_nodes() if name and n.name == name), None)
    if node is None:
        return None
    try:
        _run(original, feed)
    except Exception:  # noqa: BLE001 - the input model fails on this feed as well
        return None
    return node, first_line(message)


def _run(model: ir.Model, feed: dict) -> None:
    import onnxruntime as ort

    from slimc.backends.onnxruntime import prepare_feed
    from slimc.passes.quant import common

    options = ort.SessionOptions()
    options.log_severity_level = 4
    if not any(isinstance(v.const_value, (ir.ExternalTensor, ir.LazyTensor)) for v in model.graph.initializers.values()):
        session = ort.InferenceSession(common.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, prepare_feed(session, feed))
        return
    # memory-mapped or lazily converted weights (`fp16_weights`): streamed to a file, never one proto
    from pathlib import Path

    from slimc import workdir
    from slimc.onnx_io import save_onnx

    with workdir.new("fp16-probe") as tmp:
        path = Path(tmp) / "model.onnx"
        save_onnx(model, path, external_data=True)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, prepare_feed(session, feed))
