"""The `fp16` pass: float16 weights and compute on every zoo model, and what must stay float32.

ORT's CPU provider has few float16 kernels: it inserts casts and runs most ops in float32, so
CPU fidelity is optimistic for a GPU. What CPU cannot show (an overflowing ``x**2``) is checked
on the graph: the values that must stay float32 are float32 there, or exposed as outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from zoo import TOKEN_MODELS, ZOO, shifted_inputs

import slimc
from slimc.errors import PassConfigError
from slimc.onnx_io import copy_model
from slimc.pass_spec import parse_pipeline
from slimc.passes.quant.common import LatencyGuardError
from slimc.passes.quant.fp16 import Fp16
from slimc.pipeline import PassContext

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT



def _session(model) -> ort.InferenceSession:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(model, feed: dict) -> list[np.ndarray]:
    session = _session(model)
    types = {i.name: i.type for i in session.get_inputs()}
    feed = {k: (v.astype(np.float16) if types[k] == "tensor(float16)" else v) for k, v in feed.items() if k in types}
    return session.run(None, feed)


def _cosine_sqnr(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    noise = float((a - b) @ (a - b))
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 10 * np.log10(float(a @ a) / max(noise, 1e-300))


def _full_check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def _numpy(feed: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in feed.items()}


def _cast_chains(model: ir.Model) -> int:
    return sum(1 for n in model.graph if n.op_type == "Cast" and n.inputs[0].producer() is not None
               and n.inputs[0].producer().op_type == "Cast")


def _model(nodes, inputs, outputs, inits=()) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def rms_norm() -> ir.Model:
    """x[b,64] -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Reciprocal -> Mul x -> Mul w; ``var`` also an output."""
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=1, name="mean"),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="sqrt"),
        helper.make_node("Reciprocal", ["std"], ["inv"], name="rsqrt"),
        helper.make_node("Mul", ["x", "inv"], ["xn"], name="normalise"),
        helper.make_node("Mul", ["xn", "w"], ["y"], name="scale"),
    ]
    inits = [_init("two", np.float32(2)), _init("axes", np.array([-1], np.int64)), _init("eps", np.float32(1e-6)),
             _init("w", np.linspace(0.5, 1.5, 64, dtype=np.float32))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64]),
                   helper.make_tensor_value_info("var", TensorProto.FLOAT, ["b", 1])], inits)


def rotary() -> ir.Model:
    """Integer positions -> Cast float -> Unsqueeze -> Mul inv_freq -> Cos, Sin (no value_info: types inferred)."""
    nodes = [
        helper.make_node("Cast", ["pos"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pos_f", "axis"], ["pos_2d"]),
        helper.make_node("Mul", ["pos_2d", "inv_freq"], ["angle"]),
        helper.make_node("Cos", ["angle"], ["cos"]),
        helper.make_node("Sin", ["angle"], ["sin"]),
    ]
    inv_freq = (1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(np.float32)
    return _model(nodes, [helper.make_tensor_value_info("pos", TensorProto.INT64, ["n"])],
                  [helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["n", 4]),
                   helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["n", 4])],
                  [_init("axis", np.array([-1], np.int64)), _init("inv_freq", inv_freq)])


def masked_attention() -> ir.Model:
    """scores + Where(keep, 0, finfo(float32).min) -> Softmax -> MatMul v, as transformers builds masks."""
    nodes = [
        helper.make_node("Where", ["keep", "zero", "fill"], ["mask"], name="mask"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="context"),
    ]
    inits = [_init("zero", np.float32(0)), _init("fill", np.float32(np.finfo(np.float32).min))]
    return _model(nodes, [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 4, 4]),
                          helper.make_tensor_value_info("keep", TensorProto.BOOL, [2, 4, 4]),
                          helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 4, 3])],
                  [helper.make_tensor_value_info("ctx", TensorProto.FLOAT, [2, 4, 3]),
                   helper.make_tensor_value_info("masked", TensorProto.FLOAT, [2, 4, 4])], inits)


# ---------------------------------------------------------------- options


def test_options_are_validated_and_parse():
    for bad in ({"clip_to": 0.0}, {"clip_to": 70000.0}, {"min_speedup": 0.0}, {"block": "Softmax"}, {"block": [""]}):
        with pytest.raises(PassConfigError, match="fp16"):
            Fp16(**bad)
    (p,) = parse_pipeline("fp16(keep_io_types=false, block=[Softmax, '*lm_head*'], clip_to=65504)")
    assert (p.keep_io_types, p.block, p.clip_to, p.min_speedup) == (False, ["Softmax", "*lm_head*"], 65504.0, None)


# ---------------------------------------------------------------- zoo


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_converts_close_and_halves_weights(zoo_model, name):
    z = zoo_model(name)
    model = copy_model(z.loaded.model)
    feeds = [_numpy(z.example)] + ([_numpy(shifted_inputs(z.example))] if name in TOKEN_MODELS else [])
    refs = [_run(model, feed) for feed in feeds]

    report = Fp16().apply(model, PassContext())

    assert report.modified
    _full_check(model)
    d = report.details
    # Weights halve (llama keeps its 4-float rotary inv_freq float32) and the report says so.
    assert d["weight_bytes_after"] <= 0.51 * d["weight_bytes_before"]
    assert sum(1 for v in model.graph.initializers.values() if v.dtype == F16) > 0
    # keep_io_types: the interface is unchanged; no Cast->Cast chains survive.
    assert all(v.dtype != F16 for v in (*model.graph.inputs, *model.graph.outputs))
    assert d["interface"]["float16"] == [] and d["cast_chains"]["chains_left"] == _cast_chains(model) == 0
    for feed, ref in zip(feeds, refs):
        for a, b in zip(ref, _run(model, feed)):
            assert b.dtype == a.dtype and np.isfinite(b).all()
            cos, sqnr = _cosine_sqnr(a, b)
            # measured on these random-weight models: cosine >= 0.9999996, SQNR 61-70 dB
            assert cos > 0.9999 and sqnr > 50, (name, cos, sqnr)
    if name in ("bert", "gpt2", "llama", "vit"):  # transformers' mask fill, finfo(float32).min
        assert d["clipped_values"] == 1 and d["clip_to"] == 1e4
    if name == "llama":  # RMSNorm statistics and rotary angles stay float32, joined into islands
        assert d["blocked"]["norm statistics: x**2 overflows float16 above 256"]["ReduceMean"] == 5
        assert d["blocked"]["position angles: float16 positions are inexact above 2048"]["Cos"] == 1
        assert d["cast_chains"]["round_trips_removed"] > 0
        assert all(n.outputs[0].dtype == F32 for n in model.graph if n.op_type in ("Pow", "ReduceMean", "Sqrt", "Cos"))


@pytest.mark.parametrize("name", ["bert", "resnet"])
def test_keep_io_types_false_makes_the_interface_float16(zoo_model, name):
    z = zoo_model(name)
    model, feed = copy_model(z.loaded.model), _numpy(z.example)
    ref = _run(model, feed)
    report = Fp16(keep_io_types=False).apply(model, PassContext())
    _full_check(model)
    float_io = [v.name for v in (*model.graph.inputs, *model.graph.outputs) if v.dtype in (F16, F32)]
    assert float_io and report.details["interface"]["float16"] == float_io
    assert "interface changed" in report.summary and "feed float16" in report.summary
    for a, b in zip(ref, _run(model, feed)):
        assert b.dtype == np.float16
        assert _cosine_sqnr(a, b)[0] > 0.9999


def test_block_op_types_and_globs_stay_float32(zoo_model):
    model = copy_model(zoo_model("bert").loaded.model)
    report = Fp16(block=["Softmax", "*layer.1.*", "NoSuchOp"]).apply(model, PassContext())
    _full_check(model)
    assert all(n.outputs[0].dtype == F32 for n in model.graph if n.op_type == "Softmax")
    blocked = report.details["blocked"]
    assert blocked["block=Softmax"]["Softmax"] >= 1 and sum(blocked["block=*layer.1.*"].values()) > 10
    assert report.details["block_unmatched"] == ["NoSuchOp"] and "NoSuchOp" in report.summary
    # The blocked layer's nodes read each other's float32 outputs: the converter's
    # float32 -> float16 -> float32 round trips between them are removed.
    assert report.details["cast_chains"]["round_trips_removed"] > 0 and _cast_chains(model) == 0
    assert report.details["initializers_kept_float32"]  # layer 1's weights, read only by float32 nodes
    assert any("kept float32" in what for what, _ in report.left_alone)


# ---------------------------------------------------------------- what stays float32


def test_norm_statistics_stay_float32():
    x = {"x": np.random.default_rng(0).normal(0, 1000, (4, 64)).astype(np.float32)}  # x**2 ~ 1e6 > 65504
    ref = _run(rms_norm(), x)
    model = rms_norm()
    report = Fp16().apply(model, PassContext())
    _full_check(model)
    ops = {n.name: n for n in model.graph}
    assert all(ops[n].outputs[0].dtype == F32 for n in ("pow", "mean", "add_eps", "sqrt", "rsqrt"))
    assert ops["normalise"].outputs[0].dtype == F16 and model.graph.initializers["w"].dtype == F16
    assert report.details["blocked"]["norm statistics: x**2 overflows float16 above 256"] == {
        "Pow": 1, "ReduceMean": 1, "Add": 1, "Sqrt": 1, "Reciprocal": 1}
    y, var = _run(model, x)
    np.testing.assert_allclose(var, ref[1], rtol=1e-6)  # exact: computed and returned in float32
    np.testing.assert_allclose(y, ref[0], rtol=2e-3, atol=2e-3)

    # Without keep_fragile the variance is typed float16, where it is inf. (ORT CPU would not
    # show it: it has no float16 ReduceMean and runs the chain in float32 between its own casts.)
    naive = rms_norm()
    Fp16(keep_fragile=False).apply(naive, PassContext())
    assert {n.name: n for n in naive.graph}["mean"].outputs[0].dtype == F16
    with np.errstate(over="ignore"):
        assert np.isinf(np.mean(x["x"].astype(np.float16) ** 2, axis=-1)).all()


def test_position_angles_stay_float32():
    pos = {"pos": np.arange(4000, 4100, dtype=np.int64)}  # float16 holds these to +-2
    ref = _run(rotary(), pos)
    model = rotary()
    report = Fp16().apply(model, PassContext())
    _full_check(model)
    assert report.details["blocked"]["position angles: float16 positions are inexact above 2048"] == {
        "Cast": 1, "Unsqueeze": 1, "Mul": 1, "Cos": 1, "Sin": 1}
    assert report.details["initializers_kept_float32"] == ["inv_freq"]
    for a, b in zip(ref, _run(model, pos)):
        np.testing.assert_allclose(b, a, atol=1e-6)

    naive = rotary()
    Fp16(keep_fragile=False).apply(naive, PassContext())
    assert max(np.abs(a - b).max() for a, b in zip(ref, _run(naive, pos))) > 0.5


def test_mask_fill_is_clipped_with_head_room():
    rng = np.random.default_rng(0)
    keep = np.ones((2, 4, 4), bool)
    keep[0, 0, :] = False  # a fully masked row (left padding)
    feed = {"scores": rng.normal(0, 30, (2, 4, 4)).astype(np.float32), "keep": keep,
            "v": rng.normal(size=(2, 4, 3)).astype(np.float32)}
    feed["scores"][0, 0] = [-20.0, -35.0, -17.0, -50.0]  # attention logits below -16
    model = masked_attention()
    report = Fp16().apply(model, PassContext())
    _full_check(model)
    assert report.details["clipped_values"] == 1 and report.details["clipped_tensors"] == ["fill"]
    assert "clipped to +-10000" in report.summary
    assert model.graph.initializers["fill"].const_value.numpy() == np.float16(-1e4)
    ctx, masked = _run(model, feed)
    assert np.isfinite(masked).all() and np.isfinite(ctx).all()
    # mask + score is typed float16; at -1e4 it stays finite there, at the converter's -65504 a
    # fully masked row becomes all -inf and its softmax NaN (float16 arithmetic, as on a GPU:
    # ORT CPU adds in float32 between its own casts and would not show it).
    assert {n.name: n for n in model.graph}["add_mask"].outputs[0].dtype == F16
    scores = feed["scores"].astype(np.float16)
    with np.errstate(over="ignore"):
        assert np.isfinite(scores + np.float16(-1e4)).all()
        assert np.isneginf(scores + np.float16(-65504))[0, 0].all()

    saturated = masked_attention()
    Fp16(clip_to=65504).apply(saturated, PassContext())
    assert saturated.graph.initializers["fill"].const_value.numpy() == np.float16(-65504)


def test_constant_value_float_attributes_are_converted():
    nodes = [helper.make_node("Constant", [], ["c"], value_float=2.5),
             helper.make_node("Constant", [], ["cs"], value_floats=[1.0, 2.0, 3.0]),
             helper.make_node("Mul", ["x", "c"], ["xc"]), helper.make_node("Add", ["xc", "cs"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    Fp16().apply(model, PassContext())
    _full_check(model)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(_run(model, {"x": x})[0], x * 2.5 + [1, 2, 3])


def test_blocked_output_keeps_its_name_without_a_cast_round_trip():
    w = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Softmax", ["h"], ["y"], name="sm")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [_init("w", w)])
    report = Fp16(block=["sm"]).apply(model, PassContext())
    _full_check(model)
    (out,) = model.graph.outputs
    assert out.name == "y" and out.producer().op_type == "Softmax" and out.dtype == F32
    assert report.details["cast_chains"]["round_trips_removed"] == 1 and _cast_chains(model) == 0
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(_run(model, {"x": x})[0], _run(_model(nodes, [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [_init("w", w)]),
        {"x": x})[0], rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------- refusals and no-ops


def test_refuses_a_quantized_model():
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                   [_init("wq", np.ones((2, 2), np.int8)), _init("s", np.float32(0.1))])
    with pytest.raises(PassConfigError, match="already quantized"):
        Fp16().apply(model, PassContext())


def test_an_fp16_model_is_left_unchanged(zoo_model):
    model = copy_model(zoo_model("resnet").loaded.model)
    assert Fp16().apply(model, PassContext()).modified
    before = ir.serde.serialize_model(model).SerializeToString()
    report = Fp16(keep_io_types=False).apply(model, PassContext())
    assert not report.modified and "already holds float16" in report.summary
    assert report.left_alone and ir.serde.serialize_model(model).SerializeToString() == before


# ---------------------------------------------------------------- guard, external data, compile


def test_latency_guard_refusal_leaves_the_model_unchanged(zoo_model):
    z = zoo_model("resnet")
    model = copy_model(z.loaded.model)
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(LatencyGuardError, match="fp16"):
        Fp16(min_speedup=50.0).apply(model, PassContext(loaded=z.loaded))
    assert ir.serde.serialize_model(model).SerializeToString() == before
    report = Fp16(min_speedup=0.01).apply(model, PassContext(loaded=z.loaded))
    guard = report.details["latency_guard"]
    assert guard["before_ms"] > 0 and guard["after_ms"] > 0 and "speedup" in report.summary


def test_external_data_weights_are_converted(zoo_model, tmp_path):
    from slimc.onnx_io import load_onnx

    z = zoo_model("resnet")
    path = tmp_path / "resnet.onnx"
    ir.save(copy_model(z.loaded.model), path, external_data="resnet.onnx.data", size_threshold_bytes=100)
    model = load_onnx(path)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    feed = _numpy(z.example)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    Fp16().apply(model, PassContext())
    _full_check(model)
    assert _cosine_sqnr(ref[0], _run(model, feed)[0])[1] > 50


def test_compile_end_to_end_reports_the_size(zoo_model, tmp_path):
    loaded = zoo_model("bert").loaded
    result = slimc.compile(loaded, passes=["fp16"], measure_latency=False)
    r = result.receipt
    (report,) = r.passes
    assert report.name == "fp16" and report.modified
    assert r.after["weight_bytes"] <= 0.51 * r.before["weight_bytes"]
    # The file shrinks by the weight bytes saved (the rest of it is graph and metadata).
    saved = r.before["weight_bytes"] - r.after["weight_bytes"]
    assert r.before["bytes_on_disk"] - r.after["bytes_on_disk"] > 0.9 * saved
    assert report.details["weight_bytes_after"] == r.after["weight_bytes"]
    assert r.fidelity["metrics"]["cosine"] > 0.999
    assert "full ONNX checker" in r.verification[-1]["result"]
    result.save(tmp_path / "bert-fp16.onnx")
    assert _session(onnx.load(str(tmp_path / "bert-fp16.onnx"))).get_inputs()[0].name == "input_ids"
