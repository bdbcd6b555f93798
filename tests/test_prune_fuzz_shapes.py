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


def sdpa(b: Builder, x: str, hidden: int, spec) -> str:
    _, heads_kv, n_rep, d, mode, k_how, scaling, mask = spec
    h = heads_kv * n_rep
    q, k, v = (linear(b, x, hidden, n * d) for n in (h, heads_kv, heads_kv))
    q = b.op("Transpose", [b.op("Reshape", [q, target(b, x, ["B", "S", h, d], mode)])], perm=[0, 2, 1, 3])
    k, v = (b.op("Transpose", [b.op("Reshape", [t, target(b, x, ["B", "S", heads_kv, d], mode)])], perm=[0, 2, 1, 3])
            for t in (k, v))
    if n_rep > 1:  # repeat_kv with a run-time Expand target, as SDPA exports of Llama do
        axis = b.const(np.array([2], np.int64))
        k, v = (b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [t, axis]), target(b, x, ["B", heads_kv, n_rep, "S", d], "shape")]),
                                 target(b, x, ["B", h, "S", d], "shape")]) for t in (k, v))
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
    return linear(b, b.op("Reshape", [o, target(b, x, ["B", "S", h * d], mode)]), h * d, hidden)


def build(spec) -> onnx.ModelProto:
    seed, hidden, blocks, strip = spec
    b = Builder(seed)
    x = "x"
    for blk in blocks:
        y = ffn(b, x, hidden, blk[1], blk[2]) if blk[0] == "ffn" else sdpa(b, x, hidden, blk)
        x = b.op("Add", [x, y])
    model = b.model(["batch", "seq", hidden], x)
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
                       st.sampled_from(["split", "joint"]), st.booleans())
ffn_block = st.tuples(st.just("ffn"), st.integers(2, 5), st.sampled_from(["relu", "silu", "swiglu"]))
specs = st.tuples(st.integers(0, 2**16), st.sampled_from([4, 6]),
                  st.lists(st.one_of(sdpa_block, ffn_block), min_size=1, max_size=2),
                  st.sampled_from(["keep", "all", "dims", "dims"]))


def _run(model: ir.Model, feed) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    opts = ort.SessionOptions()
    opts.log_severity_level, opts.intra_op_num_threads = 3, 1
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
