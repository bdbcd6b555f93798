"""`smoothquant`: exact on the zoo, the scale formula by hand, every fold, what it leaves alone.

Exactness oracle: the smoothed model's outputs equal the original's through ONNX Runtime (fp32,
tolerance relative to each output's scale), at a batch size and sequence length the model was
not exported with; and the weights really changed: the per-channel activation maxima measured
on the smoothed model (`slimc.calibrate.collect`) are the original ones divided by s, flatter.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import run_checked
from zoo import shifted_inputs

import slimc
from slimc import data
from slimc.calibrate import StatRequest, collect
from slimc.data import Dataset
from slimc.errors import DataError, PassConfigError
from slimc.onnx_io import copy_model
from slimc.passes.quant.smoothquant import SmoothQuant
from slimc.pipeline import PassContext

RNG = np.random.default_rng(0)





def _assert_close(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(np.abs(b).max())), rtol=1e-4)
        else:
            np.testing.assert_array_equal(a, b)


def _smooth(model: ir.Model, calib, **options):
    return SmoothQuant(**options).apply(model, PassContext(calibration=calib))


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}


def _ratio(absmax: np.ndarray) -> float:
    return float(absmax.max() / np.median(absmax))


# ---------------------------------------------------------------- the zoo


@pytest.fixture(scope="module")
def smoothed(zoo_model):
    """name -> (original IR, smoothed IR, report, calibration), each zoo model smoothed once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            z = zoo_model(name)
            calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=1)
            model = copy_model(z.loaded.model)
            cache[name] = (z, model, _smooth(model, calib), calib)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_exact_on_the_zoo(smoothed, name, tmp_path):
    z, model, report, _ = smoothed(name)
    feed = {k: v.numpy() for k, v in shifted_inputs(z.example).items()}
    _assert_close(run_checked(model, feed, tmp_path, "smoothed"), run_checked(z.loaded.model, feed, tmp_path, "original"))
    changed = [k for k, w in _weights(model).items()
               if k not in z.loaded.model.graph.initializers or not np.array_equal(w, z.loaded.model.graph.initializers[k].const_value.numpy())]
    assert report.modified == bool(report.details["groups_smoothed"]) == bool(changed)
    assert len(list(model.graph)) == len(list(z.loaded.model.graph))  # folded: not one node more


def test_llama_groups_rmsnorm_swiglu_gqa(smoothed):
    _, _, report, _ = smoothed("llama")
    groups = report.details["groups_smoothed"]
    kinds = [g["producer"] for g in groups]
    # per layer: q/k/v (shared s) and gate/up from the RMSNorm weight, down_proj from SwiGLU's up
    # factor; lm_head from the final norm
    assert kinds.count("Mul by a constant") == 5
    assert kinds.count("Mul of activations, factor from MatMul (output columns)") == 2
    qkv = next(g for g in groups if g["linears"][0].endswith("q_proj"))
    assert [p.rsplit(".", 1)[-1] for p in qkv["linears"]] == ["q_proj", "k_proj", "v_proj"]
    down = next(g for g in groups if g["linears"] == ["model.layers.0.mlp.down_proj"])
    assert down["folded_into"] == ["MatMul 'node_linear_5'"]  # up_proj's output columns
    # o_proj reads attention heads merged back by a Reshape: left alone, with the reason
    left = dict(report.left_alone)
    assert len(left) == 2 and all("o_proj" in what for what in left)
    assert all("Reshape" in why and "heads" in why for why in left.values())
    for g in groups:
        assert 1e-5 <= g["scale_min"] <= g["scale_max"] <= 1e5
        assert g["act_absmax_after"] > 0 and g["weight_absmax_after"] > 0


def test_gpt2_conv1d_layernorm_through_reshape(smoothed):
    _, _, report, _ = smoothed("gpt2")
    groups = report.details["groups_smoothed"]
    by_kind = {}
    for g in groups:
        by_kind.setdefault(g["producer"], []).append(g)
    # c_attn, c_fc and lm_head read a LayerNorm through the [batch*seq, C] Reshape of Conv1D
    assert len(by_kind["LayerNormalization"]) == 5
    assert all(g["through"] and g["through"][0].startswith("Reshape") for g in by_kind["LayerNormalization"])
    # the MLP's c_proj reads gelu_tanh(x) = (0.5 * x) * (1 + tanh(...)): the 0.5 takes the scale
    assert len(by_kind["Mul of activations, factor from Mul by a constant"]) == 2
    assert all("c_proj" in what for what, _ in report.left_alone)  # attention's c_proj


def test_bert_post_layernorm_is_left_alone_with_reasons(smoothed):
    _, model, report, _ = smoothed("bert")
    assert not report.modified and not report.details["groups_smoothed"]
    why = [w for _, w in report.left_alone]
    residual = [w for w in why if "residual" in w]
    assert len(residual) == 4 and all("is also read by Add" in w for w in residual)  # post-LN: LN output feeds the residual
    assert sum("Gelu" in w for w in why) == 2


def test_smoothing_flattens_activation_outliers(zoo_model, tmp_path):
    """Give llama's RMSNorm weight outlier channels; after smoothing the measured maxima are flatter."""
    z = zoo_model("llama")
    model = copy_model(z.loaded.model)
    norm = model.graph.initializers["model.layers.0.input_layernorm.weight"]  # shared by every norm
    w = norm.const_value.numpy().copy()
    w[[3, 17]], w[9] = 40.0, 0.02
    norm.const_value = ir.tensor(w, name=norm.name)
    reference = copy_model(model)
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=2)
    report = _smooth(model, calib)
    groups = [g for g in report.details["groups_smoothed"] if g["producer"] == "Mul by a constant"]
    requests = {g["input"]: StatRequest(g["input"], -1, absmax=True) for g in groups}
    before = collect(reference, list(requests.values()), calib)
    after = collect(model, list(requests.values()), calib)
    for g in groups:
        a, b = before[requests[g["input"]]].absmax, after[requests[g["input"]]].absmax
        assert _ratio(a) > 20 and _ratio(b) < _ratio(a) / 3, g["input"]
        np.testing.assert_allclose(b.max(), g["act_absmax_after"], rtol=1e-4)  # the report says what happened
        np.testing.assert_allclose(a.max(), g["act_absmax_before"], rtol=1e-6)
    feed = {k: v.numpy() for k, v in shifted_inputs(z.example).items()}
    _assert_close(run_checked(model, feed, tmp_path, "smoothed"), run_checked(reference, feed, tmp_path, "reference"))


def test_alpha_one_makes_every_channel_max_one(zoo_model):
    z = zoo_model("gpt2")
    model = copy_model(z.loaded.model)
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=3)
    report = _smooth(model, calib, alpha=1.0)
    requests = [StatRequest(g["input"], -1, absmax=True) for g in report.details["groups_smoothed"]]
    for request, stats in collect(model, requests, calib).items():
        np.testing.assert_allclose(stats.absmax, 1.0, rtol=1e-5, err_msg=request.value)


def test_compile_end_to_end(zoo_model):
    z = zoo_model("llama")
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=4)
    result = slimc.compile(z.loaded, "smoothquant(alpha=0.6)", calibration=calib, measure_latency=False)
    (report,) = result.receipt.passes
    assert report.name == "smoothquant" and report.modified and report.details["alpha"] == 0.6
    assert "exact" in result.receipt.verification[-1]["result"]  # compile() checked the declared exactness
    assert result.receipt.to_json()  # details and left_alone are JSON-able


# ---------------------------------------------------------------- hand-made graphs


def _model(nodes, inputs, outputs, inits, opset: int = 18) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _f32(*shape, scale=1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _calib(name: str, shape, n: int = 3, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset([{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)], "test")


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b


def ln_matmul(extra_reader: bool = False, dtype=np.float32) -> tuple[ir.Model, dict]:
    """x[N, 6] -> LayerNormalization(g, b) -> ln -> MatMul W[6, 5] -> y (+ Relu(ln) -> r as an output)."""
    g = np.array([1.0, 30.0, 0.5, 1.0, 2.0, 0.01], np.float32)
    inits = {"g": g, "b": _f32(6, scale=0.1), "W": _f32(6, 5, scale=0.2)}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = {k: v.astype(dtype) for k, v in inits.items()}
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "W"], ["y"], name="mm")]
    outputs = [helper.make_tensor_value_info("y", elem, ["N", 5])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["ln"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", elem, ["N", 6]))
    return _model(nodes, [helper.make_tensor_value_info("x", elem, ["N", 6])], outputs, inits), inits


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_scale_formula_on_layernorm_matmul(alpha, tmp_path):
    model, inits = ln_matmul()
    original = copy_model(model)
    calib = _calib("x", (4, 6))
    report = _smooth(model, calib, alpha=alpha)
    x = np.concatenate([b["x"] for b in calib])
    act = np.abs(_layer_norm(x, inits["g"], inits["b"])).max(0)
    wmax = np.abs(inits["W"].astype(np.float64)).max(1)
    s = np.clip(act**alpha / wmax ** (1 - alpha), 1e-5, 1e5)
    ln = next(n for n in model.graph if n.op_type == "LayerNormalization")
    np.testing.assert_allclose(ln.inputs[1].const_value.numpy(), inits["g"] / s, rtol=1e-5)
    np.testing.assert_allclose(ln.inputs[2].const_value.numpy(), inits["b"] / s, rtol=1e-5)
    np.testing.assert_allclose(model.graph.initializers["W"].const_value.numpy(), inits["W"] * s[:, None], rtol=1e-5)
    (group,) = report.details["groups_smoothed"]
    assert group["producer"] == "LayerNormalization" and group["linears"] == ["mm"] and group["through"] == []
    np.testing.assert_allclose([group["scale_min"], group["scale_max"]], [s.min(), s.max()], rtol=1e-4)
    np.testing.assert_allclose(group["act_absmax_before"], act.max(), rtol=1e-4)
    np.testing.assert_allclose(group["act_absmax_after"], (act / s).max(), rtol=1e-4)
    feed = {"x": _f32(7, 6)}
    _assert_close(run_checked(model, feed, tmp_path, "s"), run_checked(original, feed, tmp_path, "o"))


def test_scales_zero_channels_and_clipping():
    s = SmoothQuant(alpha=0.5).scales(np.array([0.0, 1e12, 4.0, 1e-14, 9.0]), np.array([1.0, 1e-12, 1.0, 1e4, 0.0]))
    np.testing.assert_allclose(s, [1.0, 1e5, 2.0, 1e-5, 1.0])  # zero activation or weight row: 1


def test_extra_nonlinear_reader_is_left_alone():
    model, _ = ln_matmul(extra_reader=True)
    before = ir.serde.serialize_model(model).SerializeToString()
    report = _smooth(model, _calib("x", (4, 6)))
    assert not report.modified
    ((what, why),) = report.left_alone
    assert "'ln'" in what and "mm" in what
    assert "also read by Relu 'relu'" in why and "X / s" in why
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_float16_weights_are_left_alone():
    model, _ = ln_matmul(dtype=np.float16)
    report = _smooth(model, Dataset([{"x": _f32(4, 6).astype(np.float16)}], "test"))
    assert not report.modified and "float16" in report.left_alone[0][1]


def test_constant_node_is_replaced_by_the_smoothed_initializer(tmp_path):
    """x -> Mul(x, Constant w) -> MatMul: the RMSNorm weight as a Constant node, not an initializer."""
    w = np.array([1.0, 50.0, 1.0, 0.1], np.float32)
    model = _model(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w), name="const"),
         helper.make_node("Mul", ["x", "w"], ["m"], name="norm"), helper.make_node("MatMul", ["m", "W"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], {"W": _f32(4, 3)},
    )
    original = copy_model(model)
    report = _smooth(model, _calib("x", (5, 4)))
    assert report.details["groups_smoothed"][0]["producer"] == "Mul by a constant"
    assert [n.op_type for n in model.graph] == ["Mul", "MatMul"]  # the dead Constant went with it
    feed = {"x": _f32(6, 4)}
    _assert_close(run_checked(model, feed, tmp_path, "s"), run_checked(original, feed, tmp_path, "o"))


def chain() -> tuple[ir.Model, dict]:
    """Every fold: LN -> Reshape -> Gemm1(transB, bias) -> Relu -> Gemm2(bias) -> Reshape -> Add(b3) -> MatMul.

    No value_info (the Reshape checks need ONNX shape inference); LN's scale ``g`` is also read
    by a side Mul, so it must be copied before it is divided.
    """
    inits = {
        "g": np.array([1, 1, 25, 1, 0.1, 1, 3, 1], np.float32), "b": _f32(8, scale=0.1),
        "shape2": np.array([-1, 8], np.int64), "W1": _f32(16, 8, scale=0.3), "c1": _f32(16, scale=0.1),
        "W2": _f32(16, 12, scale=0.3), "c2": _f32(12, scale=0.1), "shape3": np.array([2, 5, 12], np.int64),
        "b3": _f32(12), "W3": _f32(12, 4, scale=0.3),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln"),
        helper.make_node("Reshape", ["ln", "shape2"], ["r"], name="reshape2"),
        helper.make_node("Gemm", ["r", "W1", "c1"], ["h"], name="gemm1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("Gemm", ["a", "W2", "c2"], ["y2"], name="gemm2"),
        helper.make_node("Reshape", ["y2", "shape3"], ["y3"], name="reshape3"),
        helper.make_node("Add", ["y3", "b3"], ["y4"], name="add"),
        helper.make_node("MatMul", ["y4", "W3"], ["out"], name="mm3"),
        helper.make_node("Mul", ["x", "g"], ["side"], name="side"),
    ]
    outs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, 4]),
            helper.make_tensor_value_info("side", TensorProto.FLOAT, [2, 5, 8])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])], outs, inits), inits


def test_every_fold_on_a_chain(tmp_path):
    model, inits = chain()
    original = copy_model(model)
    report = _smooth(model, _calib("x", (2, 5, 8), n=2))
    groups = {g["input"]: g for g in report.details["groups_smoothed"]}
    assert set(groups) == {"r", "a", "y4"} and not report.left_alone
    assert groups["r"]["producer"] == "LayerNormalization" and groups["r"]["through"] == ["Reshape 'reshape2'"]
    assert groups["a"]["producer"] == "Gemm (output columns)" and groups["a"]["through"] == ["Relu 'relu'"]
    assert groups["y4"]["producer"] == "Gemm (output columns) + bias"
    assert groups["y4"]["through"] == ["Reshape 'reshape3'"] and groups["y4"]["folded_into"] == ["Add 'add'", "Gemm 'gemm2'"]
    # g is shared with the side Mul: LN got a copy, the side Mul still reads the original
    side = next(n for n in model.graph if n.name == "side")
    np.testing.assert_array_equal(side.inputs[1].const_value.numpy(), inits["g"])
    ln = next(n for n in model.graph if n.name == "ln")
    assert ln.inputs[1] is not side.inputs[1]
    # W1 is scaled on both axes (rows by group 'a', columns by group 'r'), W2 likewise
    for name in ("W1", "W2", "c1", "c2", "b3", "W3"):
        assert not np.array_equal(model.graph.initializers[name].const_value.numpy(), inits[name]), name
    feed = {"x": _f32(2, 5, 8, scale=3.0)}
    _assert_close(run_checked(model, feed, tmp_path, "s"), run_checked(original, feed, tmp_path, "o"))


def test_exclude_leaves_every_group_touching_the_node_alone():
    model, inits = chain()
    report = _smooth(model, _calib("x", (2, 5, 8), n=2), exclude=["gemm1"])
    assert [g["input"] for g in report.details["groups_smoothed"]] == ["y4"]
    left = dict(report.left_alone)
    assert len(left) == 2 and all("exclude= matches Gemm 'gemm1'" in why for why in left.values())
    np.testing.assert_array_equal(model.graph.initializers["W1"].const_value.numpy(), inits["W1"])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("options, message", [
    ({"alpha": 1.5}, r"alpha=1.5 is out of range; use a value in \[0, 1\]"),
    ({"alpha": -0.1}, "out of range"),
    ({"calibration_batches": 0}, "calibration_batches must be >= 1"),
])
def test_bad_options(options, message):
    with pytest.raises(PassConfigError, match=message):
        SmoothQuant(**options)


def test_bad_option_in_a_pipeline_fails_before_loading():
    with pytest.raises(PassConfigError, match="alpha"):
        slimc.compile("does-not-exist.onnx", "smoothquant(alpha=1.5),cleanup")


def test_no_calibration_is_a_data_error():
    model, _ = ln_matmul()
    with pytest.raises(DataError, match="--calib"):
        SmoothQuant().apply(model, PassContext())


def test_refuses_a_quantized_model():
    model = _model(
        [helper.make_node("QuantizeLinear", ["x", "sc"], ["q"]), helper.make_node("DequantizeLinear", ["q", "sc"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], {"sc": np.array(0.1, np.float32)},
    )
    with pytest.raises(PassConfigError, match="already quantized"):
        SmoothQuant().apply(model, PassContext(calibration=_calib("x", (2,))))
