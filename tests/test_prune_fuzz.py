"""Random-graph fuzzer for the pruning engine: the correctness oracle on every group.

Hypothesis draws small ONNX graphs (opset 18, float32, dynamic "batch" and, for token graphs,
"seq" dimensions, shapes inferred with data propagation) from two families:

- CNN: Conv -> Relu -> Conv, then random blocks: 3x3/1x1 Conv (group 1 or 2), depthwise Conv
  (channel multiplier 1 or 2), ConvTranspose (dense or depthwise), BatchNorm, activations, a
  per-channel Mul/Add, residual Add, Concat of two branches or Concat(x, x), a channel Split
  (or two Slices) into separate convs, halves combined by Mul/Add or swapped by Concat, a
  channel Gather, a ShuffleNet shuffle (Reshape, Transpose, Reshape); then MaxPool or
  GlobalAveragePool, Flatten or Reshape, and a Gemm head;
- transformer on [batch, seq, hidden]: Linear (MatMul + Add), FFNs (Gelu written out with Erf,
  Relu, SiLU, SwiGLU, a chunked GLU, concatenated projections), LayerNorm, residual Adds and
  multi-head attention written out: Reshape to heads (constant [0, 0, H, D] targets or Concats
  of Shape-derived dims, shared as exporters share them), Transpose, q·kᵀ, Softmax, ·v,
  Transpose back, Reshape to [0, 0, H*D], output projection; optionally a fused QKV Split and
  grouped-query attention (Unsqueeze + Expand + Reshape, before or after the head transpose).

For every group that is not blocked, a random keep mask (at least one index kept and one
removed) is applied to one copy (`apply_plan`) and the reference (`zero_consumers`) to
another; both must pass the full ONNX checker and give the same ONNX Runtime outputs at
batch 3 / seq 5; so must all prunable groups of the graph pruned at once. Each weight of a
pruned group loses a positive multiple of the removed count along its axis, and one loses
exactly that many (or the same fraction, where the axis is a product such as heads x dims).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from slimc.passes.prune import DependencyGraph
from slimc.passes.prune.apply import apply_plan, zero_consumers

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
BATCH, SEQ = 3, 5
KINDS_SEEN: collections.Counter = collections.Counter()  # group kinds pruned, over all examples


class Builder:
    """A tiny onnx.helper graph builder with seeded random initializers."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n, self.memo = [], [], 0, {}

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, array, prefix: str = "c") -> str:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if array.dtype == np.int64 and key in self.memo:  # integer constants are shared, as exporters do
            return self.memo[key]
        self.memo[key] = name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, *shape: int, fan_in: int, prefix: str = "w") -> str:
        return self.const((self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), prefix)

    def op(self, op_type: str, inputs, n_out: int = 1, **attrs):
        key = (op_type, tuple(inputs), repr(sorted(attrs.items())))
        if op_type in ("Shape", "Gather", "Unsqueeze", "Concat") and key in self.memo:
            return self.memo[key]  # shape computations are shared too (one Shape serves every Reshape)
        outs = [self.fresh(op_type.lower() + "_") for _ in range(n_out)]
        self.memo[key] = outs[0]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, x_shape, out: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        onnx.checker.check_model(model, full_check=True)
        return model


# ---------------------------------------------------------------------- CNN family

def conv(b: Builder, x: str, cin: int, cout: int, k: int, bias: bool = True, group: int = 1) -> str:
    w = b.weight(cout, cin // group, k, k, fan_in=cin // group * k * k)
    inputs = [x, w] + ([b.weight(cout, fan_in=1)] if bias else [])
    return b.op("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)


def build_cnn(spec) -> onnx.ModelProto:
    seed, c0, stem, blocks, (pool, flat, trans_b) = spec
    b = Builder(seed)
    x, c = conv(b, b.op("Relu", [conv(b, "x", c0, stem, 3)]), stem, stem, 1), stem  # Conv -> Relu -> Conv
    for blk in blocks:
        kind = blk[0]
        if kind == "conv":  # group 2 where both channel counts are even
            x, c = conv(b, x, c, blk[2], blk[1], blk[3], 2 if blk[4] and c % 2 == blk[2] % 2 == 0 else 1), blk[2]
        elif kind == "scale":  # a per-channel constant, broadcast from [c, 1, 1]
            x = b.op(blk[1], [x, b.weight(c, 1, 1, fan_in=1)])
        elif kind == "dw":  # depthwise, with a channel multiplier of 1 or 2
            x, c = conv(b, x, c, c * blk[2], 3, bias=blk[1], group=c), c * blk[2]
        elif kind == "deconv":  # ConvTranspose, or a depthwise one
            cout, group = (c, c) if blk[2] else (blk[1], 1)
            w, bias = b.weight(c, cout // group, 3, 3, fan_in=9 * c // group), b.weight(cout, fan_in=1)
            x, c = b.op("ConvTranspose", [x, w, bias], kernel_shape=[3, 3], pads=[1] * 4, group=group), cout
        elif kind == "dup":  # the same channels twice, or a Gather of all channels but the first
            x, c = ((b.op("Concat", [x, x], axis=1), 2 * c) if blk[1] or c < 3 else
                    (b.op("Gather", [x, b.const(np.arange(1, c, dtype=np.int64))], axis=1), c - 1))
        elif kind == "glu" and c % 2 == 0:  # halves: Mul(a, Sigmoid(b)), Add(a, b) or swapped by Concat
            a, g = b.op("Split", [x], 2, axis=1, num_outputs=2)
            x, c = ((b.op("Concat", [g, a], axis=1), c) if blk[1] == "Concat" else
                    (b.op(blk[1], [a, b.op("Sigmoid", [g]) if blk[1] == "Mul" else g]), c // 2))
        elif kind == "shuffle" and c % 2 == 0:  # ShuffleNet: [n, 2, c/2, h, w] -> [n, c/2, 2, h, w] -> [n, c, h, w]
            x = b.op("Reshape", [x, b.const(np.array([0, 2, -1, 8, 8], np.int64))])
            x = b.op("Reshape", [b.op("Transpose", [x], perm=[0, 2, 1, 3, 4]), b.const(np.array([0, c, 8, 8], np.int64))])
        elif kind == "bn":
            var = b.const((b.rng.random(c) + 0.5).astype(np.float32))
            x = b.op("BatchNormalization", [x, b.weight(c, fan_in=1), b.weight(c, fan_in=1), b.weight(c, fan_in=1), var])
        elif kind == "act":
            x = b.op(blk[1], [x])
        elif kind == "res":
            x = b.op("Add", [x, conv(b, b.op("Relu", [x]), c, c, blk[1])])
        elif kind == "concat":
            x, c = b.op("Concat", [conv(b, x, c, blk[1], 1), conv(b, x, c, blk[2], 3)], axis=1), blk[1] + blk[2]
        elif kind == "split":
            _, frac, how, c1, c2, merge = blk
            a = min(c - 1, max(1, round(c * frac)))
            if how == "slice":
                parts = [b.op("Slice", [x, b.const(np.array([lo], np.int64)), b.const(np.array([hi], np.int64)),
                                        b.const(np.array([1], np.int64))]) for lo, hi in ((0, a), (a - c, 2**62))]
            elif how == "even" and a * 2 == c:
                parts = b.op("Split", [x], 2, axis=1, num_outputs=2)
            else:
                parts = b.op("Split", [x, b.const(np.array([a, c - a], np.int64))], 2, axis=-3)
            ys = [conv(b, parts[0], a, c1, 1), conv(b, parts[1], c - a, c1 if merge == "Add" else c2, 3)]
            x, c = (b.op("Add", ys), c1) if merge == "Add" else (b.op("Concat", ys, axis=1), c1 + c2)
    if pool == "gap":
        x, flat_size = b.op("GlobalAveragePool", [x]), c
    else:
        x, flat_size = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), c * 16
    if flat == "flatten":
        x = b.op("Flatten", [x], axis=1)
    else:
        x = b.op("Reshape", [x, b.const(np.array([0, -1 if flat == "-1" else flat_size], np.int64))])
    w = b.weight(*((4, flat_size) if trans_b else (flat_size, 4)), fan_in=flat_size)
    y = b.op("Gemm", [x, w, b.weight(4, fan_in=1)], transB=int(trans_b))
    return b.model(["batch", c0, 8, 8], y)


width = st.integers(2, 6)
cnn_block = st.one_of(
    st.tuples(st.just("conv"), st.sampled_from([1, 3]), width, st.booleans(), st.booleans()),
    st.tuples(st.just("scale"), st.sampled_from(["Mul", "Add"])),
    st.tuples(st.just("dw"), st.booleans(), st.sampled_from([1, 2])),
    st.tuples(st.just("deconv"), width, st.booleans()),
    st.tuples(st.just("dup"), st.booleans()),
    st.tuples(st.just("glu"), st.sampled_from(["Mul", "Add", "Concat"])),
    st.tuples(st.just("shuffle")),
    st.tuples(st.just("bn")),
    st.tuples(st.just("act"), st.sampled_from(["Relu", "Sigmoid", "HardSwish"])),
    st.tuples(st.just("res"), st.sampled_from([1, 3])),
    st.tuples(st.just("concat"), width, width),
    st.tuples(st.just("split"), st.sampled_from([0.3, 0.5, 0.7]), st.sampled_from(["even", "sizes", "slice"]),
              width, width, st.sampled_from(["Add", "Concat"])),
)
cnn_specs = st.tuples(st.integers(0, 2**16), st.integers(1, 3), width, st.lists(cnn_block, min_size=1, max_size=6),
                      st.tuples(st.sampled_from(["gap", "max"]), st.sampled_from(["flatten", "-1", "explicit"]), st.booleans()))


# ---------------------------------------------------------------------- transformer family

def linear(b: Builder, x: str, n_in: int, n_out: int, bias: bool = True) -> str:
    y = b.op("MatMul", [x, b.weight(n_in, n_out, fan_in=n_in)])
    return b.op("Add", [y, b.weight(n_out, fan_in=4)]) if bias else y


def ffn(b: Builder, x: str, hidden: int, inner: int, act: str) -> str:
    if act == "chunk":  # a fused gate/up projection split in two halves (GLU)
        gate, up = b.op("Split", [linear(b, x, hidden, 2 * inner)], 2, axis=-1, num_outputs=2)
        return linear(b, b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up]), inner, hidden)
    if act == "cat":  # two projections concatenated along the features
        h = b.op("Concat", [linear(b, x, hidden, inner), linear(b, x, hidden, 3, bias=False)], axis=-1)
        return linear(b, b.op("Relu", [h]), inner + 3, hidden)
    h = linear(b, x, hidden, inner)
    if act == "gelu":  # torch's opset-18 export of the exact Gelu
        erf = b.op("Erf", [b.op("Div", [h, b.const(np.float32(np.sqrt(2)))])])
        h = b.op("Mul", [b.op("Mul", [h, b.op("Add", [erf, b.const(np.float32(1))])]), b.const(np.float32(0.5))])
    elif act == "relu":
        h = b.op("Relu", [h])
    else:
        h = b.op("Mul", [h, b.op("Sigmoid", [h])])
        if act == "swiglu":
            h = b.op("Mul", [h, linear(b, x, hidden, inner, bias=False)])
    return linear(b, h, inner, hidden)


def target(b: Builder, x: str, dims: list, mode: str) -> str:
    """A Reshape target ("B"/"S": x's batch/seq size): a constant with 0 and -1 ("const"), or a Concat
    of constants and Shape(x, start, end) slices ("shape") or Shape -> Gather -> Unsqueeze ("gather")."""
    if mode == "const":
        return b.const(np.array([(0 if "BS".index(d) == i else -1) if d in ("B", "S") else d
                                 for i, d in enumerate(dims)], np.int64))
    pieces, shape = [], None
    if mode == "shape" and dims[:2] == ["B", "S"]:
        pieces, dims = [b.op("Shape", [x], start=0, end=2)], dims[2:]
    for d in dims:
        if d not in ("B", "S"):
            pieces.append(b.const(np.array([d], np.int64)))
        elif mode == "shape":
            pieces.append(b.op("Shape", [x], start="BS".index(d), end="BS".index(d) + 1))
        else:
            shape = shape or b.op("Shape", [x])
            gathered = b.op("Gather", [shape, b.const(np.int64("BS".index(d)))])
            pieces.append(b.op("Unsqueeze", [gathered, b.const(np.array([0], np.int64))]))
    return b.op("Concat", pieces, axis=0)


def attention(b: Builder, x: str, hidden: int, spec) -> str:
    _, heads_kv, n_rep, d, fused, mode, merge, layout = spec
    h = heads_kv * n_rep
    if fused:
        qkv = linear(b, x, hidden, (h + 2 * heads_kv) * d)
        if n_rep == 1 and mode == "const":
            q, k, v = b.op("Split", [qkv], 3, axis=-1, num_outputs=3)
        else:
            q, k, v = b.op("Split", [qkv, b.const(np.array([h * d, heads_kv * d, heads_kv * d], np.int64))], 3, axis=2)
    else:
        q, k, v = (linear(b, x, hidden, n * d, bias=bias) for n, bias in ((h, True), (heads_kv, False), (heads_kv, True)))
    q = b.op("Reshape", [q, target(b, x, ["B", "S", h, d], mode)])
    k, v = (b.op("Reshape", [t, target(b, x, ["B", "S", heads_kv, d], mode)]) for t in (k, v))
    # grouped-query attention: repeat each KV head n_rep times with Unsqueeze + Expand + Reshape,
    # before the head transpose ([b, s, kv, d]) or after it ([b, kv, s, d], as Llama does)
    rep_dims = ["B", "S", heads_kv, n_rep, d] if layout == "bshd" else ["B", heads_kv, n_rep, "S", d]
    out_dims = ["B", "S", h, d] if layout == "bshd" else ["B", h, "S", d]
    if layout == "bhsd":
        q, k, v = (b.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, k, v))
    if n_rep > 1:
        pos = 3 if layout == "bshd" else 2  # a constant Expand target broadcasts with 1s: [1, 1, 1, n_rep, 1]
        axis = b.const(np.array([pos], np.int64))
        rep = b.const(np.array([n_rep if i == pos else 1 for i in range(5)], np.int64)) if mode == "const" else None
        k, v = (b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [t, axis]), rep or target(b, x, rep_dims, mode)]),
                                 target(b, x, out_dims, mode)]) for t in (k, v))
    if layout == "bshd":
        q, v = (b.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, v))
    k = b.op("Transpose", [k], perm=[0, 2, 3, 1] if layout == "bshd" else [0, 1, 3, 2])
    scores = b.op("Mul", [b.op("MatMul", [q, k]), b.const(np.float32(d ** -0.5))])
    o = b.op("Transpose", [b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])], perm=[0, 2, 1, 3])
    merged = target(b, x, ["B", "S", h * d], merge) if merge != "-1" else b.const(np.array([0, 0, -1], np.int64))
    return linear(b, b.op("Reshape", [o, merged]), h * d, hidden)


def build_transformer(spec) -> onnx.ModelProto:
    seed, hidden, blocks, n_out = spec
    b = Builder(seed)
    x = "x"
    for blk in blocks:
        if blk[0] == "ln":
            x = b.op("LayerNormalization", [x, b.weight(hidden, fan_in=1), b.weight(hidden, fan_in=1)], axis=-1)
        else:  # an FFN may have no residual
            y = ffn(b, x, hidden, blk[1], blk[2]) if blk[0] == "ffn" else attention(b, x, hidden, blk)
            x = b.op("Add", [x, y]) if blk[0] == "attn" or blk[3] else y
    if n_out:
        x = linear(b, x, hidden, n_out)
    return b.model(["batch", "seq", hidden], x)


ffn_block = st.tuples(st.just("ffn"), st.integers(2, 8), st.sampled_from(["gelu", "relu", "silu", "swiglu", "chunk", "cat"]),
                      st.booleans())
attn_block = st.tuples(st.just("attn"), st.integers(1, 3), st.integers(1, 2), st.integers(2, 4), st.booleans(),
                       st.sampled_from(["const", "shape", "gather"]), st.sampled_from(["const", "-1", "shape"]),
                       st.sampled_from(["bshd", "bhsd"]))
tf_specs = st.tuples(st.integers(0, 2**16), st.sampled_from([4, 6, 8]),
                     st.lists(st.one_of(ffn_block, attn_block, st.tuples(st.just("ln"))), min_size=1, max_size=5)
                     .filter(lambda blocks: any(blk[0] != "ln" for blk in blocks)),
                     st.sampled_from([0, 3]))


# ---------------------------------------------------------------------- the oracle

def _outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    opts = ort.SessionOptions()
    opts.log_severity_level, opts.intra_op_num_threads = 3, 1
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def check_oracle(proto: onnx.ModelProto, feed: dict[str, np.ndarray], seed: int) -> list:
    """Prune every non-blocked group (one at a time, then all at once) and compare with the reference."""
    base = ir.from_proto(proto)
    prunable = [grp for grp in DependencyGraph(base).groups() if not grp.is_blocked()]
    rng = np.random.default_rng(seed)
    # one plan per group: a random keep mask with at least one index kept and one removed
    plans = [{grp.atom: rng.permutation(grp.size) >= rng.integers(1, grp.size)} for grp in prunable]
    if len(prunable) > 1:
        plans.append({k: v for plan in plans for k, v in plan.items()})
    for plan in plans:
        pruned, ref = ir.from_proto(proto), ir.from_proto(proto)
        g = DependencyGraph(pruned)
        assert [grp.atom for grp in g.groups() if not grp.is_blocked()] == [grp.atom for grp in prunable]
        apply_plan(g, plan)
        zero_consumers(DependencyGraph(ref), plan)
        for grp in (grp for grp in prunable if len(plan) == 1 and grp.atom in plan):
            KINDS_SEEN[grp.kind] += 1
            removed = int((~plan[grp.atom]).sum())
            sizes = [(value.shape[axis], pruned.graph.initializers[value.name].shape[axis]) for value, axis in grp.weights
                     if value.name in pruned.graph.initializers]
            # every weight loses a multiple of the removed count; one loses exactly that many along
            # the group's own axis, or the same fraction (an axis that is a product: heads x dims)
            assert sizes and all(after < before and (before - after) % removed == 0 for before, after in sizes), sizes
            assert any(before - after == removed or (before - after) * grp.size == removed * before
                       for before, after in sizes), (grp.name, grp.size, removed, sizes)
        for got, want in zip(_outputs(pruned, feed), _outputs(ref, feed), strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    return prunable


@SETTINGS
@given(cnn_specs)
def test_oracle_on_random_cnns(spec):
    x = np.random.default_rng(1).standard_normal((BATCH, spec[1], 8, 8)).astype(np.float32)
    prunable = check_oracle(build_cnn(spec), {"x": x}, spec[0])
    # the first conv's channels feed only the second: that group is never blocked
    assert prunable and prunable[0].id == 0 and prunable[0].kind == "channels"


@SETTINGS
@given(tf_specs)
def test_oracle_on_random_transformers(spec):
    x = np.random.default_rng(1).standard_normal((BATCH, SEQ, spec[1])).astype(np.float32)
    prunable = check_oracle(build_transformer(spec), {"x": x}, spec[0])
    # every FFN has a free inner dimension, every attention block a free value head dim; not GQA after the
    # head transpose with a constant [0, H, -1, D] target (the -1 axis gets a fresh name: blocked)
    opaque = [blk[0] == "ln" or blk[0] == "attn" and blk[2] > 1 and blk[5] == "const" and blk[7] == "bhsd"
              for blk in spec[2]]
    assert len(prunable) >= opaque.count(False)


def test_fuzzers_covered_every_group_kind():
    """Run after the fuzzers (file order): the generated graphs exercised every kind of group."""
    if not KINDS_SEEN:
        test_oracle_on_random_cnns()
        test_oracle_on_random_transformers()
    assert {"channels", "ffn", "heads", "kv_heads", "head_dim"} <= set(KINDS_SEEN), KINDS_SEEN
