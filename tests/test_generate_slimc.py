"""Generation on slimc's own KV-cache exports (`slimc.frontends.hf_cache`) of a tiny random GQA Llama
folder: greedy tokens equal transformers' ``generate()``, left-padded batches equal each prompt alone,
``slimc generate HF_FOLDER`` end to end, ``result.generate`` and the receipt's decode figures."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import llm_models  # noqa: E402

import slimc  # noqa: E402

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return llm_models.llama_folder(tmp_path_factory.mktemp("llama") / "hf")


@pytest.fixture(scope="module")
def gen(folder):
    return slimc.open_generator(folder)


def _hf_greedy(folder, prompts, n):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side, tok.pad_token = "left", tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def test_greedy_on_slimc_export_equals_transformers(folder, gen):
    result = gen.generate(PROMPT, max_new_tokens=20, eos_token_ids=())
    assert result.tokens == _hf_greedy(folder, [PROMPT], 20)[0]


def test_left_padded_batch_equals_transformers_and_each_prompt_alone(folder, gen):
    prompts = [PROMPT, "hello", "café 日本語"]
    batch = gen.generate(prompts, max_new_tokens=8, eos_token_ids=())
    assert batch.all_tokens == [gen.generate(p, max_new_tokens=8, eos_token_ids=()).tokens for p in prompts]
    assert batch.all_tokens == _hf_greedy(folder, prompts, 8)


def test_cli_generate_on_hf_folder(folder, gen, capsys):
    from slimc.tools.cli import main

    assert main(["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out == gen.generate(PROMPT, max_new_tokens=6).text + "\n"
    assert "tokens/s" in err
    assert main(["generate", str(folder), "--prompt", PROMPT, "--temperature", "0.9", "--top-k", "5", "--seed", "2",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == gen.generate(PROMPT, max_new_tokens=6, temperature=0.9, top_k=5, seed=2).text + "\n"


@pytest.mark.slow  # a second torch.export of a model (10-30 s): kept out of the default run
def test_no_kv_cache_export_is_refused_with_a_hint(folder, tmp_path):
    result = slimc.compile(folder, "cleanup", kv_cache=False, measure_latency=False)
    assert result.receipt.decode is None
    with pytest.raises(slimc.NoKVCacheError, match="KV cache"):
        result.generate(PROMPT, max_new_tokens=2)


def test_compile_receipt_measures_decoding_and_result_generates(folder, gen):
    result = slimc.compile(folder, "cleanup", seq_len=24)
    decode = result.receipt.decode
    assert decode["prompt_tokens"] == 24 and decode["decode_step"]["past_tokens"] == 24
    assert decode["time_to_first_token"]["feed"] == "1x24" and decode["decode_step"]["feed"] == "1x1"
    assert set(decode["tokens_per_s"]) == {"before", "after"}
    assert "decode tokens/s (batch 1, past 24)" in str(result.receipt)
    assert result.receipt.to_json()["decode"]["tokens_per_s"]["after"] > 0
    streamed = []
    out = result.generate(PROMPT, max_new_tokens=10, on_text=streamed.append)
    assert out.tokens == gen.generate(PROMPT, max_new_tokens=10).tokens and "".join(streamed) == out.text


def test_int4_guard_times_a_decode_step(folder):
    from slimc import frontends
    from slimc.passes.quant.int4 import Int4
    from slimc.pipeline import PassContext

    loaded = frontends.load(folder)
    report = Int4(force=True).apply(loaded.model, PassContext(loaded=loaded))
    assert report.details["guard"]["feed"] == "decode step 1x1, past 64"  # synthetic sample: 64 tokens
    prefill = Int4(force=True, latency_seq=8).apply(frontends.load(folder).model, PassContext(loaded=loaded))
    assert prefill.details["guard"]["feed"] == "1x8"


@pytest.mark.slow  # a second torch.export of a model (10-30 s): kept out of the default run
def test_gpt2_learned_positions_left_padded_batch_equals_transformers(tmp_path):
    folder = llm_models.gpt2_folder(tmp_path / "gpt2")
    prompts = [PROMPT, "hello"]
    result = slimc.open_generator(folder).generate(prompts, max_new_tokens=8, eos_token_ids=())
    assert result.all_tokens == _hf_greedy(folder, prompts, 8)


def test_fused_graph_generates_the_same_left_padded_batch(folder, gen):
    result = slimc.compile(folder, "fuse", seq_len=16, measure_latency=False)
    ops = {node.op_type for node in result.model.graph.all_nodes()}
    assert "RotaryEmbedding" in ops and "SimplifiedLayerNormalization" in ops
    prompts = [PROMPT, "hello"]
    out = result.generate(prompts, max_new_tokens=8, eos_token_ids=())
    assert out.all_tokens == gen.generate(prompts, max_new_tokens=8, eos_token_ids=()).all_tokens
