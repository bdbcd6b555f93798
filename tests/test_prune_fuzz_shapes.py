"""Fuzzer for what other exporters write: run-time shapes, values without shapes, SDPA's pieces.

Hypothesis draws 500 small transformer graphs (seeded: ``derandomize``) of FFNs and attention
blocks written the way ``torch.onnx.export`` decomposes ``scaled_dot_product_attention``:

- q/k/v head reshapes with constant targets or targets built at run time (``Shape`` slices, or
  ``Shape -> Gather -> Unsqueeze``, joined by ``Concat``);
- k transposed directly, or SDPA-style: ``Reshape`` to ``[-1, seq, d]`` with a target sliced from
  its own ``Shape``, ``Transpose``, ``Reshape`` back to ``[batch, heads, d, seq]``; or with the
  first target computed by multiplying two read sizes (arithmetic the engine does not follow:
  the heads it reads must block);
- q and k scaled separately by ``sqrt(scale)`` or the scores scaled once; an additive mask built
  with ``Where`` and SDPA's ``IsNaN``/``Where`` clean-up after the softmax;
- grouped-query attention repeated with ``Expand`` to a run-time target, then ``Reshape``;
- the TorchScript exporter's style: rotary's ``rotate_half`` with Slice bounds ``Shape(t)[3] / 2``,
  and ``repeat_kv`` with the Expand target through ``Where(Equal(target, -1), 1, target)`` and the
  Reshape target ``kv_heads * n_rep`` computed by ``Mul``; the unoptimised dynamo style: weights
  through ``Transpose``, q/k/v split by ``SplitToSequence``/``SequenceAt``, rotary's Slice bounds
  from ``Cast -> Reshape`` of constants;
- and ``value_info`` kept, stripped, or with random dims made unknown (ranks kept), as torch's
  exporter leaves them after run-time reshapes: the engine infers shapes itself.

Each graph is checked once with every prunable group pruned together (random keep masks): the
pruned model passes the ONNX checker, runs in ONNX Runtime at batch 3 / seq 5, and equals the
original with those channels' consumer weights zeroed. A blocked group is never a failure; a
structurally invalid result always is.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, numpy_helper
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_prune_fuzz import Builder, ffn, linear, target

from slimc.passes.prune import DependencyGraph
from slimc.passes.prune.apply import apply_plan, zero_consumers

BATCH, SEQ = 3, 5
SEEN: collections.Counter = collections.Counter()  # group kinds pruned and blockers met, over all examples


def _k_transposed(b: Builder, k: str, heads: int, d: int, how: str) -> str:
    """k [B, H, S, D] -> [B, H, D, S]: directly, or through SDPA's 3-D reshape and back."""
    if how == "plain":
        return b.op("Transpose", [k], perm=[0, 1, 3, 2])
    shape = b.op("Shape", [k])
    piece = {i: b.op("Slice", [shape, b.const(np.array([i], np.int64)), b.const(np.array([i + 1], np.int64))])
             for i in range(4)}
    first = (b.op("Mul", [piece[0], piece[1]]) if how == "arith" else b.const(np.array([-1], np.int64)))
    flat = b.op("Reshape", [k, b.op("Concat", [first, piece[2], piece[3]], axis=0)])
    lead = b.op("Slice", [shape, b.const(np.array([0], np.int64)), b.const(np.array([2], np.int64))])
    return b.op("Reshape", [b.op("Transpose", [flat], perm=[0, 2, 1]), b.op("Concat", [lead, piece[3], piece[2]], axis=0)])


def _i64(*values) -> np.ndarray:
    return np.array(values, np.int64)


def _linear(b: Builder, x: str, n_in: int, n_out: int, style: str) -> str:
    """``linear``; unoptimised dynamo exports feed the weight [out, in] through a Transpose."""
    if style != "noopt":
        return linear(b, x, n_in, n_out)
    w = b.op("Transpose", [b.weight(n_out, n_in, fan_in=n_in)], perm=[1, 0])
    return b.op("Add", [b.op("MatMul", [x, w]), b.weight(n_out, fan_in=4)])


def _qkv(b: Builder, x: str, hidden: int, sizes: list[int], style: str) -> list[str]:
    if style != "noopt":
        return [_linear(b, x, hidden, n, style) for n in sizes]
    seq = b.op("SplitToSequence", [_linear(b, x, hidden, sum(sizes), style), b.const(_i64(*sizes))], axis=-1)
    return [b.op("SequenceAt", [seq, b.const(np.array(i, np.int64))]) for i in range(3)]


def _rotary(b: Builder, t: str, d: int, style: str) -> str:
    """``t * cos + rotate_half(t) * sin`` with the half computed at run time (TorchScript: from
    ``Shape(t)[3] / 2``; unoptimised dynamo: ``Cast -> Reshape`` of a constant)."""
    if style == "torchscript":
        half = b.op("Div", [b.op("Gather", [b.op("Shape", [t]), b.const(np.array(3, np.int64))], axis=0),
                            b.const(np.array(2, np.int64))])
        half = b.op("Unsqueeze", [b.op("Cast", [half], to=TensorProto.INT64), b.const(_i64(0))])
    else:
        half = b.op("Reshape", [b.op("Cast", [b.const(np.array(d // 2, np.int64))], to=TensorProto.INT64), b.const(_i64(-1))])
    axis = b.const(_i64(3))
    x1 = b.op("Slice", [t, b.const(_i64(0)), half, axis])
    x2 = b.op("Slice", [t, half, b.const(_i64(2**63 - 1)), axis])
    rotated = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
    cos, sin = (b.weight(d, fan_in=1, prefix=p) for p in ("cos", "sin"))
    return b.op("Add", [b.op("Mul", [t, cos]), b.op("Mul", [rotated, sin])])


def _repeat_kv(b: Builder, x: str, t: str, kv: int, n_rep: int, d: int, style: str) -> str:
    """[B, kv, S, d] -> [B, kv*n_rep, S, d]: an Expand and a Reshape to run-time targets."""
    grown = b.op("Unsqueeze", [t, b.const(_i64(2))])
    if style != "torchscript":  # as SDPA exports of Llama write it
        return b.op("Reshape", [b.op("Expand", [grown, target(b, x, ["B", kv, n_rep, "S", d], "shape")]),
                                target(b, x, ["B", kv * n_rep, "S", d], "shape")])
    shape = b.op("Shape", [t])
    size = [b.op("Gather", [shape, b.const(np.array(i, np.int64))], axis=0) for i in range(4)]
    one = [b.op("Unsqueeze", [s_, b.const(_i64(0))]) for s_ in size]
    want = b.op("Reshape", [b.op("Concat", [one[0], one[1], b.const(_i64(n_rep)), one[2], one[3]], axis=0), b.const(_i64(-1))])
    ones = b.op("ConstantOfShape", [b.op("Shape", [want])], value=numpy_helper.from_array(_i64(1)))
    negative = b.op("Equal", [want, b.op("Mul", [ones, b.const(np.array(-1, np.int64))])])
    expanded = b.op("Expand", [grown, b.op("Where", [negative, ones, want])])
    heads = b.op("Unsqueeze", [b.op("Mul", [size[1], b.const(np.array(n_rep, np.int64))]), b.const(_i64(0))])
    return b.op("Reshape", [expanded, b.op("Concat", [one[0], heads, one[2], one[3]], axis=0)])


def sdpa(b: Builder, x: str, hidden: int, spec) -> str:
    _, heads_kv, n_rep, d, mode, k_how, scaling, mask, style = spec
    h = heads_kv * n_rep
    q, k, v = _qkv(b, x, hidden, [h * d, heads_kv * d, heads_kv * d], style)
    q = b.op("Transpose", [b.op("Reshape", [q, target(b, x, ["B", "S", h, d], mode)])], perm=[0, 2, 1, 3])
    k, v = (b.op("Transpose", [b.op("Reshape", [t, target(b, x, ["B", "S", heads_kv, d], mode)])], perm=[0, 2, 1, 3])
            for t in (k, v))
    if style != "dynamo" and d % 2 == 0:
        q, k = _rotary(b, q, d, style), _rotary(b, k, d, style)
    if n_rep > 1:  # repeat_kv with run-time targets
        k, v = (_repeat_kv(b, x, t, heads_kv, n_rep, d, style) for t in (k, v))
    kt = _k_transposed(b, k, h, d, k_how)
    if scaling == "split":  # SDPA scales q and k by sqrt(scale) each
        root = b.const(np.float32(d ** -0.25))
        scores = b.op("MatMul", [b.op("Mul", [q, root]), b.op("Mul", [kt, root])])
    else:
        scores = b.op("Mul", [b.op("MatMul", [q, kt]), b.const(np.float32(d ** -0.5))])
    if mask:  # an additive mask from Where, and SDPA's clean-up of fully masked rows
        cond = b.op("Less", [scores, b.const(np.float32(-3.0))])
        scores = b.op("Add", [scores, b.op("Where", [cond, b.const(np.float32(-1e4)), b.const(np.float32(0))])])
    probs = b.op("Softmax", [scores], axis=-1)
    if mask:
        probs = b.op("Where", [b.op("IsNaN", [probs]), b.const(np.float32(0)), probs])
    o = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    return _linear(b, b.op("Reshape", [o, target(b, x, ["B", "S", h * d], mode)]), h * d, hidden, style)


def build(spec) -> onnx.ModelProto:
    seed, hidden, blocks, strip = spec
    b = Builder(seed)
    x = "x"
    for blk in blocks:
        y = ffn(b, x, hidden, blk[1], blk[2]) if blk[0] == "ffn" else sdpa(b, x, hidden, blk)
        x = b.op("Add", [x, y])
    model = b.model(["batch", "seq", hidden], x)
    for info in model.graph.value_info:  # ONNX names unrelated unknown dims alike (unk__0); ORT would equate them
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param.startswith("unk__"):
                dim.Clear()
    if strip == "all":
        del model.graph.value_info[:]
    elif strip == "dims":  # as torch's exporter leaves them: ranks kept, some dims unknown
        rng = np.random.default_rng(seed)
        for info in model.graph.value_info:
            if rng.random() < 0.5:
                for dim in info.type.tensor_type.shape.dim:
                    dim.Clear()
    return model


sdpa_block = st.tuples(st.just("attn"), st.integers(1, 2), st.integers(1, 2), st.integers(2, 3),
                       st.sampled_from(["const", "shape", "gather"]), st.sampled_from(["plain", "sdpa", "sdpa", "arith"]),
                       st.sampled_from(["split", "joint"]), st.booleans(),
                       st.sampled_from(["dynamo", "dynamo", "torchscript", "noopt"]))
ffn_block = st.tuples(st.just("ffn"), st.integers(2, 5), st.sampled_from(["relu", "silu", "swiglu"]))
specs = st.tuples(st.integers(0, 2**16), st.sampled_from([4, 6]),
                  st.lists(st.one_of(sdpa_block, ffn_block), min_size=1, max_size=2),
                  st.sampled_from(["keep", "all", "dims", "dims"]))


def _run(model: ir.Model, feed) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    opts = ort.SessionOptions()
    opts.log_severity_level, opts.intra_op_num_threads = 3, 1
    opts.enable_mem_reuse = False  # ORT reuses a SequenceAt buffer across parts of different sizes
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(specs)
def test_pruning_graphs_with_run_time_shapes_is_sound(spec):
    proto = build(spec)
    base = ir.from_proto(proto)
    groups = DependencyGraph(base).groups()
    prunable = [g for g in groups if not g.is_blocked()]
    for g in groups:
        SEEN[("blocked" if g.is_blocked() else "pruned", g.kind)] += 1
        SEEN["blocked by read sizes in arithmetic"] += any("used by Mul" in r for r, _ in g.blocked)
    for style in {blk[-1] for blk in spec[2] if blk[0] == "attn"}:
        SEEN[style, "pruned kv_heads"] += any(g.kind == "kv_heads" for g in prunable)
        SEEN[style, "pruned heads"] += any(g.kind == "heads" for g in prunable)
    if not prunable:
        return
    rng = np.random.default_rng(spec[0])
    plan = {g.atom: rng.permutation(g.size) >= rng.integers(1, g.size) for g in prunable}
    pruned, ref = ir.from_proto(proto), ir.from_proto(proto)
    apply_plan(DependencyGraph(pruned), plan)
    zero_consumers(DependencyGraph(ref), plan)
    feed = {"x": np.random.default_rng(1).standard_normal((BATCH, SEQ, spec[1])).astype(np.float32)}
    for got, want in zip(_run(pruned, feed), _run(ref, feed), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_the_shape_fuzzer_pruned_attention_and_met_unfollowed_arithmetic():
    """Run after the fuzzer (file order): SDPA-style heads and KV groups were pruned, and the
    multiplied run-time sizes were blocked with their reason."""
    if not SEEN:
        test_pruning_graphs_with_run_time_shapes_is_sound()
    assert SEEN["pruned", "heads"] and SEEN["pruned", "kv_heads"] and SEEN["pruned", "ffn"], SEEN
    assert SEEN["blocked by read sizes in arithmetic"], SEEN
    for style in ("torchscript", "noopt"):  # the other exporters' spellings prune heads and KV groups too
        assert SEEN[style, "pruned heads"] and SEEN[style, "pruned kv_heads"], SEEN
