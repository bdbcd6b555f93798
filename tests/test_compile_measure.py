"""After the passes: timing feeds what the model accepts, and no measurement can lose a verified result (issue 17).

The latency step fed ``v[:1]`` of every input whatever its declared shape: a fixed batch of 3 failed
in ONNX Runtime and a 0-d input raised IndexError, after every pass had succeeded, and the CLI printed
a traceback and wrote nothing. Random inputs that the input model cannot run on (a Reshape's shape)
must be refused as such, naming the input and asking for --eval.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import slimc
from slimc.errors import DataError
from slimc.tools.cli import main

F = TensorProto.FLOAT


def _save(path, nodes, inputs, outputs, inits=()):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture
def fixed_batch(tmp_path):
    """``x: float[3, 4]`` (a batch fixed at 3) through a MatMul and Relu."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    return _save(tmp_path / "fixed.onnx", [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                 [helper.make_tensor_value_info("x", F, [3, 4])], [helper.make_tensor_value_info("y", F, [3, 4])], [w])


@pytest.fixture
def scalar(tmp_path):
    """``y = x * x + x`` for a 0-d ``x``."""
    return _save(tmp_path / "scalar.onnx", [helper.make_node("Mul", ["x", "x"], ["s"]), helper.make_node("Add", ["s", "x"], ["y"])],
                 [helper.make_tensor_value_info("x", F, [])], [helper.make_tensor_value_info("y", F, [])])


@pytest.mark.parametrize("model, feed", [("fixed_batch", "3x4"), ("scalar", "scalar")])
def test_latency_is_timed_on_what_the_model_accepts(model, feed, request):
    result = slimc.compile(str(request.getfixturevalue(model)), passes=["cleanup"])
    assert "error" not in result.receipt.latency, result.receipt.latency
    assert result.receipt.latency["feed"] == feed and result.receipt.latency["after"]["median_ms"] > 0


@pytest.mark.parametrize("model", ["fixed_batch", "scalar"])
def test_cli_writes_output_and_receipt(model, request, tmp_path, capsys):
    out, receipt = tmp_path / "out.onnx", tmp_path / "receipt.json"
    assert main([str(request.getfixturevalue(model)), "--passes", "cleanup", "-o", str(out), "--receipt", str(receipt)]) == 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert "median_ms" in json.dumps(json.loads(receipt.read_text())["latency"])


def test_a_dynamic_batch_is_cut_to_one_sample_a_fixed_one_and_a_scalar_are_not():
    from slimc.backends.timing import latency_feed
    from slimc.model import InputSpec

    batch = {"a": np.zeros((4, 2)), "b": np.zeros((4, 3)), "d": np.zeros(())}
    specs = [InputSpec("a", np.float32, ("n", 2)), InputSpec("b", np.float32, (4, 3)), InputSpec("d", np.float32, ())]
    shapes = {k: np.shape(v) for k, v in latency_feed(batch, specs).items()}
    assert shapes == {"a": (1, 2), "b": (4, 3), "d": ()}
    assert np.shape(latency_feed(batch, specs, batch_size=2)["a"]) == (2, 2)


def test_when_one_sample_does_not_run_the_whole_verified_batch_is_timed(tmp_path):
    """``x [n, 2]`` and ``idx [k]`` indexing rows of x: one row of x leaves the indices out of range."""
    path = _save(tmp_path / "gather.onnx", [helper.make_node("Gather", ["x", "idx"], ["y"], axis=0)],
                 [helper.make_tensor_value_info("x", F, ["n", 2]), helper.make_tensor_value_info("idx", TensorProto.INT64, ["k"])],
                 [helper.make_tensor_value_info("y", F, ["k", 2])])
    feed = {"x": np.arange(8, dtype=np.float32).reshape(4, 2), "idx": np.array([3, 1], np.int64)}
    latency = slimc.compile(str(path), passes=["cleanup"], evaluation=[feed]).receipt.latency
    assert "error" not in latency and latency["feed"] == "4x2", latency


def test_a_measurement_that_fails_is_reported_and_the_result_kept(fixed_batch, tmp_path, monkeypatch):
    from slimc import evaluate
    from slimc.backends import onnxruntime as ort_backend

    def broken(*args, **kwargs):
        raise RuntimeError("the timer broke")

    monkeypatch.setattr(ort_backend, "measure_latency", broken)
    monkeypatch.setattr(evaluate, "evaluate", broken)
    result = slimc.compile(str(fixed_batch), passes=["cleanup"])
    assert result.receipt.latency == {"error": "RuntimeError: the timer broke"}
    assert result.receipt.fidelity == {"error": "RuntimeError: the timer broke"}
    text = str(result.receipt)
    assert "latency (ORT)" in text and "fidelity vs the input model: not measured: RuntimeError" in text
    assert result.save(tmp_path / "kept.onnx")
    json.dumps(result.receipt.to_json())


def test_random_inputs_the_model_cannot_run_on_are_refused_naming_the_input(tmp_path, monkeypatch):
    from slimc import data_synthetic

    path = _save(tmp_path / "reshape.onnx", [helper.make_node("Reshape", ["data", "shape"], ["y"])],
                 [helper.make_tensor_value_info("data", F, [2, 3, 4]), helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                 [helper.make_tensor_value_info("y", F, [None, None])])
    for known in (True, False):  # slimc sees the shape input up front; else the failed run is explained
        if not known:
            monkeypatch.setattr(data_synthetic, "check_inventable", lambda inputs: None)
        with pytest.raises(DataError) as info:
            slimc.compile(str(path), passes=["cleanup"], measure_latency=False)
        message = str(info.value)
        assert "synthetic inputs" in message and "random" in message and "--eval" in message, message
        assert "'shape'" in message and "'data'" not in message, message
    assert "fails on the synthetic inputs" in message  # the run-time explanation
    feed = {"data": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "shape": np.array([4, 6], np.int64)}
    assert slimc.compile(str(path), passes=["cleanup"], evaluation=[feed], measure_latency=False).receipt.fidelity


def test_string_inputs_and_an_empty_input_are_data(tmp_path):
    """String tensors and an empty input (no rows) are valid evaluation data; string outputs are compared exactly."""
    s = TensorProto.STRING
    path = _save(tmp_path / "concat.onnx", [helper.make_node("Concat", ["a", "b"], ["y"], axis=0)],
                 [helper.make_tensor_value_info("a", s, ["n"]), helper.make_tensor_value_info("b", s, ["m"])],
                 [helper.make_tensor_value_info("y", s, [None])])
    feed = {"a": np.array(["x", "yz"], dtype=object), "b": np.array([], dtype=object)}
    result = slimc.compile(str(path), passes=["cleanup"], evaluation=[feed])
    assert "exact" in result.receipt.verification[-1]["result"]
    assert result.receipt.fidelity["metrics"]["non_floating"]["y"]["exact"] is True
    assert "error" not in result.receipt.latency
