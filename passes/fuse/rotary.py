"""Rotary position embedding (``rotate_half`` form) -> com.microsoft ``RotaryEmbedding``.

The unfused form, as exported from transformers' ``apply_rotary_pos_emb``::

    X1 = Slice(X, 0, d/2, axis=-1)        X2 = Slice(X, d/2, end, axis=-1)
    Y  = Add(Mul(X, C), Mul(Concat(Neg(X2), X1, axis=-1), S))
    C  = Unsqueeze(Cos(T), axes=[1])      S = Unsqueeze(Sin(T), axes=[1])
    T  = Concat(F, F, axis=-1)            F: [1 or batch, seq, d/2], the angles position · inv_freq

with X [batch, heads, seq, d] float32 (Mul/Add operands in either order). Because T repeats F,
``cos(T)[..., i] = cos(T)[..., i + d/2] = cos(F)[..., i]``, which is RotaryEmbedding's
non-interleaved form with ``cos_cache = cos(F)[0]`` [seq, d/2]. The caches are computed from
the graph's own angles (whatever positions, offset or scaling produced them), and the op reads
row ``p`` for position id ``p``, so the position ids are ``0 .. seq-1`` per batch row: nothing
about the model's maximum length or position rule has to be known. Angles per batch row (a
KV-cache export's ``position_ids`` input gives F [batch, seq, d/2]) become caches of
``batch · seq`` rows, row ``b`` reading ids ``b · seq .. b · seq + seq - 1``. Conditions checked: both
Slices cut exactly the two halves of X's last axis (constant starts/ends/axes, unit steps), the
Concat axis is the last, the Unsqueeze axis is 1, F's batch dimension is the constant 1 or X's
(proven) batch dimension and its sequence dimension is X's, d is known and even.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from slimc.passes.fuse.match import NoMatch, axes, const, dim, is_last_axis, other, producer, same_dim
from slimc.passes.quant.common import attr

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class Rotation:
    """A matched rotation of ``x`` by the angles ``angles`` (F above); ``nodes`` are the per-rotation nodes."""

    x: ir.Value
    angles: ir.Value
    out: ir.Value
    nodes: list[ir.Node]


def match_rotation(neg: ir.Node) -> Rotation:
    """The rotation whose ``Neg(X2)`` is ``neg``, or NoMatch saying which condition failed."""
    users = [u.node for u in neg.outputs[0].uses()]
    if len(users) != 1 or users[0].op_type != "Concat":
        raise NoMatch("Neg is not read by one Concat (not rotate_half)")
    cat = users[0]
    second = producer(neg.inputs[0], "Slice")
    x = second.inputs[0]
    d = dim(x, -1)
    if len(x.shape or ()) != 4 or not isinstance(d, int) or d % 2:
        raise NoMatch(f"input is not [batch, heads, seq, d] with a known even d (shape {x.shape})")
    if x.dtype != ir.DataType.FLOAT:
        raise NoMatch("only float32 rotations are fused")
    if len(cat.inputs) != 2 or cat.inputs[0] is not neg.outputs[0] or not is_last_axis(attr(cat, "axis", 0), x):
        raise NoMatch("Concat is not (-second half, first half) on the last axis")
    first = producer(cat.inputs[1], "Slice")
    if first.inputs[0] is not x:
        raise NoMatch("the two halves are sliced from different tensors")
    _check_slice(second, x, d // 2, d)
    _check_slice(first, x, 0, d // 2)
    _sole_user(second.outputs[0], "Neg")
    _sole_user(first.outputs[0], "Concat")
    sin_mul = _sole_user(cat.outputs[0], "Mul")
    add = _sole_user(sin_mul.outputs[0], "Add")
    cos_mul = producer(other(add, sin_mul.outputs[0]), "Mul")
    _sole_user(cos_mul.outputs[0], "Add")
    angles = _angles(other(sin_mul, cat.outputs[0]), "Sin", x)
    if other(cos_mul, x) is None or _angles(other(cos_mul, x), "Cos", x) is not angles:
        raise NoMatch("cos and sin are not of the same angles")
    return Rotation(x, angles, add.outputs[0], [neg, cat, second, first, sin_mul, cos_mul, add])


def _sole_user(value: ir.Value, op_type: str) -> ir.Node:
    users = {id(u.node): u.node for u in value.uses()}
    if value.is_graph_output() or len(users) != 1:
        raise NoMatch(f"{value.name} has other readers")
    (node,) = users.values()
    if node.op_type != op_type:
        raise NoMatch(f"expected {op_type} after {value.name}, found {node.op_type}")
    return node


def _check_slice(node: ir.Node, x: ir.Value, start: int, end: int) -> None:
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends, ax, steps = (const(v) for v in ins[1:5])
    if starts is None or ends is None or ax is None:
        raise NoMatch("Slice bounds or axes are not constant")
    if starts.size != 1 or ends.size != 1 or ax.size != 1 or not is_last_axis(int(ax.reshape(-1)[0]), x):
        raise NoMatch("Slice is not on the last axis alone")
    if steps is not None and (steps.size != 1 or int(steps.reshape(-1)[0]) != 1):
        raise NoMatch("Slice step is not 1")
    lo, hi = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    if lo != start or not (hi == end or (end == dim(x, -1) and hi >= end)):
        raise NoMatch(f"Slice [{lo}:{hi}] is not the half [{start}:{end}] (partial rotary is not fused)")


def _angles(value: ir.Value, trig: str, x: ir.Value) -> ir.Value:
    """F from ``Unsqueeze(trig(Concat(F, F)), 1)``, checked against ``x``."""
    unsq = producer(value, "Unsqueeze")
    if axes(unsq) != [1]:
        raise NoMatch("cos/sin are not unsqueezed on the heads axis")
    cat = producer(producer(unsq.inputs[0], trig).inputs[0], "Concat")
    if len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1] or attr(cat, "axis", 0) not in (-1, 2):
        raise NoMatch("the angles are not Concat(F, F) on the last axis")
    f = cat.inputs[0]
    batch_ok = dim(f, 0) == 1 or same_dim(dim(f, 0), dim(x, 0))
    if len(f.shape or ()) != 3 or not batch_ok or dim(f, 2) != dim(x, -1) // 2 or not same_dim(dim(f, 1), dim(x, 2)):
        raise NoMatch(f"angles of shape {f.shape} are not [1 or batch, seq, d/2] for input {x.shape}")
    if f.dtype != ir.DataType.FLOAT:
        raise NoMatch("angles are not float32")
    return f


class Caches:
    """cos/sin caches and position ids, built once per angle tensor (and batch/seq dims) and shared."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.made: dict[tuple, tuple[ir.Value, ...]] = {}

    def get(self, rot: Rotation) -> tuple[ir.Value, ir.Value, ir.Value]:
        key = (id(rot.angles), dim(rot.x, 0), dim(rot.x, 2))
        if key not in self.made:
            self.made[key] = self._build(rot)
        return self.made[key]

    def _const(self, name: str, array: np.ndarray) -> ir.Value:
        v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(v)
        return v

    def _build(self, rot: Rotation) -> tuple[ir.Value, ir.Value, ir.Value]:
        """Angles [1, s, d/2]: caches cos/sin(F)[0], ids 0..s-1 in every row. Angles [batch, s, d/2] (per-row
        positions, e.g. from a position_ids input): caches [batch·s, d/2], row b's ids b·s .. b·s+s-1."""
        base = f"{rot.angles.name}_rope{len(self.made)}"
        shared = dim(rot.angles, 0) == 1
        half = dim(rot.x, -1) // 2
        nodes = [ir.Node("", "Cos", [rot.angles], name=f"{base}_cos", num_outputs=1),
                 ir.Node("", "Sin", [rot.angles], name=f"{base}_sin", num_outputs=1)]
        flat = (self._const(f"{base}_axis0", np.array([0], np.int64)) if shared
                else self._const(f"{base}_rows", np.array([-1, half], np.int64)))
        nodes += [ir.Node("", "Squeeze" if shared else "Reshape", [n.outputs[0], flat], name=f"{n.name}_cache", num_outputs=1)
                  for n in nodes[:2]]
        shape = ir.Node("", "Shape", [rot.x], name=f"{base}_shape", num_outputs=1)
        dims = ir.Node("", "Gather", [shape.outputs[0], self._const(f"{base}_bs", np.array([0, 2], np.int64))],
                       name=f"{base}_batch_seq", num_outputs=1)
        nodes += [shape, dims]
        if shared:
            count = ir.Node("", "Gather", [shape.outputs[0], self._const(f"{base}_s", np.array(2, np.int64))],
                            name=f"{base}_seq", num_outputs=1)
        else:
            count = ir.Node("", "ReduceProd", [dims.outputs[0]], name=f"{base}_rows_count", num_outputs=1,
                            attributes=[ir.AttrInt64("keepdims", 0)])
        rng = ir.Node("", "Range", [self._const(f"{base}_start", np.array(0, np.int64)), count.outputs[0],
                                    self._const(f"{base}_step", np.array(1, np.int64))], name=f"{base}_range", num_outputs=1)
        ids = ir.Node("", "Expand" if shared else "Reshape", [rng.outputs[0], dims.outputs[0]],
                      name=f"{base}_position_ids", num_outputs=1)
        nodes += [count, rng, ids]
        for node in nodes:
            node.outputs[0].name = node.name
        # after both the angles and the input exist, before the first rotation reads the caches
        order = {id(n): i for i, n in enumerate(self.graph)}
        anchors = [v.producer() for v in (rot.angles, rot.x) if v.producer() is not None]
        if anchors:
            self.graph.insert_after(max(anchors, key=lambda n: order[id(n)]), nodes)
        else:
            self.graph.insert_before(self.graph.node(0), nodes)
        return nodes[2].outputs[0], nodes[3].outputs[0], ids.outputs[0]


def rewrite(graph: ir.Graph, rot: Rotation, caches: Caches) -> list[ir.Node]:
    cos, sin, ids = caches.get(rot)
    fused = ir.Node(MS_DOMAIN, "RotaryEmbedding", [rot.x, ids, cos, sin], name=f"{rot.nodes[-1].name}_rotary",
                    attributes=[ir.AttrInt64("interleaved", 0)], num_outputs=1)
    old = rot.out
    name = old.name
    old.name = f"{name}__unfused"
    fused.outputs[0].name, fused.outputs[0].type, fused.outputs[0].shape = name, old.type, old.shape
    ir.convenience.replace_all_uses_with(old, fused.outputs[0], replace_graph_outputs=True)
    graph.insert_after(rot.nodes[-1], [fused])
    return rot.nodes
