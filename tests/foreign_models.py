"""Small ONNX models spelled the way other converters write them, for tests/test_foreign_inputs.py.

Each reproduces one habit seen in files that PyPI packages ship: weights in ``Constant`` nodes
and no ``value_info`` (paddle2onnx), a ``-1`` dim value, dynamic image height/width with the size
in metadata (YOLO exports), an ``If`` on a 0-d sample-rate input with a recurrent state whose
batch axis is axis 1 (silero-vad), an int32 byte input indexing a constant table, inputs that
share no batch dim, and a string input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def _weights(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32) * 0.3


def constant_cnn(opset: int = 12, batch: int | str = "N") -> onnx.ModelProto:
    """Conv-Relu-Conv-GlobalAveragePool-Flatten-Gemm, every weight a Constant node, no value_info."""
    nodes = [
        _const("w1", _weights(8, 3, 3, 3)), _const("b1", _weights(8)),
        _const("w2", _weights(8, 8, 3, 3)), _const("b2", _weights(8)),
        _const("wf", _weights(8, 4)), _const("bf", _weights(4)),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "constant_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, "?", "?"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="PaddlePaddle")


CONSTANT_CNN_PARAMS = 8 * 27 + 8 + 8 * 72 + 8 + 8 * 4 + 4


def constant_mlp(opset: int = 13) -> onnx.ModelProto:
    """x[batch, 16] -> MatMul -> Relu -> MatMul, weights as Constant nodes (for dynamic int8)."""
    nodes = [
        _const("w1", _weights(16, 32)), _const("w2", _weights(32, 8)),
        helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "constant_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def sized_detector(size: int = 32, metadata: bool = True) -> onnx.ModelProto:
    """images[batch, 3, height, width] that only runs at ``size``x``size`` (Flatten into a fixed MatMul);
    with ``metadata`` the size is stated as YOLO exports state it (``imgsz: [s, s]``)."""
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]), helper.make_node("MatMul", ["f", "head"], ["y"])]
    inits = [numpy_helper.from_array(_weights(4, 3, 3, 3), "w"), numpy_helper.from_array(_weights(4 * size * size, 5), "head")]
    graph = helper.make_graph(nodes, "detector",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if metadata:
        helper.set_model_props(model, {"imgsz": f"[{size}, {size}]", "stride": "32"})
    return model


def sized_detector_macs(size: int = 32) -> int:
    return 4 * size * size * 27 + 4 * size * size * 5


def _branch(name: str, scale: float, samples: int) -> onnx.GraphProto:
    """audio[batch, samples] -> MatMul(w, a Constant inside the body) * scale -> [batch, 1]."""
    nodes = [_const(f"{name}_w", _weights(samples, 1)), _const(f"{name}_s", np.float32(scale)),
             helper.make_node("MatMul", ["input", f"{name}_w"], [f"{name}_m"]),
             helper.make_node("Mul", [f"{name}_m", f"{name}_s"], [f"{name}_out"])]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])


def streaming_vad(samples: int = 8, hidden: int = 4, batch_name: str | None = "batch") -> onnx.ModelProto:
    """silero-vad's interface: ``input [batch, samples]``, 0-d int64 ``sr`` picking an ``If`` branch
    (16000 or 8000; any other rate fails in a Reshape), recurrent ``state [2, batch, hidden]``.
    ``batch_name=None`` leaves the batch dims unnamed, as silero_vad.onnx does."""
    rest = helper.make_graph(  # any other rate: a Reshape into rows of 7, which batch*samples does not divide
        [_const("bad_shape", np.array([-1, 1, 7], np.int64)), helper.make_node("Reshape", ["input", "bad_shape"], ["bad"])],
        "rest", [], [helper.make_tensor_value_info("bad", TensorProto.FLOAT, None)])
    at_8k = helper.make_graph(
        [_const("is8k_c", np.array(8000, np.int64)), helper.make_node("Equal", ["sr", "is8k_c"], ["is8k"]),
         helper.make_node("If", ["is8k"], ["inner"], then_branch=_branch("b8k", 0.5, samples), else_branch=rest)],
        "at_8k", [], [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
    nodes = [
        _const("sr16k", np.array(16000, np.int64)), helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["speech"], then_branch=_branch("b16k", 1.0, samples), else_branch=at_8k),
        helper.make_node("Sigmoid", ["speech"], ["output"]),
        _const("ws", _weights(hidden, hidden)), helper.make_node("MatMul", ["state", "ws"], ["sm"]),
        helper.make_node("Tanh", ["sm"], ["stateN"]),
    ]
    b = batch_name
    graph = helper.make_graph(nodes, "vad", [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, [b, samples]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, b, hidden]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ], [helper.make_tensor_value_info("output", TensorProto.FLOAT, [b, 1]),
        helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, b, hidden])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def byte_classifier() -> onnx.ModelProto:
    """int32 bytes[batch, seq] -> Cast -> Gather(table of 256 rows, a Constant node) -> mean -> logits."""
    nodes = [_const("table", _weights(256, 8)), _const("head", _weights(8, 3)),
             helper.make_node("Cast", ["bytes"], ["ids"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "ids"], ["emb"]),
             helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["pooled", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "bytes",
                              [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def reshape_by_input() -> onnx.ModelProto:
    """x[3, 2] reshaped by an int64 input ``shape [2]``: the inputs share no batch dim."""
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2]),
                               helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def string_matcher() -> onnx.ModelProto:
    """words[n] (strings) == "yes" -> float."""
    nodes = [_const("yes", np.array(["yes"], dtype=object)),
             helper.make_node("Equal", ["words", "yes"], ["hit"]),
             helper.make_node("Cast", ["hit"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "strings", [helper.make_tensor_value_info("words", TensorProto.STRING, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def looped_mlp(steps: int = 3, width: int = 4) -> onnx.ModelProto:
    """x[batch, width] through ``steps`` iterations of a Loop whose body applies a main-graph weight
    (an outer-scope Constant, as converters write recurrent models)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["acc_in", "w"], ["m"]), helper.make_node("Tanh", ["m"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None)])
    nodes = [_const("w", _weights(width, width)), _const("steps", np.array(steps, np.int64)),
             _const("go", np.array(True)),
             helper.make_node("Loop", ["steps", "go", "x"], ["y"], body=body)]
    graph = helper.make_graph(nodes, "looped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
