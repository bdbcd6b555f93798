"""`int4(embedding=true)`: embedding tables to GatherBlockQuantized, sharing a tied lm_head's
4-bit weight (no float copy left), untied tables quantized on their own, what is left alone, and
end to end through `slimc.compile` (verified in ONNX Runtime) on the zoo llama."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimc
from slimc import data, frontends
from slimc.onnx_io import copy_model
from slimc.passes.quant import gptq
from slimc.passes.quant.int4 import Int4
from slimc.pipeline import PassContext


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _lm(vocab: int, hidden: int, *, tied: bool, seed: int = 0):
    """ids -> Gather(emb) -> MatMul(w) -> lm_head (Transpose(emb) when tied, else its own weight); the
    embedding output ``h`` is also a graph output so the lookup can be checked on its own."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((vocab, hidden)).astype(np.float32)
    w = rng.standard_normal((hidden, hidden)).astype(np.float32)
    inits = [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "w")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "w"], ["h2"], name="proj")]
    if tied:
        nodes += [helper.make_node("Transpose", ["emb"], ["emb_t"], name="tie", perm=[1, 0]),
                  helper.make_node("MatMul", ["h2", "emb_t"], ["logits"], name="lm_head")]
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(np.float32), "head"))
        nodes.append(helper.make_node("MatMul", ["h2", "head"], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", hidden])], inits)
    return frontends.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), emb


def _run(loaded, **options):
    model = copy_model(loaded.model)
    calib = data.synthetic(loaded.inputs, n_batches=1, seed=0)
    report = Int4(force=True, **options).apply(model, PassContext(loaded=loaded, calibration=calib))
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    return model, report


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("hidden", [64, 80])  # 80: not a whole number of blocks, the padding is sliced off
def test_tied_embedding_shares_the_lm_head_weight(symmetric, hidden):
    loaded, emb = _lm(96, hidden, tied=True)
    model, report = _run(loaded, embedding=True, symmetric=symmetric)
    (gbq,) = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    (head,) = [n for n in model.graph if n.name == "lm_head"]
    assert head.op_type == "MatMulNBits" and gbq.domain == "com.microsoft"
    reshape = gbq.inputs[0].producer()
    assert reshape.op_type == "Reshape" and reshape.inputs[0] is head.inputs[1]  # one stored 4-bit table
    assert list(gbq.inputs[2:]) == list(head.inputs[2:])  # same scales (and zero points)
    assert "emb" not in model.graph.initializers and not report.details["float_copies_kept"]
    assert not [n for n in model.graph if n.op_type in ("Gather", "Transpose")]
    (table,) = report.details["embedding_tables"]
    assert table["shared_with"] and table["int4_bytes"] == 0 and table["float_dropped"]
    assert "sharing the tied lm_head" in report.summary
    ids = np.array([[0, 5, 95], [7, 7, 1]], np.int64)
    h = _session(model).run(["h"], {"ids": ids})[0]
    deq = gptq.rtn(emb.T, 32, symmetric).dequantize()  # [hidden, vocab], the lm_head's own grid
    np.testing.assert_array_equal(h, deq.T[ids])


def test_untied_embedding_is_quantized_on_its_own():
    loaded, emb = _lm(50, 64, tied=False)
    model, report = _run(loaded, embedding=True)
    (gbq,) = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    table = gbq.inputs[0].const_value
    assert table.dtype == ir.DataType.UINT8 and tuple(table.shape) == (50, 32)
    assert "emb" not in model.graph.initializers
    (entry,) = report.details["embedding_tables"]
    assert entry["shared_with"] is None and entry["int4_bytes"] == 50 * 32 + 50 * 2 * 4
    ids = np.array([[3, 49]], np.int64)
    h = _session(model).run(["h"], {"ids": ids})[0]
    np.testing.assert_array_equal(h, gptq.rtn(emb.T, 32).dequantize().T[ids])


def test_default_keeps_the_float_table_and_says_how_to_drop_it():
    loaded, _ = _lm(96, 64, tied=True)
    model, report = _run(loaded)
    assert "emb" in model.graph.initializers and report.details["float_copies_kept"] == ["emb"]
    assert "embedding=true" in report.summary and not report.details["embedding_tables"]


def test_tables_left_alone_with_reasons():
    emb = numpy_helper.from_array(np.ones((40, 64), np.float32), "emb")
    graph = helper.make_graph(  # a Gather of columns is no row lookup
        [helper.make_node("Gather", ["emb", "ids"], ["cols"], name="embed", axis=1)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("cols", TensorProto.FLOAT, [40, "n"])], [emb])
    model, report = _run(frontends.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), embedding=True)
    assert ("embed (Gather)", "Gather along axis 1, not the rows of the table") in report.left_alone
    assert "emb" in model.graph.initializers and not report.modified
    loaded, _ = _lm(40, 16, tied=False)
    _, report = _run(loaded, embedding=True)
    assert any(what == "embed (Gather)" and "smaller than one block" in why for what, why in report.left_alone)
    loaded, _ = _lm(40, 64, tied=False)
    model, report = _run(loaded, embedding=True, exclude=["embed"])
    assert ("embed (Gather)", "matches exclude=") in report.left_alone
    assert not [n for n in model.graph if n.op_type == "GatherBlockQuantized"]


def test_compile_end_to_end_drops_the_float_embedding(zoo_model, tmp_path):
    z = zoo_model("llama")
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=0)
    sizes = {}
    for embedding in (False, True):
        result = slimc.compile(z.loaded, passes=[f"int4(force=true, embedding={str(embedding).lower()})"], calibration=calib)
        (report,) = [r for r in result.receipt.passes if r.name == "int4"]
        result.save(tmp_path / f"e{embedding}.onnx")
        sizes[embedding] = (tmp_path / f"e{embedding}.onnx").stat().st_size
        ops = {n.op_type for n in result.model.graph}
        assert ("GatherBlockQuantized" in ops) == embedding
    tables = report.details["embedding_tables"]
    assert tables and all(t["float_dropped"] for t in tables) and not report.details["float_copies_kept"]
    assert sizes[False] - sizes[True] >= 0.5 * sum(t["float_bytes"] for t in tables)  # a tiny table: node overhead counts
