"""`fuse`'s `pack` rewrite: projections of one activation (q/k/v, gate/up) as one MatMul / MatMulNBits
and a Split — exact on hand-built graphs, the conditions that keep nodes apart, and end to end on
the zoo llama after int4 (verified by the pipeline)."""

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
from slimc.onnx_io import copy_model
from slimc.passes.fuse.fuse_pass import Fuse
from slimc.pipeline import PassContext

F = TensorProto.FLOAT


def _projections(widths, k=32, opset=18, other_k=None):
    """x [b, s, k] -> one MatMul per width (and one on another input of K ``other_k``), each to a graph output."""
    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i, n in enumerate(widths):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", F, ["b", "s", n]))
    inputs = [helper.make_tensor_value_info("x", F, ["b", "s", k])]
    if other_k:
        inits.append(numpy_helper.from_array(rng.standard_normal((other_k, 8)).astype(np.float32), "wz"))
        nodes.append(helper.make_node("MatMul", ["z", "wz"], ["yz"], name="other"))
        inputs.append(helper.make_tensor_value_info("z", F, ["b", "s", other_k]))
        outputs.append(helper.make_tensor_value_info("yz", F, ["b", "s", 8]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, feed):
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _apply(proto, **options):
    loaded = frontends.load(proto)
    model = copy_model(loaded.model)
    return loaded, model, Fuse(**options).apply(model, PassContext(loaded=loaded))


@pytest.mark.parametrize("opset", [11, 18])
def test_matmuls_of_one_input_pack_exactly(opset):
    proto = _projections([24, 8, 8], opset=opset, other_k=16)
    loaded, model, report = _apply(proto, patterns=["pack"])
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops == {"MatMul": 2, "Split": 1}  # q/k/v packed; the MatMul on z has no partner and stays
    assert report.details["fused"] == {"packed MatMul": 1}
    assert [o.name for o in model.graph.outputs] == ["y0", "y1", "y2", "yz"]
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((2, 5, 32)).astype(np.float32), "z": rng.standard_normal((2, 5, 16)).astype(np.float32)}
    for ref, got in zip(_run(proto, feed), _run(model, feed), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # the three original weights are gone: one packed copy is kept
    assert sum(1 for name in model.graph.initializers if name in ("w0", "w1", "w2")) == 0


def test_single_projection_and_non_constant_weight_are_left():
    proto = _projections([8], other_k=16)
    _, model, report = _apply(proto, patterns=["pack"])
    assert not report.modified and "Split" not in {n.op_type for n in model.graph}
    # a weight that is a graph input cannot be concatenated at compile time
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["x", "w"], ["c"])], "g",
        [helper.make_tensor_value_info("x", F, [2, 4]), helper.make_tensor_value_info("w", F, [4, 4])],
        [helper.make_tensor_value_info("a", F, [2, 4]), helper.make_tensor_value_info("c", F, [2, 4])])
    _, model, report = _apply(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), patterns=["pack"])
    assert not report.modified


def test_int4_projections_pack_to_one_matmulnbits(tmp_path):
    """q/k/v-like projections after int4 (one of a different block size stays apart), exact at accuracy_level=0."""
    proto = _projections([64, 32, 32], k=64)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    result = slimc.compile(str(path), passes="int4(force=true, accuracy_level=0)", verify=False)
    quantized = result.model
    nbits = [n for n in quantized.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3
    loaded, model, report = _apply(ir.serde.serialize_model(quantized), patterns=["pack"])
    packed = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(packed) == 1 and packed[0].attributes["N"].value == 128
    assert report.details["fused"] == {"packed MatMulNBits": 1}
    feed = {"x": np.random.default_rng(2).standard_normal((1, 3, 64)).astype(np.float32)}
    for ref, got in zip(_run(quantized, feed), _run(model, feed), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_different_block_sizes_do_not_pack(tmp_path):
    proto = _projections([32, 32], k=64)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    a = slimc.compile(str(path), passes="int4(force=true, block_size=32, exclude=[proj1])", verify=False).model
    b = slimc.compile(str(path), passes="int4(force=true, block_size=64, exclude=[proj0])", verify=False).model
    # graft proj1 quantized with block 64 next to proj0 with block 32
    (n1,) = [n for n in b.graph if n.op_type == "MatMulNBits"]
    proto_a = ir.serde.serialize_model(a)
    proto_b = ir.serde.serialize_model(b)
    keep = [n for n in proto_a.graph.node if n.name != "proj1"] + [n for n in proto_b.graph.node if n.name == n1.name]
    del proto_a.graph.node[:]
    proto_a.graph.node.extend(keep)
    names = {i for n in keep for i in n.input}
    inits = {t.name: t for t in list(proto_a.graph.initializer) + list(proto_b.graph.initializer) if t.name in names}
    del proto_a.graph.initializer[:]
    proto_a.graph.initializer.extend(inits.values())
    _, model, report = _apply(proto_a, patterns=["pack"])
    assert not report.modified
    assert sum(1 for n in model.graph if n.op_type == "MatMulNBits") == 2


def test_zoo_llama_int4_fuse_packs_qkv_and_gate_up(zoo_model):
    z = zoo_model("llama")
    base = slimc.compile(z.loaded, passes="int4(force=true),fuse(patterns=[rmsnorm, skip_rmsnorm, rotary, gqa])")
    result = slimc.compile(z.loaded, passes="int4(force=true),fuse")
    (report,) = [r for r in result.receipt.passes if r.name == "fuse"]
    layers = 2
    assert report.details["fused"]["packed MatMulNBits"] == 2 * layers  # q/k/v and gate/up per block
    count = lambda m: sum(1 for n in m.graph if n.op_type == "MatMulNBits")  # noqa: E731
    assert count(result.model) == count(base.model) - 3 * layers  # 5 projections -> 2 per block
