"""Parameter, op-histogram and MAC counts against hand counts."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper
from onnx_models import tiny_cnn, tiny_cnn_macs, tiny_token_model

from slimc.analysis import _matmul_macs, count_params, model_stats, op_histogram
from slimc.model import infer_input_specs


def test_tiny_cnn_counts():
    model = ir.serde.deserialize_model(tiny_cnn(junk=False))
    stats = model_stats(model, {"x": np.zeros((4, 3, 8, 8), np.float32)})
    assert stats["params"] == 4 * 27 + 4 + 20 + 5
    assert stats["weight_bytes"] == 4 * stats["params"]
    assert stats["macs"] == tiny_cnn_macs(1)  # per sample, although the feed has batch 4
    assert stats["macs_unresolved_nodes"] == 0
    assert stats["op_histogram"] == {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}


def test_symbolic_sequence_dims_are_bound():
    model = ir.serde.deserialize_model(tiny_token_model(vocab=50, hidden=8))
    stats = model_stats(model, {"input_ids": np.zeros((2, 10), np.int64), "attention_mask": np.ones((2, 10), np.int64)})
    assert stats["macs"] == 10 * 8 * 8
    assert stats["macs_sizes"] == {"batch": 1, "seq": 10}
    assert count_params(model) == (50 * 8 + 8 * 8, 4 * (50 * 8 + 8 * 8))  # int64 axes constant excluded


def test_matmul_dims_from_any_operand():
    # Attention-like: scores of unknown shape except heads/seq, values fully known.
    assert _matmul_macs([None, 4, 128, None], [1, 4, 128, 16], [None, 4, 128, 16]) == 4 * 128 * 16 * 128
    assert _matmul_macs([3, 5], [5], None) == 3 * 5
    assert _matmul_macs([None, 5], [5, 7], None) is None


def test_unresolved_dims_are_reported_not_guessed():
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", "k"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["k", "m"])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", "m"])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert model_stats(model, None)["macs_unresolved_nodes"] == 1


def test_input_specs_know_tokens_and_masks():
    model = ir.serde.deserialize_model(tiny_token_model(vocab=50))
    specs = {s.name: s for s in infer_input_specs(model)}
    assert specs["input_ids"].kind == "tokens" and specs["input_ids"].high == 50
    assert specs["attention_mask"].kind == "attention_mask"
    assert specs["input_ids"].concrete_shape({"seq": 7}) == (2, 7)
    cnn = {s.name: s for s in infer_input_specs(ir.serde.deserialize_model(tiny_cnn()))}
    assert cnn["x"].kind == "image" and cnn["x"].concrete_shape() == (2, 3, 8, 8)


def test_op_histogram_counts_domains():
    model = ir.serde.deserialize_model(tiny_cnn())
    hist = op_histogram(model)
    assert hist["Identity"] == 2 and hist["Relu"] == 2 and sum(hist.values()) == 13


def test_token_inputs_found_through_reshapes():
    # GPT-2 style: ids are flattened before the embedding Gather.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input_ids", "shape"], ["flat"]),
         helper.make_node("Gather", ["emb", "flat"], ["h"])],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1]),
         helper.make_tensor("emb", TensorProto.FLOAT, [30, 4], np.zeros(120, np.float32))],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    (spec,) = infer_input_specs(model)
    assert spec.kind == "tokens" and spec.high == 30
