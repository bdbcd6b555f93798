"""The `fuse` pass: RMSNorm / residual + RMSNorm / rotary rewrites on hand-built graphs (every form
and every unproven condition), the pipeline order rule, non-ORT targets refusing the fused ops,
and end to end on the zoo llama through `slimc.compile` (verified exact in ONNX Runtime)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimc
from slimc import frontends
from slimc.backends import targets
from slimc.errors import PassConfigError
from slimc.onnx_io import copy_model
from slimc.pass_spec import parse_pipeline
from slimc.passes.fuse.fuse_pass import Fuse
from slimc.pipeline import PassContext
from slimc.verify import check_model_file

F = TensorProto.FLOAT
H = 16


def _model(nodes, inputs, outputs, inits, opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _norm(x: str, out: str, form: str = "pow_recip", eps=1e-5, axes=(-1,), exponent=2.0, weight_len=H, tag=""):
    """An exported RMSNorm of ``x`` in one of its forms; returns (nodes, initializers)."""
    t = lambda s: f"{tag}{s}"  # noqa: E731 - unique names per norm
    inits = {t("two"): np.array(exponent, np.float32), t("axes"): np.array(axes, np.int64),
             t("eps"): np.array(eps, np.float32), t("w"): np.linspace(0.5, 1.5, weight_len).astype(np.float32),
             t("one"): np.array(1.0, np.float32)}
    square = (helper.make_node("Mul", [x, x], [t("sq")]) if form == "mul_div1"
              else helper.make_node("Pow", [x, t("two")], [t("sq")]))
    nodes = [square, helper.make_node("ReduceMean", [t("sq"), t("axes")], [t("mean")], keepdims=1),
             helper.make_node("Add", [t("mean"), t("eps")], [t("var")]), helper.make_node("Sqrt", [t("var")], [t("std")])]
    if form == "div_sqrt":
        nodes.append(helper.make_node("Div", [x, t("std")], [t("normed")]))
    else:
        recip = (helper.make_node("Div", [t("one"), t("std")], [t("rstd")]) if form == "mul_div1"
                 else helper.make_node("Reciprocal", [t("std")], [t("rstd")]))
        nodes += [recip, helper.make_node("Mul", [t("rstd"), x], [t("normed")])]
    nodes.append(helper.make_node("Mul", [t("w"), t("normed")], [out]))
    return nodes, inits


def _apply(proto: onnx.ModelProto, **options):
    loaded = frontends.load(proto)
    model = copy_model(loaded.model)
    report = Fuse(**options).apply(model, PassContext(loaded=loaded))
    return loaded, model, report


def _outputs(model, feed):
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def _same(loaded, model, feed, tmp_path):
    for ref, got in zip(_outputs(loaded.model, feed),
                        _outputs(model, feed), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    path = tmp_path / "fused.onnx"
    onnx.save(ir.serde.serialize_model(model), path)
    check_model_file(path, full=True)  # SimplifiedLayerNormalization passes the full checker


@pytest.mark.parametrize("form", ["pow_recip", "mul_div1", "div_sqrt"])
def test_rmsnorm_forms_become_one_op(form, tmp_path):
    nodes, inits = _norm("x", "y", form)
    proto = _model(nodes, [helper.make_tensor_value_info("x", F, ["b", "s", H])],
                   [helper.make_tensor_value_info("y", F, ["b", "s", H])], inits)
    loaded, model, report = _apply(proto)
    assert _ops(model) == {"SimplifiedLayerNormalization": 1}
    (node,) = model.graph
    assert node.attributes["epsilon"].value == pytest.approx(1e-5) and node.attributes["axis"].value == -1
    assert report.details["fused"] == {"SimplifiedLayerNormalization": 1} and not report.left_alone
    assert "eps" not in model.graph.initializers  # orphaned constants go with the nodes
    _same(loaded, model, {"x": np.random.default_rng(0).standard_normal((2, 3, H)).astype(np.float32)}, tmp_path)


def _residual_model(skip_shape):
    nodes, inits = _norm("res", "y")
    nodes.insert(0, helper.make_node("Add", ["a", "b"], ["res"]))
    nodes.append(helper.make_node("Add", ["res", "y"], ["next"]))  # the next residual reads the sum
    return _model(nodes, [helper.make_tensor_value_info("a", F, ["b", "s", H]), helper.make_tensor_value_info("b", F, skip_shape)],
                  [helper.make_tensor_value_info("next", F, ["b", "s", H]), helper.make_tensor_value_info("res", F, ["b", "s", H])],
                  inits)


def test_residual_add_joins_the_norm(tmp_path):
    loaded, model, report = _apply(_residual_model(["b", "s", H]))
    assert _ops(model) == {"SkipSimplifiedLayerNormalization": 1, "Add": 1}
    skip = next(n for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
    assert skip.domain == "com.microsoft" and skip.outputs[3].name == "res"  # the sum keeps its name and readers
    rng = np.random.default_rng(1)
    feed = {k: rng.standard_normal((2, 3, H)).astype(np.float32) for k in ("a", "b")}
    _same(loaded, model, feed, tmp_path)


def test_broadcast_residual_is_not_a_skip(tmp_path):
    """b [H] broadcasts over a: SkipSimplifiedLayerNormalization's skip must have the input's shape."""
    loaded, model, _ = _apply(_residual_model([H]))
    assert _ops(model)["SimplifiedLayerNormalization"] == 1 and "SkipSimplifiedLayerNormalization" not in _ops(model)
    rng = np.random.default_rng(2)
    _same(loaded, model, {"a": rng.standard_normal((2, 3, H)).astype(np.float32),
                          "b": rng.standard_normal(H).astype(np.float32)}, tmp_path)


@pytest.mark.parametrize(("kwargs", "x_shape", "why"), [
    ({"eps": 0.0}, ["b", "s", H], "epsilon is not a positive"),
    ({"axes": (1,)}, ["b", "s", H], "not over the last axis"),
    ({"exponent": 3.0}, ["b", "s", H], "exponent is not the constant 2"),
    ({"weight_len": H // 2}, ["b", "s", H], "not proven equal to the weight's length"),
    ({}, ["b", "s", "h"], "not proven equal to the weight's length"),  # unknown last dim: [h] * [1]-wide would broadcast
])
def test_unproven_norms_are_left_alone(kwargs, x_shape, why):
    nodes, inits = _norm("x", "y", **kwargs)
    proto = _model(nodes, [helper.make_tensor_value_info("x", F, x_shape)], [helper.make_tensor_value_info("y", F, None)], inits)
    _, model, report = _apply(proto)
    assert not report.modified and "ReduceMean" in _ops(model)
    ((what, reason),) = report.left_alone
    assert what.endswith("(ReduceMean)") and why in reason


def test_intermediate_read_elsewhere_is_left_alone():
    nodes, inits = _norm("x", "y")
    proto = _model(nodes, [helper.make_tensor_value_info("x", F, ["b", "s", H])],
                   [helper.make_tensor_value_info("y", F, None), helper.make_tensor_value_info("std", F, None)], inits)
    _, model, report = _apply(proto)
    assert not report.modified and "graph output" in report.left_alone[0][1]


def _rotary_model(half: int, d: int = 8, pos_batch="1"):
    """transformers' apply_rotary_pos_emb on q [b, 2, s, d] with angles from a float position input [1 or b, s, 1]."""
    inits = {"inv_freq": (1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32), "ax1": np.array([1], np.int64),
             "lo": np.array([0], np.int64), "mid": np.array([half], np.int64), "hi": np.array([2**62], np.int64),
             "last": np.array([-1], np.int64)}
    nodes = [helper.make_node("Mul", ["pos", "inv_freq"], ["freqs"]),
             helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
             helper.make_node("Cos", ["emb"], ["cos"]), helper.make_node("Sin", ["emb"], ["sin"]),
             helper.make_node("Unsqueeze", ["cos", "ax1"], ["c"]), helper.make_node("Unsqueeze", ["sin", "ax1"], ["sn"]),
             helper.make_node("Slice", ["q", "lo", "mid", "last"], ["q1"]),
             helper.make_node("Slice", ["q", "mid", "hi", "last"], ["q2"]),
             helper.make_node("Neg", ["q2"], ["nq2"]), helper.make_node("Concat", ["nq2", "q1"], ["rot"], axis=-1),
             helper.make_node("Mul", ["q", "c"], ["qc"]), helper.make_node("Mul", ["rot", "sn"], ["rs"]),
             helper.make_node("Add", ["qc", "rs"], ["out"])]
    return _model(nodes, [helper.make_tensor_value_info("q", F, ["b", 2, "s", d]),
                          helper.make_tensor_value_info("pos", F, [1 if pos_batch == "1" else "b", "s", 1])],
                  [helper.make_tensor_value_info("out", F, ["b", 2, "s", d])], inits)


@pytest.mark.parametrize("pos_batch", ["1", "b"])
def test_rotary_becomes_rotary_embedding(pos_batch, tmp_path):
    """Positions shared by the batch (no-cache export) or per row (a position_ids input, KV-cache export)."""
    loaded, model, report = _apply(_rotary_model(4, pos_batch=pos_batch))
    assert report.details["fused"] == {"RotaryEmbedding": 1}
    assert not {"Neg", "Slice", "Unsqueeze"} & set(_ops(model))
    rng = np.random.default_rng(3)
    pos = np.arange(5, dtype=np.float32) + 7  # an offset: positions 7..11 (a past of 7 tokens)
    pos = pos.reshape(1, 5, 1) if pos_batch == "1" else np.stack([pos, pos + 3]).reshape(2, 5, 1)
    _same(loaded, model, {"q": rng.standard_normal((2, 2, 5, 8)).astype(np.float32), "pos": pos}, tmp_path)


def test_partial_rotary_is_left_alone():
    _, model, report = _apply(_rotary_model(2))
    assert not report.modified and "Neg" in _ops(model)
    assert any("not the half" in why for _, why in report.left_alone)


def test_options_and_pipeline_order():
    with pytest.raises(PassConfigError, match="add rmsnorm"):
        Fuse(patterns=["skip_rmsnorm"])
    with pytest.raises(PassConfigError, match="choose from"):
        parse_pipeline("fuse(patterns=[gelu])")
    for spec in ("fuse,int4", "fuse,prune(ratio=0.2)", "fuse,fp16", "cleanup,fuse,smoothquant,int8"):
        with pytest.raises(PassConfigError, match="comes after 'fuse'.*Put fuse last"):
            parse_pipeline(spec)
    assert [p.name for p in parse_pipeline("int4,fuse,cleanup")] == ["int4", "fuse", "cleanup"]
    _, model, report = _apply(_rotary_model(4), patterns=["rmsnorm"])
    assert not report.modified and "Neg" in _ops(model)


def test_zoo_llama_end_to_end_and_targets(zoo_model):
    z = zoo_model("llama")
    result = slimc.compile(z.loaded, passes="cleanup,fuse")
    (report,) = [r for r in result.receipt.passes if r.name == "fuse"]
    layers = 2
    assert report.details["fused"] == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2 * layers,
                                       "RotaryEmbedding": 2 * layers, "packed MatMul": 2 * layers}  # q/k/v, gate/up
    # without a KV cache there is no past to hand GroupQueryAttention: each attention is left alone, with the reason
    assert [why for _, why in report.left_alone] == ["not a cached attention: expected Concat, found RotaryEmbedding"] * layers
    assert report.details["exactness"] is None
    ops = _ops(result.model)
    assert not {"ReduceMean", "Neg", "Pow"} & set(ops)
    proto = ir.serde.serialize_model(result.model)
    for name in ("openvino", "tflite", "ncnn", "executorch"):
        refused = targets.get(name).unsupported(proto)
        assert {"RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= set(refused), name
    assert not targets.get("onnx").unsupported(proto)


def test_after_int4_checks_itself_at_accuracy_level_0(zoo_model):
    z = zoo_model("llama")
    result = slimc.compile(z.loaded, passes="int4(force=true, embedding=true),fuse")
    (report,) = [r for r in result.receipt.passes if r.name == "fuse"]
    assert report.modified and "exact with MatMulNBits at accuracy_level=0" in report.details["exactness"]
    assert {"GatherBlockQuantized", "MatMulNBits", "RotaryEmbedding"} <= set(_ops(result.model))


def test_kv_cache_graph_with_a_past_matches_unfused(zoo_model):
    """The zoo llama as slimc exports it with a KV cache: fused and unfused agree on logits and presents
    with a non-empty past and per-row position offsets (verification itself feeds an empty past)."""
    from slimc.kvcache import cache_spec

    z = zoo_model("llama")
    spec = cache_spec(z.loaded.model)
    if spec is None:
        pytest.skip("this export has no KV cache")
    _, model, report = _apply_loaded(z.loaded)
    assert report.details["fused"]["RotaryEmbedding"] == 2 * len(spec.layers)
    rng = np.random.default_rng(4)
    batch, seq, past = 2, 3, 4
    feed = {"input_ids": rng.integers(3, 100, (batch, seq)), "attention_mask": np.ones((batch, past + seq), np.int64)}
    if spec.position_ids:
        feed["position_ids"] = np.stack([np.arange(past, past + seq), np.arange(past, past + seq) + 2])
    for layer in spec.layers:
        for name, width in zip(layer.names[:2], (layer.head_dim, layer.value_head_dim), strict=True):
            feed[name] = rng.standard_normal((batch, layer.kv_heads, past, width)).astype(np.float32)
    for ref, got in zip(_outputs(z.loaded.model, feed), _outputs(model, feed), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def _apply_loaded(loaded):
    model = copy_model(loaded.model)
    return loaded, model, Fuse().apply(model, PassContext(loaded=loaded))
