"""int8 and smoothquant on graphs with ONNX Runtime's fused ``com.microsoft`` ops (ORT's transformer optimizer).

ONNX's shape inference does not know those ops, so every value after one was untyped, and ORT's
quantizer raised from deep inside ("Unable to find data type for weight_name=...", "Unable to get
valid quantization scale for input ...") on BERT, GPT-2 and ViT optimised by ORT, and smoothquant's
calibration raised ValueError ("the rank of ... is unknown") on Llama optimised by ORT. Both now type
them with ORT's symbolic shape inference (`slimc.typeinfer`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimc
from slimc.passes.quant import common


def fused_mlp() -> onnx.ModelProto:
    """x -> MatMul -> FastGelu (com.microsoft) -> MatMul -> SkipLayerNormalization (com.microsoft) ->
    LayerNormalization -> MatMul -> y."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("FastGelu", ["h1", "b1"], ["g"], name="gelu", domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "w2"], ["h2"], name="fc2"),
        helper.make_node("SkipLayerNormalization", ["h2", "x", "gamma", "beta"], ["n"], name="skipln",
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("LayerNormalization", ["n", "gamma", "beta"], ["m"], name="ln", axis=-1),  # smoothquant folds here
        helper.make_node("MatMul", ["m", "w3"], ["y"], name="fc3"),
    ]
    inits = [weight("w1", 32, 64), weight("b1", 64), weight("w2", 64, 32), weight("w3", 32, 16),
             numpy_helper.from_array(np.ones(32, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(32, np.float32), "beta")]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_values_after_fused_ops_are_typed():
    from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer

    inferred = save_and_reload_model_with_shape_infer(fused_mlp())
    assert common._untyped(inferred) > 0  # ONNX's inference stops at them
    assert common._untyped(common.type_untyped(inferred)) == 0


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_quantizes_around_fused_ops(tmp_path, mode):
    path = tmp_path / "fused.onnx"
    onnx.save(fused_mlp(), path)
    calib = {"x": np.random.default_rng(1).standard_normal((4, 8, 32)).astype(np.float32)}
    result = slimc.compile(str(path), f"int8(mode={mode}, force=true)", calibration=[calib], measure_latency=False)
    assert result.receipt.passes[0].details["quantized_ops"], result.receipt.passes[0].summary
    result.save(tmp_path / "out.onnx")
    session = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, calib)[0].shape == (4, 8, 16)


def test_smoothquant_calibrates_after_fused_ops(tmp_path):
    path = tmp_path / "fused.onnx"
    onnx.save(fused_mlp(), path)
    calib = {"x": np.random.default_rng(1).standard_normal((4, 8, 32)).astype(np.float32)}
    result = slimc.compile(str(path), "smoothquant,int8(mode=dynamic, force=true)", calibration=[calib],
                           measure_latency=False)
    assert result.receipt.passes[0].modified, result.receipt.passes[0].summary
