"""The `int4` pass: MatMulNBits packing (checked against ONNX Runtime's own quantizer), GPTQ,
the rewrite of MatMul / Gemm / tied weights, option errors, the latency guard, and end to end on
the zoo llama."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_models import sqnr_db
from onnx import TensorProto, helper, numpy_helper

import slimc
from slimc import data, frontends
from slimc.errors import DataError, PassConfigError
from slimc.onnx_io import copy_model
from slimc.pass_spec import parse_pipeline
from slimc.passes.quant import gptq
from slimc.passes.quant.common import LatencyGuardError
from slimc.passes.quant.int4 import Int4
from slimc.pipeline import PassContext



def _session(model) -> ort.InferenceSession:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _matmul_model(w: np.ndarray, name: str = "w") -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", name], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w, name)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _nbits_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "MatMulNBits"]




# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "n", "block_size"), [(128, 24, 32), (96, 16, 64), (70, 5, 32)])
def test_packer_equals_onnxruntime_quantizer(symmetric, k, n, block_size):
    """Same codes, scales and zero points as ORT's MatMulNBitsQuantizer (RTN), and the same outputs."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    rng = np.random.default_rng(k + n)
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 2.0, size=n)).astype(np.float32)
    w[: block_size // 2, 0] = 0.0  # a half-zero block, and the largest magnitude of another block positive
    w[3, 1] = 5.0
    quantizer = MatMulNBitsQuantizer(_matmul_model(w), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, accuracy_level=None))
    quantizer.process()
    theirs_model = quantizer.model.model
    inits = {t.name: numpy_helper.to_array(t) for t in theirs_model.graph.initializer}
    node = next(n for n in theirs_model.graph.node if n.op_type == "MatMulNBits")
    b, scales = inits[node.input[1]], inits[node.input[2]]

    ours = gptq.pack(gptq.rtn(w, block_size, symmetric))
    assert ours.b.shape == b.shape and ours.scales.shape == scales.shape
    valid = k // 2  # ORT leaves the padding past K zero; ours pads with the zero point (both unread)
    np.testing.assert_array_equal(ours.b.reshape(n, -1)[:, :valid], b.reshape(n, -1)[:, :valid])
    np.testing.assert_array_equal(ours.scales, scales)
    if symmetric:
        assert ours.zero_points is None and len(node.input) == 3
    else:
        np.testing.assert_array_equal(ours.zero_points, inits[node.input[3]])

    # our pass on the same model gives the same MatMulNBits computation
    mine = ir.serde.deserialize_model(_matmul_model(w))
    Int4(block_size=block_size, symmetric=symmetric, accuracy_level=0, force=True).apply(mine, PassContext())
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_array_equal(_session(mine).run(None, {"x": x})[0], _session(theirs_model).run(None, {"x": x})[0])


@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_round_trip(symmetric):
    rng = np.random.default_rng(1)
    for block_size in (32, 64, 128):
        k = 3 * block_size + 5  # odd K: a padded last block
        w = rng.standard_normal((k, 9)).astype(np.float32) * rng.uniform(0.1, 10, size=(1, 9)).astype(np.float32)
        q = gptq.rtn(w, block_size, symmetric)
        packed = gptq.pack(q)
        assert packed.b.shape == (9, 4, block_size // 2)
        deq = gptq.unpack(packed, k, block_size)
        np.testing.assert_array_equal(deq, q.dequantize())
        # rounding moves a weight by at most half a step, except at the edge the grid clips (ORT's
        # symmetric grid reaches 7 steps on the side opposite the largest magnitude, which needs 8)
        step = np.repeat(np.abs(q.scales), block_size, axis=1)[:, :k].T
        err = np.abs(w - deq)
        assert np.all(err <= step * (1 + 1e-5)) and np.mean(err <= step * (0.5 + 1e-5)) > 0.97
        # the padding dequantizes to exactly zero, and codes survive pack / unpack
        full = gptq.dequantize(q.codes, q.scales, q.zero_points, block_size)
        assert np.all(full[:, k:] == 0)
        np.testing.assert_array_equal(gptq.unpack_nibbles(packed.b, block_size).reshape(9, -1), q.codes)


def test_round_half_away_from_zero():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 7.5, 2.4], np.float32)
    np.testing.assert_array_equal(gptq.round_half_away(x), [1, 2, 3, -1, -3, 0, 8, 2])


def test_odd_k_model_runs_and_matches_its_dequantized_weight():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((70, 12)).astype(np.float32)
    model = ir.serde.deserialize_model(_matmul_model(w))
    report = Int4(accuracy_level=0, force=True).apply(model, PassContext())
    (node,) = _nbits_nodes(model)
    assert node.attributes["K"].value == 70 and node.attributes["N"].value == 12
    assert report.details["quantized_nodes"] == 1
    b = model.graph.initializers[node.inputs[1].name].const_value.numpy()
    s = model.graph.initializers[node.inputs[2].name].const_value.numpy()
    assert b.shape == (12, 3, 16)
    deq = gptq.unpack(gptq.Packed(b, s, None), 70, 32)
    x = rng.standard_normal((4, 70)).astype(np.float32)
    np.testing.assert_allclose(_session(model).run(None, {"x": x})[0], x @ deq, rtol=1e-4, atol=1e-4)


def test_chained_matmuls_with_gptq():
    """A MatMul reading another's output: each rewrite reconnects to the value the previous one made."""
    rng = np.random.default_rng(8)
    w0, w1 = rng.standard_normal((64, 96)).astype(np.float32), rng.standard_normal((96, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"), helper.make_node("MatMul", ["h", "w1"], ["y"], name="mm1")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")],
    )
    loaded = frontends.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    calib = data.Dataset([{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(4)], "random")
    model = copy_model(loaded.model)
    report = Int4(method="gptq", accuracy_level=0, force=True).apply(model, PassContext(loaded=loaded, calibration=calib))
    assert [n.op_type for n in model.graph] == ["MatMulNBits", "MatMulNBits"]
    assert [v.name for v in model.graph.outputs] == ["y"] and set(model.graph.initializers) == {"w0_Q4", "w0_scales", "w1_Q4", "w1_scales"}
    assert report.details["guard"]["speedup"] > 0
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    x = calib[0]["x"]
    ref = _session(loaded.model).run(None, {"x": x})[0]
    assert sqnr_db(ref, _session(model).run(None, {"x": x})[0]) > 15


def test_float16_weights_get_float16_scales():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 8)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 8])],
        [numpy_helper.from_array(w, "w")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    Int4(force=True).apply(model, PassContext())
    (node,) = _nbits_nodes(model)
    assert node.inputs[2].const_value.dtype == ir.DataType.FLOAT16
    x = rng.standard_normal((2, 64)).astype(np.float16)
    deq = gptq.rtn(w.astype(np.float32), 32).dequantize()
    np.testing.assert_allclose(_session(model).run(None, {"x": x})[0], x.astype(np.float32) @ deq, rtol=0.05, atol=0.1)


# ---------------------------------------------------------------- GPTQ


def test_inverse_cholesky_upper():
    rng = np.random.default_rng(6)
    for n in (7, 300):  # 300: the triangular inverse recurses
        a = rng.standard_normal((n + 5, n))
        h = a.T @ a + 0.1 * np.eye(n)
        u = gptq.inverse_cholesky_upper(h)
        np.testing.assert_array_equal(u, np.triu(u))
        np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-8, atol=1e-10)


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(3)
    k, n, rows = 256, 64, 2048
    x = rng.standard_normal((rows, k)) @ rng.standard_normal((k, k)) / np.sqrt(k)  # correlated input dims
    x[:, 5] = 0.0  # a dead input
    w = rng.standard_normal((k, n)).astype(np.float32)
    h = gptq.hessian(x.T @ x, rows)
    for symmetric in (True, False):
        for block_size in (32, 128):
            q, info = gptq.gptq(w, h, block_size, symmetric, damp=0.01)
            assert info.dead_inputs == 1
            deq_g, deq_r = q.dequantize(), gptq.rtn(w, block_size, symmetric).dequantize()
            assert np.all(deq_g[5] == 0)
            err_g, err_r = gptq.output_error(w, deq_g, h), gptq.output_error(w, deq_r, h)
            assert err_g < 0.8 * err_r, (symmetric, block_size, err_g, err_r)
            # the statistics' estimate is the actual output error on the calibration rows
            actual = np.sum((x @ (w - deq_g)) ** 2) / np.sum((x @ w) ** 2)
            assert err_g == pytest.approx(actual, rel=1e-6)
            # GPTQ's codes are on the same grid the packer stores
            np.testing.assert_array_equal(gptq.unpack(gptq.pack(q), k, block_size), deq_g)


# ---------------------------------------------------------------- options and refusals


@pytest.mark.parametrize(("spec", "words"), [
    ("int4(block_size=48)", "use 32, 64 or 128"),
    ("int4(accuracy_level=7)", "0..4"),
    ("int4(method=foo)", "method"),
    ("int4(calibration_batches=0)", "calibration_batches"),
    ("int4(latency_seq=0)", "latency_seq"),
])
def test_bad_options(spec, words):
    with pytest.raises(PassConfigError, match=words):
        parse_pipeline(spec)


def test_bad_options_direct():
    with pytest.raises(PassConfigError, match="method=rtn"):
        Int4(method="foo")
    with pytest.raises(PassConfigError, match="block_size"):
        Int4(block_size=16)
    (p,) = parse_pipeline("int4(method=gptq, block_size=64, exclude=[lm_head*], force=true)")
    assert (p.method, p.block_size, p.exclude, p.force) == ("gptq", 64, ["lm_head*"], True)


def test_gptq_without_calibration_and_quantized_models_are_refused():
    model = ir.serde.deserialize_model(_matmul_model(np.ones((64, 8), np.float32)))
    with pytest.raises(DataError, match="calibration"):
        Int4(method="gptq").apply(model, PassContext())
    Int4(force=True).apply(model, PassContext())
    assert _nbits_nodes(model)
    with pytest.raises(PassConfigError, match="already quantized"):
        Int4(force=True).apply(model, PassContext())


# ---------------------------------------------------------------- graph forms


def test_gemm_trans_b_alpha_beta_bias():
    rng = np.random.default_rng(4)
    k, n = 64, 10
    wt = rng.standard_normal((n, k)).astype(np.float32)  # transB=1: stored [N, K]
    c = rng.standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "wt", "c"], ["y"], name="fc", transB=1, alpha=0.5, beta=2.0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(wt, "wt"), numpy_helper.from_array(c, "c")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    Int4(accuracy_level=0, force=True).apply(model, PassContext())
    ops = [node.op_type for node in model.graph]
    assert ops == ["MatMulNBits", "Add"] and model.graph.outputs[0].name == "y"
    assert set(model.graph.initializers) == {"wt_Q4", "wt_scales", "c_beta"}
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    deq = gptq.rtn(0.5 * wt.T, 32, True).dequantize()
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(_session(model).run(None, {"x": x})[0], x @ deq + 2 * c, rtol=1e-4, atol=1e-4)


def test_left_alone_with_reasons_and_transpose_into_trans_b():
    rng = np.random.default_rng(9)
    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w_t = f32(64, 8)
    nodes = [
        helper.make_node("MatMul", ["x", "small"], ["a"], name="k_too_small"),  # K=16
        helper.make_node("MatMul", ["x3", "batched"], ["b"], name="batched"),  # 3-D weight
        helper.make_node("Gemm", ["xt", "w_ta"], ["c"], name="trans_a", transA=1),
        helper.make_node("Transpose", ["w_t"], ["w_tt"], perm=[1, 0]),
        helper.make_node("Gemm", ["x64", "w_tt"], ["d"], name="double_transpose", transB=1),  # weight = w_t
        helper.make_node("MatMul", ["x64", "w_skip"], ["e"], name="skipped"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16]), helper.make_tensor_value_info("x3", TensorProto.FLOAT, [2, 3, 64]),
         helper.make_tensor_value_info("xt", TensorProto.FLOAT, [64, 2]), helper.make_tensor_value_info("x64", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in "abcde"],
        [numpy_helper.from_array(a, name) for name, a in [
            ("small", f32(16, 8)), ("batched", f32(2, 64, 8)), ("w_ta", f32(64, 8)), ("w_t", w_t), ("w_skip", f32(64, 8))]],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    report = Int4(exclude=["w_sk*"], accuracy_level=0, force=True).apply(model, PassContext())
    why = dict(report.left_alone)
    assert "smaller than one block" in why["k_too_small (MatMul)"]
    assert "2-D" in why["batched (MatMul)"]
    assert "transA" in why["trans_a (Gemm)"]
    assert why["skipped (MatMul)"] == "matches exclude="
    (node,) = _nbits_nodes(model)
    assert node.name == "double_transpose" and "w_t" not in model.graph.initializers
    x = f32(2, 64)
    deq = gptq.rtn(w_t, 32).dequantize()  # Transpose then transB=1: the Gemm multiplies by w_t itself
    out = _session(model).run(["d"], {"x": f32(2, 16), "x3": f32(2, 3, 64), "xt": f32(64, 2), "x64": x})[0]
    np.testing.assert_allclose(out, x @ deq, rtol=1e-4, atol=1e-4)


def test_tied_and_shared_weights_keep_their_floatcopy_model():
    """lm_head tied to the embedding through a Transpose, and a weight another op also reads."""
    rng = np.random.default_rng(5)
    vocab, d = 48, 64
    emb = rng.standard_normal((vocab, d)).astype(np.float32)
    w = rng.standard_normal((d, d)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "w"], ["h2"], name="proj"),
        helper.make_node("ReduceSum", ["w"], ["wsum"], name="uses_w", keepdims=0),
        helper.make_node("Add", ["h2", "wsum"], ["h3"], name="add"),
        helper.make_node("Transpose", ["emb"], ["emb_t"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["h3", "emb_t"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    loaded = frontends.load(proto)
    model = copy_model(loaded.model)
    calib = data.synthetic(loaded.inputs, n_batches=2, seed=0)
    report = Int4(method="gptq", force=True).apply(model, PassContext(loaded=loaded, calibration=calib))
    assert report.details["quantized_nodes"] == 2
    assert sorted(report.details["float_copies_kept"]) == ["emb", "w"]
    assert "file grows" in report.summary
    assert "Transpose" not in {node.op_type for node in model.graph}
    assert {"emb", "w"} <= set(model.graph.initializers)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    feed = calib[1]
    ref = _session(loaded.model).run(None, feed)[0]
    assert sqnr_db(ref, _session(model).run(None, feed)[0]) > 15


# ---------------------------------------------------------------- zoo llama


@pytest.fixture(scope="module")
def llama(zoo_model):
    z = zoo_model("llama")
    return z.loaded, data.synthetic(z.loaded.inputs, n_batches=2, seed=0)


def test_llama_structure_exclusions_and_fidelity(llama):
    loaded, calib = llama
    model = copy_model(loaded.model)
    weighted = [n.name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    report = Int4(exclude=["*linear_14*"], force=True).apply(model, PassContext(loaded=loaded, calibration=calib))
    nbits = _nbits_nodes(model)
    assert len(nbits) == len(weighted) - 1 == report.details["quantized_nodes"]
    for node in nbits:
        attrs = {k: a.value for k, a in node.attributes.items()}
        assert node.domain == "com.microsoft"
        assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
        b, s = node.inputs[1].const_value, node.inputs[2].const_value
        assert b.dtype == ir.DataType.UINT8 and tuple(b.shape) == (attrs["N"], -(-attrs["K"] // 32), 16)
        assert tuple(s.shape) == (attrs["N"], -(-attrs["K"] // 32)) and len(node.inputs) == 3
    lm_head = [n for n in model.graph if n.name == "node_linear_14"]
    assert lm_head and lm_head[0].op_type == "MatMul"
    assert ("node_linear_14 (MatMul)", "matches exclude=") in report.left_alone
    assert any("activation x activation" in why for _, why in report.left_alone)
    assert report.details["weight_bytes_after"] < report.details["weight_bytes_before"] / 5
    assert set(report.details["guard"]) >= {"before_ms", "after_ms", "speedup"}
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    feed = calib[1]
    ref = _session(loaded.model).run(None, feed)[0]
    assert sqnr_db(ref, _session(proto).run(None, feed)[0]) > 15


def test_llama_gptq_reports_errors_below_rtn(llama):
    loaded, calib = llama
    model = copy_model(loaded.model)
    report = Int4(method="gptq", symmetric=False, force=True).apply(model, PassContext(loaded=loaded, calibration=calib))
    layers = report.details["layers"]
    assert len(layers) == report.details["quantized_weights"] == len(_nbits_nodes(model))
    assert all(len(n.inputs) == 4 for n in _nbits_nodes(model))  # asymmetric: zero points
    assert np.mean([x["output_error"] for x in layers]) < np.mean([x["rtn_output_error"] for x in layers])
    feed = calib[1]
    ref = _session(loaded.model).run(None, feed)[0]
    assert sqnr_db(ref, _session(model).run(None, feed)[0]) > 15


def test_latency_guard_refusal_leaves_the_model_untouched(llama):
    loaded, calib = llama
    model = copy_model(loaded.model)
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(LatencyGuardError, match="force=true"):
        Int4(min_speedup=1000).apply(model, PassContext(loaded=loaded, calibration=calib))
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_compile_end_to_end(llama, tmp_path):
    loaded, calib = llama
    result = slimc.compile(loaded, passes=["int4(force=true)"], calibration=calib)
    assert _nbits_nodes(result.model)
    (report,) = [r for r in result.receipt.passes if r.name == "int4"]
    assert report.modified and report.details["quantized_nodes"] == 15
    assert "MatMulNBits" in report.summary
    result.save(tmp_path / "int4.onnx")
    onnx.checker.check_model(str(tmp_path / "int4.onnx"), full_check=True)
    from slimc.onnx_io import save_onnx

    save_onnx(loaded.model, tmp_path / "float.onnx")
    saved = (tmp_path / "float.onnx").stat().st_size - (tmp_path / "int4.onnx").stat().st_size
    assert saved >= 0.9 * (report.details["weight_bytes_before"] - report.details["weight_bytes_after"])
