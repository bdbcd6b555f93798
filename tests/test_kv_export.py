"""KV-cache export of causal LMs (`slimc.frontends.hf_cache`, the interface in `slimc.kvcache`).

Tiny random models (a Llama with grouped-query attention and a GPT-2, saved as Hugging Face
folders with a word-level tokenizer; a Llama module through the ``nn.Module`` path) are exported
with their cache. The graph is checked against transformers itself: greedy decoding through the
cache gives exactly ``generate()``'s tokens (batch 2, left padding), logits after a past of
several tokens match a full forward, and slimc's own feeds (empty past) give the receipt the same
perplexity as the graph without a cache. The passes that must keep the interface keep it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

import slimc  # noqa: E402
from slimc import frontends, kvcache  # noqa: E402
from slimc.errors import OptionError  # noqa: E402

VOCAB = 96
WORDS = [f"w{i}" for i in range(VOCAB - 4)]
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _text(n_words: int = 3000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    # a Zipf-like word stream: a model can learn nothing from it, but its perplexity is a number to compare
    picks = np.minimum(rng.zipf(1.3, n_words), len(WORDS)) - 1
    return "\n".join(" ".join(WORDS[i] for i in picks[k:k + 12]) for k in range(0, n_words, 12))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")


def _llama():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            initializer_range=0.2, **SPECIAL)
    return tf.LlamaForCausalLM(config).eval()


def _gpt2():
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                           **SPECIAL)
    return tf.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    out = {}
    for name, build in (("llama", _llama), ("gpt2", _gpt2)):
        build().save_pretrained(root / name, safe_serialization=True)
        _tokenizer().save_pretrained(root / name)
        out[name] = root / name
    (root / "text.txt").write_text(_text())
    out["text"] = root / "text.txt"
    out["cache"] = root / "cache"
    return out


@pytest.fixture(scope="module")
def exported(folders):
    """name -> LoadedModel, each exported once for the module."""
    cache = {}

    def get(name: str, kv_cache: bool | None = None):
        key = (name, kv_cache)
        if key not in cache:
            cache[key] = frontends.load(folders[name], cache_dir=folders["cache"], kv_cache=kv_cache)
        return cache[key]

    return get


def _reference(folder):
    return tf.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _step(session, spec, ids, mask, past):
    """One run of the cached graph: new tokens ``ids``, the whole mask, the past -> (logits, present)."""
    names = [i.name for i in session.get_inputs()]
    feeds = {"input_ids": ids, "attention_mask": mask, **past}
    if "position_ids" in names:
        feeds["position_ids"] = kvcache.position_ids(mask, ids.shape[1])
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    present = {}
    for layer in spec.layers:
        past_k, past_v, present_k, present_v = layer.names
        present[past_k], present[past_v] = outs[present_k], outs[present_v]
    return outs["logits"], present


def greedy(model: ir.Model, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding through the KV cache: prefill on an empty past, then one token per step."""
    spec = kvcache.cache_spec(model)
    session = _session(model)
    logits, past = _step(session, spec, ids, mask, spec.empty_past(ids.shape[0]))
    out = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        out.append(token)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        logits, past = _step(session, spec, token, mask, past)
    return np.concatenate(out, axis=1)


def _left_padded(batch: int = 2, seq: int = 7, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(4, VOCAB, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # the second prompt is 3 tokens shorter, padded on the left as generate() expects
    ids[1, :3] = SPECIAL["pad_token_id"]
    return ids, mask


def _generate(reference, ids, mask, new_tokens):
    with torch.no_grad():
        out = reference.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=SPECIAL["pad_token_id"])
    return out[:, ids.shape[1]:].numpy()


# ---- the interface -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_export_has_the_cache_interface(exported, name):
    loaded = exported(name)
    graph = loaded.model.graph
    spec = kvcache.cache_spec(loaded.model)
    assert [layer.index for layer in spec.layers] == [0, 1]
    heads = 2 if name == "llama" else 4  # Llama's GQA: 2 KV heads for 4 query heads
    assert all((layer.kv_heads, layer.head_dim) == (heads, 8) for layer in spec.layers)
    shapes = {v.name: tuple(str(d) for d in v.shape) for v in (*graph.inputs, *graph.outputs)}
    assert shapes["input_ids"] == ("batch", "seq") and shapes["attention_mask"] == ("batch", "total_seq")
    assert shapes["past_key_values.1.value"] == ("batch", str(heads), "past_seq", "8")
    assert shapes["logits"] == ("batch", "seq", str(VOCAB))
    assert shapes["present.0.key"] == ("batch", str(heads), "total_seq", "8")
    assert [v.name for v in graph.outputs][0] == "logits"
    assert spec.position_ids and shapes["position_ids"] == ("batch", "seq")
    assert loaded.task == "causal-lm"
    assert {s.name: s.kind for s in loaded.inputs}["past_key_values.0.key"] == "past_key_values"
    assert any(node.op_type == "Softmax" for node in graph.all_nodes()), "eager attention: explicit Softmax"
    gen = loaded.generation
    assert (gen.eos_token_ids, gen.bos_token_id, gen.pad_token_id, gen.context_length) == ([2], 1, 0, 128)


@pytest.mark.slow  # a second torch.export of a model (10-30 s): kept out of the default run
def test_no_kv_cache_keeps_the_plain_form_and_its_own_cache_entry(exported, folders, monkeypatch, capsys):
    import json

    from slimc.tools.cli import main

    plain = exported("llama", kv_cache=False)
    assert [v.name for v in plain.model.graph.inputs] == ["input_ids", "attention_mask"]
    assert [v.name for v in plain.model.graph.outputs] == ["logits"]
    assert kvcache.cache_spec(plain.model) is None and plain.generation.eos_token_ids == [2]
    assert kvcache.cache_spec(exported("llama").model) is not None  # the cached export is another entry
    from slimc.frontends import huggingface

    hits = huggingface.CACHE_STATS.hits
    again = frontends.load(folders["llama"], cache_dir=folders["cache"])
    assert huggingface.CACHE_STATS.hits == hits + 1 and again.generation == exported("llama").generation
    assert [v.name for v in again.model.graph.inputs] == [v.name for v in exported("llama").model.graph.inputs]
    with pytest.raises(OptionError, match="dynamic shapes"):
        frontends.load(folders["llama"], cache_dir=folders["cache"], dynamic=False, kv_cache=True)
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(folders["cache"]))  # both forms are cached there by now
    for flags, names in (([], 7), (["--no-kv-cache"], 2)):
        assert main(["inspect", str(folders["llama"]), "--json", *flags]) == 0
        assert len(json.loads(capsys.readouterr().out)["inputs"]) == names


# ---- against transformers -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_decoding_with_the_cache_equals_generate(exported, folders, name):
    ids, mask = _left_padded()
    expected = _generate(_reference(folders[name]), ids, mask, 8)
    np.testing.assert_array_equal(greedy(exported(name).model, ids, mask, 8), expected)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_logits_after_a_past_match_the_full_forward(exported, folders, name):
    loaded = exported(name)
    spec = kvcache.cache_spec(loaded.model)
    session = _session(loaded.model)
    ids = np.random.default_rng(5).integers(4, VOCAB, (3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    with torch.no_grad():
        full = _reference(folders[name])(input_ids=torch.from_numpy(ids)).logits.numpy()
    first, past = _step(session, spec, ids[:, :6], mask[:, :6], spec.empty_past(3))  # past length 0
    np.testing.assert_allclose(first, full[:, :6], rtol=1e-4, atol=1e-4)
    assert past["past_key_values.0.key"].shape[2] == 6
    later, present = _step(session, spec, ids[:, 6:], mask, past)  # past length 6, 3 new tokens
    np.testing.assert_allclose(later, full[:, 6:], rtol=1e-4, atol=1e-4)
    assert present["past_key_values.1.value"].shape[2] == 9


@pytest.mark.slow  # a second torch.export of a model (10-30 s): kept out of the default run
def test_module_path_exports_the_cache_and_leaves_the_module_alone():
    module = _llama()
    assert module.config._attn_implementation != "eager"
    loaded = frontends.load(module)  # no example inputs needed: the interface fixes them
    assert module.config._attn_implementation != "eager" and not module.training
    assert kvcache.cache_spec(loaded.model) is not None and loaded.generation.eos_token_ids == [2]
    ids, mask = _left_padded(seed=4)
    eager = _llama()
    eager.set_attn_implementation("eager")
    np.testing.assert_array_equal(greedy(loaded.model, ids, mask, 6), _generate(eager, ids, mask, 6))
    # without a cache: logits only, although the config says use_cache (a returned cache cannot be traced)
    assert module.config.use_cache
    plain = frontends.load(module, {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)},
                           kv_cache=False)
    assert [v.name for v in plain.model.graph.outputs] == ["logits"] and plain.task == "causal-lm"
    assert module.config.use_cache and module.config._attn_implementation != "eager"


# ---- slimc's own feeds and the passes ---------------------------------------------------------------


def test_receipt_perplexity_through_the_cache_equals_the_plain_graph(exported, folders):
    common = {"evaluation": str(folders["text"]), "seq_len": 32, "measure_latency": False}
    cached = slimc.compile(exported("llama"), "cleanup", **common)
    plain = slimc.compile(exported("llama", kv_cache=False), "cleanup", **common)
    got, want = cached.receipt.fidelity["metrics"], plain.receipt.fidelity["metrics"]
    assert got["tokens"] == want["tokens"] > 0
    assert got["perplexity_reference"] == pytest.approx(want["perplexity_reference"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    # MACs count the full forward at the evaluation length, past 0, the same work as the plain graph
    assert cached.receipt.before["macs"] == plain.receipt.before["macs"] > 0


def _interface(model: ir.Model) -> list[tuple]:
    return [(v.name, v.dtype, tuple(str(d) for d in v.shape)) for v in (*model.graph.inputs, *model.graph.outputs)]


@pytest.mark.parametrize("passes", ["cleanup", "int8(mode=dynamic, force=true)", "int4(force=true)",
                                    "sparsify(ratio=0.3)", "fp16"])
def test_passes_keep_the_cache_interface_and_generate(exported, folders, passes):
    loaded = exported("llama")
    result = slimc.compile(loaded, passes, calibration=str(folders["text"]), evaluation=str(folders["text"]),
                           seq_len=32, measure_latency=False)
    assert _interface(result.model) == _interface(loaded.model)
    assert result.receipt.fidelity["metrics"]["perplexity"] is not None
    ids, mask = _left_padded()
    tokens = greedy(result.model, ids, mask, 5)
    assert tokens.shape == (2, 5) and ((tokens >= 0) & (tokens < VOCAB)).all()
    if passes == "cleanup":
        np.testing.assert_array_equal(tokens, _generate(_reference(folders["llama"]), ids, mask, 5))


def test_synthetic_and_array_feeds_get_an_empty_past_and_positions(exported):
    from slimc import data

    loaded = exported("llama")
    batch = data.synthetic(loaded.inputs, n_batches=1, sizes={"seq": 6})[0]
    assert batch["past_key_values.0.key"].shape == (2, 2, 0, 8)
    np.testing.assert_array_equal(batch["position_ids"], np.tile(np.arange(6), (2, 1)))
    ids, mask = _left_padded()
    given = data.load({"input_ids": ids, "attention_mask": mask}, loaded, role="evaluation")[0]
    assert given["past_key_values.1.value"].shape == (2, 2, 0, 8)
    np.testing.assert_array_equal(given["position_ids"][1], [1, 1, 1, 0, 1, 2, 3])  # generate()'s positions


@pytest.mark.slow
def test_smollm2_gguf_generates_like_transformers():
    from slimc.tools import models

    path = models.smollm2_gguf()
    loaded = frontends.load(path)  # the session's export cache (conftest): the other SmolLM2 tests reuse it
    spec = kvcache.cache_spec(loaded.model)
    assert len(spec.layers) == 30 and {(layer.kv_heads, layer.head_dim) for layer in spec.layers} == {(3, 64)}
    assert loaded.generation.eos_token_ids and loaded.generation.context_length == 8192
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    feeds = tokenizer(["The capital of France is", "Once upon a time, there was a little"], padding=True,
                      return_tensors="np")
    ids, mask = feeds["input_ids"].astype(np.int64), feeds["attention_mask"].astype(np.int64)
    reference = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                        dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = reference.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
    np.testing.assert_array_equal(greedy(loaded.model, ids, mask, 16), out[:, ids.shape[1]:].numpy())


# ---- prune and layerskip change the cache with the model (passes/prune/cache.py, passes/skip/cache.py) ----


def test_prune_kv_heads_changes_the_cache_head_count(exported, folders):
    result = slimc.compile(exported("llama"), "prune(target=kv_heads, ratio=0.5)", calibration=str(folders["text"]),
                           seq_len=32, measure_latency=False)
    assert {layer.kv_heads for layer in kvcache.cache_spec(result.model).layers} == {1}


def test_layerskip_drops_the_skipped_blocks_cache_entries(exported, folders):
    result = slimc.compile(exported("llama"), "layerskip(count=1, protect_first=0, measure_latency=false)",
                           calibration=str(folders["text"]), seq_len=32, measure_latency=False)
    assert len(kvcache.cache_spec(result.model).layers) == 1
