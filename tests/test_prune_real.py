"""`prune` on the real pretrained models (slow): SmolLM2-135M (GQA 9/3), all-MiniLM-L6-v2, EfficientNet-Lite0.

Each pruned model passes the full ONNX checker (inside compile()'s verification and again
here on the saved file) and runs in ORT at a batch size and sequence length other than the
export's. Fidelity numbers in docs/passes/prune.md come from ``tools/prune_fidelity.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import slimc
from slimc import frontends
from slimc.backends.onnxruntime import create_session, run
from slimc.passes.prune import DependencyGraph

pytestmark = pytest.mark.slow


def _run_saved(result, path, feed):
    result.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    outputs = run(create_session(path), feed)
    assert all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f")
    return outputs


def _tokens(batch: int, seq: int, names) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(100, 1000, (batch, seq))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {n: feeds[n] for n in names}


def test_smollm2_gqa_groups_and_kv_group_pruning(tmp_path):
    from slimc.tools.models import smollm2_gguf

    # the plain form: prune cannot yet change a KV cache's head count (tests/test_kv_export.py)
    loaded = frontends.load(smollm2_gguf(), kv_cache=False)
    groups = DependencyGraph(ir.serde.deserialize_model(ir.serde.serialize_model(loaded.model))).groups()
    layer0 = {g.kind: g.size for g in groups if ".layers.0." in g.name and not g.is_blocked()}
    # 9 query heads in 3 KV groups of 3, head dim 64, FFN 1536
    assert layer0 == {"kv_heads": 3, "heads": 3, "head_dim": 64, "ffn": 1536}
    result = slimc.compile(loaded, "prune(ratio=0.34, target=kv_heads)", measure_latency=False)
    (report,) = result.receipt.passes
    assert {(p["before"], p["after"]) for p in report.details["groups_pruned"]} == {(3, 2)}
    assert len(report.details["groups_pruned"]) == 30
    names = [i.name for i in loaded.inputs]
    (logits,) = _run_saved(result, tmp_path / "smollm2.onnx", _tokens(2, 5, names))[:1]
    assert logits.shape == (2, 5, 49152)


def test_minilm_prunes_heads_and_ffn(tmp_path):
    from slimc.tools.models import minilm_path

    loaded = frontends.load(minilm_path())
    result = slimc.compile(loaded, "prune(ratio=0.5)", measure_latency=False)
    (report,) = result.receipt.passes
    kinds = {p["kind"] for p in report.details["groups_pruned"]}
    assert kinds == {"heads", "ffn"}
    assert result.receipt.after["params"] < result.receipt.before["params"]
    names = [i.name for i in loaded.inputs]
    (hidden,) = _run_saved(result, tmp_path / "minilm.onnx", _tokens(3, 9, names))[:1]
    assert hidden.shape == (3, 9, 384)  # the interface (hidden width) is never pruned by default


def test_efficientnet_lite0_prunes_channels(tmp_path):
    import torch

    from slimc.tools.models import efficientnet_lite0

    loaded = frontends.load(efficientnet_lite0(), torch.randn(1, 3, 224, 224))
    result = slimc.compile(loaded, "prune(ratio=0.25, round_to=8)", measure_latency=False)
    (report,) = result.receipt.passes
    assert report.details["groups_pruned"] and all(p["after"] % 8 == 0 for p in report.details["groups_pruned"])
    assert result.receipt.after["macs"] < 0.8 * result.receipt.before["macs"]
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (logits,) = _run_saved(result, tmp_path / "effnet.onnx", {loaded.inputs[0].name: x})[:1]
    assert logits.shape == (2, 1000)


def test_demo_prunes_minilm_and_writes_its_receipt(tmp_path):
    """`slimc demo` (the README's first command) runs this: a real model pruned, verified, measured."""
    import json

    from slimc.tools.demo import run_demo

    result = run_demo("minilm", tmp_path / "demo", quiet=True)
    (report,) = result.receipt.passes
    assert report.name == "prune" and report.details["groups_pruned"]
    assert result.receipt.after["params"] < result.receipt.before["params"]
    assert result.receipt.fidelity["metrics"]["embedding_cosine"] > 0.8  # 0.916 measured at -25% of the FFN
    saved = json.loads((tmp_path / "demo" / "minilm.receipt.json").read_text())
    assert saved["passes"][0]["name"] == "prune"
    onnx.checker.check_model(str(tmp_path / "demo" / "minilm.onnx"), full_check=True)
