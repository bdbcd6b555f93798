"""Static int8 on a model below opset 13 writes a model ONNX Runtime loads (issue 17).

Per-channel DequantizeLinear needs its ``axis`` attribute, which exists from opset 13: at opset 11
the quantizer wrote an invalid model and the run ended in an exit-2 error as if the user were at fault.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_models import tiny_cnn

import slimc
from slimc.errors import PassFailedError
from slimc.passes.quant import common

PASS = "int8(mode=static,force=true)"  # force: the latency guard is not what this tests


@pytest.fixture
def cnn11(tmp_path):
    model = tiny_cnn(junk=False)
    model.opset_import[0].version = 11
    model.ir_version = 6
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "cnn11.onnx"
    onnx.save(model, path)
    return path


def _calib():
    return np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)


def _loads_and_runs(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": _calib()[:2]})[0]


def test_opset_11_is_raised_to_13_for_per_channel_weights(cnn11, tmp_path):
    result = slimc.compile(str(cnn11), passes=[PASS], calibration=_calib(), measure_latency=False)
    report = result.receipt.passes[0]
    assert "opset 11 converted to 13" in report.summary and report.details["per_channel"] is True
    out = tmp_path / "int8.onnx"
    result.save(out)
    saved = onnx.load(str(out))
    assert next(o.version for o in saved.opset_import if o.domain == "") == 13
    axes = [a.i for n in saved.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes  # per-channel weights really are there
    assert _loads_and_runs(out).shape == (2, 5)


def test_where_the_converter_fails_weights_go_per_tensor(cnn11, tmp_path, monkeypatch):
    from onnx import version_converter

    def refuse(*args, **kwargs):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    result = slimc.compile(str(cnn11), passes=[PASS], calibration=_calib(), measure_latency=False)
    report = result.receipt.passes[0]
    assert "weights per tensor: opset 11" in report.summary and report.details["per_channel"] is False
    out = tmp_path / "int8.onnx"
    result.save(out)
    assert next(o.version for o in onnx.load(str(out)).opset_import if o.domain == "") == 11
    assert _loads_and_runs(out).shape == (2, 5)


def test_a_model_the_pass_made_invalid_is_a_pass_failure_not_a_data_error(cnn11, monkeypatch):
    monkeypatch.setattr(common, "per_channel_opset", lambda proto, folder=None: (proto, True, None))  # the old behaviour
    with pytest.raises(PassFailedError, match="invalid model.*bug in slimc"):
        slimc.compile(str(cnn11), passes=[PASS], calibration=_calib(), measure_latency=False)
