"""`prune`: the correctness oracle on every prunable group of every zoo model, and the pass.

Oracle (DESIGN.md): for a group whose channels feed only weighted consumers, the pruned model
equals the original with those channels' consumer weights zeroed (plus, with bias
compensation, the same compensated biases), through ONNX Runtime, at a batch size and
sequence length the model was not exported with.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_models import run_checked
from zoo import ZOO, shifted_inputs

import slimc
from slimc import data
from slimc.analysis import count_params
from slimc.backends.onnxruntime import create_session, run
from slimc.calibrate import collect
from slimc.errors import DataError, PassConfigError
from slimc.kvcache import cache_spec
from slimc.onnx_io import copy_model
from slimc.passes.prune import DependencyGraph
from slimc.passes.prune.apply import apply_plan, zero_consumers
from slimc.passes.prune.compensate import compensate
from slimc.passes.prune.importance import stat_requests
from slimc.passes.prune.prune_pass import Prune



def _feed(example) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in shifted_inputs(example).items()}




def _assert_close(got, want) -> None:
    for a, b in zip(got, want):
        if a.dtype.kind == "f":
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(np.abs(b).max())), rtol=1e-4)


def _random_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.ones(size, bool)
    mask[rng.choice(size, max(1, size // 2), replace=False)] = False
    return mask


@pytest.mark.parametrize("name", sorted(ZOO))
def test_oracle_on_every_prunable_group(zoo_model, name, tmp_path):
    z = zoo_model(name)
    feed = _feed(z.example)
    groups = DependencyGraph(copy_model(z.loaded.model)).groups()
    prunable = [grp for grp in groups if not grp.is_blocked()]
    assert prunable, f"{name}: no prunable group"
    rng = np.random.default_rng(0)
    for grp in prunable:
        mask = _random_mask(grp.size, rng)
        pruned, ref = copy_model(z.loaded.model), copy_model(z.loaded.model)
        g = DependencyGraph(pruned)
        assert g.groups()[grp.id].atom == grp.atom
        apply_plan(g, {grp.atom: mask})
        gr = DependencyGraph(ref)
        zero_consumers(gr, {grp.atom: mask})
        # every initializer of the group lost exactly the removed channels along its axis (or a multiple: heads)
        for value, axis in grp.weights:
            pruned_value = pruned.graph.initializers.get(value.name)
            if pruned_value is not None:
                before, after = value.shape[axis], pruned_value.shape[axis]
                assert (before - after) % int((~mask).sum()) == 0 and after < before
        _assert_close(run_checked(pruned, feed, tmp_path, "pruned"), run_checked(ref, feed, tmp_path, "ref"))


def test_llama_groups_have_the_gqa_structure(zoo_model):
    groups = DependencyGraph(copy_model(zoo_model("llama").loaded.model)).groups()
    kinds = {}
    for grp in groups:
        if ".layers.0." in f".{grp.name}":  # model.layers.0 (plain export) or model.model.layers.0 (KV-cache export)
            kinds.setdefault(grp.kind, []).append(grp)
    # 4 query heads in 2 KV groups: KV heads (2), query heads per group (2), head dims, FFN
    assert [g.size for g in kinds["kv_heads"]] == [2]
    assert [g.size for g in kinds["heads"]] == [2]
    assert [g.size for g in kinds["ffn"]] == [64]
    kv = kinds["kv_heads"][0]
    assert not kv.is_blocked() and len(kv.weights) == 4  # q, k, v rows and o_proj columns
    # the rotary half of q/k head dims is coupled and blocked (q·kᵀ); the value head dim is free in the
    # plain export, and in the KV-cache export it is the cache's head size: an interface axis, blocked
    # unless change_interface=true
    dims = [g for g in groups if g.kind == "head_dim" and "layers.0" in g.name]
    cached = cache_spec(zoo_model("llama").loaded.model) is not None
    assert [(g.size, g.is_blocked()) for g in dims] == [(8, cached)]
    if cached:
        assert "graph output 'present.0.value'" in dims[0].describe()["reasons"]


def test_bias_compensation_oracle(zoo_model, tmp_path):
    z = zoo_model("llama")
    feed = _feed(z.example)
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=3, sizes={"batch": 2, "seq": 9})
    base = copy_model(z.loaded.model)
    groups = [grp for grp in DependencyGraph(copy_model(base)).groups() if grp.kind == "ffn" and not grp.is_blocked()]
    stats = collect(base, sorted(stat_requests(groups, gram=False), key=lambda r: r.value), calib)
    rng = np.random.default_rng(1)
    plan = {grp.atom: _random_mask(grp.size, rng) for grp in groups}
    pruned, ref = copy_model(base), copy_model(base)
    g = DependencyGraph(pruned)
    count, left = compensate(g, plan, stats, "bias")
    assert count == len(groups) and not left
    apply_plan(g, plan)
    gr = DependencyGraph(ref)
    compensate(gr, plan, stats, "bias")
    zero_consumers(gr, plan)
    _assert_close(run_checked(pruned, feed, tmp_path, "pruned"), run_checked(ref, feed, tmp_path, "ref"))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_compile_prune_half_on_zoo(zoo_model, name, tmp_path):
    z = zoo_model(name)
    result = slimc.compile(z.loaded, "prune(ratio=0.5)", measure_latency=False)
    r = result.receipt
    (report,) = r.passes
    assert report.modified and report.details["groups_pruned"]
    # the receipt's numbers are a recount of the result, and agree with the pass's own count
    assert r.after["params"] == count_params(result.model)[0] == report.details["params_after"]
    assert r.after["params"] < r.before["params"] and 0 < r.after["macs"] < r.before["macs"]
    for p in report.details["groups_pruned"]:
        assert p["after"] == max(1, p["before"] - round(p["before"] * 0.5))
    path = tmp_path / f"{name}.onnx"
    result.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    outputs = run(create_session(path), _feed(z.example))
    assert all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f")


def test_kv_heads_target_removes_a_kv_group_and_its_query_heads(zoo_model, tmp_path):
    z = zoo_model("llama")
    model = copy_model(z.loaded.model)
    report = Prune(ratio=0.5, target="kv_heads").apply(model, slimc.pipeline.PassContext())
    assert [p["kind"] for p in report.details["groups_pruned"]] == ["kv_heads", "kv_heads"]
    shapes = sorted(tuple(v.shape) for v in model.graph.initializers.values() if v.shape is not None and len(v.shape) == 2)
    # per layer: q_proj [32, 32] -> [32, 16] (the 2 query heads of the removed KV group),
    # k_proj and v_proj [32, 16] -> [32, 8] (1 of 2 KV heads), o_proj [32, 32] -> [16, 32]
    assert (shapes.count((32, 16)), shapes.count((32, 8)), shapes.count((16, 32))) == (2, 4, 2)
    run_checked(model, _feed(z.example), tmp_path, "kv")


def test_round_to_and_global_scope(zoo_model):
    model = copy_model(zoo_model("bert").loaded.model)
    report = Prune(ratio=0.3, target="ffn", round_to=8).apply(model, slimc.pipeline.PassContext())
    assert all(p["after"] % 8 == 0 for p in report.details["groups_pruned"])  # 64 * 0.7 = 44.8 -> 48
    assert {p["after"] for p in report.details["groups_pruned"]} == {48}
    model = copy_model(zoo_model("bert").loaded.model)
    report = Prune(ratio=0.5, target="ffn", scope="global").apply(model, slimc.pipeline.PassContext())
    kept = [p["after"] for p in report.details["groups_pruned"]]
    assert sum(kept) == 64 * 2 - 64 and all(k >= 1 for k in kept)


def test_ignore_and_ratios_by_kind(zoo_model):
    model = copy_model(zoo_model("bert").loaded.model)
    report = Prune(ratio=0.5, ratios_by_kind={"attention": 0.25}, ignore=["encoder.layer.1.*"]).apply(model, slimc.pipeline.PassContext())
    pruned = {(p["kind"], p["group"]): (p["before"], p["after"]) for p in report.details["groups_pruned"]}
    assert all("layer.1" not in name for _, name in pruned)
    assert {v for (k, _), v in pruned.items() if k == "heads"} == {(4, 3)}
    assert {v for (k, _), v in pruned.items() if k == "ffn"} == {(64, 32)}
    assert any("ignore" in why for _, why in report.left_alone)


@pytest.mark.parametrize("spec, error", [
    ("prune(ratio=1.5)", PassConfigError),
    ("prune(ratio=-0.1)", PassConfigError),
    ("prune(round_to=0)", PassConfigError),
    ("prune(ratios_by_kind={conv: 0.2})", PassConfigError),
    ("prune(target=neurons)", PassConfigError),
])
def test_bad_options_are_clear(spec, error, zoo_model):
    with pytest.raises(error, match="prune"):
        slimc.compile(zoo_model("resnet").loaded, spec, measure_latency=False)


def test_activation_aware_importance_needs_calibration(zoo_model):
    with pytest.raises(DataError, match="calibration"):
        slimc.compile(zoo_model("gpt2").loaded, "prune(importance=wanda)", measure_latency=False)


@pytest.mark.parametrize("method", ["wanda", "flap"])
def test_least_squares_compensation_improves_held_out_fidelity(zoo_model, method):
    z = zoo_model("llama")
    calib = data.synthetic(z.loaded.inputs, n_batches=8, seed=5, sizes={"batch": 4, "seq": 32})
    held_out = data.synthetic(z.loaded.inputs, n_batches=3, seed=6, sizes={"batch": 2, "seq": 12})
    sqnr = {}
    for comp in ("none", "least_squares"):
        result = slimc.compile(z.loaded, f"prune(ratio=0.5, target=ffn, importance={method}, compensate={comp})",
                               calibration=calib, evaluation=held_out, measure_latency=False)
        sqnr[comp] = result.receipt.fidelity["metrics"]["sqnr_db"]
    # refitting the kept weights to the original output beats dropping the channels outright
    assert sqnr["least_squares"] > sqnr["none"] + 0.3


def test_least_squares_minimises_the_layer_error_on_calibration_statistics(tmp_path):
    """One Linear layer, correlated inputs: LS < bias < none in E‖y' − y‖² on the calibration data."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    k, n = 16, 8
    w1 = rng.standard_normal((k, k)).astype(np.float32)
    w2 = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor("w1", TensorProto.FLOAT, w1.shape, w1.reshape(-1)), helper.make_tensor("w2", TensorProto.FLOAT, w2.shape, w2.reshape(-1))],
    )
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    base = ir.serde.deserialize_model(proto)
    mix = rng.standard_normal((k, k)).astype(np.float32)
    xs = [(rng.standard_normal((64, k)) @ mix).astype(np.float32) for _ in range(4)]
    calib = data.Dataset([{"x": x} for x in xs], "test")
    (grp,) = [g for g in DependencyGraph(copy_model(base)).groups() if not g.is_blocked()]
    plan = {grp.atom: _random_mask(grp.size, np.random.default_rng(2))}
    x = np.concatenate(xs)
    y = np.maximum(x @ w1, 0) @ w2
    errors = {}
    for method in ("none", "bias", "least_squares"):
        model = copy_model(base)
        g = DependencyGraph(model)
        if method != "none":
            stats = collect(model, sorted(stat_requests(g.groups(), gram=True), key=lambda r: r.value), calib)
            compensate(g, plan, stats, method)
        apply_plan(g, plan)
        (pruned,) = run_checked(model, {"x": x}, tmp_path, method)
        errors[method] = float(np.mean((pruned - y) ** 2))
    assert errors["least_squares"] < errors["bias"] < errors["none"], errors


def test_merged_biases_do_not_couple_but_tied_weights_do(tmp_path):
    """Exporters merge identical constants: a shared zero bias must not tie two layers' channels;
    a weight matrix used twice is a real tie and keeps both uses consistent (and shared)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal(s).astype(np.float32) for n, s in
         {"wa": (16, 32), "wb": (16, 32), "wa2": (32, 16), "wb2": (32, 16), "wt": (16, 32), "wt2": (32, 16), "wt3": (32, 16)}.items()}
    zero = np.zeros(32, np.float32)
    nodes = []
    for branch in ("a", "b"):  # two layers sharing one merged zero bias
        nodes += [helper.make_node("MatMul", ["x", f"w{branch}"], [f"{branch}1"]), helper.make_node("Add", [f"{branch}1", "zero"], [f"{branch}2"]),
                  helper.make_node("Relu", [f"{branch}2"], [f"{branch}3"]), helper.make_node("MatMul", [f"{branch}3", f"w{branch}2"], [f"y{branch}"])]
    for k, second in (("t1", "wt2"), ("t2", "wt3")):  # one weight used by two layers: tied
        nodes += [helper.make_node("MatMul", ["x", "wt"], [f"{k}h"]), helper.make_node("Relu", [f"{k}h"], [f"{k}r"]),
                  helper.make_node("MatMul", [f"{k}r", second], [f"y{k}"])]
    outputs = [helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, ["batch", 16]) for k in ("a", "b", "t1", "t2")]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.reshape(-1)) for n, a in w.items()]
    inits.append(helper.make_tensor("zero", TensorProto.FLOAT, (32,), zero))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])], outputs, inits)
    base = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])))
    groups = [g for g in DependencyGraph(copy_model(base)).groups() if not g.is_blocked()]
    assert sorted(len(g.contractions) for g in groups) == [1, 1, 2]  # a, b apart; the tied pair together
    model = copy_model(base)
    params = count_params(model)[0]
    report = Prune(ratio=0.5).apply(model, slimc.pipeline.PassContext())
    assert len(report.details["groups_pruned"]) == 3
    assert count_params(model)[0] == params - (16 * 16 * 2 + 16 * 16 * 2 + 16 * 16 * 3 + 16)  # halves everywhere; the zero bias stays one (re-shared), the tie stays one
    x = rng.standard_normal((3, 16)).astype(np.float32)
    run_checked(model, {"x": x}, tmp_path, "tied")


def test_a_reshape_of_an_empty_tensor_is_left_alone(tmp_path):
    """Issue 17 (test_reshape_allowzero_reordered): axes of size 0 made the layout analysis divide by zero."""
    import onnx
    from onnx import TensorProto, helper

    import slimc

    nodes = [helper.make_node("Reshape", ["data", "shape"], ["y"], allowzero=1)]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [0, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4, 0])],
        [onnx.numpy_helper.from_array(np.array([3, 4, 0], np.int64), "shape")]), opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "empty.onnx"
    onnx.save(model, path)
    result = slimc.compile(str(path), passes=["prune(allow_noop=true)"], evaluation=[{"data": np.zeros((0, 3, 4), np.float32)}],
                           measure_latency=False)
    assert result.receipt.passes[0].name == "prune"
