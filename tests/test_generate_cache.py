"""The generation loop, the receipt's decode figures and the quantizers' decode-step guard on a
hand-written KV-cache LM (`kv_toy`: standard ONNX ops, layers 0 and 3 with 2 and 1 KV heads)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import kv_toy
from slimc.generate import Generator, SamplingConfig
from slimc.kvcache import cache_spec
from slimc.pipeline import PassContext

LAYERS = {0: 2, 3: 1}
PROMPT = [5, 17, 42, 9, 100, 3]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    paths = {}
    for seed in (0, 1):
        paths[seed] = folder / f"toy{seed}.onnx"
        ir.save(kv_toy.build(LAYERS, seed), paths[seed])
    return paths


def _generator(path) -> Generator:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return Generator(session, cache_spec(ir.load(path)), pad_token_id=0)


def test_cached_greedy_equals_full_recompute_with_noncontiguous_layers(toy):
    tokens, stats = _generator(toy[0]).generate_ids([PROMPT], SamplingConfig(max_new_tokens=16))
    assert tokens[0] == kv_toy.reference_greedy(LAYERS, PROMPT, 16)
    assert stats.prompt_tokens == len(PROMPT) and stats.new_tokens == 16


def test_left_padded_batch_equals_each_prompt_alone(toy):
    gen = _generator(toy[0])
    prompts = [PROMPT, [7, 8], [250, 1, 2, 3]]
    config = SamplingConfig(max_new_tokens=10)
    rows, stats = gen.generate_ids(prompts, config)
    assert rows == [gen.generate_ids([p], config)[0][0] for p in prompts]
    assert stats.batch == 3 and stats.prompt_tokens == len(PROMPT)


def test_finished_rows_stop_at_their_eos_while_others_continue(toy):
    gen = _generator(toy[0])
    free = [gen.generate_ids([p], SamplingConfig(max_new_tokens=10))[0][0] for p in (PROMPT, [7, 8])]
    stop = free[1][2]
    rows, stats = gen.generate_ids([PROMPT, [7, 8]], SamplingConfig(max_new_tokens=10, eos_token_ids=(stop,)))
    assert rows[1] == free[1][: free[1].index(stop) + 1]
    assert rows[0] == (free[0][: free[0].index(stop) + 1] if stop in free[0] else free[0])
    assert rows[1] != free[1]  # the stop was early
    steps = []
    gen.generate_ids([[7, 8]], SamplingConfig(max_new_tokens=10, eos_token_ids=(stop,)), on_token=steps.append)
    assert [s[0] for s in steps] == rows[1]


def test_receipt_decode_figures(toy):
    from slimc.measure_decode import decode
    from slimc.receipt import _decode_lines

    batch = {"input_ids": np.array([PROMPT * 4])}
    result = decode({"before": toy[0], "after": toy[1]}, batch, seq_len=20, vocab=kv_toy.VOCAB, threads=1)
    assert result["prompt_tokens"] == 20 and result["decode_step"]["past_tokens"] == 20
    for key in ("time_to_first_token", "decode_step"):
        entry = result[key]
        assert entry["before"]["runs"] >= 3 and entry["after"]["median_ms"] > 0
        assert entry["speedup"] == pytest.approx(entry["before"]["median_ms"] / entry["after"]["median_ms"])
        assert isinstance(entry["within_noise"], bool)
    assert result["time_to_first_token"]["feed"] == "1x20" and result["decode_step"]["feed"] == "1x1"
    assert result["tokens_per_s"]["after"] == pytest.approx(1e3 / result["decode_step"]["after"]["median_ms"])
    lines = "\n".join(_decode_lines(result))
    assert "time to first token (20 tokens)" in lines and "decode tokens/s (batch 1, past 20)" in lines
    assert "not measured: boom" in _decode_lines({"error": "boom"})[0]


def test_decode_step_feed_matches_a_real_decode_step(toy):
    """The prefill's present fed as past gives the same logits as the full sequence (what is timed is a real step)."""
    from slimc.measure_decode import step_feeds

    session = ort.InferenceSession(str(toy[0]), providers=["CPUExecutionProvider"])
    prompt = np.array([PROMPT])
    _, step = step_feeds(session, prompt, None)
    logits = session.run(["logits"], step)[0][0, -1]
    full = kv_toy.reference_logits(LAYERS, PROMPT + [PROMPT[-1]])
    np.testing.assert_allclose(logits, full, rtol=1e-4, atol=1e-4)


def test_quantizer_guard_times_a_decode_step_for_kv_models(toy):
    from slimc.kvcache import cache_spec as spec_of
    from slimc.passes.quant import common
    from slimc.passes.quant.int4 import Int4

    model = ir.load(toy[0])
    ids = np.array([PROMPT * 3])
    sample = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None],
              **spec_of(model).empty_past(1)}
    feed = common.latency_feed(PassContext(calibration=[sample]), model)
    assert feed["input_ids"].shape == (1, 1) and feed["position_ids"].tolist() == [[18]]
    assert feed["attention_mask"].shape == (1, 19)
    assert feed["past_key_values.3.key"].shape == (1, 1, 18, kv_toy.HEAD_DIM)
    assert feed["past_key_values.0.value"].shape == (1, 2, 18, kv_toy.HEAD_DIM)
    prefill = common.latency_feed(PassContext(calibration=[sample]), model, seq=4)  # latency_seq: a forward of 4 tokens
    assert prefill["input_ids"].shape == (1, 4) and prefill["past_key_values.0.key"].shape[2] == 0
    report = Int4(accuracy_level=0, force=True).apply(model, PassContext(calibration=[sample]))
    assert report.details["guard"]["feed"] == "decode step 1x1, past 18"
