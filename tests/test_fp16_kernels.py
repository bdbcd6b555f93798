"""fp16 keeps ops ONNX Runtime cannot run in float16 in float32 instead of refusing the model (issue 17)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import slimc
from slimc.passes.quant import fp16_kernels

F = TensorProto.FLOAT


def _save(tmp_path, nodes, inputs, outputs, opset=18):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def _kept(result) -> dict:
    report = next(p for p in result.receipt.passes if p.name == "fp16")
    return {op: n for counts in report.details["blocked"].values() for op, n in counts.items()}


def test_an_op_without_a_float16_kernel_stays_float32(tmp_path):
    """Celu has no float16 kernel and LayerNormalization's Mean output is float32 under stash_type."""
    x = helper.make_tensor_value_info("x", F, [2, 8])
    nodes = [helper.make_node("Celu", ["x"], ["c"], alpha=1.5),
             helper.make_node("LayerNormalization", ["c", "scale", "bias"], ["y", "mean"], axis=-1),
             helper.make_node("MatMul", ["y", "w"], ["z"])]
    inits = [onnx.numpy_helper.from_array(np.ones(8, np.float32), "scale"),
             onnx.numpy_helper.from_array(np.zeros(8, np.float32), "bias"),
             onnx.numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("z", F, [2, 8]),
                                                             helper.make_tensor_value_info("mean", F, [2, 1])], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = slimc.compile(str(path), passes=["fp16"], measure_latency=False)
    kept = _kept(result)
    assert kept.get("Celu") == 1 and kept.get("LayerNormalization") == 1, kept
    assert "MatMul" not in kept  # the rest is float16
    out = tmp_path / "out.onnx"
    result.save(out)
    feed = {"x": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)}
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-2, rtol=2e-2)


def test_a_kernel_that_refuses_float16_at_run_time_stays_float32(tmp_path):
    """ScatterND(reduction=add) loads in float16 but fails when run: found by running the converted model once."""
    inputs = [helper.make_tensor_value_info("data", F, [4, 3]), helper.make_tensor_value_info("idx", TensorProto.INT64, [2, 1]),
              helper.make_tensor_value_info("upd", F, [2, 3])]
    nodes = [helper.make_node("ScatterND", ["data", "idx", "upd"], ["s"], reduction="add"),
             helper.make_node("Relu", ["s"], ["y"])]
    path = _save(tmp_path, nodes, inputs, [helper.make_tensor_value_info("y", F, [4, 3])])
    feed = {"data": np.ones((4, 3), np.float32), "idx": np.array([[0], [2]], np.int64), "upd": np.ones((2, 3), np.float32)}
    result = slimc.compile(str(path), passes=["fp16"], evaluation=[feed], measure_latency=False)
    assert _kept(result) == {"ScatterND": 1}
    assert result.receipt.fidelity["metrics"]["max_abs_error"] == 0.0


def test_the_probe_asks_the_runtime():
    """Celu's float16 one-node model does not load while its float32 one does; Relu's does."""
    import onnx_ir as ir

    x = helper.make_tensor_value_info("x", F, [2])
    for op, blocked in (("Celu", True), ("Relu", False)):
        model = helper.make_model(helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g", [x],
                                                    [helper.make_tensor_value_info("y", F, [2])]),
                                  opset_imports=[helper.make_opsetid("", 18)])
        ir_model = ir.serde.deserialize_model(model)
        assert bool(fp16_kernels.without_fp16_kernel(ir_model, list(ir_model.graph))) is blocked, op


def test_the_callers_evaluation_arrays_come_back_unchanged(tmp_path):
    """ORT binds numpy inputs without copying; a float32 BatchNormalization(training_mode=1) between
    float16 casts wrote its running statistics into the caller's ``mean`` and ``var`` arrays."""
    c = 3
    inputs = [helper.make_tensor_value_info(n, F, shape) for n, shape in
              (("x", [2, c, 4]), ("s", [c]), ("bias", [c]), ("mean", [c]), ("var", [c]))]
    node = helper.make_node("BatchNormalization", ["x", "s", "bias", "mean", "var"], ["y", "running_mean", "running_var"],
                            training_mode=1)
    path = _save(tmp_path, [node], inputs, [helper.make_tensor_value_info("y", F, [2, c, 4]),
                                            helper.make_tensor_value_info("running_mean", F, [c]),
                                            helper.make_tensor_value_info("running_var", F, [c])], opset=15)
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((2, c, 4)).astype(np.float32), "s": np.ones(c, np.float32),
            "bias": np.zeros(c, np.float32), "mean": rng.standard_normal(c).astype(np.float32),
            "var": rng.random(c).astype(np.float32) + 0.5}
    before = {k: v.copy() for k, v in feed.items()}
    slimc.compile(str(path), passes=["fp16"], evaluation=[feed])
    for name, array in feed.items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)
