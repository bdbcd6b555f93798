"""Attention over a KV cache -> com.microsoft ``GroupQueryAttention``.

The unfused form, as exported from transformers' eager attention with a cache (per layer)::

    K  = Concat(past_key, K_new, axis=2)            -> present.N.key    (a graph input, a graph output)
    V  = Concat(past_value, V_new, axis=2)          -> present.N.value
    Kr = repeat_kv(K, n_rep)   Vr = repeat_kv(V, n_rep)         n_rep = heads / kv_heads
    A  = Softmax(Mul(MatMul(Q, Transpose(Kr, [0,1,3,2])), c) + M, axis=-1)   (or Div by 1/c; or no
                                                     scale node: c = 1, Q may be scaled before)
    Y  = Reshape(Transpose(MatMul(A, Vr), [0,2,1,3]), [batch, seq, heads·d])

with Q [batch, heads, seq, d], K_new/V_new [batch, kv_heads, seq, d] (heads, kv_heads, d static),
``repeat_kv`` either absent (n_rep = 1) or ``Reshape(Expand(Unsqueeze(K, 2), [b, kv, n_rep, t, d]),
[b, heads, t, d])`` (or a Concat of n_rep copies of the Unsqueeze), so query head h reads KV head
``h // n_rep`` as GroupQueryAttention does, and M an additive mask broadcastable as
``[batch or 1, 1 or heads, seq, total]``. The rewrite is

    Y, present.N.key, present.N.value = GroupQueryAttention(q, k, v, past_key, past_value,
        seqlens_k, total_sequence_length, attention_bias=M, scale=c, causal=0)

with q, k, v the tensors before the heads reshape ([batch, seq, heads·d]; rotated ones are
transposed back). ``causal=0`` and ``seqlens_k = total - 1`` in every row make the op attend to
every key and add M, which is the graph's own mask: the causal and padding rule stays whatever
the graph computes (left padding included), nothing about it is assumed. ``total`` is the
attention mask's length (the KV-cache contract: past + new tokens); a graph without an
``attention_mask`` input is left alone.

ONNX Runtime 1.32 refuses one case the unfused graph runs: a step of more than one token with a
non-empty past at batch > 1 ("batch_size must be 1 when sequence_length > 1 and past context is
given"). Prefill (empty past, any batch) and decoding (one token) are unaffected.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from slimc.passes.fuse.match import NoMatch, const, dim, producer, same_dim, scalar
from slimc.passes.quant.common import attr

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class Attention:
    """A matched cached attention; ``nodes`` are the nodes the fused op replaces."""

    query: ir.Value  # [batch, heads, seq, d]
    key: ir.Value  # new keys [batch, kv_heads, seq, d]
    value: ir.Value
    past: tuple[ir.Value, ir.Value]
    present: tuple[ir.Value, ir.Value]
    mask: ir.Value
    scale: float
    heads: int
    kv_heads: int
    head_dim: int
    out: ir.Value  # [batch, seq, heads·d]
    nodes: list[ir.Node]


def _users(value: ir.Value) -> list[ir.Node]:
    return list({id(u.node): u.node for u in value.uses()}.values())


def _sole_user(value: ir.Value, op_type: str) -> ir.Node:
    users = _users(value)
    if value.is_graph_output() or len(users) != 1:
        raise NoMatch(f"{value.name} is read outside the attention")
    if users[0].op_type != op_type or users[0].domain not in ("", "ai.onnx"):
        raise NoMatch(f"expected {op_type} after {value.name}, found {users[0].op_type}")
    return users[0]


def _perm(node: ir.Node, perm: list[int]) -> bool:
    return [int(p) for p in attr(node, "perm", [])] == perm


def _scaled_scores(add: ir.Node) -> tuple[ir.Node, ir.Node | None, float, ir.Value]:
    """(scores MatMul, scale node, scale, mask) from ``Add(scale(MatMul(Q, Kᵀ)), M)``, either order."""
    for i in (0, 1):
        node = add.inputs[i].producer() if add.inputs[i] is not None else None
        if node is None or node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx"):
            continue
        for j in ((0, 1) if node.op_type == "Mul" else (0,)):
            c = scalar(node.inputs[1 - j])
            mm = node.inputs[j].producer()
            if c is None or mm is None or mm.op_type != "MatMul" or c == 0:
                continue
            return mm, node, (c if node.op_type == "Mul" else 1.0 / c), add.inputs[1 - i]
    for i in (0, 1):  # scaled before the product (q·c), or not at all: the op's scale is 1
        node = add.inputs[i].producer() if add.inputs[i] is not None else None
        if node is not None and node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            return node, None, 1.0, add.inputs[1 - i]
    raise NoMatch("the Softmax input is not Add(Mul or Div(MatMul(q, kᵀ), constant scale), mask)")


def _unrepeat(value: ir.Value, heads: int) -> tuple[ir.Value, list[ir.Node], int]:
    """The cache tensor ``value`` repeats (``repeat_kv``), the repeating nodes, and n_rep."""
    node = value.producer()
    if node is None or node.op_type != "Reshape" or dim(value, 1) != heads:
        return value, [], 1
    src = node.inputs[0]
    grown = src.producer()
    if grown is None or len(src.shape or ()) != 5:
        raise NoMatch("the keys/values read by attention are reshaped from something other than repeat_kv")
    if grown.op_type == "Expand":
        unsq = producer(grown.inputs[0], "Unsqueeze")
        copies = [unsq.outputs[0]]
        rep_nodes = [node, grown, unsq]
    elif grown.op_type == "Concat" and attr(grown, "axis", 0) in (2, -3) and len({id(v) for v in grown.inputs}) == 1:
        unsq = producer(grown.inputs[0], "Unsqueeze")
        copies = list(grown.inputs)
        rep_nodes = [node, grown, unsq]
    else:
        raise NoMatch(f"repeat_kv is neither Expand nor Concat of copies (found {grown.op_type})")
    cache = unsq.inputs[0]
    kv, n_rep, d = dim(src, 1), dim(src, 2), dim(src, 4)
    if (unsq.inputs[1] is None or const(unsq.inputs[1]) is None or const(unsq.inputs[1]).reshape(-1).tolist() != [2]
            or dim(unsq.outputs[0], 2) != 1):
        raise NoMatch("repeat_kv does not insert the copies axis at 2")
    if not all(isinstance(x, int) for x in (kv, n_rep, d)) or kv * n_rep != heads or dim(cache, 1) != kv:
        raise NoMatch(f"repeat_kv shapes are not proven: {src.shape} from {cache.shape} to {value.shape}")
    if grown.op_type == "Concat" and len(copies) != n_rep:
        raise NoMatch("the number of copies does not match the repeated shape")
    if not (same_dim(dim(src, 0), dim(value, 0)) and same_dim(dim(src, 3), dim(value, 2)) and dim(value, 3) == d):
        raise NoMatch(f"repeat_kv's Reshape {src.shape} -> {value.shape} does not merge (kv heads, copies)")
    for out, reader in ((unsq.outputs[0], grown), (grown.outputs[0], node)):
        if out.is_graph_output() or {id(u.node) for u in out.uses()} != {id(reader)}:
            raise NoMatch(f"{out.name} is read outside repeat_kv")
    return cache, rep_nodes, n_rep


def _cache(value: ir.Value, kind: str) -> tuple[ir.Node, ir.Value, ir.Value]:
    """(Concat, past input, new tensor) for ``present = Concat(past, new, axis=2)``."""
    cat = producer(value, "Concat")
    if len(cat.inputs) != 2 or attr(cat, "axis", 0) not in (2, -2):
        raise NoMatch(f"the {kind} cache is not Concat(past, new) on the sequence axis (2)")
    past, new = cat.inputs
    if past is None or not past.is_graph_input() or not value.is_graph_output():
        raise NoMatch(f"the {kind} Concat does not join a past graph input into a present graph output")
    return cat, past, new


def _check_uses(present: ir.Value, readers: list[ir.Node]) -> None:
    if {id(u.node) for u in present.uses()} != {id(n) for n in readers}:
        raise NoMatch(f"{present.name} is read outside the attention")


def match_attention(softmax: ir.Node) -> Attention:
    """The cached attention whose Softmax is ``softmax``, or NoMatch saying which condition failed."""
    x = softmax.inputs[0]
    if len(x.shape or ()) != 4 or attr(softmax, "axis", -1) not in (-1, 3):
        raise NoMatch("Softmax is not over the last axis of a 4-D score tensor")
    if x.dtype != ir.DataType.FLOAT:
        raise NoMatch("only float32 attention is fused")
    add = producer(x, "Add")
    mm, scale_node, scale, mask = _scaled_scores(add)
    q, kt = mm.inputs
    kt_node = producer(kt, "Transpose")
    if not _perm(kt_node, [0, 1, 3, 2]):
        raise NoMatch("the keys are not transposed (0, 1, 3, 2) for q·kᵀ")
    pv = _sole_user(softmax.outputs[0], "MatMul")
    if pv.inputs[0] is not softmax.outputs[0]:
        raise NoMatch("the attention weights are not the left operand of ·V")
    back = _sole_user(pv.outputs[0], "Transpose")
    merge = _sole_user(back.outputs[0], "Reshape")
    if not _perm(back, [0, 2, 1, 3]):
        raise NoMatch("the attended values are not transposed (0, 2, 1, 3) to merge the heads")
    heads, d = dim(q, 1), dim(q, 3)
    if len(q.shape or ()) != 4 or not isinstance(heads, int) or not isinstance(d, int):
        raise NoMatch(f"q is not [batch, heads, seq, head_dim] with static heads and head_dim ({q.shape})")
    kr, k_rep, k_n = _unrepeat(kt_node.inputs[0], heads)
    vr, v_rep, v_n = _unrepeat(pv.inputs[1], heads)
    k_cat, past_k, k_new = _cache(kr, "key")
    v_cat, past_v, v_new = _cache(vr, "value")
    kv = dim(k_new, 1)
    if k_n != v_n or kv != heads // k_n or heads % kv or dim(v_new, 1) != kv:
        raise NoMatch(f"kv heads are not proven: {heads} query heads, keys {k_new.shape}, values {v_new.shape}")
    for v in (k_new, v_new, past_k, past_v):
        if len(v.shape or ()) != 4 or dim(v, 3) != d or dim(v, 1) != kv or v.dtype != ir.DataType.FLOAT:
            raise NoMatch(f"{v.name} is not float32 [batch, {kv}, seq, {d}] ({v.shape})")
    _check_uses(kr, [k_rep[-1] if k_rep else kt_node])
    _check_uses(vr, [v_rep[-1] if v_rep else pv])
    _check_mask(mask, x, heads)
    _check_merge(merge, heads, d)
    scaled = [(mm.outputs[0], scale_node), (scale_node.outputs[0], add)] if scale_node is not None else \
        [(mm.outputs[0], add)]
    for value, reader in (*scaled, (add.outputs[0], softmax), (kt, mm),
                          *([(kt_node.inputs[0], kt_node)] if k_rep else []), *([(pv.inputs[1], pv)] if v_rep else [])):
        if value.is_graph_output() or {id(u.node) for u in value.uses()} != {id(reader)}:
            raise NoMatch(f"{value.name} is read outside the attention")
    nodes = [kt_node, mm, add, softmax, pv, back, merge, k_cat, v_cat, *k_rep, *v_rep]
    nodes += [scale_node] if scale_node is not None else []
    return Attention(q, k_new, v_new, (past_k, past_v), (kr, vr), mask, float(np.float32(scale)), heads, kv, d,
                     merge.outputs[0], nodes)


def _check_mask(mask: ir.Value, scores: ir.Value, heads: int) -> None:
    """M must broadcast onto the scores as GroupQueryAttention's attention_bias does."""
    if mask is None or len(mask.shape or ()) != 4 or mask.dtype != ir.DataType.FLOAT:
        raise NoMatch(f"the additive mask is not a float32 4-D tensor ({None if mask is None else mask.shape})")
    ok = ((dim(mask, 0) == 1 or same_dim(dim(mask, 0), dim(scores, 0))) and dim(mask, 1) in (1, heads)
          and same_dim(dim(mask, 2), dim(scores, 2)) and same_dim(dim(mask, 3), dim(scores, 3)))
    if not ok:
        raise NoMatch(f"the mask's shape {mask.shape} is not proven [batch or 1, 1 or heads, seq, total] "
                      f"for scores {scores.shape}")


def _check_merge(merge: ir.Node, heads: int, d: int) -> None:
    src, out = merge.inputs[0], merge.outputs[0]
    if (len(out.shape or ()) != 3 or dim(out, 2) != heads * d or not same_dim(dim(out, 0), dim(src, 0))
            or not same_dim(dim(out, 1), dim(src, 1))):
        raise NoMatch(f"the heads are not merged to [batch, seq, {heads * d}] ({src.shape} -> {out.shape})")


class Shared:
    """``seqlens_k`` (int32 [batch], total - 1 in every row) and ``total_sequence_length`` (int32 scalar),
    built once per graph from the attention mask's shape."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.made: tuple[ir.Value, ir.Value] | None = None

    def _const(self, name: str, array: np.ndarray) -> ir.Value:
        v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(v)
        return v

    def get(self, att: Attention) -> tuple[ir.Value, ir.Value]:
        if self.made is None:
            self.made = self._build(att)
        return self.made

    def _build(self, att: Attention) -> tuple[ir.Value, ir.Value]:
        mask = attention_mask(self.graph)
        node = lambda op, ins, name, **a: ir.Node("", op, ins, name=f"gqa_{name}", num_outputs=1,  # noqa: E731
                                                  attributes=[ir.AttrInt64(k, v) for k, v in a.items()])
        dims = node("Shape", [mask], "mask_shape")
        total64 = node("Gather", [dims.outputs[0], self._const("gqa_axis1", np.array(1, np.int64))], "total64")
        batch = node("Slice", [dims.outputs[0], self._const("gqa_b0", np.array([0], np.int64)),
                               self._const("gqa_b1", np.array([1], np.int64))], "batch")
        total = node("Cast", [total64.outputs[0]], "total_sequence_length", to=int(ir.DataType.INT32))
        last = node("Sub", [total.outputs[0], self._const("gqa_one", np.array(1, np.int32))], "last")
        seqlens = node("Expand", [last.outputs[0], batch.outputs[0]], "seqlens_k")
        nodes = [dims, total64, batch, total, last, seqlens]
        for n in nodes:
            n.outputs[0].name = n.name
        self.graph.insert_before(self.graph.node(0), nodes)  # reads a graph input only; sorted again at the end
        return seqlens.outputs[0], total.outputs[0]


def attention_mask(graph: ir.Graph) -> ir.Value | None:
    """The KV-cache contract's ``attention_mask`` input ([batch, past + new tokens]), None if the graph has none."""
    return next((v for v in graph.inputs if v.name == "attention_mask" and len(v.shape or ()) == 2), None)


def _to_bsh(graph: ir.Graph, value: ir.Value, heads: int, d: int, anchor: ir.Node) -> ir.Value:
    """[batch, heads, seq, d] -> [batch, seq, heads·d]: the tensor before the heads reshape when the graph
    has it (``Transpose(Reshape(x, [b, s, heads, d]), [0, 2, 1, 3])`` of a 3-D x), else a new Transpose + Reshape."""
    flat = _unsplit(value, heads, d)
    if flat is not None:
        return flat
    rot = value.producer()
    if (rot is not None and rot.op_type == "RotaryEmbedding" and rot.domain == MS_DOMAIN and len(rot.inputs) == 4
            and attr(rot, "rotary_embedding_dim", 0) == 0 and _unsplit(rot.inputs[0], heads, d) is not None):
        # RotaryEmbedding takes [batch, seq, heads·d] as well (head size from the cache width): rotate the
        # flat tensor and skip the transposes both ways
        flat = ir.Node(MS_DOMAIN, "RotaryEmbedding", [_unsplit(rot.inputs[0], heads, d), *rot.inputs[1:]],
                       name=f"{rot.name}_bsh", num_outputs=1,
                       attributes=[*rot.attributes.values(), ir.AttrInt64("num_heads", heads)]
                       if "num_heads" not in rot.attributes else list(rot.attributes.values()))
        flat.outputs[0].name = flat.name
        graph.insert_after(rot, [flat])
        return flat.outputs[0]
    shape = ir.Value(name=f"{value.name}_bsh_shape", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.array([0, 0, heads * d], np.int64), name=f"{value.name}_bsh_shape"))
    graph.register_initializer(shape)
    t = ir.Node("", "Transpose", [value], name=f"{value.name}_bsnh", attributes=[ir.AttrInt64s("perm", [0, 2, 1, 3])],
                num_outputs=1)
    r = ir.Node("", "Reshape", [t.outputs[0], shape], name=f"{value.name}_bsh", num_outputs=1)
    for n in (t, r):
        n.outputs[0].name = n.name
    graph.insert_before(anchor, [t, r])
    return r.outputs[0]


def _unsplit(value: ir.Value, heads: int, d: int) -> ir.Value | None:
    """x when ``value`` is ``Transpose(Reshape(x, [b, s, heads, d]), [0, 2, 1, 3])`` of a 3-D x, else None."""
    node = value.producer()
    if node is None or node.op_type != "Transpose" or not _perm(node, [0, 2, 1, 3]):
        return None
    split = node.inputs[0].producer()
    if split is None or split.op_type != "Reshape":
        return None
    x, y = split.inputs[0], split.outputs[0]
    ok = (len(x.shape or ()) == 3 and dim(x, 2) == heads * d and dim(y, 2) == heads and dim(y, 3) == d
          and same_dim(dim(x, 0), dim(y, 0)) and same_dim(dim(x, 1), dim(y, 1)))
    return x if ok else None


def rewrite(graph: ir.Graph, att: Attention, shared: Shared) -> list[ir.Node]:
    """Insert GroupQueryAttention; the merged output and the presents keep their names and readers."""
    anchor = att.out.producer()  # the merge Reshape: every input of the fused op exists before it
    q, k, v = (_to_bsh(graph, t, n, att.head_dim, anchor) for t, n in
               ((att.query, att.heads), (att.key, att.kv_heads), (att.value, att.kv_heads)))
    seqlens, total = shared.get(att)
    fused = ir.Node(MS_DOMAIN, "GroupQueryAttention",
                    [q, k, v, att.past[0], att.past[1], seqlens, total, None, None, None, att.mask],
                    name=f"{anchor.name}_gqa", num_outputs=3,
                    attributes=[ir.AttrInt64("num_heads", att.heads), ir.AttrInt64("kv_num_heads", att.kv_heads),
                                ir.AttrFloat32("scale", att.scale), ir.AttrInt64("causal", 0)])
    for old, new in zip((att.out, *att.present), fused.outputs, strict=True):
        name = old.name
        old.name = f"{name}__unfused"
        new.name, new.type, new.shape = name, old.type, old.shape
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    graph.insert_before(anchor, [fused])
    return att.nodes


def past_lengths_from_mask(graph: ir.Graph, fused: list[ir.Node]) -> str | None:
    """Let the past buffers be shared with the presents: rewrite every ``Shape(past)[2:3]`` (the past length,
    which the graph's mask is built from) to ``Shape(attention_mask)[1:2] - Shape(input_ids)[1:2]``, the same
    number under the KV-cache contract (the mask covers past + new tokens), so nothing but GroupQueryAttention
    reads a past buffer's length. Returns None when done, else why the buffers cannot be shared."""
    inputs = {v.name: v for v in graph.inputs}
    if "attention_mask" not in inputs or "input_ids" not in inputs:
        return "the graph has no attention_mask/input_ids inputs to read the past length from"
    pasts = {id(n.inputs[i]) for n in fused for i in (3, 4)}
    shapes = []
    for v in graph.inputs:
        if id(v) not in pasts and v.name.startswith("past_key_values."):
            return f"{v.name} does not feed a fused attention"
        for node in {id(u.node): u.node for u in v.uses()}.values() if id(v) in pasts else ():
            if node.op_type == "GroupQueryAttention":
                continue
            if node.op_type != "Shape":
                return f"{v.name} is read by a {node.op_type}"
            start, end = attr(node, "start", 0), attr(node, "end", None)
            covered = range(4)[start:end]
            if 2 in covered and list(covered) != [2]:
                return f"{v.name}'s shape is read as a whole ({node.name})"
            if 2 in covered:
                shapes.append(node)
    for node in shapes:
        made = [ir.Node("", "Shape", [inputs["attention_mask"]], name=f"{node.name}_total",
                        attributes=[ir.AttrInt64("start", 1), ir.AttrInt64("end", 2)], num_outputs=1),
                ir.Node("", "Shape", [inputs["input_ids"]], name=f"{node.name}_seq",
                        attributes=[ir.AttrInt64("start", 1), ir.AttrInt64("end", 2)], num_outputs=1)]
        made.append(ir.Node("", "Sub", [made[0].outputs[0], made[1].outputs[0]], name=f"{node.name}_past",
                            num_outputs=1))
        for n in made:
            n.outputs[0].name = n.name
        old = node.outputs[0]
        made[-1].outputs[0].type, made[-1].outputs[0].shape = old.type, old.shape
        graph.insert_after(node, made)
        ir.convenience.replace_all_uses_with(old, made[-1].outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
    return None


def takes_any_padding(node: ir.Node) -> bool:
    """Whether a GroupQueryAttention node attends as its graph's own mask says (as `fuse` writes it:
    ``causal=0``, an ``attention_bias``, ``seqlens_k = Expand(total - 1)``), so left-padded prompts are
    exact; the builder's form (``seqlens_k`` counted from the mask, causal) assumes no left padding."""
    ins = list(node.inputs) + [None] * (11 - len(node.inputs))
    if node.op_type != "GroupQueryAttention" or attr(node, "causal", 1) != 0 or ins[10] is None:
        return False
    expand = ins[5].producer() if ins[5] is not None else None
    sub = expand.inputs[0].producer() if expand is not None and expand.op_type == "Expand" else None
    return (sub is not None and sub.op_type == "Sub" and sub.inputs[0] is ins[6]
            and scalar(sub.inputs[1]) == 1.0)
