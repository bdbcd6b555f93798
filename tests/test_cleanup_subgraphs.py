"""`cleanup` keeps every graph output, in the main graph and in If/Loop/Scan bodies (issue 17).

onnx_ir's identity elimination turned a body's ``scan_out = Identity(sum_out)`` (both body
outputs) into the same value twice; ORT then returned garbage (4.2e-42 for 9.0) and only the
exactness check noticed. These models are checked with ``verify=False``, so nothing but the
pass itself keeps them right.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import slimc
from slimc.passes.cleanup import Cleanup
from slimc.pipeline import PassContext

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, opset=16) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def scan_model() -> onnx.ModelProto:
    """test_scan9_sum's body: ``sum_out = Add(sum_in, next)``, ``scan_out = Identity(sum_out)``."""
    body = helper.make_graph(
        [helper.make_node("Add", ["sum_in", "next"], ["sum_out"]),
         helper.make_node("Identity", ["sum_out"], ["scan_out"])],
        "body",
        [helper.make_tensor_value_info("sum_in", F, [2]), helper.make_tensor_value_info("next", F, [2])],
        [helper.make_tensor_value_info("sum_out", F, [2]), helper.make_tensor_value_info("scan_out", F, [2])],
    )
    scan = helper.make_node("Scan", ["initial", "x"], ["y", "z"], num_scan_inputs=1, body=body)
    return _model([scan], [helper.make_tensor_value_info("initial", F, [2]), helper.make_tensor_value_info("x", F, [3, 2])],
                  [helper.make_tensor_value_info("y", F, [2]), helper.make_tensor_value_info("z", F, [3, 2])])


def if_model() -> onnx.ModelProto:
    """Branches whose two outputs are one value and its Identity, one returning an outer value through
    Identity; main-graph outputs ``y`` and ``y2 = Identity(y)``."""
    def branch(op: str, name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["x", "x"], [f"{name}_a"]),
             helper.make_node("Identity", [f"{name}_a"], [f"{name}_b"]),
             helper.make_node("Identity", ["h"], [f"{name}_h"])],
            name, [],
            [helper.make_tensor_value_info(f"{name}_a", F, [3]), helper.make_tensor_value_info(f"{name}_b", F, [3]),
             helper.make_tensor_value_info(f"{name}_h", F, [3])])

    nodes = [helper.make_node("Neg", ["x"], ["h"]),
             helper.make_node("If", ["cond"], ["y", "yb", "yh"], then_branch=branch("Add", "then"),
                              else_branch=branch("Mul", "else")),
             helper.make_node("Identity", ["y"], ["y2"])]
    return _model(nodes, [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("x", F, [3])],
                  [helper.make_tensor_value_info(n, F, [3]) for n in ("y", "yb", "yh", "y2")])


def loop_model() -> onnx.ModelProto:
    """A Loop body whose carried value is also its scan output (through Identity)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "x"], ["acc_out"]),
         helper.make_node("Identity", ["acc_out"], ["each"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", F, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", F, [2]),
         helper.make_tensor_value_info("each", F, [2])],
    )
    loop = helper.make_node("Loop", ["n", "", "init"], ["final", "all"], body=body)
    return _model([loop], [helper.make_tensor_value_info("n", TensorProto.INT64, []), helper.make_tensor_value_info("init", F, [2]),
                           helper.make_tensor_value_info("x", F, [2])],
                  [helper.make_tensor_value_info("final", F, [2]), helper.make_tensor_value_info("all", F, [None, 2])])


CASES = {
    "scan": (scan_model, {"initial": np.array([0, 1], np.float32), "x": np.arange(6, dtype=np.float32).reshape(3, 2)}),
    "if-then": (if_model, {"cond": np.array(True), "x": np.array([1, 2, 3], np.float32)}),
    "if-else": (if_model, {"cond": np.array(False), "x": np.array([1, 2, 3], np.float32)}),
    "loop": (loop_model, {"n": np.array(3, np.int64), "init": np.array([1, 2], np.float32), "x": np.array([0.5, 1], np.float32)}),
}


def _run(model: onnx.ModelProto | ir.Model, feed) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cleanup_keeps_subgraph_outputs_with_verify_off(case, tmp_path):
    build, feed = CASES[case]
    proto = build()
    expected = _run(proto, feed)
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    result = slimc.compile(str(path), passes=["cleanup"], evaluation=[feed], verify=False, measure_latency=False)
    out = tmp_path / "out.onnx"
    result.save(out)
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    assert [o.name for o in saved.graph.output] == [o.name for o in proto.graph.output]
    for got, want in zip(_run(saved, feed), expected, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("build", [scan_model, if_model, loop_model])
def test_every_graph_output_is_a_distinct_value_made_in_its_graph(build):
    model = ir.serde.deserialize_model(build())
    Cleanup().apply(model, PassContext())
    from slimc.passes.cleanup import _graphs

    for graph in _graphs(model):
        outputs = list(graph.outputs)
        assert len({id(v) for v in outputs}) == len(outputs), f"{graph.name}: an output repeated"
        for v in outputs:
            assert v.graph is graph or (v.producer() is not None and v.producer().graph is graph), v.name


def test_identities_that_are_not_outputs_still_go():
    """The guard puts back only what an output needs: a chain of Identities between outputs shrinks."""
    x = helper.make_tensor_value_info("x", F, [2])
    nodes = [helper.make_node("Identity", ["x"], ["t1"]), helper.make_node("Identity", ["t1"], ["t2"]),
             helper.make_node("Relu", ["t2"], ["y"]), helper.make_node("Identity", ["y"], ["z"])]
    model = ir.serde.deserialize_model(_model(nodes, [x], [helper.make_tensor_value_info(n, F, [2]) for n in ("y", "z")]))
    Cleanup().apply(model, PassContext())
    assert [n.op_type for n in model.graph] == ["Relu", "Identity"]
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
