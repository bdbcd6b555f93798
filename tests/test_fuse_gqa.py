"""`fuse` writes com.microsoft GroupQueryAttention for slimc's cached attention (passes/fuse/gqa.py).

Tiny random Llamas (grouped-query: 4 query heads on 2 KV heads; multi-head: 4 on 4) exported with
their KV cache: fused and unfused graphs agree on logits and presents with an empty past, with a
4-token past, and for a left-padded batch of 2 (the attention takes the graph's own mask as its
bias); greedy generation gives the same tokens; what is not a cached attention is left alone with
the reason. ``--target genai`` with ``fuse`` is tested in tests/test_target_genai.py.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

import slimc  # noqa: E402
from slimc import frontends  # noqa: E402
from slimc.backends.targets.genai_config import uses_group_query_attention  # noqa: E402
from slimc.kvcache import cache_spec  # noqa: E402
from slimc.onnx_io import copy_model  # noqa: E402
from slimc.passes.fuse.fuse_pass import Fuse  # noqa: E402
from slimc.passes.fuse.gqa import takes_any_padding  # noqa: E402
from slimc.pipeline import PassContext  # noqa: E402

LAYERS = 2


def _llama_folder(folder, kv_heads: int):
    import llm_models

    tok = llm_models.tokenizer()
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                            num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                            initializer_range=0.2, bos_token_id=0, eos_token_id=1)
    tf.LlamaForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def exported(request, tmp_path_factory):
    folder = _llama_folder(tmp_path_factory.mktemp(f"llama{request.param}"), request.param)
    return folder, frontends.load(folder)


def _fuse(loaded):
    model = copy_model(loaded.model)
    return model, Fuse().apply(model, PassContext(loaded=loaded))


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _feed(spec, batch: int, seq: int, past: int, pad: int, rng) -> dict[str, np.ndarray]:
    """A step of ``seq`` tokens after ``past`` cached ones; the last row's first ``pad`` positions are padding."""
    mask = np.ones((batch, past + seq), np.int64)
    mask[-1, :pad] = 0
    feed = {"input_ids": rng.integers(3, 250, (batch, seq)), "attention_mask": mask,
            "position_ids": np.clip(np.cumsum(mask, 1) - 1, 0, None)[:, past:]}
    for layer in spec.layers:
        for name in layer.names[:2]:
            feed[name] = rng.standard_normal((batch, layer.kv_heads, past, layer.head_dim)).astype(np.float32)
    return feed


def test_fused_graph_matches_the_unfused_one(exported):
    _assert_fused_matches(exported[1])


@pytest.mark.slow
def test_qwen2_fuses_and_matches(tmp_path):
    """Qwen2: biased q/k/v projections (the flat tensor GQA reads is the bias Add's output)."""
    import llm_models

    tok = llm_models.tokenizer()
    torch.manual_seed(0)
    config = tf.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            initializer_range=0.2, bos_token_id=0, eos_token_id=1)
    tf.Qwen2ForCausalLM(config).eval().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    _assert_fused_matches(frontends.load(tmp_path))


def _assert_fused_matches(loaded):
    spec = cache_spec(loaded.model)
    model, report = _fuse(loaded)
    assert report.details["fused"]["GroupQueryAttention"] == LAYERS
    assert not report.left_alone and report.details["past_buffer"] == "shareable"
    ops = collections.Counter(n.op_type for n in model.graph)
    assert "Softmax" not in ops and "GatherND" in ops  # attention fused; the graph's mask kept as the bias
    pasts = [v for v in model.graph.inputs if v.name.startswith("past_key_values.")]
    assert {u.node.op_type for v in pasts for u in v.uses()} <= {"GroupQueryAttention", "Shape"}
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    heads = {(n.attributes["num_heads"].value, n.attributes["kv_num_heads"].value) for n in gqa}
    assert heads == {(4, spec.layers[0].kv_heads)}
    assert [n.attributes["scale"].value for n in gqa] == pytest.approx([8 ** -0.5] * LAYERS)
    assert uses_group_query_attention(model, spec)  # only GQA (and batch-size Shapes) read the pasts
    assert all(takes_any_padding(n) for n in gqa)  # slimc generate may batch prompts of unequal length
    before, after = _session(loaded.model), _session(model)
    rng = np.random.default_rng(0)
    # (batch, new tokens, past, left padding of the last row): prefill, left-padded prefill, decode after a
    # 4-token past with padding, and a 3-token step after a past at batch 1
    for batch, seq, past, pad in ((1, 6, 0, 0), (2, 6, 0, 3), (2, 1, 4, 2), (1, 3, 4, 0)):
        feed = _feed(spec, batch, seq, past, pad, rng)
        ref, got = before.run(None, feed), after.run(None, feed)
        real = feed["attention_mask"][:, past:] == 1  # padded query rows attend to nothing: unspecified
        np.testing.assert_allclose(got[0][real], ref[0][real], rtol=1e-4, atol=1e-5)
        for r, g in zip(ref[1:], got[1:], strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_batched_multi_token_step_after_a_past_is_refused_by_onnxruntime(exported):
    """The one case ORT 1.32's GroupQueryAttention refuses (documented in docs/passes/fuse.md)."""
    _, loaded = exported
    model, _ = _fuse(loaded)
    with pytest.raises(Exception, match="batch_size must be 1 when sequence_length > 1 and past context"):
        _session(model).run(None, _feed(cache_spec(loaded.model), 2, 3, 4, 0, np.random.default_rng(1)))


def test_greedy_tokens_equal_before_and_after_fuse(exported):
    folder, loaded = exported
    plain = slimc.compile(loaded, passes="cleanup")
    fused = slimc.compile(loaded, passes="cleanup,fuse")
    (report,) = [r for r in fused.receipt.passes if r.name == "fuse"]
    assert report.details["fused"]["GroupQueryAttention"] == LAYERS
    for prompt in ("the quick brown fox", "hello world, this is"):
        a = plain.generate(prompt, max_new_tokens=12)
        b = fused.generate(prompt, max_new_tokens=12)
        assert b.tokens == a.tokens and len(a.tokens) > 0
    # prompts of unequal length: a left-padded batch, exact because the fused attention adds the graph's mask
    prompts = ["the quick brown fox jumps over", "hello"]
    a, b = plain.generate(prompts, max_new_tokens=8), fused.generate(prompts, max_new_tokens=8)
    assert b.all_tokens == a.all_tokens and len(a.all_tokens) == 2


def test_what_is_not_a_cached_attention_is_left_alone():
    """A hand-built decoder masks with Where instead of adding a bias (and, without inferred shapes, its score
    tensor is not even proven 4-D); both attentions stay as they are, each with the reason."""
    from kv_decoders import decoder

    proto = onnx.shape_inference.infer_shapes(decoder(64, [2, 1]))
    model = ir.serde.deserialize_model(proto)
    report = Fuse(patterns=["rmsnorm", "skip_rmsnorm", "rotary", "gqa"]).apply(model, PassContext(loaded=None))
    assert not report.modified and len(report.left_alone) == 2
    assert [why for _, why in report.left_alone] == ["not a cached attention: expected Add, found Where"] * 2
    assert sum(n.op_type == "Softmax" for n in model.graph) == 2


def test_patterns_without_gqa_leave_attention(exported):
    _, loaded = exported
    model = copy_model(loaded.model)
    report = Fuse(patterns=["rmsnorm", "skip_rmsnorm", "rotary"]).apply(model, PassContext(loaded=loaded))
    assert "GroupQueryAttention" not in report.details["fused"] and "past_buffer" not in report.details
    assert not uses_group_query_attention(model, cache_spec(model))


@pytest.mark.slow
def test_gpt2_is_left_alone_with_the_reason(tmp_path):
    """GPT-2 merges the heads to [batch·seq, hidden] for its Conv1D: not proven, so left alone and exact."""
    torch.manual_seed(0)
    module = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                              bos_token_id=1, eos_token_id=2)).eval()
    ids = torch.randint(3, 96, (2, 8))
    loaded = frontends.load(module, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert cache_spec(loaded.model) is not None
    _, report = _fuse(loaded)
    assert not report.modified
    assert [why.split(" (")[0] for _, why in report.left_alone] == [
        "not a cached attention: the heads are not merged to [batch, seq, 32]"] * 2


def test_symbolic_sums_compare_in_any_order():
    """SmolLM2's export names a layer's total length ``past_seq + seq`` on the mask and ``seq + past_seq`` on
    the scores; 7 of its 30 attentions were left alone before sums were compared term by term."""
    from slimc.passes.fuse.match import same_dim

    assert same_dim("past_seq + seq", "seq + past_seq") and same_dim(8, 8)
    assert not same_dim("a - b", "b - a") and not same_dim("seq", "past_seq + seq") and not same_dim(None, None)


def test_a_graph_without_an_attention_mask_is_left_alone(exported):
    """GroupQueryAttention's lengths come from the mask's shape: without the input, nothing is fused."""
    _, loaded = exported
    model = copy_model(loaded.model)
    mask = next(v for v in model.graph.inputs if v.name == "attention_mask")
    mask.name = "padding_mask"  # the same graph, but not the KV-cache contract's input
    report = Fuse(patterns=["gqa"]).apply(model, PassContext(loaded=loaded))
    assert not report.modified
    assert [why for _, why in report.left_alone] == [
        "not a cached attention: the graph has no 2-D attention_mask input to size the cache from"] * LAYERS
