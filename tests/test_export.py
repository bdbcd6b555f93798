"""Export targets (`slimc.export`): static shapes, opset conversion, the ONNX Runtime targets
(onnx, ort-mobile), the artifact verified in its runtime, typed errors before anything is written.

The edge runtimes with optional extras (OpenVINO, ncnn, LiteRT, ExecuTorch) are tested in
`test_export_edge.py`, skipped with the install command where their extra is missing.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_models import tiny_cnn

import slimc
from slimc import data
from slimc.backends import targets
from slimc.errors import DataError, MissingExtraError, TargetError
from slimc.export import ExportOptions, parse_static_shapes, prepare
from slimc.tools.cli import main


def _onnx_file(zoo_model, name, tmp_path):
    path = tmp_path / f"{name}.onnx"
    ir.save(zoo_model(name).loaded.model, path)
    return path


# ---------------------------------------------------------------- preparing the ONNX


def test_static_shapes_pin_inputs_and_fold_shape_arithmetic(zoo_model, tmp_path):
    z = zoo_model("bert")
    model = prepare(z.loaded.model, ExportOptions(static_shapes={"input_ids": (1, 16), "attention_mask": (1, 16),
                                                                 "token_type_ids": (1, 16)}))
    assert [list(v.shape) for v in model.graph.inputs] == [[1, 16]] * 3
    assert all(all(isinstance(d, int) for d in v.shape) for v in model.graph.outputs)
    before = sum(n.op_type == "Shape" for n in z.loaded.model.graph)
    assert before > 0 and sum(n.op_type == "Shape" for n in model.graph) == 0  # folded into constants
    feed = {k: v[:1].numpy() for k, v in z.example.items()}
    from onnx_models import run_checked

    expected = run_checked(z.loaded.model, feed, tmp_path, "dynamic")
    for a, b in zip(run_checked(model, feed, tmp_path, "static"), expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_opset_conversion_keeps_the_outputs(zoo_model, tmp_path):
    z = zoo_model("resnet")
    model = prepare(z.loaded.model, ExportOptions(opset=17))
    assert model.opset_imports[""] == 17
    from onnx_models import run_checked

    feed = {k: v.numpy() for k, v in z.example.items()}
    for a, b in zip(run_checked(model, feed, tmp_path, "o17"), run_checked(z.loaded.model, feed, tmp_path, "orig")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_parse_static_shapes():
    assert parse_static_shapes("input_ids=1x128, attention_mask=1x128") == {"input_ids": (1, 128), "attention_mask": (1, 128)}
    assert parse_static_shapes("pixel_values=1x3x224x224") == {"pixel_values": (1, 3, 224, 224)}
    for bad in ("x", "x=", "x=1x0", "x=ax3", "=1x2", ""):
        with pytest.raises(TargetError):
            parse_static_shapes(bad)


@pytest.mark.parametrize("shapes, message", [
    ({"nope": (1, 3, 64, 64)}, "does not take"),
    ({"pixel_values": (1, 3, 64)}, "rank 3"),
    ({"pixel_values": (1, 4, 64, 64)}, "axis 1 is fixed at 3"),
])
def test_bad_static_shapes(zoo_model, shapes, message):
    with pytest.raises(TargetError, match=message):
        prepare(zoo_model("resnet").loaded.model, ExportOptions(static_shapes=shapes))


def test_bad_options_fail_before_any_work():
    with pytest.raises(TargetError, match="unknown target 'coreml'.*ort-mobile"):
        ExportOptions(target="coreml")
    with pytest.raises(TargetError, match="opset=7 is out of range"):
        ExportOptions(opset=7)
    with pytest.raises(TargetError, match="unknown target"):
        slimc.compile("does-not-exist.onnx", target="coreml")  # before the (missing) model is read


# ---------------------------------------------------------------- the ORT targets through compile()


@pytest.mark.parametrize("spec", ["cleanup", "prune(ratio=0.25),int8(mode=static, force=true)"])
def test_ort_mobile_artifact_runs_and_matches(zoo_model, tmp_path, spec):
    z = zoo_model("resnet")
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=0)
    evaluation = data.synthetic(z.loaded.inputs, n_batches=2, seed=5)
    result = slimc.compile(z.loaded, spec, calibration=calib, evaluation=evaluation, target="ort-mobile",
                           static_shapes={"pixel_values": (1, 3, 64, 64)})
    t = result.receipt.target
    assert t["target"] == "ort-mobile" and [f["name"] for f in t["files"]] == ["model.ort", "model.required_operators.config"]
    assert t["fidelity_vs_onnx"]["cosine"] > 0.9999 and t["fidelity_vs_onnx"]["top1_agreement"] == 1.0
    # every held-out sample, run one at a time at the pinned batch 1
    assert t["fidelity_vs_onnx"]["samples"] == sum(len(b["pixel_values"]) for b in evaluation) > len(evaluation)
    assert t["latency"]["before"]["median_ms"] > 0 and t["latency"]["speedup"] > 0
    assert "target ort-mobile" in str(result.receipt) and json.dumps(result.receipt.to_json())
    written = result.save(tmp_path / "deploy.ort")
    assert [p.name for p in written] == ["deploy.ort", "deploy.required_operators.config"]
    config = (tmp_path / "deploy.required_operators.config").read_text()
    assert "ai.onnx;" in config and "Conv" in config
    from slimc.backends.onnxruntime import create_session, run

    session = create_session(tmp_path / "deploy.ort")
    batch = next(iter(evaluation))
    out = run(session, {k: v[:1] for k, v in batch.items()})[0]
    assert out.shape == (1, 10) and np.isfinite(out).all()
    if "int8" in spec:
        ops = config.split(";")
        assert any("QuantizeLinear" in o or "QLinearConv" in o for o in ops)


def test_onnx_target_with_opset_and_static_shapes(zoo_model, tmp_path):
    z = zoo_model("llama")
    result = slimc.compile(z.loaded, "cleanup", target="onnx", opset=17, static_shapes="input_ids=1x16,attention_mask=1x16",
                           measure_latency=False, evaluation=data.synthetic(z.loaded.inputs, n_batches=2, seed=3,
                                                                            sizes={"seq": 16}))
    assert result.model.opset_imports[""] == 17
    assert result.receipt.fidelity["metrics"]["cosine"] > 0.99999
    assert any(v["pass"].startswith("export (opset 17") for v in result.receipt.verification)
    path = tmp_path / "llama17.onnx"
    result.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    assert [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim] == [1, 16]


def test_data_that_does_not_fit_the_pinned_shape(zoo_model):
    z = zoo_model("llama")
    evaluation = data.synthetic(z.loaded.inputs, n_batches=1, sizes={"seq": 12})
    with pytest.raises(DataError, match="--seq-len 16"):
        slimc.compile(z.loaded, "cleanup", static_shapes="input_ids=1x16,attention_mask=1x16", evaluation=evaluation,
                      measure_latency=False)


# ---------------------------------------------------------------- what a target cannot do


class _NoRuntime(targets.Target):
    name, suffix, extra, modules = "fake", ".fake", "fake", ("slimc_no_such_module",)


class _NoGemm(targets.Target):
    name, suffix = "nogemm", ".x"

    def unsupported(self, proto):
        return {op: "no such layer here" for op in targets.op_types(proto) if op == "Gemm"}


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(targets.TARGETS, "fake", f"{__name__}:_NoRuntime")
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(junk=False), path)
    with pytest.raises(MissingExtraError, match=r'pip install "slimc\[fake\]"'):
        slimc.compile(path, "cleanup", target="fake", measure_latency=False)


def test_unsupported_op_is_named_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(targets.TARGETS, "nogemm", f"{__name__}:_NoGemm")
    monkeypatch.setitem(sys.modules, __name__, sys.modules[__name__])
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(junk=False), path)
    out = tmp_path / "out.x"
    assert main([str(path), "--target", "nogemm", "-o", str(out), "--no-latency", "-q"]) == 2
    err = capsys.readouterr().err
    assert "target 'nogemm' cannot represent 1 op type(s)" in err and "Gemm: no such layer here" in err
    assert not out.exists() and "Traceback" not in err


def test_cli_target_suffix_and_artifact(tmp_path, capsys):
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(junk=False), path)
    assert main([str(path), "--target", "ort-mobile", "-o", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert "must end in .ort" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
    receipt = tmp_path / "r.json"
    assert main([str(path), "--target", "ort-mobile", "--static-shapes", "x=1x3x8x8", "--opset", "17",
                 "-o", str(tmp_path / "m.ort"), "--receipt", str(receipt), "-q"]) == 0
    assert (tmp_path / "m.ort").exists() and (tmp_path / "m.required_operators.config").exists()
    t = json.loads(receipt.read_text())["target"]
    assert t["opset"] == 17 and t["static_shapes"] == {"x": [1, 3, 8, 8]} and t["fidelity_vs_input"]["cosine"] > 0.9999
    assert main([str(path), "--static-shapes", "x=1x3x9x8", "-o", str(tmp_path / "bad.onnx"), "-q"]) == 2
    assert "axis 2 is fixed at 8" in capsys.readouterr().err and not (tmp_path / "bad.onnx").exists()


def test_fp16_flag_keeps_float_io(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(junk=False), path)
    out = tmp_path / "half.onnx"
    assert main([str(path), "--fp16", "-o", str(out), "--no-latency", "-q"]) == 0
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)


def test_int8_for_ort_mobile_is_static_qdq_at_8_bits(zoo_model, tmp_path):
    """What NNAPI / QNN / XNNPACK run: static QDQ (no dynamic int8), 8-bit weights, guard informs only."""
    z = zoo_model("bert")  # int8 auto picks dynamic here on x86; the mobile target must not
    calib = data.synthetic(z.loaded.inputs, n_batches=3, seed=0)
    result = slimc.compile(z.loaded, "int8(min_speedup=100)", calibration=calib, target="ort-mobile",
                           measure_latency=False)
    (report,) = result.receipt.passes
    ops = {n.op_type for n in result.model.graph}
    assert "QuantizeLinear" in ops and not ops & {"DynamicQuantizeLinear", "MatMulInteger"}
    assert report.details["chosen"] == "static" and report.details["reduce_range"] is False
    assert any("does not decide for the device" in n for n in report.details["notes"])  # min_speedup=100 kept
    with pytest.raises(slimc.PassConfigError, match="not dynamic int8"):
        slimc.compile(z.loaded, "int8(mode=dynamic)", calibration=calib, target="ort-mobile", measure_latency=False)
