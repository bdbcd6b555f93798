"""A small causal LM written directly in standard ONNX ops with the KV-cache interface of
`slimc.kvcache`, and a NumPy reference of the same math without any cache.

Layers carry arbitrary indices and their own KV head counts (``{0: 2, 3: 1}``: non-contiguous, as
after layerskip; different heads, as after pruning KV groups). Each layer is single-query-group
attention with a residual: ``x += softmax(q kᵀ/√d + bias) v · Wo``, ``bias`` = 0 where the key is
at or before the query's absolute position and its attention-mask bit is 1, else -1e9. Token and
learned position embeddings make positions matter, so left padding is only right when
``position_ids`` count real tokens.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, HEAD_DIM, POSITIONS = 300, 32, 4, 256


def weights(layers: dict[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"emb": rng.normal(0, 1, (VOCAB, HIDDEN)), "pos": rng.normal(0, 0.5, (POSITIONS, HIDDEN)),
         "lm": rng.normal(0, 1, (HIDDEN, VOCAB))}
    for i, heads in layers.items():
        for name in ("q", "k", "v"):
            w[f"{name}{i}"] = rng.normal(0, 0.5, (HIDDEN, heads * HEAD_DIM))
        w[f"o{i}"] = rng.normal(0, 0.5, (heads * HEAD_DIM, HIDDEN))
    return {k: v.astype(np.float32) for k, v in w.items()}


def build(layers: dict[int, int], seed: int = 0) -> ir.Model:
    """The ONNX graph (opset 17): input_ids, attention_mask, position_ids, past_key_values.{i}.*."""
    w = weights(layers, seed)
    nodes, inits = [], [numpy_helper.from_array(v, k) for k, v in w.items()]
    const = lambda name, value: inits.append(numpy_helper.from_array(np.array(value), name))  # noqa: E731
    const("zero", np.int64(0)), const("one", np.int64(1)), const("ax0", [0]), const("ax1", [1])
    const("neg", np.float32(-1e9)), const("fzero", np.float32(0)), const("scale", np.float32(1 / np.sqrt(HEAD_DIM)))
    n = lambda op, ins, outs, **kw: nodes.append(helper.make_node(op, ins, outs, **kw))  # noqa: E731
    n("Gather", ["emb", "input_ids"], ["tok"]), n("Gather", ["pos", "position_ids"], ["posv"]), n("Add", ["tok", "posv"], ["x_in"])
    # bias [B,1,S,T]: key t visible to query s when t <= T - S + s and attention_mask[b, t] == 1
    n("Shape", ["attention_mask"], ["mshape"]), n("Gather", ["mshape", "one"], ["T"])
    n("Shape", ["input_ids"], ["ishape"]), n("Gather", ["ishape", "one"], ["S"]), n("Sub", ["T", "S"], ["P"])
    n("Range", ["zero", "T", "one"], ["kidx"]), n("Range", ["P", "T", "one"], ["qidx"])
    n("Unsqueeze", ["kidx", "ax0"], ["krow"]), n("Unsqueeze", ["qidx", "ax1"], ["qcol"])
    n("LessOrEqual", ["krow", "qcol"], ["causal"]), n("Cast", ["attention_mask"], ["pad"], to=TensorProto.BOOL)
    n("Unsqueeze", ["pad", "ax1"], ["pad3"]), n("Unsqueeze", ["pad3", "ax1"], ["pad4"]), n("And", ["causal", "pad4"], ["allowed"])
    n("Where", ["allowed", "fzero", "neg"], ["bias"])
    x, inputs, outputs = "x_in", [], []
    for i, heads in layers.items():
        shape = f"shape{i}"
        const(shape, [0, 0, heads, HEAD_DIM])
        for name in ("q", "k", "v"):
            n("MatMul", [x, f"{name}{i}"], [f"{name}{i}_flat"]), n("Reshape", [f"{name}{i}_flat", shape], [f"{name}{i}_4"])
            n("Transpose", [f"{name}{i}_4"], [f"{name}{i}_h"], perm=[0, 2, 1, 3])
        n("Concat", [f"past_key_values.{i}.key", f"k{i}_h"], [f"present.{i}.key"], axis=2)
        n("Concat", [f"past_key_values.{i}.value", f"v{i}_h"], [f"present.{i}.value"], axis=2)
        n("Transpose", [f"present.{i}.key"], [f"kt{i}"], perm=[0, 1, 3, 2]), n("MatMul", [f"q{i}_h", f"kt{i}"], [f"qk{i}"])
        n("Mul", [f"qk{i}", "scale"], [f"sc{i}"]), n("Add", [f"sc{i}", "bias"], [f"sb{i}"]), n("Softmax", [f"sb{i}"], [f"p{i}"], axis=-1)
        n("MatMul", [f"p{i}", f"present.{i}.value"], [f"a{i}"]), n("Transpose", [f"a{i}"], [f"at{i}"], perm=[0, 2, 1, 3])
        const(f"flat{i}", [0, 0, heads * HEAD_DIM])
        n("Reshape", [f"at{i}", f"flat{i}"], [f"af{i}"]), n("MatMul", [f"af{i}", f"o{i}"], [f"ao{i}"]), n("Add", [x, f"ao{i}"], [f"x{i}"])
        x = f"x{i}"
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        ["batch", heads, "past_sequence", HEAD_DIM]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         ["batch", heads, "total_sequence", HEAD_DIM]))
    n("MatMul", [x, "lm"], ["logits"])
    ints = lambda name, dims: helper.make_tensor_value_info(name, TensorProto.INT64, dims)  # noqa: E731
    graph = helper.make_graph(
        nodes, "kv_toy",
        [ints("input_ids", ["batch", "sequence"]), ints("attention_mask", ["batch", "total_sequence"]),
         ints("position_ids", ["batch", "sequence"]), *inputs],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB]), *outputs], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def reference_logits(layers: dict[int, int], ids: list[int], seed: int = 0) -> np.ndarray:
    """Last-position logits of the full sequence ``ids`` (no padding, no cache), in float64."""
    w = {k: v.astype(np.float64) for k, v in weights(layers, seed).items()}
    x = w["emb"][ids] + w["pos"][np.arange(len(ids))]
    allowed = np.tril(np.ones((len(ids), len(ids)), bool))
    for i, heads in layers.items():
        q, k, v = ((x @ w[f"{n}{i}"]).reshape(len(ids), heads, HEAD_DIM).transpose(1, 0, 2) for n in "qkv")
        s = q @ k.transpose(0, 2, 1) / np.sqrt(HEAD_DIM) + np.where(allowed, 0, -1e9)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + (p @ v).transpose(1, 0, 2).reshape(len(ids), heads * HEAD_DIM) @ w[f"o{i}"]
    return x[-1] @ w["lm"]


def reference_greedy(layers: dict[int, int], prompt: list[int], n: int, seed: int = 0) -> list[int]:
    """Greedy continuation recomputing the whole sequence for every token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(reference_logits(layers, ids, seed))))
    return ids[len(prompt):]
