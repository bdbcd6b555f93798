"""Passes on KV-cache graphs (`slimc.kvcache`): the cache follows what a pass removes, or stays as it is.

Tiny random causal LMs with three layers (a Llama with grouped-query attention, 4 query heads
on 2 KV heads, and a GPT-2) are exported with their cache. After ``prune`` (KV groups, heads,
FFN neurons) and ``layerskip`` (attention sub-layers, blocks, MLP sub-layers) each result must
be generation-ready: the cache inputs/outputs match the heads and layers left (and the report
says what changed), greedy decoding through the cache runs, and decoding token by token through
the cache gives the logits of one full forward over the same tokens (cache consistency). The
consumer-zeroing oracle checks every group of the cached graph with an empty and a real past.
The quantization passes keep the interface exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

import slimc  # noqa: E402
from slimc import frontends, kvcache  # noqa: E402
from slimc.onnx_io import copy_model  # noqa: E402
from slimc.passes.prune.apply import apply_plan, zero_consumers  # noqa: E402
from slimc.passes.prune.graph import DependencyGraph  # noqa: E402

VOCAB = 64
WORDS = [f"w{i}" for i in range(VOCAB - 4)]
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")


def _build(name: str):
    torch.manual_seed(0)
    if name == "llama":
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                initializer_range=0.2, **SPECIAL)
        return tf.LlamaForCausalLM(config).eval()
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, initializer_range=0.2,
                           **SPECIAL)
    return tf.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvpasses")
    rng = np.random.default_rng(0)
    picks = np.minimum(rng.zipf(1.3, 2000), len(WORDS)) - 1
    (root / "text.txt").write_text("\n".join(" ".join(WORDS[i] for i in picks[k:k + 10]) for k in range(0, 2000, 10)))
    loaded = {}
    for name in ("llama", "gpt2"):
        _build(name).save_pretrained(root / name, safe_serialization=True)
        _tokenizer().save_pretrained(root / name)
        loaded[name] = frontends.load(root / name, cache_dir=root / "cache")
    return {"loaded": loaded, "text": str(root / "text.txt")}


def _compile(setup, name: str, passes: str):
    return slimc.compile(setup["loaded"][name], passes, calibration=setup["text"], evaluation=setup["text"],
                         seq_len=16, measure_latency=False)


# ---- running the cached graph ---------------------------------------------------------------------


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def _step(session, spec, ids, mask, past):
    """One run: new tokens ``ids``, the whole mask, the past -> (logits, the next past)."""
    feeds = {"input_ids": ids, "attention_mask": mask, **past}
    if spec.position_ids:
        feeds["position_ids"] = kvcache.position_ids(mask, ids.shape[1])
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    nxt = {}
    for layer in spec.layers:
        past_k, past_v, present_k, present_v = layer.names
        nxt[past_k], nxt[past_v] = outs[present_k], outs[present_v]
    return outs["logits"], nxt


def _ids(batch=2, seq=8, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, VOCAB, (batch, seq)).astype(np.int64)


def assert_cache_consistent(model: ir.Model) -> None:
    """Token-by-token decoding through the cache gives the logits of one full forward (empty past)."""
    spec, session = kvcache.cache_spec(model), _session(model)
    ids = _ids()
    mask = np.ones_like(ids)
    full, _ = _step(session, spec, ids, mask, spec.empty_past(2))
    past = spec.empty_past(2)
    for t in range(ids.shape[1]):
        logits, past = _step(session, spec, ids[:, t:t + 1], mask[:, :t + 1], past)
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4, err_msg=f"token {t}")
    assert past[spec.layers[0].names[0]].shape[2] == ids.shape[1]


def greedy(model: ir.Model, new_tokens: int = 6) -> np.ndarray:
    spec, session = kvcache.cache_spec(model), _session(model)
    ids = _ids(seed=2)
    mask = np.ones_like(ids)
    logits, past = _step(session, spec, ids, mask, spec.empty_past(2))
    out = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        out.append(token)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        logits, past = _step(session, spec, token, mask, past)
    tokens = np.concatenate(out, axis=1)
    assert tokens.shape == (2, new_tokens) and ((tokens >= 0) & (tokens < VOCAB)).all()
    return tokens


def _layout(model: ir.Model) -> dict[int, int]:
    """{cache layer: kv_heads}."""
    return {layer.index: layer.kv_heads for layer in kvcache.cache_spec(model).layers}


def _interface(model: ir.Model) -> list[tuple]:
    return [(v.name, v.dtype, tuple(str(d) for d in v.shape)) for v in (*model.graph.inputs, *model.graph.outputs)]


# ---- prune -----------------------------------------------------------------------------------------


def test_kv_group_holds_the_cache_head_axis(setup):
    model = copy_model(setup["loaded"]["llama"].model)
    g = DependencyGraph(model)
    kv = [grp for grp in g.groups() if grp.kind == "kv_heads"]
    assert len(kv) == 3 and not any(grp.is_blocked() for grp in kv), [grp.describe() for grp in kv]
    for grp in kv:  # the group reaches the past and present of its own layer
        assert grp.describe()["status"] == "prunable"
        layer = int(grp.name.split(".")[-2])
        for name in kvcache.CacheLayer(layer, 2, 8, 8).names:
            value = next(v for v in (*model.graph.inputs, *model.graph.outputs) if v.name == name)
            assert g.atoms.find(g.axes(value)[1]) in g.atoms.leaves(grp.atom), name
    assert all("KV cache" in r for grp in kv for r, _ in grp.blocked)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_oracle_on_every_group_with_an_empty_and_a_real_past(setup, name):
    """Each prunable group pruned alone by half equals the consumer-zeroed original; the pruned
    cache is the original's with the removed heads left out."""
    model = setup["loaded"][name].model
    groups = [grp for grp in DependencyGraph(copy_model(model)).groups() if not grp.is_blocked()]
    assert {"heads", "ffn"} <= {grp.kind for grp in groups}
    rng = np.random.default_rng(0)
    ids = _ids(seq=3)
    for grp in groups:
        mask = np.zeros(grp.size, bool)
        mask[rng.choice(grp.size, grp.size - grp.size // 2, replace=False)] = True
        pruned, ref = copy_model(model), copy_model(model)
        g = DependencyGraph(pruned)
        keep = {v.name: g.mask(g.axes(v)[1], {grp.atom: mask}) for v in pruned.graph.inputs if kvcache.is_cache_input(v.name)}
        apply_plan(g, {grp.atom: mask})
        zero_consumers(DependencyGraph(ref), {grp.atom: mask})
        spec_ref, spec_pruned = kvcache.cache_spec(ref), kvcache.cache_spec(pruned)
        for past_len in (0, 4):
            past = {k: rng.standard_normal(v.shape[:2] + (past_len,) + v.shape[3:]).astype(np.float32)
                    for k, v in spec_ref.empty_past(2).items()}
            cut = {k: v if keep[k] is None else v[:, keep[k]] for k, v in past.items()}
            total = np.ones((2, past_len + 3), np.int64)
            want, want_cache = _step(_session(ref), spec_ref, ids, total, past)
            got, got_cache = _step(_session(pruned), spec_pruned, ids, total, cut)
            where = f"{grp.kind} {grp.name}, past {past_len}"
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=where)
            for k, v in want_cache.items():
                np.testing.assert_allclose(got_cache[k], v if keep[k] is None else v[:, keep[k]], rtol=1e-4, atol=1e-4,
                                           err_msg=f"{where}: {k}")


@pytest.mark.parametrize("name,target,changes", [
    ("llama", "kv_heads", True), ("llama", "heads", False), ("llama", "ffn", False),
    ("gpt2", "heads", True), ("gpt2", "ffn", False)])
def test_prune_keeps_the_cache_generation_ready(setup, name, target, changes):
    before = setup["loaded"][name].model
    result = _compile(setup, name, f"prune(target={target}, ratio=0.5)")
    report = result.receipt.passes[0]
    heads = 2 if name == "llama" else 4
    assert _layout(before) == {0: heads, 1: heads, 2: heads}
    if changes:  # the cache loses the pruned heads of every layer, and the report says so
        assert _layout(result.model) == {0: heads // 2, 1: heads // 2, 2: heads // 2}
        assert report.details["kv_cache_changed"] == [
            {"layer": i, "kv_heads_before": heads, "kv_heads_after": heads // 2} for i in range(3)]
        assert f"KV cache interface changed (kv_heads): layer 0 {heads}->{heads // 2}" in report.summary
    else:  # query heads inside a GQA group, FFN neurons: the interface is as it was
        assert _interface(result.model) == _interface(before)
        assert report.details["kv_cache_changed"] == [] and "KV cache" not in report.summary
    assert result.receipt.fidelity["metrics"]["perplexity"] is not None
    assert_cache_consistent(result.model)
    greedy(result.model)


def _unproven_cache_graph() -> ir.Model:
    """A cached 'layer' whose key and value heads come from two separate projections that nothing
    couples: pruning one would leave key and value caches with different head counts."""
    nodes = [
        helper.make_node("MatMul", ["x", "wk"], ["k2"]), helper.make_node("MatMul", ["x", "wv"], ["v2"]),
        helper.make_node("Reshape", ["k2", "shape4"], ["k4"]), helper.make_node("Reshape", ["v2", "shape4"], ["v4"]),
        helper.make_node("Transpose", ["k4"], ["k"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["v4"], ["v"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "v"], ["present.0.value"], axis=2),
        helper.make_node("MatMul", ["k2", "wo"], ["ko"]), helper.make_node("MatMul", ["v2", "wo2"], ["vo"]),
        helper.make_node("Add", ["ko", "vo"], ["y"]),
    ]
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, (8, 8), rng.standard_normal(64).astype(np.float32))
             for n in ("wk", "wv", "wo", "wo2")]
    inits.append(helper.make_tensor("shape4", TensorProto.INT64, (4,), [0, 0, 2, 4]))
    cache = ["batch", 2, "past_seq", 4]
    graph = helper.make_graph(
        nodes, "unproven", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8]),
                            helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, cache),
                            helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, cache)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", 2, "total_seq", 4]),
         helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, ["batch", 2, "total_seq", 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def test_unproven_cache_coupling_blocks_the_group():
    model = _unproven_cache_graph()
    g = DependencyGraph(model)
    past_k = next(v for v in model.graph.inputs if v.name == "past_key_values.0.key")
    leaf = g.atoms.leaves(g.axes(past_k)[1])
    groups = [grp for grp in g.groups() if grp.atom in leaf or any(a in leaf for a in g.atoms.leaves(grp.atom))]
    assert groups, [grp.describe() for grp in g.groups()]
    for grp in groups:
        assert grp.hard_blocked
        assert any("KV cache of layer 0: the head axis of past_key_values.0.value is not proven" in r
                   for r, _ in grp.blocked), grp.blocked


# ---- layerskip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,unit,removed", [("llama", "attention", True), ("llama", "block", True),
                                               ("llama", "mlp", False), ("gpt2", "block", True)])
def test_layerskip_takes_the_cache_entries_with_the_layer(setup, name, unit, removed):
    before = setup["loaded"][name].model
    result = _compile(setup, name, f"layerskip(count=1, unit={unit}, protect_first=0, protect_last=0, "
                                   "measure_latency=false)")
    report = result.receipt.passes[0]
    gone = report.details["kv_cache_removed"]
    if removed:
        (layer,) = gone
        left = [i for i in range(3) if i != layer]
        assert list(_layout(result.model)) == left  # the other layers keep their indices
        names = {v.name for v in (*result.model.graph.inputs, *result.model.graph.outputs)}
        assert not names & set(kvcache.CacheLayer(layer, None, None, None).names)
        assert f"KV cache entries removed with their layers (past_key_values.N.* inputs, present.N.* outputs): N = {layer}" \
            in report.summary
    else:  # an MLP sub-layer holds no cache
        assert gone == [] and _interface(result.model) == _interface(before)
    assert result.receipt.fidelity["metrics"]["perplexity"] is not None
    assert_cache_consistent(result.model)
    greedy(result.model)


def test_layerskip_reads_the_past_length_from_a_kept_layer(setup):
    """Layer 0's past key gives the exporter the past length for every layer: skipping layer 0 moves that read."""
    model = copy_model(setup["loaded"]["llama"].model)
    from slimc.passes.skip import blocks
    from slimc.passes.skip.layerskip import rewire

    units = blocks.analyse(model).units("block")
    assert [u.parts[0].cache for u in units] == [[0], [1], [2]]
    rewire(model, [units[0]])
    assert list(_layout(model)) == [1, 2]
    assert_cache_consistent(model)


# ---- passes that keep the interface ----------------------------------------------------------------


@pytest.mark.parametrize("passes", ["smoothquant,int8(force=true)", "int8(mode=dynamic, force=true)",
                                    "int4(force=true)", "sparsify(ratio=0.5)", "fp16"])
def test_lossy_passes_keep_the_cache_interface(setup, passes):
    before = setup["loaded"]["llama"].model
    result = _compile(setup, "llama", passes)
    assert _interface(result.model) == _interface(before)
    assert_cache_consistent_loosely(result.model)
    greedy(result.model)


def assert_cache_consistent_loosely(model: ir.Model) -> None:
    """Quantized kernels (int8 activations quantized per run) round the one-token and the full run
    differently: the same check as `assert_cache_consistent` with a tolerance for that."""
    spec, session = kvcache.cache_spec(model), _session(model)
    ids = _ids()
    mask = np.ones_like(ids)
    full, _ = _step(session, spec, ids, mask, spec.empty_past(2))
    past, steps = spec.empty_past(2), []
    for t in range(ids.shape[1]):
        logits, past = _step(session, spec, ids[:, t:t + 1], mask[:, :t + 1], past)
        steps.append(logits[:, 0])
    steps = np.stack(steps, axis=1)
    scale = float(np.abs(full).max())
    np.testing.assert_allclose(steps, full, rtol=0, atol=0.1 * scale)
