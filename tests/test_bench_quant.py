"""The quantization benchmark's core on tiny random BERT and ResNet models: every cell holds a
latency and a fidelity or an error, slimc's exact ``cleanup`` measures as exact, a failing tool
is recorded without stopping the run. Timings are recorded, never asserted."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest

pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime.quantization")

from slimc.receipt import json_safe  # noqa: E402
from slimc.tools import bench_prune, bench_quant  # noqa: E402

TOOLS = ["ort-dynamic", "ort-static", "slimc"]


def _exported_once(case: bench_quant.Case) -> bench_quant.Case:
    """The case with its export cached: the tests share one export per model (the tool never
    modifies the loaded model: slimc.compile copies it, the peers read the saved file)."""
    return dataclasses.replace(case, load=functools.cache(case.load))


@functools.cache
def tiny_bert() -> bench_quant.Case:
    config = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    base = bench_prune.bert_case(config, seq=16, name="tiny-bert")
    return _exported_once(bench_quant.random_case(base, transformer=True, calib_batches=2, eval_batches=2, batch_size=2))


@functools.cache
def tiny_resnet() -> bench_quant.Case:
    config = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=10)
    base = bench_prune.resnet_case(config, size=32, name="tiny-resnet")
    return _exported_once(bench_quant.random_case(base, transformer=False, calib_batches=2, eval_batches=2, batch_size=2))


def test_bench_tiny_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = bench_quant.run([tiny_bert(), tiny_resnet()], TOOLS, spec="cleanup", repeats=1)
    assert not list(tmp_path.iterdir())  # no library leaves files in the current folder

    assert report["spec"] == "cleanup" and report["tools"] == TOOLS and report["machine"]
    assert report["versions"]["onnxruntime"] and "nncf" in report["versions"]
    assert [item["model"] for item in report["models"]] == ["tiny-bert", "tiny-resnet"]
    for item in report["models"]:
        assert "error" not in item, item.get("error")
        assert item["synthetic"] and "seed 0" in item["calibration"] and "seed 1" in item["evaluation"]
        (label,) = item["feeds"]
        results = item["results"]
        assert set(results) == {"fp32", *TOOLS}
        assert results["fp32"]["latency"][label]["median_ms"] > 0 and results["fp32"]["size_bytes"] > 0
        for tool in TOOLS:
            cell = results[tool]
            if "error" in cell:  # a peer may fail; it must say why
                assert isinstance(cell["error"], str) and cell["error"]
                continue
            assert cell["latency"][label]["median_ms"] > 0 and cell["speedup"][label] > 0
            assert cell["size_bytes"] > 0 and cell["quantize_seconds"] >= 0
            assert "sqnr_db" in cell["fidelity"] or "error" in cell["fidelity"]
        for tool in ("ort-dynamic", "ort-static"):  # real quantizers: lossy and smaller
            cell = results[tool]
            if "error" not in cell:
                assert not cell["fidelity"]["exact"] and cell["fidelity"]["sqnr_db"] > 10
                assert cell["size_bytes"] < results["fp32"]["size_bytes"]
        slimc_cell = results["slimc"]
        assert "error" not in slimc_cell, slimc_cell.get("error")
        assert slimc_cell["fidelity"]["exact"] and slimc_cell["fidelity"]["batches"] == 2
        assert [p["name"] for p in slimc_cell["passes"]] == ["cleanup"] and slimc_cell["pass_seconds"] >= 0
        assert slimc_cell["passes"][0]["details"]

    json.dumps(json_safe(report), allow_nan=False)  # the --out file is plain JSON
    table = bench_quant.markdown(report)
    assert "| model | feed | tool | latency ms | speedup vs fp32 | fidelity metric | size MB | notes |" in table
    assert table.count("| tiny-bert |") == 4 and table.count("| tiny-resnet |") == 4
    assert "| tiny-bert | 1x16 | slimc |" in table and "| exact |" in table
    assert "| tiny-resnet | 1x3x32x32 | fp32 |" in table and "random weights, synthetic data: SQNR only |" in table
    assert report["machine"] in table and "Load average" in table


def test_failing_tool_is_recorded_and_cli_writes_files(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_quant, "make_case", lambda *args: tiny_resnet())
    out, md = tmp_path / "results.json", tmp_path / "table.md"
    assert bench_quant.main(["--models", "resnet50", "--tools", "slimc,ort-dynamic", "--slimc-spec", "prune(ratio=2)",
                             "--repeats", "1", "--out", str(out), "--markdown", str(md)]) == 0

    report = json.loads(out.read_text())
    (item,) = report["models"]
    cell = item["results"]["slimc"]
    assert "ratio" in cell["error"] and "latency" not in cell
    assert "median_ms" in item["results"]["ort-dynamic"]["latency"]["1x3x32x32"]
    table = md.read_text()
    assert "| tiny-resnet | 1x3x32x32 | slimc | - | - | - |" in table and "error: " in table


def test_fidelity_text_picks_the_task_metric():
    metrics = {"sqnr_db": 31.2, "exact": False, "perplexity_ratio": 1.0123, "top1_agreement": 0.875}
    assert bench_quant.fidelity_text(metrics, "causal-lm", synthetic=False) == "ppl ratio 1.0123 (SQNR 31.2 dB)"
    assert bench_quant.fidelity_text(metrics, "image-classifier", synthetic=False) == "top-1 agreement 0.875 (SQNR 31.2 dB)"
    assert bench_quant.fidelity_text(metrics, "image-classifier", synthetic=True) == "SQNR 31.2 dB"
    assert bench_quant.fidelity_text({"sqnr_db": None, "exact": True}, "encoder", synthetic=True) == "exact"
    assert bench_quant.fidelity_text({"error": "DataError: no batches"}, "encoder", False) == "error: DataError: no batches"


@pytest.mark.parametrize("argv", [["--models", "alexnet"], ["--tools", "tensorrt"], ["--models", ""]])
def test_cli_rejects_unknown_names(argv):
    with pytest.raises(SystemExit):
        bench_quant.main(argv)
