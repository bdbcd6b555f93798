"""Symbolic shapes for the dependency graph, inferred on load: no ``value_info`` needed.

Exporters other than slimc's own write no ``value_info`` and compute Reshape targets at run time
(``Shape -> Slice/Gather -> Unsqueeze -> Concat -> Reshape``, as SDPA's decomposition does). One
forward walk over the graph gives every value its dims as *monomials* (``4*batch*seq`` is
``(4, ("batch", "seq"))``; ``None`` is a dim nothing is known about) and gives every small
integer tensor its *elements*: the monomial it holds and, for a size read by ``Shape``, its
*origin* ``(value, axis)``. Ops that only move elements around (Slice, Gather, Concat,
Unsqueeze, Squeeze, Cast, Identity, Where with a known condition) keep origins, and ``Mul`` by a
constant keeps it with a coefficient (``(value, axis, c)``: ``c`` times the slot's size, as
``repeat_kv`` writes ``kv_heads * n_rep``); a Reshape/Expand target or a Slice bound is checked by
its rule (the axis it sizes must be the origin's slot); reading a shape tensor's length (``Shape``
of it) uses no size, and comparing a size with a negative constant (torch's ``expand(-1)`` test)
does not depend on it; any other consumer of a read size *escapes* it: the size is used in
arithmetic the engine does not follow, so the read axis is blocked.

Ops without a handler here take the shape the file declares, or ONNX's per-node inference.
The walk is linear in the number of nodes (no whole-model serialization of the weights).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

Sym = tuple  # (coefficient, sorted symbol names); a static dim n is (n, ())
Elem = tuple  # (Sym | None, origin (ir.Value, axis) or (ir.Value, axis, coefficient) | None)

_TRANSPARENT = {"Slice": (0,), "Gather": (0,), "Unsqueeze": (0,), "Squeeze": (0,), "Identity": (0,), "Cast": (0,),
                "Concat": None, "Reshape": (0, 1), "Expand": (0, 1), "Where": (1, 2)}  # None: every input
_BOOL = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN", "IsInf"}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
              "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "BitShift"}
_SAME = {"Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "Neg", "Sqrt", "Reciprocal", "Cast", "CastLike", "Exp", "Log", "Abs",
         "Clip", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "LeakyRelu", "Elu", "Selu", "Celu", "Mish",
         "Identity", "Dropout", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN", "IsInf",
         "ThresholdedRelu", "Swish", "Softmax", "LogSoftmax", "Hardmax", "CumSum", "Trilu", "LayerNormalization",
         "RMSNormalization", "SimplifiedLayerNormalization", "BatchNormalization", "InstanceNormalization"}


def static(d: Sym | None) -> int | None:
    return d[0] if d is not None and not d[1] else None


def mul(a: Sym | None, b: Sym | None) -> Sym | None:
    return None if a is None or b is None else (a[0] * b[0], tuple(sorted(a[1] + b[1])))


def div(a: Sym | None, b: Sym | None) -> Sym | None:
    """``a / b`` when it is a monomial (exact), else None."""
    if a is None or b is None or b[0] == 0 or a[0] % b[0]:
        return None
    rest = list(a[1])
    for s in b[1]:
        if s not in rest:
            return None
        rest.remove(s)
    return (a[0] // b[0], tuple(rest))


def product(dims) -> Sym | None:
    out: Sym | None = (1, ())
    for d in dims:
        out = mul(out, d)
    return out


def text(d: Sym | None) -> str:
    if d is None:
        return "?"
    return "*".join(([str(d[0])] if d[0] != 1 or not d[1] else []) + list(d[1]))


def sum_name(terms: list[str]) -> str:
    """One canonical symbol for a sum of symbolic sizes: exporters write ``past_seq + seq`` in one
    place and ``seq + past_seq`` in another (the cache's Concat); addition commutes, so sorted terms
    name the same size."""
    return " + ".join(sorted(t.strip() for t in terms))


def symbolic_sum(parts: list[Sym | None]) -> Sym | None:
    """The size of a concatenation (or an Add of sizes) as one opaque symbol; None if a part is unknown."""
    parts = [p for p in parts if p != (0, ())]
    if any(p is None for p in parts) or not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    if all(static(p) is not None for p in parts):
        return (sum(static(p) for p in parts), ())
    terms = [t for p in parts for t in (p[1][0].split(" + ") if p[0] == 1 and len(p[1]) == 1 else [text(p)])]
    return (1, (sum_name(terms),))


def _from_ir(shape) -> list[Sym | None] | None:
    if shape is None:
        return None
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append((d, ()))
        else:
            name = d.value if isinstance(d, ir.SymbolicDim) else None
            if name and "+" in name and "*" not in name and "(" not in name:
                name = sum_name(name.split("+"))
            out.append(None if not name or name.startswith("unk__") else (1, (name,)))
    return out


class Shapes:
    """Dims of every value and elements of every small integer tensor of one graph."""

    def __init__(self, graph: ir.Graph, opset: int = 18):
        self.opset = opset
        self._dims: dict[ir.Value, list[Sym | None] | None] = {}
        self.elems: dict[ir.Value, list[Elem]] = {}
        self.escaped: dict[tuple[ir.Value, int], str] = {}
        self.decided: set[ir.Node] = set()  # nodes whose handler kept or escaped every origin itself
        self._types: dict[ir.Value, int] = {}  # element types the file does not declare
        self.sequences: dict[ir.Value, tuple[list, int, list[int]]] = {}  # SplitToSequence: (dims, axis, sizes)
        for value in graph.inputs:
            self._dims[value] = _from_ir(value.shape)
        for node in graph:
            self._visit(node)
        for value in graph.outputs:
            self._escape(value, f"graph output '{value.name}'")

    # ------------------------------------------------------------ queries

    def dims(self, value: ir.Value | None) -> list[Sym | None] | None:
        if value is None:
            return None
        if value not in self._dims:
            if value.const_value is not None:
                self._dims[value] = [(int(n), ()) for n in value.const_value.shape]
                self._const_elems(value)
            else:
                self._dims[value] = _from_ir(value.shape)
        return self._dims[value]

    def sequence_parts(self, value: ir.Value) -> list[int] | None:
        """The part sizes of a sequence made by ``SplitToSequence`` with known sizes."""
        got = self.sequences.get(value)
        return None if got is None else got[2]

    def elements(self, value: ir.Value | None) -> list[Elem] | None:
        if value is None:
            return None
        self.dims(value)
        return self.elems.get(value)

    def _const_elems(self, value: ir.Value) -> None:
        t = value.const_value
        if t is None or value.dtype not in (ir.DataType.INT64, ir.DataType.INT32) or len(t.shape) > 1 or t.size > 64:
            return
        self.elems[value] = [((int(x), ()), None) for x in np.asarray(t.numpy()).reshape(-1)]

    # ------------------------------------------------------------ the walk

    def _escape(self, value: ir.Value, where: str) -> None:
        for _, origin in self.elems.get(value) or []:
            if origin is not None:
                self.escaped.setdefault(origin[:2], where)

    def _visit(self, node: ir.Node) -> None:
        for value in node.inputs:
            self.dims(value)
        self._set_types(node)
        handler = _HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        try:
            if handler is not None:
                handler(self, node)
            elif node.op_type in _SAME and node.domain in ("", "ai.onnx"):
                self._set(node.outputs[0], self.dims(node.inputs[0]))
            elif node.op_type in _BROADCAST and node.domain in ("", "ai.onnx"):
                self._set(node.outputs[0], broadcast_dims([self.dims(v) for v in node.inputs if v is not None]))
        except Exception:  # noqa: BLE001 - a graph a handler cannot read: the shape comes from below
            self._dims.pop(node.outputs[0], None)
        for value in node.outputs:
            declared = _from_ir(value.shape)
            got = self._dims.get(value)
            if got is None or (declared is not None and len(declared) != len(got)):
                got = declared if declared is not None else self._infer(node, value)
            elif declared is not None:
                got = [g if g is not None else d for g, d in zip(got, declared)]
            self._dims[value] = got
        where = f"{node.op_type} {node.name or ''}".strip()
        keep = _TRANSPARENT.get(node.op_type, ())
        if node in self.decided or node.op_type in ("Shape", "Size"):
            return  # the handler accounted for every origin, or only the length of a shape tensor is read
        for i, value in enumerate(node.inputs):
            if value is None or value not in self.elems:
                continue
            if (node.op_type in ("Reshape", "Expand") and i == 1) or (node.op_type == "Slice" and i in (1, 2)):
                continue  # a target or a bound: its rule proves each entry (slice_rules, symbolic)
            # any other consumer, or a moving op whose output elements could not be followed, escapes them
            if not (keep is None or i in keep) or node.outputs[0] not in self.elems:
                self._escape(value, where)

    def dtype(self, value: ir.Value) -> int:
        if value.dtype is not None:
            return int(value.dtype)
        return self._types.get(value, onnx.TensorProto.FLOAT)

    def _set_types(self, node: ir.Node) -> None:
        """Element types of outputs the file leaves untyped (per-node inference needs them)."""
        op, first = node.op_type, next((v for v in node.inputs if v is not None), None)
        if op in ("Shape", "Size", "ArgMax", "ArgMin", "NonZero"):
            t = onnx.TensorProto.INT64
        elif op in _BOOL:
            t = onnx.TensorProto.BOOL
        elif op == "Cast":
            t = node.attributes["to"].value
        elif op == "Constant" and "value" in node.attributes:
            t = int(node.attributes["value"].value.dtype)
        elif op == "ConstantOfShape":
            a = node.attributes.get("value")
            t = int(a.value.dtype) if a is not None else onnx.TensorProto.FLOAT
        elif op == "CastLike" or op == "Where":
            t = self.dtype(node.inputs[1])
        else:
            t = self.dtype(first) if first is not None else onnx.TensorProto.FLOAT
        for value in node.outputs:
            self._types.setdefault(value, int(t))

    def _set(self, value: ir.Value, dims) -> None:
        self._dims[value] = None if dims is None else list(dims)

    def _infer(self, node: ir.Node, value: ir.Value) -> list[Sym | None] | None:
        """ONNX's own per-node inference, from the dims known so far (unknown dims stay unknown)."""
        try:
            types = {}
            for v in node.inputs:
                if v is None or not v.name:
                    continue
                dims = self.dims(v)
                elem = self.dtype(v)
                shape = None if dims is None else [static(d) if static(d) is not None else text(d) if d else None
                                                   for d in dims]
                types[v.name] = onnx.helper.make_tensor_type_proto(elem, shape)
            schema = onnx.defs.get_schema(node.op_type, self.opset, node.domain)
            proto = ir.serde.serialize_node(node)
            data = {v.name: ir.serde.serialize_tensor(v.const_value) for v in node.inputs
                    if v is not None and v.const_value is not None and v.const_value.size <= 64}
            out = onnx.shape_inference.infer_node_outputs(schema, proto, types, data,
                                                          opset_imports=[onnx.helper.make_opsetid(node.domain, self.opset)])
        except Exception:  # noqa: BLE001 - no schema or inference failed: the shape stays unknown
            return None
        t = out.get(value.name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        known = {text(d) for v in node.inputs for d in (self.dims(v) or []) if d is not None}
        return [(d.dim_value, ()) if d.HasField("dim_value") else
                (_parse(d.dim_param) if d.dim_param in known else None) for d in t.tensor_type.shape.dim]


def _parse(s: str) -> Sym | None:
    coef, names = 1, []
    for part in s.split("*"):
        if part.isdigit():
            coef *= int(part)
        elif part:
            names.append(part)
    return (coef, tuple(sorted(names)))


def broadcast_dims(shapes: list) -> list | None:
    """Numpy broadcasting of symbolic shapes; a pair of different symbolic dims is unknown."""
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        cands = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        real = [d for d in cands if d != (1, ())]
        if not real:
            out.append((1, ()))
        elif any(d is None for d in real) or len(set(real)) > 1:
            # an unknown dim broadcasts with a known one: the known one (or 1, which ONNX's
            # inference assumes away as well); two different known dims stay unknown
            known = {d for d in real if d is not None}
            out.append(known.pop() if len(known) == 1 else None)
        else:
            out.append(real[0])
    return out


from slimc.passes.prune.shape_ops import HANDLERS as _HANDLERS  # noqa: E402  (handlers need the helpers above)
