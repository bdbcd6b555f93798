"""slimc search: budgets and their refusals, the per-block hooks of prune and layerskip, a small search
on a residual MLP (budget met by the built graphs, report written, reproducible for a seed), the CLI,
and evaluation as Ray tasks (when ray is installed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimc
from slimc.analysis import count_params
from slimc.errors import BudgetError, OptionError, PassConfigError
from slimc.evosearch import space as spaces
from slimc.evosearch.budget import parse_budget
from slimc.onnx_io import copy_model
from slimc.passes.prune.prune_pass import Prune
from slimc.passes.skip.layerskip import LayerSkip
from slimc.pipeline import PassContext

WIDTH, HIDDEN, BLOCKS = 16, 32, 5


def residual_mlp(blocks: int = BLOCKS, seed: int = 0) -> onnx.ModelProto:
    """x[batch, 16] -> ``blocks`` x (x + W2 relu(W1 x + b1)) -> y; block k's branch scaled by 1/(k+1), so
    the blocks matter unequally (a non-uniform allocation can do better than a uniform one)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for k in range(blocks):
        w1 = rng.standard_normal((WIDTH, HIDDEN)).astype(np.float32) / 4
        w2 = (rng.standard_normal((HIDDEN, WIDTH)) * np.linspace(0.1, 1.5, HIDDEN)[:, None] / (k + 1)).astype(np.float32) / 4
        inits += [numpy_helper.from_array(w1, f"block{k}.w1"), numpy_helper.from_array(np.zeros(HIDDEN, np.float32), f"block{k}.b1"),
                  numpy_helper.from_array(w2, f"block{k}.w2")]
        nodes += [helper.make_node("MatMul", [x, f"block{k}.w1"], [f"h{k}"], name=f"block{k}/fc1"),
                  helper.make_node("Add", [f"h{k}", f"block{k}.b1"], [f"hb{k}"], name=f"block{k}/bias"),
                  helper.make_node("Relu", [f"hb{k}"], [f"a{k}"], name=f"block{k}/relu"),
                  helper.make_node("MatMul", [f"a{k}", f"block{k}.w2"], [f"f{k}"], name=f"block{k}/fc2"),
                  helper.make_node("Add", [x, f"f{k}"], [f"x{k + 1}"], name=f"block{k}/residual")]
        x = f"x{k + 1}"
    head = rng.standard_normal((WIDTH, 4)).astype(np.float32)
    inits.append(numpy_helper.from_array(head, "head.w"))
    nodes.append(helper.make_node("MatMul", [x, "head.w"], ["y"], name="head"))
    graph = helper.make_graph(nodes, "residual_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "mlp.onnx"
    onnx.save(residual_mlp(), path)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((32, WIDTH)).astype(np.float32))
    return path


def _ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))  # as a front end loads it


# ---------------------------------------------------------------- budgets


def test_budget_parses_measures_units_and_fractions():
    budget = parse_budget("speedup>=1.5, size<=60MB,params<=0.7x,macs<=2G")
    assert [str(b) for b in budget.bounds] == ["speedup>=1.5", "size<=6e+07", "params<=0.7x", "macs<=2e+09"]
    assert budget.get("size").value == 60e6 and budget.get("params").relative
    assert budget.get("params").limit({"params": 1000}) == pytest.approx(700)
    assert parse_budget("size<=1MiB").get("size").value == 1 << 20
    assert budget.get("speedup").holds(1.6, {}) and not budget.get("speedup").holds(1.4, {})


@pytest.mark.parametrize("text, says", [
    ("", "needs a budget"),
    ("latency<=3", "unknown measure 'latency'"),
    ("speedup<=2", "lower bound"),
    ("size>=10MB", "upper bound"),
    ("size<=10parsecs", "unknown unit 'parsecs'"),
    ("speedup>=1", "asks for nothing"),
    ("params<=1.5x", "fraction below 1"),
    ("size<=1MB,size<=2MB", "bounded twice"),
    ("speedup=>2", "cannot read"),
])
def test_malformed_budgets_are_refused_with_a_reason(text, says):
    with pytest.raises(BudgetError, match=says):
        parse_budget(text)
    assert issubclass(BudgetError, OptionError)


# ---------------------------------------------------------------- the per-block hooks


def test_prune_ratios_by_group_gives_each_block_its_own_ratio():
    model = _ir(residual_mlp())
    Prune(ratio=0.0, ratios_by_group={"block1.*": 0.5, "block3.w1": 0.25, "block*": 0.0}, allow_noop=True).apply(model, PassContext())
    inits = model.graph.initializers
    hidden = [inits[f"block{k}.w1"].const_value.shape[1] for k in range(BLOCKS)]
    assert hidden == [HIDDEN, HIDDEN // 2, HIDDEN, HIDDEN - HIDDEN // 4, HIDDEN]  # first matching pattern wins
    assert [inits[f"block{k}.w2"].const_value.shape[0] for k in range(BLOCKS)] == hidden


def test_prune_ratios_by_group_is_validated_and_parsed_from_a_spec():
    with pytest.raises(PassConfigError, match=r"ratios_by_group\[block1\.\*\]=1.2"):
        Prune(ratios_by_group={"block1.*": 1.2})
    (pass_,) = slimc.parse_pipeline("prune(ratio=0, ratios_by_group={'block2.*': 0.5})")
    assert pass_.ratios_by_group == {"block2.*": 0.5}


def test_layerskip_units_removes_exactly_the_listed_blocks():
    model = _ir(residual_mlp())
    report = LayerSkip(units=[1, 3], measure_latency=False).apply(model, PassContext())
    names = {n.name for n in model.graph}
    assert not any(n.startswith(("block1/", "block3/")) for n in names)
    assert all(f"block{k}/fc1" in names for k in (0, 2, 4))
    assert [r["index"] for r in report.details["removed"]] == [1, 3]
    with pytest.raises(PassConfigError, match="has 5 block units"):
        LayerSkip(units=[7], measure_latency=False).apply(_ir(residual_mlp()), PassContext())
    with pytest.raises(PassConfigError, match="exactly one of"):
        LayerSkip(units=[1], count=1)


def test_space_builds_a_genome_with_the_passes():
    model = _ir(residual_mlp())
    space = spaces.discover(model)
    assert len(space.blocks) == BLOCKS and [b.skippable for b in space.blocks] == [False, True, True, True, False]
    assert space.blocks[2].initializers == ("block2.b1", "block2.w1", "block2.w2")
    genome = (0, 4, 5, 2, 1)  # dense, prune 0.5, skip, prune 0.25, prune 0.125
    built = space.build(model, genome)
    inits = built.graph.initializers
    assert "block2.w1" not in inits
    assert [inits[f"block{k}.w1"].const_value.shape[1] for k in (0, 1, 3, 4)] == [32, 16, 24, 28]
    assert model.graph.initializers["block1.w1"].const_value.shape[1] == HIDDEN  # the input is not changed
    assert [p.name for p in space.passes(genome)] == ["layerskip", "prune"]


# ---------------------------------------------------------------- a small search


def _search(mlp_path, calib, report=None, seed=0, workers=1, budget="params<=0.75x"):
    return slimc.search(mlp_path, budget, calibration=calib, evaluation=calib, generations=3, offspring=4,
                        survivors=2, batches=2, low_batches=1, finalists=2, seed=seed, workers=workers, report=report)


def test_search_meets_the_budget_and_writes_its_report(mlp_path, calib, tmp_path):
    result = _search(mlp_path, calib, report=tmp_path / "report")
    params0 = count_params(_ir(residual_mlp()))[0]
    params1 = count_params(result.compiled.model)[0]
    assert result.budget_met and params1 <= 0.75 * params0
    assert len(result.allocation) == BLOCKS and len(result.genome) == BLOCKS
    assert result.compiled.receipt.after["params"] == params1  # the receipt is of the chosen allocation
    start = next(r for r in result.log if r["stage"] == "start")
    chosen = next(r for r in result.finalists if r["genome"] == list(result.genome))
    assert chosen["fitness"] <= start["fitness"]  # the evolution keeps the fittest
    assert len(result.uniform) == len(spaces.PRUNE_LEVELS) + 1 and all("measured_speedup" in r for r in result.uniform)
    saved = json.loads((tmp_path / "report" / "pareto.json").read_text())
    assert saved["genome"] == list(result.genome) and saved["budget"] == "params<=0.75x" and saved["front"]
    lines = (tmp_path / "report" / "search_log.jsonl").read_text().splitlines()
    assert len(lines) == len(result.log) > 4
    pytest.importorskip("matplotlib")
    assert (tmp_path / "report" / "pareto.png").stat().st_size > 1000
    assert (tmp_path / "report" / "allocation.png").stat().st_size > 1000


def test_search_is_reproducible_for_a_seed(mlp_path, calib):
    a, b = _search(mlp_path, calib, seed=3), _search(mlp_path, calib, seed=3)
    assert a.genome == b.genome
    assert [(r["genome"], r["fitness"]) for r in a.log] == [(r["genome"], r["fitness"]) for r in b.log]


def test_impossible_budget_is_refused(mlp_path, calib):
    with pytest.raises(BudgetError, match="cannot be met in this search space"):
        _search(mlp_path, calib, budget="params<=0.05x")


def test_cli_search_writes_the_model_and_refuses_a_bad_budget(mlp_path, calib, tmp_path, capsys):
    from slimc.tools.cli import main

    assert main(["search", str(mlp_path), "--budget", "latency<=2", "-q"]) == 2
    assert "unknown measure" in capsys.readouterr().err
    out = tmp_path / "best.onnx"
    code = main(["search", str(mlp_path), "--budget", "macs<=0.8x", "--calib", str(calib), "--eval", str(calib),
                 "--generations", "2", "--offspring", "3", "--batches", "2", "-o", str(out), "--receipt",
                 str(tmp_path / "r.json"), "-q"])
    assert code == 0 and out.exists() and json.loads((tmp_path / "r.json").read_text())["after"]["params"] > 0


def test_search_on_ray_matches_the_in_process_search(mlp_path, calib):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'slimc[search]')")
    local, on_ray = _search(mlp_path, calib, seed=5), _search(mlp_path, calib, seed=5, workers=2)
    assert on_ray.settings["workers"].startswith("ray")
    assert on_ray.genome == local.genome
    assert [r["fitness"] for r in on_ray.log] == pytest.approx([r["fitness"] for r in local.log])


@pytest.mark.parametrize("low_batches", [1, 2])
def test_evolution_finds_a_better_allocation_than_uniform_on_a_known_objective(low_batches):
    """A synthetic objective with known optimum: block i's damage at level g is sens_i * g^2, costs are
    linear in the level. The search must keep the budget and beat the uniform allocation."""
    from slimc.evosearch import evolve

    blocks = tuple(spaces.Block(i, f"b{i}", (), skippable=False) for i in range(6))
    space = spaces.Space(blocks, spaces.PRUNE_LEVELS, ("prune",))
    sens = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    levels = np.arange(len(spaces.PRUNE_LEVELS) + 1)
    savings = {m: np.tile(levels * 10.0, (6, 1)) for m in evolve.COST_MEASURES}
    model = evolve.CostModel(space, {"params": 1000.0, "size": 4000.0, "macs": 1000.0, "latency_ms": 1.0}, savings, (0.0, 1e-3))
    budget = parse_budget("params<=0.88x")  # 120 saved: a total level of 12 over 6 blocks (uniform: 2 each)

    def evaluate(jobs):
        rows = []
        for genome, n in jobs:
            g = np.array(genome)
            rows.append({"genome": list(genome), "fitness": float((sens * g**2).sum()), "batches": n,
                         **{m: model.predict(genome)[m] for m in evolve.COST_MEASURES}})
        return rows

    settings = evolve.Settings(generations=40, offspring=6, survivors=2, low_batches=low_batches, batches=2, seed=1)
    search = evolve.Evolution(model, budget, settings, evaluate)
    best = search.run()
    assert search.feasible(best) and sum(best) >= 12
    uniform = float((sens * 2**2).sum())
    assert search.full[best]["fitness"] < 0.8 * uniform
    assert list(best) == sorted(best)  # the least sensitive blocks take the highest levels


@pytest.mark.slow
def test_search_on_a_causal_lm_with_kv_cache(tmp_path):
    """A random 4-layer GQA Llama exported with its KV cache: KL fitness on the logits, heads and FFN
    neurons pruned per block, removed blocks taking their cache entries; the receipt's params meet the budget."""
    pytest.importorskip("transformers")
    from llm_models import llama_folder

    folder = llama_folder(tmp_path / "llama", layers=4)
    text = tmp_path / "text.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 10)
    result = slimc.search(folder, "params<=0.8x", calibration=text, evaluation=text, generations=2, offspring=3,
                          batches=2, seq_len=32, finalists=2)
    assert result.settings["fitness"] == "kl_divergence" and result.budget_met
    params0 = result.settings["reference"]["params"]
    assert result.compiled.receipt.after["params"] <= 0.8 * params0
    assert result.compiled.receipt.fidelity["metrics"]["kl_divergence"] < 0.1
