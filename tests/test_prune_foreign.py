"""`prune` on graphs other exporters write: SDPA attention, run-time shapes, no ``value_info``.

Tiny BERT, GPT-2, Llama (grouped-query attention, rotary) and ViT models (hidden 64, 2 layers,
random weights) are exported with ``torch.onnx.export(dynamo=True)`` and dynamic batch and
sequence, once with eager attention (the reference) and once with SDPA, SDPA's decomposition
computing k's reshape targets at run time. The SDPA export, with and without its
``value_info``, must give the same prunable groups as the eager export, pass the
consumer-zeroing oracle on every one of them at a batch size and sequence length other than the
export's, and lose at least 20% of its MACs under ``prune(ratio=0.3)``. Hand-built graphs pin
the soundness rule (an axis whose size cannot be proven blocks) and the no-op error.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import run_checked

import slimc
from slimc.analysis import count_macs
from slimc.errors import NothingToDoError
from slimc.onnx_io import copy_model
from slimc.passes.prune import DependencyGraph
from slimc.passes.prune.apply import apply_plan, zero_consumers
from slimc.passes.prune.prune_pass import Prune
from slimc.pipeline import PassContext

VOCAB, BATCH, SEQ = 128, 3, 7  # the oracle runs at batch 3 / seq 7; exports use 2 x 16
ARCHS = ("bert", "gpt2", "llama", "vit")


def _module(arch: str, attn: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    common = dict(attn_implementation=attn)
    if arch == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64, pad_token_id=0, **common)
        return tf.BertModel(cfg).eval(), ("input_ids", "attention_mask", "token_type_ids")
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                            bos_token_id=1, eos_token_id=2, **common)
        return tf.GPT2LMHeadModel(cfg).eval(), ("input_ids", "attention_mask")
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
        return tf.LlamaForCausalLM(cfg).eval(), ("input_ids", "attention_mask")
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, **common)
    return tf.ViTModel(cfg).eval(), ("pixel_values",)


def _export(arch: str, attn: str, path, torchscript: bool = False, optimize: bool = True) -> str:
    import torch

    module, names = _module(arch, attn)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 16), generator=gen)
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    dim = torch.export.Dim
    batch, seq = dim("batch", max=64), dim("seq", max=64)
    shapes = {n: {0: batch} if n == "pixel_values" else {0: batch, 1: seq} for n in names}
    kwargs = {n: feeds[n] for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if torchscript:
            axes = {n: {0: "batch"} if n == "pixel_values" else {0: "batch", 1: "seq"} for n in names}
            torch.onnx.export(module, (), str(path), kwargs=kwargs, input_names=list(names), dynamic_axes=axes,
                              dynamo=False, opset_version=17)
        else:
            torch.onnx.export(module, (), str(path), kwargs=kwargs, dynamo=True, dynamic_shapes=shapes,
                              external_data=False, verbose=False, optimize=optimize)
    return str(path)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(arch, variant): path} for eager, sdpa, sdpa-without-value_info, the TorchScript
    exporter's SDPA graph and the unoptimised dynamo SDPA graph ("noopt"), made once per module."""
    made: dict = {}

    def get(arch: str, variant: str) -> str:
        if (arch, variant) not in made:
            folder = tmp_path_factory.mktemp(f"{arch}_{variant}")
            if variant == "sdpa_novi":
                proto = onnx.load(get(arch, "sdpa"))
                del proto.graph.value_info[:]
                path = folder / "model.onnx"
                onnx.save(proto, path)
                made[(arch, variant)] = str(path)
            elif variant == "torchscript":
                made[(arch, variant)] = _export(arch, "sdpa", folder / "model.onnx", torchscript=True)
            elif variant == "noopt":  # onnxscript's optimiser not run: Transpose'd weights, computed Slice bounds
                made[(arch, variant)] = _export(arch, "sdpa", folder / "model.onnx", optimize=False)
            else:
                made[(arch, variant)] = _export(arch, variant, folder / "model.onnx")
        return made[(arch, variant)]

    return get


def _feed(model: ir.Model) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(3, VOCAB, (BATCH, SEQ)), "attention_mask": np.ones((BATCH, SEQ), np.int64),
             "token_type_ids": np.zeros((BATCH, SEQ), np.int64),
             "pixel_values": rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32),
             "logits_to_keep": np.array(0, np.int64)}  # an input TorchScript exports of causal LMs add
    return {v.name: feeds[v.name] for v in model.graph.inputs}


def _prunable(path: str) -> collections.Counter:
    return collections.Counter((g.kind, g.size) for g in DependencyGraph(ir.load(path)).groups() if not g.is_blocked())


def check_oracle(model: ir.Model, feed: dict[str, np.ndarray], tmp_path) -> list:
    """Every prunable group, pruned alone by a random half: equal to the consumer-zeroed original."""
    groups = [g for g in DependencyGraph(copy_model(model)).groups() if not g.is_blocked()]
    rng = np.random.default_rng(0)
    for grp in groups:
        mask = np.ones(grp.size, bool)
        mask[rng.choice(grp.size, max(1, grp.size // 2), replace=False)] = False
        pruned, ref = copy_model(model), copy_model(model)
        apply_plan(DependencyGraph(pruned), {grp.atom: mask})
        zero_consumers(DependencyGraph(ref), {grp.atom: mask})
        got, want = run_checked(pruned, feed, tmp_path, "pruned"), run_checked(ref, feed, tmp_path, "ref")
        for a, b in zip(got, want, strict=True):
            if a.dtype.kind == "f":
                assert a.shape == b.shape, (grp.kind, grp.name)
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(b).max())),
                                           err_msg=f"{grp.kind} {grp.name}")
    return groups


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_export_has_the_groups_of_the_eager_export(exports, arch):
    eager = _prunable(exports(arch, "eager"))
    assert eager["heads", 4 if arch != "llama" else 2] == 2, eager  # two layers of attention heads
    assert _prunable(exports(arch, "sdpa")) == eager
    assert _prunable(exports(arch, "sdpa_novi")) == eager  # shapes inferred, not read from value_info
    if arch == "llama":
        assert eager["kv_heads", 2] == 2


@pytest.mark.parametrize("variant", ["sdpa", "sdpa_novi"])
@pytest.mark.parametrize("arch", ARCHS)
def test_oracle_on_every_group_of_the_sdpa_export(exports, arch, variant, tmp_path):
    model = ir.load(exports(arch, variant))
    groups = check_oracle(model, _feed(model), tmp_path)
    assert {"heads", "ffn"} <= {g.kind for g in groups}


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_removes_macs_of_the_sdpa_export_and_runs_at_other_sizes(exports, arch, tmp_path):
    path = exports(arch, "sdpa_novi")
    result = slimc.compile(path, "prune(ratio=0.3)", measure_latency=False)
    sizes = {"batch": 1, "seq": 16}
    from slimc import frontends

    # both counted from shapes inferred on load (the file has no value_info to count from)
    before, after = count_macs(frontends.load(path).model, sizes)[0], count_macs(result.model, sizes)[0]
    assert after <= 0.8 * before, (before, after)
    kinds = {p["kind"] for p in result.receipt.passes[0].details["groups_pruned"]}
    assert {"heads", "ffn"} <= kinds
    outputs = run_checked(result.model, _feed(result.model), tmp_path)
    assert all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f")


@pytest.mark.parametrize("arch", ["gpt2", "vit", "llama"])
def test_torchscript_export_has_the_groups_of_the_eager_export_and_passes_the_oracle(exports, arch, tmp_path):
    """Llama: rotary's ``x[..., : d // 2]`` with ``d`` read by Shape, and ``repeat_kv``'s Expand/Reshape
    targets built through ``Where(Equal(., -1))`` and ``kv_heads * n_rep``, are followed."""
    path = exports(arch, "torchscript")
    eager = _prunable(exports(arch, "eager"))
    assert _prunable(path) == eager
    model = ir.load(path)
    kinds = {g.kind for g in check_oracle(model, _feed(model), tmp_path)}
    assert {"heads", "ffn"} <= kinds
    if arch == "llama":
        assert eager["kv_heads", 2] == 2 and "kv_heads" in kinds


@pytest.mark.parametrize("arch", ARCHS)
def test_unoptimised_dynamo_export_has_the_groups_of_the_eager_export_and_passes_the_oracle(exports, arch, tmp_path):
    """``optimize=False``: weights reach MatMul through Transpose, Constants hold ``value_ints``, Slice
    bounds are ``Cast -> Reshape`` of constants, GPT-2 splits qkv with SplitToSequence/SequenceAt."""
    path = exports(arch, "noopt")
    assert _prunable(path) == _prunable(exports(arch, "eager"))
    model = ir.load(path)
    assert {"heads", "ffn"} <= {g.kind for g in check_oracle(model, _feed(model), tmp_path)}


@pytest.mark.parametrize("arch, variant", [(a, "noopt") for a in ARCHS] + [("llama", "torchscript")])
def test_prune_removes_macs_of_other_exports(exports, arch, variant, tmp_path):
    path = exports(arch, variant)
    feed = _feed(ir.load(path))  # TorchScript's causal LM takes a 0-d logits_to_keep synthetic data cannot guess
    result = slimc.compile(path, "prune(ratio=0.3)", measure_latency=False, evaluation=feed)
    from slimc import frontends

    sizes = {"batch": 1, "seq": 16}
    before, after = count_macs(frontends.load(path).model, sizes)[0], count_macs(result.model, sizes)[0]
    assert after <= 0.8 * before, (before, after)
    assert {"heads", "ffn"} <= {p["kind"] for p in result.receipt.passes[0].details["groups_pruned"]}
    run_checked(result.model, _feed(result.model), tmp_path)


@pytest.mark.parametrize("variant", ["sdpa", "torchscript"])
def test_kv_heads_of_the_llama_export(exports, variant, tmp_path):
    model = ir.load(exports("llama", variant))
    report = Prune(ratio=0.5, target="kv_heads").apply(model, PassContext())
    assert [(p["kind"], p["before"], p["after"]) for p in report.details["groups_pruned"]] == [("kv_heads", 2, 1)] * 2
    outputs = run_checked(model, _feed(model), tmp_path)  # saved, checked and run by ONNX Runtime
    assert all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f")


# ---------------------------------------------------------------------- hand-built graphs

def _attention_graph(followable: bool) -> onnx.ModelProto:
    """x[b, s, 8] -> q, k, v (2 heads of 4), SDPA-style k reshape [b, h, s, d] -> [b*h, s, d] ->
    transpose -> [b, h, d, s] with targets read by Shape at run time; q and k scaled separately.
    ``followable=False`` multiplies two read sizes (batch * heads) for the first target: that
    arithmetic is not followed, so the heads axis it reads must block."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    heads = const("heads_shape", i64(0, 0, 2, 4))
    for p in "qkv":
        node("MatMul", ["x", const(f"W{p}", rng.standard_normal((8, 8)).astype(np.float32))], f"{p}_lin")
        node("Reshape", [f"{p}_lin", heads], f"{p}_4d")
        node("Transpose", [f"{p}_4d"], f"{p}_t", perm=[0, 2, 1, 3])
    node("Shape", ["k_t"], "k_shape")
    pieces = {n: node("Slice", ["k_shape", const(f"s{n}", i64(n)), const(f"e{n}", i64(n + 1))], f"dim{n}") for n in range(4)}
    first = node("Mul", [pieces[0], pieces[1]], "bh") if not followable else const("minus1", i64(-1))
    node("Concat", [first, pieces[2], pieces[3]], "t3", axis=0)
    node("Reshape", ["k_t", "t3"], "k_3d")
    node("Transpose", ["k_3d"], "k_3d_t", perm=[0, 2, 1])
    node("Concat", [pieces[0], pieces[1], pieces[3], pieces[2]], "t4", axis=0)
    node("Reshape", ["k_3d_t", "t4"], "k_T")
    scale = const("sqrt_scale", np.float32(0.5 ** 0.5))
    node("Mul", ["q_t", scale], "q_s")
    node("Mul", ["k_T", scale], "k_s")
    node("MatMul", ["q_s", "k_s"], "scores")
    node("IsNaN", ["scores"], "nan")
    node("Where", ["nan", const("zero", np.float32(0)), "scores"], "clean")
    node("Softmax", ["clean"], "probs", axis=-1)
    node("MatMul", ["probs", "v_t"], "ctx")
    node("Transpose", ["ctx"], "ctx_t", perm=[0, 2, 1, 3])
    node("Reshape", ["ctx_t", const("merge", i64(0, 0, 8))], "merged")
    node("MatMul", ["merged", const("Wo", rng.standard_normal((8, 8)).astype(np.float32))], "y")
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    # ONNX's own inference leaves k's dims unknown after the run-time reshapes: the case that broke
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def test_an_axis_read_into_unfollowed_arithmetic_blocks_its_group(tmp_path):
    model = ir.from_proto(_attention_graph(followable=False))
    heads = [g for g in DependencyGraph(copy_model(model)).groups() if g.kind == "heads"]
    assert heads and all(g.is_blocked() for g in heads)
    assert any("used by Mul" in reason for g in heads for reason, _ in g.blocked), [g.blocked for g in heads]
    feed = {"x": np.random.default_rng(1).standard_normal((BATCH, SEQ, 8)).astype(np.float32)}
    assert check_oracle(model, feed, tmp_path)  # what stays prunable is sound (q heads alone were not)


@pytest.mark.parametrize("strip", [False, True])
def test_run_time_reshape_targets_are_followed(tmp_path, strip):
    proto = _attention_graph(followable=True)
    if strip:
        del proto.graph.value_info[:]
    model = ir.from_proto(proto)
    feed = {"x": np.random.default_rng(1).standard_normal((BATCH, SEQ, 8)).astype(np.float32)}
    groups = check_oracle(model, feed, tmp_path)
    assert [(g.kind, g.size) for g in groups if g.kind == "heads"] == [("heads", 2)]


def test_nothing_prunable_is_an_error_unless_allowed(exports, tmp_path):
    from slimc.tools.cli import main

    path = exports("bert", "sdpa")
    with pytest.raises(NothingToDoError, match="no kv_heads group"):
        Prune(target="kv_heads").apply(ir.load(path), PassContext())
    report = Prune(target="kv_heads", allow_noop=True).apply(ir.load(path), PassContext())
    assert not report.modified and any("no kv_heads group" in why for _, why in report.left_alone)
    out = tmp_path / "o.onnx"
    assert main([path, "--passes", "prune(target=kv_heads)", "-o", str(out), "-q", "--no-latency"]) == 2
    assert not out.exists()


def test_a_model_without_parameters_reports_no_percentage():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    with pytest.raises(NothingToDoError, match="no channels / ffn / heads group"):
        Prune().apply(model, PassContext())
    report = Prune(allow_noop=True).apply(model, PassContext())
    assert "params 0 -> 0 (no parameters before)" in report.summary and "100.0%" not in report.summary


def _sliced_graph(bound: str) -> onnx.ModelProto:
    """x[b, s, 8] -> h = x @ W1 [8, 8]; y = h[..., :end] @ W3; g = x @ W2 [8, 6] -> out too. ``end``
    is read at run time: h's own last dim ("same": the whole axis), g's ("other": another slot), or
    a constant through Cast -> Reshape ("folded": 5 of h's 8 channels, a cut that is rewritten)."""
    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
         for n, s in (("W1", (8, 8)), ("W2", (8, 6)), ("W3", (8 if bound == "same" else 5 if bound == "folded" else 6, 4)),
                      ("W4", (6, 4)))}
    i64 = lambda name, *v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["x", "W2"], ["g"]),
             helper.make_node("Relu", ["h"], ["hr"]), helper.make_node("Relu", ["g"], ["gr"])]
    if bound == "folded":
        nodes += [helper.make_node("Cast", ["five"], ["five_c"], to=TensorProto.INT64),
                  helper.make_node("Reshape", ["five_c", "minus1"], ["end"])]
    else:
        nodes.append(helper.make_node("Shape", ["hr" if bound == "same" else "gr"], ["end"], start=2, end=3))
    nodes += [helper.make_node("Slice", ["hr", "zero", "end", "two"], ["y"]),
              helper.make_node("MatMul", ["y", "W3"], ["a"]), helper.make_node("MatMul", ["gr", "W4"], ["b"]),
              helper.make_node("Add", ["a", "b"], ["out"])]
    graph = helper.make_graph(nodes, "sliced", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", 4])],
                              [*w.values(), i64("zero", 0), i64("two", 2), i64("minus1", -1),
                               numpy_helper.from_array(np.array(5, np.int64), "five")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.mark.parametrize("bound", ["same", "other", "folded"])
def test_slice_bounds_computed_at_run_time_are_followed_or_block_with_the_reason(bound, tmp_path):
    model = ir.from_proto(_sliced_graph(bound))
    groups = DependencyGraph(copy_model(model)).groups()
    h, g = ([grp for grp in groups if (weight, 1) in [(v.name, axis) for v, axis in grp.weights]] for weight in ("W1", "W2"))
    if bound == "other":  # h's channels are cut at g's run-time width: neither can change alone
        assert h and g and all(grp.is_blocked() for grp in h + g)
        assert any("run-time size of another slot (gr axis 2)" in r for r, _ in h[0].blocked), h[0].blocked
        return
    # "folded": h's 8 channels are two groups, the 5 kept by the slice and the 3 it drops
    assert sorted(grp.size for grp in h) == ([3, 5] if bound == "folded" else [8]) and len(g) == 1
    assert not any(grp.is_blocked() for grp in h + g), [grp.blocked for grp in h + g]
    feed = {"x": np.random.default_rng(1).standard_normal((BATCH, SEQ, 8)).astype(np.float32)}
    assert len(check_oracle(model, feed, tmp_path)) >= 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import exports as export_corpus  # tests/exports.py (the fixture above is named exports too)

    return export_corpus.Corpus(tmp_path_factory.mktemp("corpus"))


def test_unoptimised_dynamo_resnet_has_the_groups_of_the_optimised_export(corpus, tmp_path):
    """Conv's zero bias is ``Expand(CastLike(0), Expand(Shape(W)[0:1], [1]))``: the size is read before the Conv
    that ties it to the output channels (target proofs run after every rule); ReduceMean's axes are
    ``Reshape(Constant, [-1])``."""
    noopt, optimised = corpus.get("resnet/dynamo-noopt"), corpus.get("resnet/dynamo")
    assert _prunable(str(noopt.path)) == _prunable(str(optimised.path))
    model = ir.load(noopt.path)
    feed = {"pixel_values": np.random.default_rng(0).standard_normal((BATCH, 3, 64, 64)).astype(np.float32)}
    assert {g.kind for g in check_oracle(model, feed, tmp_path)} == {"channels"}
