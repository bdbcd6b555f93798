"""The pruning benchmark's core on a tiny bottleneck ResNet: structure of the report, and
Torch-Pruning really removing MACs. Timings are recorded, never asserted."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")

from slimc.tools import bench_prune  # noqa: E402


def tiny_resnet() -> bench_prune.Case:
    config = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=10)
    return bench_prune.resnet_case(config, size=64, name="tiny-resnet")


def test_bench_tiny_resnet(tmp_path):
    report = bench_prune.run([tiny_resnet()], ratio=0.5, repeats=1)

    assert report["ratio"] == 0.5 and report["machine"]
    assert report["versions"]["torch-pruning"]
    (item,) = report["models"]
    assert item["model"] == "tiny-resnet" and item["input"] == "pixel_values 1x3x64x64"
    results = item["results"]
    assert set(results) == {"baseline", "torch-pruning", "slimc"}

    base, tp = results["baseline"], results["torch-pruning"]
    assert base["macs"] > 0 and base["params"] > 0 and base["macs_unresolved_nodes"] == 0
    assert base["latency"]["runs"] >= 1 and base["latency"]["median_ms"] > 0
    assert tp["status"] == "ok", tp.get("note")
    assert tp["macs_ratio"] > 1 and tp["params_ratio"] > 1
    assert tp["macs"] < base["macs"] and tp["prune_seconds"] >= 0
    assert tp["speedup"] > 0 and "latency" in tp

    slimc_entry = results["slimc"]
    assert slimc_entry["status"] == "ok", slimc_entry.get("note")
    assert {"macs_ratio", "params_ratio", "speedup", "prune_seconds", "latency"} <= set(slimc_entry)
    assert slimc_entry["macs_ratio"] > 1 and slimc_entry["params_ratio"] > 1

    json.dumps(report)  # the --out file must be writable as JSON
    table = bench_prune.markdown(report)
    assert "| tiny-resnet | torch-pruning |" in table and report["machine"] in table
    assert table.count("| tiny-resnet |") == 3


def test_cli_rejects_unknown_model():
    with pytest.raises(SystemExit):
        bench_prune.main(["--models", "alexnet"])


def test_bench_tiny_bert_sdpa_export_heads_and_ffn():
    """The SDPA case: the file torch.onnx.export writes at its defaults, pruned by prune(ratio) alone."""
    config = tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64, attn_implementation="sdpa")
    case = bench_prune.bert_sdpa_case(config, seq=16, name="tiny-bert-sdpa")
    assert case.export == "dynamo"
    report = bench_prune.run([case], ratio=0.5, repeats=1, hidden=False)
    results = report["models"][0]["results"]
    assert results["torch-pruning"]["status"] == "not run"
    slimc_entry = results["slimc"]
    assert slimc_entry["status"] == "ok", slimc_entry.get("note")
    assert "heads 8->4" in slimc_entry["note"] and slimc_entry["macs_ratio"] > 1.5
    assert slimc_entry["speedup_per_macs_ratio"] > 0
    assert "| tiny-bert-sdpa | torch-pruning | - |" in bench_prune.markdown(report)
