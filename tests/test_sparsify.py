"""`sparsify`: the mask algorithms against their definitions, and the pass on the zoo and hand-built graphs.

The N:M checks read the weights back from the IR in their *stored* layout and regroup them here
(MatMul [K, N]; Gemm transB=1 [N, K]; Conv [N, C, kh, kw] grouped along C), independently of
the pass's own canonical layout, so a layout bug cannot hide behind a matching bug in the check.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import run_checked
from zoo import shifted_inputs

import slimc
from slimc import data
from slimc.errors import DataError, PassConfigError
from slimc.onnx_io import copy_model
from slimc.pass_spec import parse_pipeline
from slimc.passes.sparse import masks
from slimc.passes.sparse.sparsify import Sparsify
from slimc.pipeline import PassContext

RNG = np.random.default_rng(0)


def _correlated(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Calibration activations with correlated channels and a few outlier channels, like an LLM's."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k // 4)) @ rng.standard_normal((k // 4, k)) + 0.3 * rng.standard_normal((n, k))
    x[:, :3] *= 15
    return x


# ---------------------------------------------------------------- masks


def test_n_of_m_keeps_exactly_n_in_every_group_of_m_inputs():
    score = RNG.random((64, 10))
    keep = masks.n_of_m(score, 2, 4)
    groups = keep.reshape(16, 4, 10)
    assert (groups.sum(axis=1) == 2).all()
    # the kept two are the two largest of their group
    top = np.sort(score.reshape(16, 4, 10), axis=1)[:, 2:, :]
    assert np.allclose(np.sort(np.where(groups, score.reshape(16, 4, 10), -1), axis=1)[:, 2:, :], top)
    with pytest.raises(ValueError, match="multiple of M"):
        masks.n_of_m(RNG.random((6, 3)), 2, 4)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_per_output_and_layerwise_ratios_are_exact(ratio):
    w = RNG.standard_normal((200, 30))
    keep = masks.per_output(np.abs(w), ratio)
    assert ((~keep).sum(axis=0) == round(200 * ratio)).all()
    keep = masks.magnitude(w, ratio)
    assert (~keep).sum() == round(w.size * ratio)
    assert np.abs(w[~keep]).max() <= np.abs(w[keep]).min()


def test_wanda_scores_weight_by_input_norm():
    w = np.ones((4, 2))
    keep = masks.mask(masks.wanda_score(w, np.array([1.0, 5.0, 0.5, 3.0])), 0.5, None, per_row=True)
    assert keep[:, 0].tolist() == [False, True, False, True]


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(nm):
    k, n = 256, 64
    x = _correlated(3000, k)
    w = RNG.standard_normal((k, n)).astype(np.float32)
    h = 2 * x.T @ x / len(x)
    new, info = masks.sparsegpt(w, h, 0.5, nm)
    assert np.mean(new == 0) == pytest.approx(0.5, abs=1 / k)
    if nm:
        assert masks.nm_valid(new, *nm)
    magnitude = w * (masks.magnitude(w, 0.5) if nm is None else masks.n_of_m(np.abs(w), *nm))
    wanda = w * masks.mask(masks.wanda_score(w, np.sqrt((x ** 2).sum(0))), 0.5, nm, per_row=True)
    err_sgpt, err_mag, err_wanda = (masks.output_error(w, a, h) for a in (new, magnitude, wanda))
    assert err_sgpt < 0.6 * err_mag and err_sgpt < err_wanda
    # the kept weights were updated (the OBS correction), not just masked
    kept = new != 0
    assert not np.allclose(new[kept], w[kept])


def test_output_error_is_the_relative_output_error():
    x = _correlated(500, 32)
    w = RNG.standard_normal((32, 8))
    new = w * masks.magnitude(w, 0.5)
    direct = np.sum((x @ (w - new)) ** 2) / np.sum((x @ w) ** 2)
    assert masks.output_error(w, new, 2 * x.T @ x / len(x)) == pytest.approx(direct, rel=1e-9)


def test_sparsegpt_survives_dead_inputs_and_tiny_hessians():
    k, n = 32, 8
    x = _correlated(400, k) * 1e-20
    x[:, 5] = 0.0
    w = RNG.standard_normal((k, n)).astype(np.float32)
    new, info = masks.sparsegpt(w, 2 * x.T @ x / len(x), 0.5)
    assert np.isfinite(new).all() and info.dead_inputs == 1
    assert np.mean(new == 0) == pytest.approx(0.5, abs=1 / k)
    assert (new[5] == 0).sum() >= n // 2  # the dead input is pruned first


def test_owl_ratios_average_to_the_target_within_lambda():
    outliers = np.array([0.001, 0.02, 0.005, 0.04, 0.01])
    sizes = np.array([100, 400, 100, 300, 200])
    r = masks.owl_ratios(outliers, sizes, 0.7, 0.08)
    assert np.sum(r * sizes) / sizes.sum() == pytest.approx(0.7, abs=1e-6)
    assert (np.abs(r - 0.7) <= 0.08 + 1e-9).all()
    order = np.argsort(outliers)
    assert (np.diff(r[order]) <= 1e-12).all()  # more outliers -> lower sparsity
    assert masks.outlier_ratio(np.array([1.0, 1.0, 1.0, 100.0]), 3) == 0.25


# ---------------------------------------------------------------- stored layouts


def _groups_along_k(array: np.ndarray, op: str, m: int, trans_b: bool = False) -> np.ndarray:
    """Groups of m consecutive input-channel weights, [groups, m], from the stored layout."""
    if op == "MatMul":  # [K, N]
        k, n = array.shape
        return array.reshape(k // m, m, n).transpose(0, 2, 1).reshape(-1, m)
    if op == "Gemm" and trans_b:  # [N, K]
        return array.reshape(array.shape[0], -1, m).reshape(-1, m)
    if op == "Conv":  # [N, C, kh, kw]: groups along C at each kernel position
        nout, c = array.shape[:2]
        moved = np.moveaxis(array, 1, -1)  # [N, kh, kw, C]
        return moved.reshape(-1, c // m, m).reshape(-1, m)
    raise AssertionError(op)


def _mixed_model() -> onnx.ModelProto:
    """x[B,8,6,6] -> Conv 3x3 (8->16) -> Relu -> Conv 1x1 (16->16, groups 2) -> GAP -> Flatten -> Gemm(transB, 16->16) -> MatMul(16->4)."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "c1.w"),
        numpy_helper.from_array(rng.standard_normal((16, 8, 1, 1)).astype(np.float32), "c2.w"),
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "fc.b"),
        numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "out.w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "c2.w"], ["c2"], group=2, name="c2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["fc"], transB=1, name="fc"),
        helper.make_node("MatMul", ["fc", "out.w"], ["y"], name="out"),
    ]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _mixed_calib(n: int = 3):
    return [{"x": RNG.standard_normal((4, 8, 6, 6)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_groups_run_along_the_input_dimension_of_every_layout(method, pattern, tmp_path):
    model = ir.serde.deserialize_model(_mixed_model())
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    report = Sparsify(pattern=pattern, method=method, measure_zip=False).apply(model, PassContext(calibration=_mixed_calib()))
    keep, m = (int(p) for p in pattern.split(":"))
    layout = {"c1.w": ("Conv", False), "c2.w": ("Conv", False), "fc.w": ("Gemm", True), "out.w": ("MatMul", False)}
    for name, (op, trans) in layout.items():
        w = model.graph.initializers[name].const_value.numpy()
        zeros = (_groups_along_k(w, op, m, trans) == 0).sum(axis=1)
        assert (zeros == m - keep).all(), name
    assert report.details["nm_valid"] and report.details["sparsity"] == pytest.approx(0.5)
    np.testing.assert_array_equal(model.graph.initializers["fc.b"].const_value.numpy(), before["fc.b"])  # biases untouched
    run_checked(model, {"x": RNG.standard_normal((2, 8, 6, 6)).astype(np.float32)}, tmp_path)
    if method == "sparsegpt":  # c2 is 1x1 but grouped, c1 is 3x3: no channel Hessian, Wanda instead (reported)
        assert set(report.details["sparsegpt_fallback_to_wanda"]) == {"c1.w", "c2.w"}


def test_nm_leaves_layers_whose_channels_do_not_divide_alone():
    model = ir.serde.deserialize_model(_mixed_model())
    report = Sparsify(pattern="8:16", method="magnitude", measure_zip=False).apply(model, PassContext())
    left = dict(report.left_alone)
    assert "8 input channels are not a multiple of M=16" in left["c1 (Conv)"]
    assert "8 input channels are not a multiple of M=16" in left["c2 (Conv)"]  # 16 channels in 2 groups
    assert {r["weight"] for r in report.details["layers"]} == {"fc.w", "out.w"} and report.details["nm_valid"]


# ---------------------------------------------------------------- the zoo


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit", "resnet", "resnet_bottleneck", "mobilenet_v2", "convnext"])
def test_zoo_wanda_2_4_is_valid_and_runs(zoo_model, name, tmp_path):
    z = zoo_model(name)
    model = copy_model(z.loaded.model)
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=0)
    report = Sparsify(pattern="2:4", method="wanda").apply(model, PassContext(loaded=z.loaded, calibration=calib))
    d = report.details
    assert d["nm_valid"] and d["layers_sparsified"] >= 4 and d["sparsity"] == pytest.approx(0.5)
    assert all(r["sparsity"] == pytest.approx(0.5) for r in d["layers"])
    assert d["zip_bytes_after"] < d["zip_bytes_before"] and d["sparse_bytes"] < d["dense_bytes"]
    assert any("no sparse kernels" in why for _, why in report.left_alone)
    feed = {k: v.numpy() for k, v in shifted_inputs(z.example).items()}
    outputs = run_checked(model, {i.name: feed[i.name] for i in z.loaded.inputs if i.name in feed}, tmp_path)
    assert all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f")


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_zoo_llama_sparsegpt_stages_and_ratios(zoo_model, ratio):
    z = zoo_model("llama")
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=0)
    ctx = PassContext(loaded=z.loaded, calibration=calib)
    one = Sparsify(ratio=ratio, method="sparsegpt", stages=1, measure_zip=False).apply(copy_model(z.loaded.model), ctx)
    staged = Sparsify(ratio=ratio, method="sparsegpt", stages=4, measure_zip=False).apply(copy_model(z.loaded.model), ctx)
    assert one.details["stages"] == 1 and staged.details["stages"] == 4
    for report in (one, staged):
        for layer in report.details["layers"]:
            assert layer["sparsity"] == pytest.approx(ratio, abs=1 / layer["K"])
    # the first stage's layers see the same (dense) inputs either way; later stages see sparse ones
    first = {r["weight"]: r["output_error"] for r in one.details["layers"]}
    assert any(r["stage"] > 1 and r["output_error"] != first[r["weight"]] for r in staged.details["layers"])
    assert all(r["output_error"] == pytest.approx(first[r["weight"]], rel=1e-6) for r in staged.details["layers"] if r["stage"] == 1)


def test_zoo_owl_ratios_average_to_target(zoo_model):
    z = zoo_model("gpt2")
    model = copy_model(z.loaded.model)
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=0)
    report = Sparsify(ratio=0.7, method="wanda", layerwise="owl", owl_lambda=0.1, measure_zip=False).apply(
        model, PassContext(loaded=z.loaded, calibration=calib))
    d = report.details
    ratios = np.array([r["ratio"] for r in d["layers"]])
    assert d["sparsity"] == pytest.approx(0.7, abs=1 / 64)  # whole weights per output row of K >= 32
    assert (np.abs(ratios - 0.7) <= 0.1 + 1e-6).all() and ratios.max() - ratios.min() > 0.05
    for r in d["layers"]:
        assert r["sparsity"] == pytest.approx(r["ratio"], abs=1 / r["K"])


def test_exclude_keeps_matching_weights(zoo_model):
    z = zoo_model("llama")
    model = copy_model(z.loaded.model)
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    report = Sparsify(ratio=0.5, exclude=["*mlp*"], measure_zip=False).apply(model, PassContext())
    excluded = [what for what, why in report.left_alone if why == "matches exclude="]
    assert len(excluded) == 6  # gate, up, down of 2 layers
    sparsified = {r["weight"] for r in report.details["layers"]}
    for name, value in model.graph.initializers.items():
        if name not in sparsified:
            np.testing.assert_array_equal(value.const_value.numpy(), before[name])


def test_composes_prune_sparsify_int8(zoo_model, tmp_path):
    z = zoo_model("bert")
    calib = data.synthetic(z.loaded.inputs, n_batches=2, seed=0)
    result = slimc.compile(z.loaded, "prune(ratio=0.25, target=ffn),sparsify(method=wanda),int8(force=true)",
                           calibration=calib, measure_latency=False)
    assert [r.name for r in result.receipt.passes] == ["prune", "sparsify", "int8"]
    path = tmp_path / "out.onnx"
    result.save(path)
    onnx.checker.check_model(str(path), full_check=True)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("options,match", [
    ({"ratio": 1.5}, "out of range"),
    ({"ratio": -0.1}, "out of range"),
    ({"pattern": "3:2"}, "not understood"),
    ({"pattern": "dense"}, "not understood"),
    ({"pattern": "2:4", "ratio": 0.7}, "contradicts"),
    ({"layerwise": "owl", "pattern": "2:4"}, "N:M pattern fixes"),
    ({"method": "obs"}, "unknown"),
    ({"stages": 0}, "stages"),
    ({"owl_lambda": 0.7}, "owl_lambda"),
])
def test_bad_options(options, match):
    with pytest.raises(PassConfigError, match=match):
        Sparsify(**options)


def test_spec_parses_nm_patterns():
    (p,) = parse_pipeline("sparsify(pattern=2:4, method=wanda)")
    assert p.nm == (2, 4) and p.target == 0.5
    (p,) = parse_pipeline("sparsify(pattern='4:8', exclude=[*lm_head*])")
    assert p.nm == (4, 8) and p.exclude == ["*lm_head*"]


def test_data_driven_methods_need_data():
    model = ir.serde.deserialize_model(_mixed_model())
    for options in ({"method": "wanda"}, {"method": "sparsegpt"}, {"layerwise": "owl"}):
        with pytest.raises(DataError, match="calibration data"):
            Sparsify(**options).apply(model, PassContext())


def test_already_quantized_is_refused(zoo_model):
    z = zoo_model("llama")
    quantized = slimc.compile(z.loaded, "int4(force=true)", measure_latency=False).model
    with pytest.raises(PassConfigError, match="already quantized"):
        Sparsify().apply(quantized, PassContext())


def test_bench_markdown_table():
    from slimc.tools import bench_sparsify

    row = {"spec": "sparsify(pattern=2:4, method=wanda)", "sparsity": 0.5, "nm_valid": True, "perplexity": 30.5,
           "perplexity_dense": 22.6, "perplexity_ratio": 1.35, "zip_bytes_before": 5e8, "zip_bytes_after": 4e8, "seconds": 12.0}
    text = bench_sparsify.markdown({"evaluation": "e", "calibration": "c", "machine": "m", "rows": [row, {**row, "nm_valid": None}]})
    assert "| `sparsify(pattern=2:4, method=wanda)` | 50.0% | yes | 30.50 (22.60) | 1.35 | 500 -> 400 | 12 |" in text
    assert text.count("\n| `sparsify") == 2 and "|  |" in text
