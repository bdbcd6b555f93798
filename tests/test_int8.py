"""`int8`: structure (QDQ / dynamic nodes where expected, exclusions float, full checker, runs in
ORT), fidelity bounds on the random-weight zoo, the accuracy budget, the latency guard, and
bad input. Latency on these tiny models is meaningless, so tests that are not about the guard
pass ``force=true`` (the guard still measures and reports)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from onnx_models import run_checked, sqnr_db, tiny_cnn

import slimc
from slimc import data
from slimc.backends.onnxruntime import create_session, run
from slimc.errors import DataError, PassConfigError
from slimc.onnx_io import copy_model
from slimc.passes.quant.common import LatencyGuardError, weighted_ops
from slimc.passes.quant.int8 import Int8
from slimc.pipeline import PassContext



def _ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)






def _ctx(z, n_batches: int = 4, seed: int = 0) -> PassContext:
    return PassContext(loaded=z.loaded, calibration=data.synthetic(z.loaded.inputs, n_batches=n_batches, seed=seed))


def _eval_feed(z, seed: int = 99) -> dict[str, np.ndarray]:
    return data.synthetic(z.loaded.inputs, n_batches=1, seed=seed)[0]


# SQNR (dB) of the main output on held-out synthetic inputs, random weights; measured values in
# comments, bounds with a margin.
FIDELITY = {
    ("bert", "static"): 30.0,    # measured 37.3
    ("bert", "dynamic"): 50.0,   # 58.0
    ("llama", "dynamic"): 18.0,  # 23.2
    ("resnet", "static"): 34.0,  # 41.4
}


@pytest.mark.parametrize("name,mode", sorted(FIDELITY))
def test_structure_and_fidelity_on_the_zoo(zoo_model, name, mode, tmp_path):
    z = zoo_model(name)
    model = copy_model(z.loaded.model)
    weighted = {w.node.name for w in weighted_ops(model)}
    report = Int8(mode=mode, force=True).apply(model, _ctx(z))
    ops = _ops(model)
    if mode == "dynamic":
        assert ops["MatMulInteger"] == sum(1 for w in weighted_ops(z.loaded.model) if w.node.op_type in ("MatMul", "Gemm"))
        assert ops["Conv"] == _ops(z.loaded.model)["Conv"]  # dynamic never touches Conv
    else:
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
        # every weighted node now reads a dequantized weight
        producer = {o.name: n.op_type for n in model.graph for o in n.outputs}
        for node in model.graph:
            if node.name in weighted:
                assert producer.get(node.inputs[1].name) == "DequantizeLinear", node.name
    assert report.details["chosen"] == mode
    assert "guard" in report.details and report.details["guard"]["speedup"] > 0
    feed = _eval_feed(z)
    want = run(create_session(_save(z.loaded.model, tmp_path / "f.onnx")), feed)
    got = run_checked(model, feed, tmp_path, "q")
    assert sqnr_db(want[0], got[0]) > FIDELITY[(name, mode)]


def _save(model: ir.Model, path):
    ir.save(model, path)
    return path


def test_attention_matmuls_and_excluded_nodes_stay_float(zoo_model):
    z = zoo_model("bert")
    model = copy_model(z.loaded.model)
    report = Int8(mode="static", force=True, exclude=["*intermediate*", "*pooler*"]).apply(model, _ctx(z))
    excluded = [what for what, why in report.left_alone if "excluded" in why]
    assert excluded and all("intermediate" in w or "pooler" in w for w in excluded)
    producer = {o.name: n.op_type for n in model.graph for o in n.outputs}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm"):
            from_dq = producer.get(node.inputs[1].name) == "DequantizeLinear"
            path = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
            if "intermediate" in path or "pooler" in path:
                assert not from_dq, node.name
    attention = [w for w, why in report.left_alone if "attention" in w]
    assert attention, report.left_alone


def test_auto_keeps_the_fastest_accurate_enough_candidate(zoo_model):
    z = zoo_model("vit")  # Conv patch embedding + MatMuls (the tiny config's conv is a large share)
    model = copy_model(z.loaded.model)
    report = Int8(force=True).apply(model, _ctx(z))
    cands = {c["name"]: c for c in report.details["candidates"]}
    assert {"static", "dynamic"} <= set(cands)
    loss = {n: c["loss"] for n, c in cands.items()}  # the unrounded loss the pass chose by
    eligible = [n for n in cands if loss[n] <= max(2 * min(loss.values()), 1e-3)]
    chosen = report.details["chosen"]
    assert chosen in eligible
    # The pass's own rule on its own measurements; the report rounds speed-ups to 3 decimals.
    assert cands[chosen]["speedup"] >= 0.95 * max(cands[n]["speedup"] for n in eligible) - 2e-3


def test_auto_candidates_follow_where_the_weights_are():
    kinds = {"Conv", "MatMul"}
    names = lambda share, data=True: [c.name for c in Int8()._candidates(kinds, share, data)[0]]  # noqa: E731
    assert names(0.05) == ["static"]  # a CNN: dynamic would quantize only the classifier
    assert names(0.5) == ["static", "static Conv + dynamic MatMul", "dynamic"]
    assert names(0.95) == ["static", "dynamic"]  # a transformer with a conv stem
    assert names(0.95, data=False) == ["dynamic"]
    with pytest.raises(DataError, match="Conv"):
        names(0.05, data=False)
    assert [c.name for c in Int8(mode="dynamic")._candidates(kinds, 0.05, True)[0]] == ["dynamic"]


def test_auto_without_calibration_tries_dynamic_only(zoo_model):
    z = zoo_model("bert")
    model = copy_model(z.loaded.model)
    report = Int8(force=True).apply(model, PassContext(loaded=z.loaded))
    assert [c["name"] for c in report.details["candidates"]] == ["dynamic"]
    assert any("calibration" in n for n in report.details["notes"])


def test_accuracy_budget_keeps_the_most_sensitive_nodes_float(zoo_model, tmp_path):
    z = zoo_model("bert")
    full = copy_model(z.loaded.model)
    ctx = _ctx(z, n_batches=6)
    base = Int8(mode="static", force=True, max_loss={"sqnr": 0.0}).apply(full, ctx)
    full_sqnr = base.details["budget"]["full"]["sqnr_db"]
    assert base.details["budget"]["kept_float"] == 0
    target = full_sqnr + 6.0  # a quarter of the noise power
    model = copy_model(z.loaded.model)
    report = Int8(mode="static", force=True, max_loss={"sqnr": target}).apply(model, ctx)
    budget = report.details["budget"]
    assert 0 < budget["kept_float"] < budget["of"]
    assert budget["result"]["sqnr_db"] >= target
    kept = [w for w, why in report.left_alone if "accuracy budget" in why]
    assert len(kept) == budget["kept_float"]


def test_impossible_budget_is_a_clear_error(tmp_path):
    model = ir.serde.deserialize_model(tiny_cnn(junk=False))
    feed = [{"x": np.random.default_rng(i).standard_normal((2, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    ctx = PassContext(calibration=data.Dataset(feed, "test"))
    with pytest.raises(PassConfigError, match="cannot be met"):
        Int8(mode="static", force=True, max_loss={"sqnr": 200.0}).apply(model, ctx)


def test_latency_guard_refuses_and_leaves_the_model_alone(zoo_model):
    z = zoo_model("bert")
    model = copy_model(z.loaded.model)
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(LatencyGuardError, match="slower|Refused"):
        Int8(mode="dynamic", min_speedup=100.0).apply(model, _ctx(z))
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_prune_then_int8_pipeline(zoo_model):
    z = zoo_model("llama")
    calib = data.synthetic(z.loaded.inputs, n_batches=3, seed=0)
    result = slimc.compile(z.loaded, ["prune(ratio=0.5, target=ffn)", "int8(force=true)"], calibration=calib,
                           measure_latency=False)
    ops = Counter(n.op_type for n in result.model.graph)
    assert ops["MatMulInteger"] + ops["DequantizeLinear"] > 0
    assert [p.name for p in result.receipt.passes] == ["prune", "int8"]


def test_bad_input_is_a_clear_error(zoo_model):
    z = zoo_model("bert")
    with pytest.raises(PassConfigError, match="percentile"):
        Int8(percentile=0)
    with pytest.raises(PassConfigError, match="unknown metric"):
        Int8(max_loss={"accuracy": 0.9})
    with pytest.raises(PassConfigError, match="mode"):
        slimc.compile(z.loaded, "int8(mode=fast)")
    # static ranges need data; an empty set is refused
    with pytest.raises(DataError, match="calibration"):
        Int8(mode="static").apply(copy_model(z.loaded.model), PassContext(loaded=z.loaded))
    with pytest.raises(DataError):
        slimc.compile(z.loaded, "int8(mode=static)", calibration=[])
    # wrong shape / dtype
    bad = [{"input_ids": np.zeros((2, 16, 3), np.int64), "attention_mask": np.ones((2, 16), np.int64),
            "token_type_ids": np.zeros((2, 16), np.int64)}]
    with pytest.raises(DataError):
        slimc.compile(z.loaded, "int8(mode=static)", calibration=bad)
    bad = [{"input_ids": np.zeros((2, 16), np.float32) + 0.5, "attention_mask": np.ones((2, 16), np.int64),
            "token_type_ids": np.zeros((2, 16), np.int64)}]
    with pytest.raises(DataError):
        slimc.compile(z.loaded, "int8(mode=static)", calibration=bad)


def test_an_already_quantized_model_is_refused(zoo_model):
    z = zoo_model("bert")
    model = copy_model(z.loaded.model)
    Int8(mode="dynamic", force=True).apply(model, _ctx(z))
    with pytest.raises(PassConfigError, match="already quantized"):
        Int8(force=True).apply(model, _ctx(z))


def test_threads_reach_the_latency_guard(zoo_model):
    """compile(threads=N) / --threads N: the guard times with N intra-op threads, as the receipt does."""
    z = zoo_model("resnet")
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=0)
    result = slimc.compile(z.loaded, "int8(mode=static, force=true)", calibration=calib, threads=1, measure_latency=False)
    (report,) = result.receipt.passes
    assert "1 intra-op threads" in report.details["guard"]["machine"]


def test_gemm_is_never_left_to_dynamic_int8():
    """ORT's dynamic quantizer has no integer Gemm: a Gemm planned as dynamic silently stayed float."""
    kinds = {"Conv", "MatMul", "Gemm"}
    mixed, = [c for c in Int8()._candidates(kinds, 0.3, True)[0] if c.dynamic and c.static]
    assert mixed.static == ("Conv", "Gemm") and mixed.dynamic == ("MatMul",)
    (dynamic,) = Int8(mode="dynamic")._candidates(kinds, 0.9, True)[0]
    assert dynamic.dynamic == ("MatMul",)
    assert Int8(mode="dynamic")._candidates({"Gemm"}, 1.0, True)[0] == []  # nothing dynamic int8 can quantize
