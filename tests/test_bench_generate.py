"""tools/bench_generate.py on a tiny genai folder: the measurements go through onnxruntime_genai and agree with ORT."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from slimc.export import save_folder
from slimc.tools import bench_generate
from test_target_genai import _export, _greedy_ort, _source


def test_measure_reports_speed_perplexity_and_tokens_of_each_folder(tmp_path):
    path = _source(tmp_path / "src")
    exported, loaded = _export(path, tmp_path / "work")
    save_folder(exported.files, tmp_path / "a", loaded.source_paths)
    rng = np.random.default_rng(0)
    prompt, windows = rng.integers(3, 290, 16), [rng.integers(3, 290, 24) for _ in range(3)]
    results = bench_generate.measure([bench_generate.Variant("slimc-fp32", tmp_path / "a")], prompt, windows, 8, 2)
    entry = results["slimc-fp32"]
    assert entry["greedy_tokens"] == _greedy_ort(path, prompt, 8)
    assert entry["decode_tokens_per_s"] > 0 and entry["bytes"] > 0
    session = ort.InferenceSession(str(path))  # the perplexity ORT computes on the same windows
    nll = []
    for w in windows:
        feed = {"input_ids": w[None], "attention_mask": np.ones((1, len(w)), np.int64), "position_ids": np.arange(len(w))[None]}
        feed.update({v.name: np.zeros((1, 2, 0, 8), np.float32) for v in session.get_inputs() if "past" in v.name})
        logits = session.run(["logits"], feed)[0][0, :-1].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        nll += list(-logp[np.arange(len(w) - 1), w[1:]])
    assert abs(entry["perplexity"] - float(np.exp(np.mean(nll)))) < 1e-3 * entry["perplexity"]


def test_table_marks_variants_not_measured():
    results = {"order": ["builder-fp32", "slimc-fp32"], "variants": {
        "builder-fp32": {"decode_tokens_per_s": 10.0, "decode_tokens_per_s_range": [9.0, 11.0], "ttft_ms": 500.0,
                         "bytes": 5e8, "perplexity": 22.0, "greedy_tokens": [1, 2, 3]},
        "slimc-fp32": {"error": "TargetError: no KV cache"}}}
    text = bench_generate.table(results)
    assert "| slimc-fp32 | not measured: TargetError: no KV cache |" in text
    assert "| builder-fp32 | 10.0 (9.0–11.0) | 1.00× | 500 ms | 500.0 MB | 22.00 |" in text


def test_slimc_folder_reused_only_from_the_same_spec(tmp_path, monkeypatch):
    built = []

    def fake_build(hf, out, spec, evaluation):  # writes a folder the way result.save does
        out.mkdir()
        (out / "genai_config.json").write_text("{}")
        (out / f"model-{len(built)}.data").write_bytes(b"x")
        built.append(spec)
        return {"passes": spec}

    monkeypatch.setattr(bench_generate, "build_slimc", fake_build)
    folder = tmp_path / "slimc-int4"
    args = (folder, tmp_path / "hf", tmp_path, tmp_path / "eval.txt")
    assert bench_generate.build("slimc-int4", *args, "int4(method=rtn)") == {"passes": "int4(method=rtn)"}
    assert bench_generate.build("slimc-int4", *args, "int4(method=rtn)") is None  # same spec: reused
    bench_generate.build("slimc-int4", *args, bench_generate.INT4_SPEC)  # another spec: rebuilt from scratch
    assert built == ["int4(method=rtn)", bench_generate.INT4_SPEC]
    assert sorted(p.name for p in folder.iterdir()) == ["genai_config.json", "model-1.data"]
    (tmp_path / "slimc-fp32").mkdir()  # a folder without its spec file is not trusted
    (tmp_path / "slimc-fp32" / "genai_config.json").write_text("{}")
    bench_generate.build("slimc-fp32", tmp_path / "slimc-fp32", *args[1:], "unused")
    assert built[-1] == "cleanup"


def test_fused_variant_compared_with_the_builder_of_its_precision():
    row = {"decode_tokens_per_s": 10.0, "decode_tokens_per_s_range": [9.0, 11.0], "ttft_ms": 500.0,
           "bytes": 5e8, "perplexity": 22.0, "greedy_tokens": [1, 2, 3]}
    results = {"order": ["builder-fp32", "slimc-fp32-fuse"],
               "variants": {"builder-fp32": row, "slimc-fp32-fuse": {**row, "decode_tokens_per_s": 12.0}}}
    assert "| slimc-fp32-fuse | 12.0 (9.0–11.0) | 1.20× | 500 ms | 500.0 MB | 22.00 | 3/3 |" in bench_generate.table(results)
