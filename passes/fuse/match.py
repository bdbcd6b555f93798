"""Small structural predicates the fuse matchers share: constants, single uses, shapes, attributes.

Every predicate answers from what the graph proves (a constant's value, a declared shape, an
attribute) and says no when it cannot tell: a matcher that cannot prove a condition leaves the
pattern alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from slimc.passes.quant.common import attr

STANDARD = ("", "ai.onnx")


class NoMatch(Exception):
    """A pattern does not hold; the message says which condition failed (reported in left_alone)."""


def producer(value: ir.Value | None, op_type: str) -> ir.Node:
    """The standard-domain node of ``op_type`` that produces ``value``, or NoMatch."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in STANDARD:
        found = "a graph input or initializer" if node is None else node.op_type
        raise NoMatch(f"expected {op_type}, found {found}")
    return node


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array (an initializer that is not also a graph input), or None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return np.asarray(value.const_value.numpy())


def scalar(value: ir.Value | None) -> float | None:
    """A constant with exactly one element, as a float; None otherwise."""
    arr = const(value)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def single_use(value: ir.Value, users: Sequence[ir.Node] = ()) -> bool:
    """``value`` is read only by ``users`` (or by exactly one node when none given) and is no graph output."""
    if value.is_graph_output():
        return False
    nodes = {id(u.node) for u in value.uses()}
    return nodes == {id(u) for u in users} if users else len(nodes) == 1


def other(node: ir.Node, value: ir.Value) -> ir.Value:
    """The other input of a binary node that reads ``value``."""
    a, b = node.inputs[0], node.inputs[1]
    if a is value:
        return b
    if b is value:
        return a
    raise NoMatch(f"{node.op_type} does not read {value.name}")


def axes(node: ir.Node) -> list[int] | None:
    """ReduceMean / Unsqueeze / Squeeze axes from the attribute (old opsets) or the constant input."""
    if "axes" in node.attributes:
        return [int(a) for a in attr(node, "axes", [])]
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const(node.inputs[1])
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    return None


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def dim(value: ir.Value, i: int):
    """Dimension ``i`` (an int or a symbolic name), None when unknown."""
    if value.shape is None or not -len(value.shape) <= i < len(value.shape):
        return None
    d = value.shape[i]
    if isinstance(d, int):
        return d
    return None if d is None or d.value is None else d.value


def same_dim(a, b) -> bool:
    """Two dims proven equal: equal ints, or the same symbolic name (sums compared term by term, in any
    order: exporters write ``past_seq + seq`` on one value and ``seq + past_seq`` on another)."""
    return a is not None and b is not None and _canonical(a) == _canonical(b)


def _canonical(d):
    if not isinstance(d, str) or any(op in d for op in "-*/()%"):
        return d
    return tuple(sorted(term.strip() for term in d.split("+")))


def same_shape(a: ir.Value, b: ir.Value) -> bool:
    ra, rb = rank(a), rank(b)
    return ra is not None and ra == rb and all(same_dim(dim(a, i), dim(b, i)) for i in range(ra))


def is_last_axis(axis: int, value: ir.Value) -> bool:
    r = rank(value)
    return axis == -1 or (r is not None and axis == r - 1)
