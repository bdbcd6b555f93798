"""`cleanup` removes exactly the planted junk and is numerically exact through ORT."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_models import tiny_cnn

from slimc.passes.cleanup import Cleanup
from slimc.pipeline import PassContext


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_cleanup_counts_and_exactness():
    model = ir.serde.deserialize_model(tiny_cnn(junk=True))
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    before = _run(model, x)
    report = Cleanup().apply(model, PassContext())
    steps = report.details["steps"]
    assert steps["identity elimination"]["nodes_removed"] == 2
    assert steps["common subexpressions"]["nodes_removed"] == 1
    assert steps["constant folding"]["nodes_removed"] == 1
    assert steps["dead code"]["nodes_removed"] == 1  # the Neg nobody reads
    assert report.details["nodes_before"] == 13 and report.details["nodes_after"] == 8
    assert "unused.w" not in model.graph.initializers
    assert report.details["weight_bytes_freed"] >= 16 * 16 * 4
    ops = [n.op_type for n in model.graph]
    assert "Identity" not in ops and "Neg" not in ops and ops.count("Relu") == 1
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6, atol=1e-6)
    assert report.modified


def test_cleanup_on_clean_graph_is_a_no_op():
    model = ir.serde.deserialize_model(tiny_cnn(junk=False))
    report = Cleanup().apply(model, PassContext())
    assert report.details["nodes_before"] == report.details["nodes_after"] == 5
    assert not report.modified


def test_cleanup_runs_as_an_onnx_ir_pass():
    model = ir.serde.deserialize_model(tiny_cnn(junk=True))
    result = ir.passes.PassManager([Cleanup()])(model)
    assert result.modified and len(model.graph) == 8


def test_options_switch_steps_off():
    model = ir.serde.deserialize_model(tiny_cnn(junk=True))
    report = Cleanup(cse=False, fold_constants=False).apply(model, PassContext())
    assert "common subexpressions" not in report.details["steps"]
    assert "constant folding" not in report.details["steps"]
    assert [n.op_type for n in model.graph].count("Relu") == 2
