"""backend="triton" on the real pretrained models (slow): the lowered torch module of each
quantized or sparse model agrees with ONNX Runtime on held-out data, and its fidelity to the
input model is ORT's (same bounds as tests/test_quant_real.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import slimc  # noqa: E402
from slimc.tools import bench_quant  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text")


def _compile(case, spec):
    loaded = case.load()
    calib, evaluation = case.data(loaded)
    result = slimc.compile(loaded, spec, calibration=calib, evaluation=evaluation, measure_latency=False,
                           backend="triton", device="cpu")
    return result, result.receipt.backend


@pytest.mark.parametrize("spec,kernel,ppl", [("int4(force=true)", "matmul_nbits", 1.45),
                                             pytest.param("smoothquant,int8(mode=dynamic, force=true)", "dynamic_linear",
                                                          1.35, marks=pytest.mark.xfail(strict=False, reason=(
                                                              "torch module ppl ratio 1.116 vs ORT 1.085 after measuring "
                                                              "on ORT's sub-batches (was 1.123): cause not yet found"))),
                                             ("sparsify(pattern=2:4, method=wanda)", "sparse24_linear", 9.5)])
def test_smollm2(text_folder, spec, kernel, ppl):
    result, backend = _compile(bench_quant.smollm2(text_folder, calib_batches=2, eval_batches=2), spec)
    assert backend["agreement_with_onnxruntime"]["ok"]
    assert backend["lowering"]["kernels"][kernel] >= 150  # 30 layers x 7 projections (x 4 heads for 2:4 -> fewer)
    assert backend["fidelity"]["perplexity_ratio"] < ppl
    ort_ratio = result.receipt.fidelity["metrics"]["perplexity_ratio"]
    assert backend["fidelity"]["perplexity_ratio"] == pytest.approx(ort_ratio, rel=0.02)


def test_efficientnet_static_int8(tmp_path):
    result, backend = _compile(bench_quant.efficientnet(calib_batches=2, eval_batches=2),
                               "int8(mode=static, force=true)")
    assert backend["agreement_with_onnxruntime"]["ok"]
    assert backend["lowering"]["kernels"]["qdq_conv1x1"] >= 30  # the pointwise convs; 3x3/depthwise stay generic
    assert backend["fidelity"]["top1_agreement"] >= 0.6
    result.save(tmp_path / "effnet.pt2")
    assert (tmp_path / "effnet.pt2").stat().st_size > 1e6


def test_minilm_int8(text_folder):
    result, backend = _compile(bench_quant.minilm(text_folder, calib_batches=2, eval_batches=2),
                               "int8(mode=dynamic, force=true)")
    assert backend["agreement_with_onnxruntime"]["ok"]
    assert backend["lowering"]["kernels"]["dynamic_linear"] >= 36
    assert backend["fidelity"]["embedding_cosine"] > 0.98
