"""Generation with a KV cache (slimc.generate, slimc.textgen, slimc.generate_genai, `slimc generate`).

The graphs are ONNX Runtime GenAI model-builder exports of a tiny random GQA Llama
(`llm_models`): greedy tokens must equal transformers' ``generate()`` on the same weights, and
``og.Generator``'s tokens on the same folder must equal slimc's loop.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")

import llm_models  # noqa: E402

import slimc  # noqa: E402
from slimc.errors import ModelLoadError, NoKVCacheError, OptionError  # noqa: E402
from slimc.generate import SamplingConfig, choose_tokens  # noqa: E402
from slimc.textgen import TextStream, open_generator  # noqa: E402

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF folder, GenAI builder folder) of one tiny random Llama."""
    root = tmp_path_factory.mktemp("llama")
    hf = llm_models.llama_folder(root / "hf")
    return hf, llm_models.genai_build(hf, root / "genai")


@pytest.fixture(scope="module")
def onnx_gen(llama):
    return open_generator(llama[1] / "model.onnx")


def _hf_greedy(folder, ids, n):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=1, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers_generate(llama, onnx_gen):
    ids = onnx_gen.tokenizer(PROMPT)["input_ids"]
    result = onnx_gen.generate(PROMPT, max_new_tokens=24, eos_token_ids=())
    assert result.tokens == _hf_greedy(llama[0], ids, 24)
    assert result.stats.prompt_tokens == len(ids) and result.stats.new_tokens == 24
    assert result.stats.stop_reason == "max_new_tokens"
    assert result.stats.time_to_first_token_s > 0 and result.stats.decode_tokens_per_s > 0


def test_genai_generator_equals_slimc_loop(llama, onnx_gen):
    ids = onnx_gen.tokenizer(PROMPT)["input_ids"]
    genai = open_generator(llama[1])
    ours = onnx_gen.generate(PROMPT, max_new_tokens=20)
    theirs = genai.generate(PROMPT, prompt_ids=ids, max_new_tokens=20)
    assert theirs.tokens == ours.tokens
    assert theirs.stats.new_tokens == 20 and theirs.stats.prompt_tokens == len(ids)


def test_sampling_is_seeded_and_top_k_1_is_greedy(onnx_gen):
    sample = dict(max_new_tokens=16, temperature=1.5)
    a = onnx_gen.generate(PROMPT, seed=7, **sample).tokens
    assert onnx_gen.generate(PROMPT, seed=7, **sample).tokens == a
    assert onnx_gen.generate(PROMPT, seed=8, **sample).tokens != a
    greedy = onnx_gen.generate(PROMPT, max_new_tokens=16).tokens
    assert onnx_gen.generate(PROMPT, seed=7, max_new_tokens=16, temperature=1.5, top_k=1).tokens == greedy
    assert greedy != a  # a random model sampled hot does not follow its argmax


def test_choose_tokens_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    rng = np.random.default_rng(0)
    top_k = choose_tokens(logits, SamplingConfig(temperature=1.0, top_k=2), rng)
    assert set(top_k.tolist()) == {0, 1}
    # nucleus 0.75: tokens 0 and 1 (0.5 alone falls short; 0.5 + 0.3 reaches it), in ratio 5:3
    top_p = choose_tokens(logits, SamplingConfig(temperature=1.0, top_p=0.75), rng)
    assert set(top_p.tolist()) == {0, 1}
    assert 0.55 < np.mean(top_p == 0) < 0.70
    plain = choose_tokens(logits, SamplingConfig(temperature=1.0), rng)
    assert set(plain.tolist()) == {0, 1, 2, 3}
    cold = choose_tokens(logits, SamplingConfig(temperature=0.05), rng)
    assert np.mean(cold == 0) > 0.99


@pytest.mark.parametrize("options, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=5), "temperature=0 decodes greedily"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_k=-2), "top_k"),
])
def test_bad_sampling_options_are_typed_errors(options, message):
    with pytest.raises(OptionError, match=message):
        SamplingConfig(**options)


def test_stops_at_eos(onnx_gen):
    free = onnx_gen.generate(PROMPT, max_new_tokens=12, eos_token_ids=()).tokens
    stop = free[4]
    result = onnx_gen.generate(PROMPT, max_new_tokens=12, eos_token_ids=(stop,))
    assert result.tokens == free[: free.index(stop) + 1]
    assert result.stats.stop_reason == "eos"


def test_streamed_text_equals_decoded_text_across_multibyte_pieces(onnx_gen):
    tok = onnx_gen.tokenizer
    text = "café 日本語のテキスト naïve"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    partial = [i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i])]
    assert partial, "the test text must split a UTF-8 character across tokens"
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    streamed = []
    result = onnx_gen.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=3, on_text=streamed.append)
    assert "".join(streamed) == result.text


def test_context_length_caps_generation(onnx_gen):
    long_prompt = " ".join(["fox"] * 200)
    with pytest.raises(OptionError, match="at most 128 positions"):
        onnx_gen.generate(long_prompt, max_new_tokens=4)
    prompt = " ".join([PROMPT] * 8)
    ids = onnx_gen.tokenizer(prompt)["input_ids"]
    assert 64 < len(ids) < 128
    result = onnx_gen.generate(prompt, max_new_tokens=200)
    assert result.stats.new_tokens == 128 - len(ids) and result.stats.stop_reason == "context_length"


def test_batch_of_equal_prompts_and_left_padding_refused_for_fused_attention(onnx_gen):
    one = onnx_gen.generate("hello world", max_new_tokens=6).tokens
    two = onnx_gen.generate(["hello world", "hello world"], max_new_tokens=6)
    assert two.all_tokens == [one, one] and two.stats.batch == 2
    with pytest.raises(OptionError, match="one at a time"):
        onnx_gen.generate(["hello world, this is", "fox"], max_new_tokens=3)


def test_chat_template(onnx_gen, llama, tmp_path):
    plain = onnx_gen.generate("hi", max_new_tokens=2)
    chat = onnx_gen.generate("hi", chat=True, max_new_tokens=2)
    expected = onnx_gen.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                      tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert chat.stats.prompt_tokens == len(expected) > plain.stats.prompt_tokens
    no_template = tmp_path / "tok"
    llm_models.tokenizer(chat_template=False).save_pretrained(no_template)
    gen = open_generator(llama[1] / "model.onnx", tokenizer=no_template)
    with pytest.raises(OptionError, match="no chat template"):
        gen.generate("hi", chat=True, max_new_tokens=2)


def test_graph_without_kv_cache_is_a_typed_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    table = helper.make_tensor("emb", TensorProto.FLOAT, [300, 8], np.zeros(2400, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["logits"])], "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 8])], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "lm.onnx")
    llm_models.tokenizer().save_pretrained(tmp_path)
    with pytest.raises(NoKVCacheError, match="onnxruntime_genai.models.builder"):
        open_generator(tmp_path / "lm.onnx")
    from slimc.tools.cli import main

    assert main(["generate", str(tmp_path / "lm.onnx"), "--prompt", "hi"]) == 2


def test_missing_tokenizer_and_dynamic_dims_without_config(llama, tmp_path):
    import shutil

    shutil.copy(llama[1] / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(llama[1] / "model.onnx.data", tmp_path / "model.onnx.data")
    with pytest.raises(ModelLoadError, match="--tokenizer"):
        open_generator(tmp_path / "model.onnx")
    # the builder's cache head_dim is dynamic: without genai_config.json/config.json beside it, refuse
    with pytest.raises(ModelLoadError, match="config.json"):
        open_generator(tmp_path / "model.onnx", tokenizer=llama[0])
    shutil.copy(llama[0] / "config.json", tmp_path / "config.json")
    assert open_generator(tmp_path / "model.onnx", tokenizer=llama[0]).generate(PROMPT, max_new_tokens=3).stats.new_tokens == 3


@pytest.mark.parametrize("target", ["onnx", "genai"])
def test_cli_streams_text_and_prints_speed(llama, onnx_gen, target, capsys):
    from slimc.tools.cli import main

    model = llama[1] / "model.onnx" if target == "onnx" else llama[1]
    assert main(["generate", str(model), "--prompt", PROMPT, "--max-new-tokens", "8", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    expected = (onnx_gen if target == "onnx" else open_generator(llama[1])).generate(PROMPT, max_new_tokens=8)
    assert out == expected.text + "\n" and expected.stats.new_tokens == 8
    assert "tokens/s" in err and "time to first token" in err and "8 new tokens" in err


def test_public_api_one_call(llama):
    result = slimc.generate_text(llama[1] / "model.onnx", PROMPT, max_new_tokens=5, temperature=0.7, seed=1)
    again = slimc.generate_text(llama[1] / "model.onnx", PROMPT, max_new_tokens=5, temperature=0.7, seed=1)
    assert result.tokens == again.tokens and len(result.tokens) == 5 and str(result) == result.text


def test_stream_keeps_the_space_a_sentencepiece_token_carries():
    """Metaspace tokenizers (Llama, Mistral) drop a word's leading space at the start of a decoded string:
    the streamed text, decoded with the prompt's last tokens as context, keeps it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from slimc.textgen import stream_text

    words = ["<unk>", "▁The", "▁capital", "▁is", "▁Paris", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    prompt = fast("The capital is")["input_ids"]
    assert fast.decode([4, 5]) == "Paris."  # decoded alone, the space is gone
    assert stream_text(fast, prompt, [4, 5]) == " Paris."
    stream = TextStream(fast, prompt)
    assert [stream.push(4), stream.push(5), stream.flush()] == [" Paris", ".", ""]
