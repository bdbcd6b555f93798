"""compile() end to end on small ONNX models: receipt numbers, verification, exactness guard."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_models import tiny_cnn, tiny_cnn_macs, tiny_token_model

import slimc
from slimc import passes
from slimc.errors import DataError, OutputPathError, PassFailedError
from slimc.pipeline import Pass, PassContext, PassReport


@pytest.fixture()
def cnn_file(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(junk=True), path)
    return path


def test_compile_onnx_file_cleanup(cnn_file, tmp_path):
    result = slimc.compile(cnn_file, "cleanup", measure_latency=True)
    r = result.receipt
    assert r.before["nodes"] == 13 and r.after["nodes"] == 8
    assert r.before["macs"] == r.after["macs"] == tiny_cnn_macs(1)
    # unused.w (256) and c.half_dup (1) dropped; folding adds the constant "one" (1)
    assert r.before["params"] - r.after["params"] == 16 * 16
    assert r.after["bytes_on_disk"] < r.before["bytes_on_disk"]
    assert r.fidelity["synthetic"] is True
    assert r.fidelity["metrics"]["max_abs_error"] <= 1e-5
    assert r.latency["before"]["median_ms"] > 0 and r.latency["speedup"] > 0
    assert "exact" in r.verification[-1]["result"]
    text = str(r)
    assert "SYNTHETIC" in text and "cleanup" in text and "MACs per sample" in text
    saved = tmp_path / "out.onnx"
    result.save(saved)
    onnx.checker.check_model(str(saved), full_check=True)
    r.save(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["after"]["nodes"] == 8 and data["passes"][0]["name"] == "cleanup"


def test_input_file_is_never_modified_and_never_overwritten(cnn_file):
    original = cnn_file.read_bytes()
    result = slimc.compile(cnn_file, "cleanup", measure_latency=False)
    with pytest.raises(OutputPathError, match="overwrite the input"):
        result.save(cnn_file)
    assert cnn_file.read_bytes() == original


def test_ir_model_argument_is_copied():
    model = ir.serde.deserialize_model(tiny_cnn(junk=True))
    slimc.compile(model, "cleanup", measure_latency=False)
    assert len(model.graph) == 13


def test_evaluation_npz_is_used_and_checked(cnn_file, tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    result = slimc.compile(cnn_file, "cleanup", evaluation=tmp_path / "eval.npz", measure_latency=False)
    assert result.receipt.fidelity["synthetic"] is False
    assert result.receipt.fidelity["metrics"]["top1_agreement"] == 1.0
    np.savez(tmp_path / "bad.npz", x=x[:, :, :4, :4])
    with pytest.raises(DataError, match="x"):
        slimc.compile(cnn_file, "cleanup", evaluation=tmp_path / "bad.npz", measure_latency=False)


def test_token_model_synthetic_inputs_stay_in_vocab(tmp_path):
    path = tmp_path / "tok.onnx"
    onnx.save(tiny_token_model(vocab=50), path)
    result = slimc.compile(path, "cleanup", measure_latency=False)
    assert result.receipt.after["macs_sizes"]["batch"] == 1


@dataclasses.dataclass
class _Breaks(Pass):
    """A pass that claims exactness but perturbs a weight: verification must catch it."""

    name = "breaks_exactness"
    exact = True
    description = "test-only"

    def __post_init__(self):
        super().__init__()

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        w = model.graph.initializers["fc.w"]
        w.const_value = ir.tensor(w.const_value.numpy() * 1.5, name="fc.w")
        return PassReport(self.name, True, "scaled fc.w")


@dataclasses.dataclass
class _Crashes(Pass):
    name = "crashes"
    exact = False
    description = "test-only"

    def __post_init__(self):
        super().__init__()

    def apply(self, model, ctx):
        raise ZeroDivisionError("boom")


@pytest.fixture()
def test_passes(monkeypatch):
    monkeypatch.setitem(passes.REGISTRY, "breaks_exactness", f"{__name__}:_Breaks")
    monkeypatch.setitem(passes.REGISTRY, "crashes", f"{__name__}:_Crashes")


def test_exactness_violation_names_the_pass_and_history(cnn_file, test_passes, tmp_path):
    with pytest.raises(PassFailedError, match=r"pass 'breaks_exactness' \(after cleanup\) declares itself exact but changed output 'logits'"):
        slimc.compile(cnn_file, "cleanup,breaks_exactness", measure_latency=False)


def test_crashing_pass_is_wrapped(cnn_file, test_passes):
    with pytest.raises(PassFailedError, match=r"pass 'crashes' \(after cleanup\) failed: ZeroDivisionError: boom"):
        slimc.compile(cnn_file, ["cleanup", "crashes"], measure_latency=False)
