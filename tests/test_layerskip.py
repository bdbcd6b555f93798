"""layerskip: residual-block detection on the zoo, exact removal of a block made exactly zero,
Block Influence and the greedy loss search against independent measurements, options, data."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import run_checked
from zoo import shifted_inputs

import slimc
from slimc import data, passes
from slimc.calibrate import CosineRequest, cosine
from slimc.errors import DataError, PassConfigError
from slimc.model import LoadedModel, infer_input_specs
from slimc.onnx_io import copy_model
from slimc.passes.skip import blocks
from slimc.passes.skip.layerskip import LayerSkip
from slimc.pipeline import PassContext


def _ctx(loaded, n_batches: int = 2, seed: int = 0) -> PassContext:
    return PassContext(loaded=loaded, calibration=data.synthetic(loaded.inputs, n_batches=n_batches, seed=seed))


def _np(feeds) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in feeds.items()}


def _zero(model: ir.Model, unit: blocks.Unit) -> None:
    """Make every sub-layer's f(x) exactly 0: zero the float constants of its last weighted node
    and of the branch nodes after it (biases). Shared initializers get a zero copy for this use."""
    for part in unit.parts:
        weighted = [i for i, n in enumerate(part.branch) if n.op_type in blocks.CONTRACTIONS
                    and any(v is not None and v.const_value is not None for v in n.inputs[1:])]
        for node in part.branch[weighted[-1]:]:
            for k, v in enumerate(node.inputs):
                if v is not None and v.const_value is not None and v.dtype.is_floating_point():
                    zeros = np.zeros_like(v.const_value.numpy())
                    z = ir.Value(name=f"{v.name}__zeroed_{id(node)}", shape=v.shape, type=v.type,
                                 const_value=ir.tensor(zeros, name=f"{v.name}__zeroed_{id(node)}"))
                    model.graph.register_initializer(z)
                    node.replace_input_with(k, z)


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("name, n_blocks, n_attention, n_mlp", [
    ("bert", 2, 2, 2), ("gpt2", 2, 2, 2), ("llama", 2, 2, 2), ("vit", 2, 2, 2), ("resnet", 1, 0, 0),
])
def test_finds_blocks_and_sublayers(zoo_model, name, n_blocks, n_attention, n_mlp):
    z = zoo_model(name)
    analysis = blocks.analyse(z.loaded.model)
    found = {u: analysis.units(u) for u in ("block", "attention", "mlp")}
    assert [len(found[u]) for u in ("block", "attention", "mlp")] == [n_blocks, n_attention, n_mlp]
    labels = [u.label for u in found["block"]]
    assert len(set(labels)) == len(labels) and all(labels)
    for unit in found["block"]:
        assert unit.x.shape == unit.out.shape
    if n_attention:  # transformers: a block is one attention + one MLP sub-layer, chained
        assert all(u.describe() == "attention + mlp" for u in found["block"])
        assert found["block"][1].x is found["block"][0].out
        assert [u.label for u in found["mlp"]] == [f"{b}/mlp" for b in labels]
        tails = {n.op_type for u in found["block"] for p in u.parts for n in p.tail}
        # BERT is post-LN: each sub-layer ends in its LayerNorm; the pre-LN models end at the Add
        assert tails == ({"LayerNormalization"} if name == "bert" else set())
        # the attention mask's Add (scores + mask) is no residual
        assert not any("broadcast" in why for _, why in analysis.left_alone)
    else:  # ResNet: Relu(x + f(x)) with an identity shortcut; the projection block is left alone
        assert [n.op_type for n in found["block"][0].parts[0].tail] == ["Relu"]
        assert found["block"][0].channel_axis == 1
        assert any("not the identity" in why and "Conv" in why for _, why in analysis.left_alone)


@pytest.mark.parametrize("name, n_blocks", [("resnet_bottleneck", 1), ("mobilenet_v2", 10), ("convnext", 2)])
def test_other_cnns_skip_through_compile(zoo_model, name, n_blocks):
    """The remaining zoo CNNs: ResNet-50's bottleneck blocks, MobileNetV2's linear inverted
    residuals (no activation tail), ConvNeXt's layer-scaled blocks; compile() runs the checker and ORT."""
    z = zoo_model(name)
    units = blocks.analyse(z.loaded.model).units("block")
    assert len(units) == n_blocks and all(u.describe() == "conv" and u.channel_axis == 1 for u in units)
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=0)
    result = slimc.compile(z.loaded, "layerskip(count=1, protect_first=0, protect_last=0)", calibration=calib,
                           measure_latency=False)
    details = result.receipt.passes[0].details
    assert len(details["removed"]) == 1 and details["params_after"] < details["params_before"]
    (unit,) = [u for u in units if u.label == details["removed"][0]["label"]]
    assert not {n.name for n in unit.nodes} & {n.name for n in result.model.graph}


def _graph(extra_output: bool = False, long_skip: bool = False) -> ir.Model:
    """x -> two residual MLP blocks (x + W2 relu(W1 x)) -> y; optionally a branch value as an
    extra graph output, or an Add from x around both blocks."""
    rng = np.random.default_rng(0)
    inits, nodes, stream = [], [], "x"
    for b in range(2):
        inits += [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), f"w1_{b}"),
                  numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), f"w2_{b}")]
        nodes += [helper.make_node("MatMul", [stream, f"w1_{b}"], [f"h_{b}"]),
                  helper.make_node("Relu", [f"h_{b}"], [f"r_{b}"]),
                  helper.make_node("MatMul", [f"r_{b}", f"w2_{b}"], [f"f_{b}"]),
                  helper.make_node("Add", [stream, f"f_{b}"], [f"s_{b}"])]
        stream = f"s_{b}"
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])]
    if long_skip:
        nodes.append(helper.make_node("Add", ["x", stream], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [stream], ["y"]))
    if extra_output:
        outputs.append(helper.make_tensor_value_info("r_1", TensorProto.FLOAT, ["n", 16]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])], outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def test_blocks_whose_work_escapes_or_that_skip_blocks_are_left_alone():
    assert len(blocks.analyse(_graph()).units("block")) == 2
    escaped = blocks.analyse(_graph(extra_output=True))
    assert len(escaped.units("block")) == 1
    assert any("graph output" in why for _, why in escaped.left_alone)
    nested = blocks.analyse(_graph(long_skip=True))
    assert len(nested.units("block")) == 2  # the inner blocks stay units
    assert any("long skip" in why for _, why in nested.left_alone)


# ---------------------------------------------------------------- exact removal


@pytest.mark.parametrize("name, unit, index", [("llama", "block", 1), ("gpt2", "mlp", 0), ("vit", "attention", 1),
                                               ("resnet", "block", 0)])
def test_a_zeroed_unit_is_the_one_removed_and_removal_is_exact(zoo_model, tmp_path, name, unit, index):
    z = zoo_model(name)
    model = copy_model(z.loaded.model)
    target = blocks.analyse(model).units(unit)[index]
    _zero(model, target)
    feed = _np(shifted_inputs(z.example))
    reference = run_checked(model, feed, tmp_path, "zeroed")
    loaded = LoadedModel(model, z.loaded.inputs, z.loaded.task)
    report = LayerSkip(count=1, unit=unit, protect_first=0, protect_last=0, measure_latency=False).apply(model, _ctx(loaded))
    assert report.modified and [r["label"] for r in report.details["removed"]] == [target.label]
    scores = {c["label"]: c["influence"] for c in report.details["candidates"]}
    assert scores[target.label] == pytest.approx(0.0, abs=1e-6)  # out == x exactly
    assert all(s > 1e-4 for label, s in scores.items() if label != target.label)
    assert report.details["params_after"] < report.details["params_before"]
    after = run_checked(model, feed, tmp_path, "skipped")  # full checker, batch 3 / seq 7
    for r, a in zip(reference, after):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)
    gone = {n.name for n in target.nodes}
    assert not gone & {n.name for n in model.graph}


def test_post_ln_sublayer_skips_to_its_input(zoo_model, tmp_path):
    """BERT: y = LN(x + mlp(x)) of the last layer is skipped as x, the previous sub-layer's LN output."""
    z = zoo_model("bert")
    model = copy_model(z.loaded.model)
    last = blocks.analyse(model).units("mlp")[-1]
    assert last.out.name == "last_hidden_state" and last.parts[0].tail[0].op_type == "LayerNormalization"
    probe = copy_model(model)  # the original with the sub-layer's input as an extra output
    probe.graph.outputs.append(next(v for n in probe.graph for v in n.outputs if v.name == last.x.name))
    feed = _np(shifted_inputs(z.example))
    expected = run_checked(probe, feed, tmp_path, "probe")[-1]
    report = LayerSkip(count=1, unit="mlp", protect_first=0, protect_last=1, measure_latency=False).apply(
        model, _ctx(z.loaded))
    assert report.details["removed"][0]["label"] == blocks.analyse(probe).units("mlp")[0].label  # last one protected
    model2 = copy_model(z.loaded.model)
    report = LayerSkip(count=1, unit="mlp", protect_first=1, protect_last=0, measure_latency=False).apply(
        model2, _ctx(z.loaded))
    assert report.details["outputs_renamed"] == ["last_hidden_state"]
    out = run_checked(model2, feed, tmp_path, "skipped")
    names = [v.name for v in model2.graph.outputs]
    np.testing.assert_array_equal(out[names.index("last_hidden_state")], expected)


# ---------------------------------------------------------------- scores


def test_influence_scores_in_range_and_report(zoo_model):
    z = zoo_model("gpt2")
    model = copy_model(z.loaded.model)
    report = LayerSkip(count=1, unit="mlp", protect_first=1, protect_last=0).apply(model, _ctx(z.loaded))
    candidates = report.details["candidates"]
    assert len(candidates) == 2 and all(0.0 <= c["influence"] <= 2.0 for c in candidates)
    assert [c["protected"] for c in candidates] == [True, False]
    assert any("protect_first=1" in why for _, why in report.left_alone)
    latency = report.details["latency"]
    assert latency["before_ms"] > 0 and latency["after_ms"] > 0 and latency["speedup"] > 0
    assert "latency" in report.summary


def _perplexity(outputs: list[np.ndarray], batches) -> float:
    nll = count = 0.0
    for logits, batch in zip(outputs, batches):
        logits = logits[:, :-1].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        target = batch["input_ids"][:, 1:]
        valid = (batch["attention_mask"][:, :-1] * batch["attention_mask"][:, 1:]).astype(bool)
        picked = np.take_along_axis(logp, target[..., None], -1)[..., 0]
        nll -= picked[valid].sum()
        count += valid.sum()
    return math.exp(nll / count)


def test_loss_greedy_matches_the_measured_perplexity_of_the_result(zoo_model, tmp_path):
    z = zoo_model("llama")
    ctx = _ctx(z.loaded, n_batches=2)
    model = copy_model(z.loaded.model)
    report = LayerSkip(count=2, unit="attention", score="loss", protect_first=0, protect_last=0,
                       measure_latency=False).apply(model, ctx)
    loss = report.details["loss"]
    assert loss["metric"].startswith("perplexity") and loss["shortlist_size"] == 2
    step1, step2 = loss["steps"]
    assert step1["chosen"] == min(step1["losses"], key=step1["losses"].get)
    assert set(step2["losses"]) == set(step1["losses"]) - {step1["chosen"]}
    # the gated evaluation equals the rewired model: measure the result independently
    from slimc.backends.onnxruntime import create_session, run

    path = tmp_path / "skipped.onnx"
    ir.save(model, path)
    session = create_session(path)
    measured = _perplexity([run(session, b)[0] for b in ctx.calibration], list(ctx.calibration))
    assert report.details["removed"][-1]["loss_after"] == pytest.approx(measured, rel=1e-4)
    original = tmp_path / "original.onnx"
    ir.save(z.loaded.model, original)
    session = create_session(original)
    baseline = _perplexity([run(session, b)[0] for b in ctx.calibration], list(ctx.calibration))
    assert loss["baseline"] == pytest.approx(baseline, rel=1e-5)


def test_loss_greedy_picks_the_zeroed_block_and_measures_output_error(zoo_model, tmp_path):
    """Not a causal LM: the loss is the relative squared error of the logits vs the unmodified model."""
    z = zoo_model("vit")
    model = copy_model(z.loaded.model)
    target = blocks.analyse(model).units("mlp")[0]
    _zero(model, target)
    loaded = LoadedModel(model, z.loaded.inputs, z.loaded.task)
    ctx = _ctx(loaded)
    reference = copy_model(model)
    report = LayerSkip(count=2, unit="mlp", score="loss", shortlist=5, protect_first=0, protect_last=0,
                       measure_latency=False).apply(model, ctx)
    loss = report.details["loss"]
    assert loss["metric"].startswith("relative squared error") and loss["baseline"] == 0.0
    assert loss["steps"][0]["chosen"] == target.label and loss["steps"][0]["losses"][target.label] == pytest.approx(0, abs=1e-10)
    ref = [run_checked(reference, b, tmp_path, "ref")[0].astype(np.float64) for b in ctx.calibration]
    got = [run_checked(model, b, tmp_path, "got")[0].astype(np.float64) for b in ctx.calibration]
    measured = sum(((r - g) ** 2).sum() for r, g in zip(ref, got)) / sum((r**2).sum() for r in ref)
    assert report.details["removed"][-1]["loss_after"] == pytest.approx(measured, rel=1e-4, abs=1e-9)


def test_cosine_statistics_match_numpy(zoo_model, tmp_path):
    z = zoo_model("llama")
    model = z.loaded.model
    unit = blocks.analyse(model).units("block")[0]
    batches = data.synthetic(z.loaded.inputs, n_batches=2, seed=3)
    batches = [{**b, "attention_mask": np.concatenate([b["attention_mask"][:, :12], np.zeros_like(b["attention_mask"][:, 12:])], 1)}
               for b in batches]
    request = CosineRequest(unit.x.name, unit.out.name, -1, "attention_mask")
    stats = cosine(model, [request], batches)[request]
    probe = copy_model(model)
    names = {unit.x.name, unit.out.name}
    probe.graph.outputs.extend(v for n in probe.graph for v in n.outputs if v.name in names)
    total = weight = 0.0
    for b in batches:
        x, y = (v.astype(np.float64) for v in run_checked(probe, b, tmp_path, "probe")[-2:])
        den = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
        # the pad token's embedding row is zero: one zero vector counts as cosine 0
        cos = np.where(den > 0, (x * y).sum(-1) / np.where(den > 0, den, 1.0), 0.0)
        total += (cos * b["attention_mask"]).sum()
        weight += b["attention_mask"].sum()
    assert stats.weight == weight and stats.mean == pytest.approx(total / weight, abs=1e-5)


# ---------------------------------------------------------------- options and data


@pytest.mark.parametrize("options, message", [
    ({}, "exactly one of count"), ({"count": 2, "ratio": 0.2}, "exactly one of count"),
    ({"ratio": 0.0}, r"\(0, 1\)"), ({"ratio": 1.0}, r"\(0, 1\)"), ({"count": 0}, ">= 1"),
    ({"count": 1, "unit": "layer"}, "unit=block"), ({"count": 1, "score": "cosine"}, "score=influence"),
    ({"count": 1, "protect_first": -1}, "protect_first"), ({"count": 1, "shortlist": 4}, "only applies to score=loss"),
    ({"count": 1, "score": "loss", "shortlist": 0}, "shortlist"), ({"count": 1, "calibration_batches": 0}, "calibration_batches"),
    ({"count": 1, "loss_batches": 2}, "only applies to score=loss"),
    ({"count": 1, "score": "loss", "loss_batches": 9}, r"loss_batches=9 must be in 1..calibration_batches \(8\)"),
])
def test_bad_options_say_what_to_write(options, message):
    with pytest.raises(PassConfigError, match=message):
        LayerSkip(**options)


def test_too_many_and_no_data(zoo_model):
    z = zoo_model("llama")
    with pytest.raises(PassConfigError, match=r"only 0 of the 2 found can be removed.*count<=0"):
        LayerSkip(count=1).apply(copy_model(z.loaded.model), _ctx(z.loaded))  # first and last protected
    with pytest.raises(PassConfigError, match="only 1 of the 2"):
        LayerSkip(count=2, unit="mlp", protect_last=0).apply(copy_model(z.loaded.model), _ctx(z.loaded))
    with pytest.raises(DataError, match="calibration"):
        LayerSkip(count=1, protect_first=0).apply(copy_model(z.loaded.model), PassContext(loaded=z.loaded))
    model = copy_model(z.loaded.model)
    report = LayerSkip(ratio=0.2).apply(model, _ctx(z.loaded))  # 0.2 x 2 blocks rounds to 0
    assert not report.modified and "rounds to 0" in report.summary


def test_a_model_without_residuals_is_left_as_is():
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")]), opset_imports=[helper.make_opsetid("", 18)])
    model = ir.serde.deserialize_model(proto)
    specs = infer_input_specs(model)
    report = LayerSkip(count=1).apply(model, PassContext(calibration=data.synthetic(specs, n_batches=1)))
    assert not report.modified and "no block units" in report.summary


def test_composes_with_int8(zoo_model, tmp_path, monkeypatch):
    if "layerskip" not in passes.REGISTRY:
        monkeypatch.setitem(passes.REGISTRY, "layerskip", "slimc.passes.skip.layerskip:LayerSkip")
    z = zoo_model("gpt2")
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=0)
    result = slimc.compile(z.loaded, "layerskip(count=1, unit=mlp, protect_last=0),int8(force=true)", calibration=calib,
                           measure_latency=False)
    assert [p.name for p in result.receipt.passes] == ["layerskip", "int8"]
    assert result.receipt.passes[0].details["removed"]
    outputs = run_checked(result.model, _np(shifted_inputs(z.example)), tmp_path)
    assert outputs[0].shape == (3, 7, 128) and np.isfinite(outputs[0]).all()


def test_benchmark_table_compares_loss_with_influence():
    from slimc.tools import bench_layerskip

    def row(score, count, ppl):
        return {"unit": "block", "score": score, "count": count, "perplexity": ppl, "params_after": 120e6,
                "pass_seconds": 10.0, "removed": [f"model.layers.{k}" for k in range(count)],
                "latency": {"prefill 128": {"speedup": 1.1}, "decode 1": {"speedup": 1.05}}}

    report = {"model": "SmolLM2-135M", "source": "test", "baseline_perplexity": 20.0, "calibration": "lee",
              "evaluation": "wiki", "loss_batches": 2, "repeats": 10, "machine": "cpu", "versions": {"slimc": "0"},
              "feeds": {"prefill 128": {"input_ids": [1, 128]}, "decode 1": {"input_ids": [1, 1]}},
              "results": [row("influence", 2, 25.0), row("loss", 2, 24.0), row("influence", 4, 30.0), row("loss", 4, 31.0)]}
    table = bench_layerskip.markdown(report)
    assert "| block | loss | 2 | 24.000 | 1.200 | 1.10 | 1.05 | 120.0M | 10 | 0, 1 |" in table
    assert "--remeasure" not in table
    report["results"][1]["latency_remeasured"] = {"prefill 128": {"speedup": 1.2}, "decode 1": {"speedup": 1.0}}
    report["remeasured"] = {"repeats": 10, "load_average": {"start": [0.1], "end": [0.2]}}
    table = bench_layerskip.markdown(report)
    assert "| block | loss | 2 | 24.000 | 1.200 | 1.20 | 1.00 |" in table and "measured again" in table
    assert "block x2: loss 24.000 vs influence 25.000 (loss <= influence)" in table
    assert "block x4: loss 31.000 vs influence 30.000 (loss > influence)" in table
