"""RMSNorm -> ``SimplifiedLayerNormalization``; residual Add + RMSNorm -> ``SkipSimplifiedLayerNormalization``.

The unfused RMSNorm, as PyTorch exporters write ``w * x * rsqrt(mean(x², -1) + eps)``::

    P = Pow(X, 2) | Mul(X, X)
    M = ReduceMean(P, axes=[-1], keepdims=1)
    A = Add(M, eps)                       eps: a positive one-element constant
    R = Reciprocal(Sqrt(A)) | Div(1, Sqrt(A))       then N = Mul(X, R)
        or N = Div(X, Sqrt(A))
    Y = Mul(N, W)                         W: a constant [hidden], hidden = X's last dim

(Mul/Add operands in either order.) Every intermediate must be read only inside the pattern and
be no graph output; X float32 with a known last dimension equal to W's length. The rewrite is
``SimplifiedLayerNormalization(X, W, axis=-1, epsilon, stash_type=1)`` (ONNX Runtime registers it
in the default domain); float32 computes the same sum and square root.

When X = Add(a, b) with a and b of one proven shape [batch, seq, hidden] (a residual
connection), the Add joins the norm: ``SkipSimplifiedLayerNormalization(a, b, W)`` (com.microsoft)
returns the norm and, as its fourth output, ``a + b``, which takes the Add's other readers (the
next residual Add).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from slimc.passes.fuse.match import NoMatch, axes, const, dim, is_last_axis, other, producer, same_shape, scalar, single_use
from slimc.passes.quant.common import attr

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class RmsNorm:
    """A matched RMSNorm: ``y = x * rsqrt(mean(x²) + eps) * weight``; ``nodes`` is everything it replaces."""

    x: ir.Value
    weight: ir.Value
    eps: float
    out: ir.Value
    nodes: list[ir.Node]


def match_rmsnorm(mean: ir.Node) -> RmsNorm:
    """The RMSNorm whose ReduceMean is ``mean``, or NoMatch saying which condition failed."""
    p = mean.inputs[0]
    square = producer(p, "Pow") if p.producer() is not None and p.producer().op_type == "Pow" else producer(p, "Mul")
    x = square.inputs[0]
    if square.op_type == "Pow" and scalar(square.inputs[1]) != 2.0:
        raise NoMatch("Pow exponent is not the constant 2")
    if square.op_type == "Mul" and square.inputs[1] is not x:
        raise NoMatch("Mul is not x * x")
    if axes(mean) is None or len(axes(mean)) != 1 or not is_last_axis(axes(mean)[0], x) or attr(mean, "keepdims", 1) != 1:
        raise NoMatch("ReduceMean is not over the last axis with keepdims=1")
    add = _only_user(mean.outputs[0], "Add")
    eps = scalar(other(add, mean.outputs[0]))
    if eps is None or not eps > 0:
        raise NoMatch("epsilon is not a positive one-element constant")
    sqrt = _only_user(add.outputs[0], "Sqrt")
    after = _only_user(sqrt.outputs[0], None)
    nodes = [square, mean, add, sqrt, after]
    if after.op_type == "Div" and after.inputs[1] is sqrt.outputs[0] and after.inputs[0] is x:
        normed = after  # x / sqrt(...)
    else:
        if after.op_type == "Reciprocal":
            recip = after
        elif after.op_type == "Div" and after.inputs[1] is sqrt.outputs[0] and scalar(after.inputs[0]) == 1.0:
            recip = after
        else:
            raise NoMatch(f"{after.op_type} after Sqrt is neither Reciprocal, 1/x nor x/Sqrt")
        normed = _only_user(recip.outputs[0], "Mul")
        if other(normed, recip.outputs[0]) is not x:
            raise NoMatch("the reciprocal square root does not multiply the normalised input")
        nodes.append(normed)
    scale = _only_user(normed.outputs[0], "Mul")
    weight = other(scale, normed.outputs[0])
    _check_weight(x, weight)
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            raise NoMatch(f"{node.op_type} in domain {node.domain}")
    if not single_use(p, [mean]):
        raise NoMatch("x² is read outside the norm")
    return RmsNorm(x, weight, eps, scale.outputs[0], [*nodes, scale])


def _only_user(value: ir.Value, op_type: str | None) -> ir.Node:
    uses = {id(u.node): u.node for u in value.uses()}
    if value.is_graph_output() or len(uses) != 1:
        raise NoMatch(f"{value.name} is read by {len(uses)} nodes{' and is a graph output' if value.is_graph_output() else ''}")
    (node,) = uses.values()
    if op_type is not None and (node.op_type != op_type or node.domain not in ("", "ai.onnx")):
        raise NoMatch(f"expected {op_type} after {value.name}, found {node.op_type}")
    return node


def _check_weight(x: ir.Value, weight: ir.Value) -> None:
    w = const(weight)
    if w is None or w.ndim != 1:
        raise NoMatch("the scale is not a constant 1-D weight")
    if x.dtype != ir.DataType.FLOAT or weight.dtype != ir.DataType.FLOAT:
        raise NoMatch(f"{x.dtype.name if x.dtype else 'untyped'} input: only float32 norms are fused (the fused op "
                      "computes in float32, not equal to a float16 graph within the exact tolerance)")
    hidden = dim(x, -1)
    if not isinstance(hidden, int) or hidden != w.shape[0]:
        raise NoMatch(f"the input's last dimension ({hidden}) is not proven equal to the weight's length ({w.shape[0]})")
    if not np.all(np.isfinite(w)):
        raise NoMatch("the weight is not finite")


def residual(norm: RmsNorm) -> ir.Node | None:
    """The Add producing ``norm.x`` when it qualifies as a residual connection for SkipSimplifiedLayerNormalization."""
    add = norm.x.producer()
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    a, b = add.inputs[0], add.inputs[1]
    if a is None or b is None or len(norm.x.shape or ()) != 3 or not (same_shape(a, norm.x) and same_shape(b, norm.x)):
        return None
    if a.dtype != ir.DataType.FLOAT or b.dtype != ir.DataType.FLOAT:
        return None
    return add


def rewrite(graph: ir.Graph, norm: RmsNorm, add: ir.Node | None) -> list[ir.Node]:
    """Insert the fused node; the norm's (and Add's) outputs keep their names and readers. Returns the replaced nodes."""
    attrs = [ir.AttrFloat32("epsilon", norm.eps)]
    last = norm.nodes[-1]
    if add is None:
        fused = ir.Node("", "SimplifiedLayerNormalization", [norm.x, norm.weight], name=f"{last.name}_rmsnorm",
                        attributes=[ir.AttrInt64("axis", -1), *attrs, ir.AttrInt64("stash_type", 1)], num_outputs=1)
        pairs = [(norm.out, fused.outputs[0])]
    else:
        fused = ir.Node(MS_DOMAIN, "SkipSimplifiedLayerNormalization", [add.inputs[0], add.inputs[1], norm.weight],
                        name=f"{last.name}_skip_rmsnorm", attributes=attrs, num_outputs=4)
        for unused in fused.outputs[1:3]:
            unused.name = ""  # mean and inv_std_var are not produced
        pairs = [(norm.out, fused.outputs[0]), (norm.x, fused.outputs[3])]
    for old, new in pairs:
        name = old.name
        old.name = f"{name}__unfused"
        new.name, new.type, new.shape = name, old.type, old.shape
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    # where every input exists and before every reader: at the Add, or before the norm's first node
    if add is None:
        graph.insert_before(norm.nodes[0], [fused])
    else:
        graph.insert_after(add, [fused])
    return norm.nodes + ([add] if add is not None else [])
