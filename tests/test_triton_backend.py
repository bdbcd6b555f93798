"""backend="triton" on every zoo model after every pass: the lowered torch module agrees with ONNX
Runtime on the same IR, keeps dynamic batch/sequence, fine-tunes, saves as .pt2, compiles and
exports back to ONNX."""

from __future__ import annotations

import json

import numpy as np
import pytest
from zoo import TOKEN_MODELS, ZOO, shifted_inputs

torch = pytest.importorskip("torch")

import slimc  # noqa: E402
from slimc import data  # noqa: E402
from slimc.backends import onnxruntime as ort_backend  # noqa: E402
from slimc.backends.triton import module as tm  # noqa: E402
from slimc.errors import TargetError  # noqa: E402
from slimc.onnx_io import save_onnx  # noqa: E402

COMMON = ["cleanup", "prune(ratio=0.3)", "int8(force=true)", "int4(force=true)", "sparsify(pattern=2:4)", "fp16"]
EXTRA = {
    "bert": ["int8(mode=static,force=true)", "int8(mode=dynamic,force=true)", "smoothquant,int8(force=true)"],
    "llama": ["int8(mode=dynamic,force=true)", "smoothquant,int8(force=true)", "layerskip(count=1,protect_first=0,measure_latency=false)",
              "prune(ratio=0.3),int8(force=true)"],
    "vit": ["int8(mode=static,force=true)", "layerskip(count=1,protect_first=0,measure_latency=false)"],
    "resnet": ["prune(ratio=0.3),int8(force=true)"],
}
CASES = [(name, spec) for name in sorted(ZOO) for spec in COMMON + EXTRA.get(name, [])]
# Which kernel a pass must route the model's matmuls to (CNN weights are mostly convs: int8 is static QDQ conv).
KERNEL = {"int4(force=true)": "matmul_nbits", "sparsify(pattern=2:4)": "sparse24_linear"}


def _compile(zoo_model, name, spec, **kw):
    loaded = zoo_model(name).loaded
    calib = data.synthetic(loaded.inputs, n_batches=2, seed=3)
    return slimc.compile(loaded, spec, calibration=calib, measure_latency=False, backend="triton", device="cpu", **kw)


def _ort(model, tmp_path):
    path = tmp_path / "m.onnx"
    save_onnx(model, path)
    return ort_backend.create_session(path)


@pytest.mark.parametrize("name,spec", CASES)
def test_lowered_module_agrees_with_onnxruntime(zoo_model, name, spec, tmp_path):
    result = _compile(zoo_model, name, spec)
    backend = result.receipt.backend
    agree = backend["agreement_with_onnxruntime"]
    assert agree["ok"] and agree["batches"] >= 1
    kernels = backend["lowering"]["kernels"]
    if spec in KERNEL and name in TOKEN_MODELS + ("vit",):
        assert kernels.get(KERNEL[spec], 0) >= 4, kernels
    if spec == "int8(force=true)" and name in TOKEN_MODELS:  # auto: static or dynamic, whichever measured faster
        assert kernels.get("dynamic_linear", 0) + kernels.get("qdq_linear", 0) >= 4, kernels
    if spec == "int8(mode=dynamic,force=true)":
        assert kernels.get("dynamic_linear", 0) >= 4, kernels
    if spec == "int8(mode=static,force=true)":
        assert kernels.get("qdq_linear", 0) >= 4, kernels
    if spec == "int8(force=true)" and name in ("mobilenet_v2", "resnet_bottleneck"):  # static: 1x1 convs are matmuls
        assert kernels.get("qdq_conv1x1", 0) >= 5, kernels
    if spec in ("cleanup", "prune(ratio=0.3)", "fp16"):
        assert not kernels  # nothing quantized or sparse: plain torch ops only
    # Shapes unlike the compile's (batch 3, sequence 7, padded masks): dynamic dims stayed dynamic.
    feeds = {k: v.numpy() for k, v in shifted_inputs(zoo_model(name).example).items()}
    ref = ort_backend.run(_ort(result.model, tmp_path), feeds)
    got = tm.run(result.module, feeds)
    check = tm.agreement([ref], [got], result.module.output_names, tm.tolerance_kind(result.model))
    assert check["ok"], check


def test_quantized_tolerance_is_orts_int8_activations_not_the_kernel(zoo_model, tmp_path):
    """int4 differs from ORT by ~0.5%: ORT's MatMulNBits (accuracy_level=4) quantizes activations to int8.
    With accuracy_level=0 ORT computes what the op defines, and the lowering matches it to float precision."""
    import onnx_ir as ir

    result = _compile(zoo_model, "llama", "int4(force=true)")
    for node in result.model.graph:
        if node.op_type == "MatMulNBits":
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
    feeds = {k: v.numpy() for k, v in shifted_inputs(zoo_model("llama").example).items()}
    ref = ort_backend.run(_ort(result.model, tmp_path), feeds)
    got = tm.run(result.module, feeds)
    assert tm.agreement([ref], [got], result.module.output_names, "exact")["ok"]


@pytest.mark.parametrize("name,spec", [("bert", "int8(mode=dynamic,force=true)"), ("llama", "int4(force=true)"),
                                       ("vit", "int8(mode=static,force=true)"), ("mobilenet_v2", "sparsify(pattern=2:4)")])
def test_module_runs_on_another_device(zoo_model, name, spec):
    """On the meta device (no data): every tensor the graph makes lands on the inputs' device, as on a GPU."""
    result = _compile(zoo_model, name, spec)
    gm = tm.to_torch(result, device="meta")
    with torch.no_grad():
        out = gm(*tm.feed(gm, result._example, "meta"))
    assert all(o.device.type == "meta" for o in out)


def test_receipt_has_the_backend_section(zoo_model, tmp_path):
    result = _compile(zoo_model, "bert", "int8(mode=dynamic,force=true)")
    text = str(result.receipt)
    assert "backend triton" in text and "dynamic_linear x" in text and "agreement with ONNX Runtime" in text
    result.receipt.save(tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["backend"]["backend"] == "triton" and saved["backend"]["fidelity"]["cosine"] > 0.99


def test_module_fidelity_is_measured_on_the_rows_ort_was(zoo_model, monkeypatch):
    """Dynamic int8 takes one activation scale per run, so grouping rows changes the result: with
    sub-batches of one row (a tiny output budget) the module's fidelity is measured on the same rows
    as ORT's, and the two agree (the module on whole batches of 4 differed by 0.5-1%)."""
    from slimc import subbatch

    monkeypatch.setattr(subbatch, "OUTPUT_BUDGET_BYTES", 1)
    loaded = zoo_model("llama").loaded
    evaluation = data.synthetic(loaded.inputs, n_batches=2, seed=5, sizes={"batch": 4})
    result = slimc.compile(loaded, "int8(mode=dynamic,force=true)", calibration=data.synthetic(loaded.inputs, 2, 3),
                           evaluation=evaluation, measure_latency=False, backend="triton", device="cpu")
    ort, torch_ = result.receipt.fidelity["metrics"], result.receipt.backend["fidelity"]
    assert ort["samples"] == torch_["samples"] == 8
    # Same rows: within 0.1% (float order); grouped as whole batches the module differed by 0.5-1%.
    for metric in ("max_abs_error", "mean_abs_error"):
        assert torch_[metric] == pytest.approx(ort[metric], rel=0.003), metric


def test_torch_latency_is_measured_against_the_input_model_lowered_the_same_way(zoo_model):
    loaded = zoo_model("gpt2").loaded
    result = slimc.compile(loaded, "prune(ratio=0.5)", backend="triton", device="cpu", measure_latency=True)
    lat = result.receipt.backend["latency"]
    assert lat["before"]["median_ms"] > 0 and lat["after"]["median_ms"] > 0
    assert lat["speedup"] == pytest.approx(lat["before"]["median_ms"] / lat["after"]["median_ms"])
    assert "torch" in lat["machine"]


@pytest.mark.parametrize("name,spec", [("llama", "int4(force=true)"), ("bert", "int8(mode=dynamic,force=true)"),
                                       ("vit", "int8(mode=static,force=true)"), ("resnet", "sparsify(pattern=2:4)")])
def test_pt2_round_trip_keeps_dynamic_dims(zoo_model, name, spec, tmp_path):
    result = _compile(zoo_model, name, spec)
    written = result.save(tmp_path / "m.pt2")
    assert written == [tmp_path / "m.pt2"] and not list(tmp_path.glob(".slimc-*"))
    program = tm.load(tmp_path / "m.pt2")
    feeds = {k: v.numpy() for k, v in shifted_inputs(zoo_model(name).example).items()}
    expect = tm.run(result.module, feeds)
    with torch.no_grad():
        got = program.module()(*tm.feed(result.module, feeds))
    for e, g in zip(expect, got, strict=True):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-5)
    if spec != "sparsify(pattern=2:4)" or name != "resnet":
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any("slimc." in o for o in ops), "the kernels stay one custom op each in the program"
    # And the .onnx path still writes the compressed ONNX.
    assert result.save(tmp_path / "m.onnx")[0].suffix == ".onnx"


def test_torch_compile_runs_the_module(zoo_model):
    result = _compile(zoo_model, "gpt2", "int4(force=true)")
    feeds = {k: v.numpy() for k, v in shifted_inputs(zoo_model("gpt2").example).items()}
    eager = tm.run(result.module, feeds)
    compiled = torch.compile(result.module)
    with torch.no_grad():
        got = compiled(*tm.feed(result.module, feeds))
    np.testing.assert_allclose(got[0].numpy(), eager[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,spec", [("llama", "int4(force=true)"), ("vit", "int8(mode=static,force=true)"),
                                       ("bert", "sparsify(pattern=2:4)")])
def test_export_back_to_onnx_after_fine_tuning(zoo_model, name, spec, tmp_path):
    result = _compile(zoo_model, name, spec)
    gm = result.module
    feeds = {k: v.numpy() for k, v in shifted_inputs(zoo_model(name).example).items()}
    # One optimiser step changes the float parameters; the exported ONNX must carry the new values.
    out = gm(*tm.feed(gm, feeds))[0]
    out.float().pow(2).mean().backward()
    with torch.no_grad():
        for p in gm.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    tm.to_onnx(gm, result._example, tmp_path / "back.onnx", result.model)
    ref = tm.run(gm, feeds)
    got = ort_backend.run(ort_backend.create_session(tmp_path / "back.onnx"), feeds)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,spec,param", [("llama", "int4(force=true)", "norm"), ("bert", "int8(mode=dynamic,force=true)", "LayerNorm"),
                                             ("vit", "int8(mode=static,force=true)", "layernorm"),
                                             ("gpt2", "sparsify(pattern=2:4)", "values")])
def test_gradients_reach_float_parameters_through_the_kernels(zoo_model, name, spec, param):
    result = _compile(zoo_model, name, spec)
    gm = result.module
    out = gm(*tm.feed(gm, result._example))[0]
    out.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in gm.named_parameters()}
    # Parameters before the first quantized matmul get gradients through it (straight-through).
    reached = [n for n, g in grads.items() if param.lower() in n.lower() and g is not None and g.abs().sum() > 0]
    assert reached, f"no gradient reached a '{param}' parameter: {sorted(n for n, g in grads.items() if g is not None)[:10]}"
    assert all(not b.requires_grad for b in gm.buffers())  # integer weights, scales and metadata are frozen


def test_fine_tuning_a_pruned_model_recovers_accuracy_on_digits(tmp_path):
    """After prune(0.6) of an MLP trained on scikit-learn's digits, 60 Adam steps on the lowered
    module lower the loss and raise held-out accuracy."""
    X, y = data.digits() if hasattr(data, "digits") else pytest.importorskip("slimc.datasets").digits()
    X = torch.from_numpy(X / 16.0).float()
    y = torch.from_numpy(y)
    train, test = slice(0, 1400), slice(1400, None)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 96), torch.nn.ReLU(),
                              torch.nn.Linear(96, 10))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(mlp(X[train]), y[train]).backward()
        opt.step()
    mlp.eval()
    result = slimc.compile(mlp, "prune(ratio=0.6)", example_inputs=X[:2], backend="triton", device="cpu",
                           measure_latency=False)
    gm = result.module

    def loss_acc(rows):
        logits = gm(X[rows])[0]
        return torch.nn.functional.cross_entropy(logits, y[rows]), (logits.argmax(-1) == y[rows]).float().mean().item()

    with torch.no_grad():
        loss0, acc0 = loss_acc(test)
        train_loss0, _ = loss_acc(train)
    opt = torch.optim.Adam(gm.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss, _ = loss_acc(train)
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss1, acc1 = loss_acc(test)
        train_loss1, _ = loss_acc(train)
    assert train_loss1 < train_loss0 and loss1 < loss0
    assert acc1 > acc0, (acc0, acc1)


def test_backend_errors_are_typed(zoo_model, tmp_path):
    loaded = zoo_model("resnet").loaded
    with pytest.raises(TargetError, match="unknown backend 'tensorrt'"):
        slimc.compile(loaded, "cleanup", backend="tensorrt")
    with pytest.raises(TargetError, match="with --backend triton the artifact is a torch.export .pt2"):
        slimc.compile(loaded, "cleanup", backend="triton", target="openvino")


def test_cli_backend_triton_writes_pt2(zoo_model, tmp_path, capsys):
    from slimc.tools.cli import main

    src = tmp_path / "resnet.onnx"
    save_onnx(zoo_model("resnet").loaded.model, src)
    assert main([str(src), "--passes", "prune(ratio=0.3)", "--backend", "triton", "--device", "cpu", "--no-latency",
                 "-o", str(tmp_path / "out.pt2")]) == 0
    assert "backend triton" in capsys.readouterr().out
    assert tm.load(tmp_path / "out.pt2") is not None
    assert main([str(src), "--backend", "triton", "-o", str(tmp_path / "out.bin")]) == 2
    assert "must end in .pt2" in capsys.readouterr().err
