"""Lower slimc's IR (an ONNX graph) to a `torch.fx.GraphModule`.

Every ONNX node becomes one ``call_function`` node of the function of the same name in
`slimc.backends.triton.ops` (ONNX semantics in PyTorch), except the quantized and sparse matmuls,
which become calls of the kernels in `slimc.kernels`:

=================================================  ==========================================
ONNX pattern                                       lowered to
=================================================  ==========================================
``MatMul/Gemm(DQ(Q(x)), DQ(int8 W))`` (static)     `slimc.kernels.qdq_linear` (W8A8)
``DynamicQuantizeLinear -> MatMulInteger -> Cast    `slimc.kernels.dynamic_linear` (W8A8)
-> Mul(scale)`` (ONNX Runtime's dynamic int8)
other ``MatMulInteger`` with an int8 weight          `slimc.kernels.matmul_integer` (exact int32)
``com.microsoft.MatMulNBits`` (int4 pass)          `slimc.kernels.matmul_nbits` (W4A16/W8A16)
``MatMul/Gemm`` with a 2:4-sparse float weight      `slimc.kernels.sparse24_linear`
=================================================  ==========================================

Initializers become parameters (float tensors with more than one element: trainable) or buffers
(integers, scalars, quantized weights, scales); int64 constants of up to 64 elements stay Python
literals in the graph, as shapes do (see `ops`), so dynamic dimensions stay dynamic. An op with no
lowering is a `LoweringError` naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import keyword
import operator
import re
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.fx as fx

from slimc.backends.triton import ops
from slimc.errors import BackendError

SMALL_INT_CONSTANT = 64
# Old-opset attributes that later opsets moved to inputs: the op functions take them as *_attr.
_MOVED_ATTRS = {
    "Squeeze": {"axes": "axes_attr"}, "Unsqueeze": {"axes": "axes_attr"}, "Split": {"split": "split_attr"},
    **{f"Reduce{r}": {"axes": "axes_attr"} for r in ("Mean", "Sum", "Max", "Min", "Prod", "L1", "L2", "SumSquare",
                                                      "LogSumExp")},
}
# Ops that can make a tensor from Python values alone: they put it on the device of a graph input.
_CREATES_TENSORS = ("Range", "ConstantOfShape")
_IGNORED_ATTRS = {"LayerNormalization": {"stash_type"}, "MatMulNBits": {"accuracy_level"}}


class LoweringError(BackendError):
    """The graph has something the torch backend cannot express (an op with no lowering, a subgraph)."""


@dataclasses.dataclass
class LoweringReport:
    """What the lowering did: node counts by op, and which matmuls became which kernel."""

    nodes: int = 0
    ops: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    kernels: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    left_generic: dict[str, str] = dataclasses.field(default_factory=dict)  # quantized op -> why no kernel
    parameters: int = 0
    buffers: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "ops": dict(sorted(self.ops.items())), "kernels": dict(self.kernels),
                "left_generic": self.left_generic, "trainable_parameters": self.parameters, "buffers": self.buffers}


def supported_ops() -> list[str]:
    names = [n for n, fn in vars(ops).items() if n[:1].isupper() and n != "T" and callable(fn)
             and getattr(fn, "__module__", None) == ops.__name__]
    return sorted(names + ["Constant", "MatMulInteger", "MatMulNBits"])  # Constant: folded at lowering


def _py_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "v"
    if base[0].isdigit() or keyword.iskeyword(base):
        base = "v_" + base
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def _attr_value(attr: ir.Attr) -> Any:
    kind = attr.type
    if kind in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise LoweringError("subgraphs (If/Loop/Scan) have no torch lowering in slimc yet")
    if kind == ir.AttributeType.TENSOR:
        return torch.from_numpy(np.array(attr.value.numpy()))
    if kind == ir.AttributeType.INTS:
        return list(attr.value)
    if kind == ir.AttributeType.FLOATS:
        return list(attr.value)
    return attr.value


class _Lowerer:
    def __init__(self, model: ir.Model, kernels: bool, pt2e: bool = False, trainable: bool = False):
        self.model = model
        self.pt2e = pt2e
        self.trainable = trainable  # quantized weights as float parameters behind fake quantization (distill)
        self.quantized: dict[str, dict[str, Any]] = {}  # root attribute -> how it maps back to an integer weight
        self.pending: dict[str, dict[str, Any]] = {}  # such a parameter's ONNX-side name -> that mapping
        self.graph = model.graph
        self.use_kernels = kernels
        self.fx = fx.Graph()
        self.root = torch.nn.Module()
        self.weights = self.root.weights = torch.nn.Module()
        self.names: set[str] = set()
        self.env: dict[ir.Value, Any] = {}  # ONNX value -> fx.Node or Python literal
        self.attrs: dict[str, str] = {}  # root attribute -> ONNX name
        self.report = LoweringReport()
        self.consts = self._constants()
        self.consumers = collections.defaultdict(list)
        for node in self.graph:
            for v in node.inputs:
                if v is not None:
                    self.consumers[v].append(node)
        self.graph_outputs = set(self.graph.outputs)
        self.fused: dict[ir.Node, tuple] = {}  # anchor node -> (function, args) replacing its output
        self.fake_quant: dict[ir.Node, ir.Node] = {}  # DequantizeLinear -> its QuantizeLinear (same parameters)
        self.pt2e_codes: dict[ir.Value, fx.Node] = {}  # pt2e form: a shared activation's int8 codes
        self.fused_kwargs: dict[ir.Node, dict[str, Any]] = {}
        self.skipped: set[ir.Node] = set()

    # ------------------------------------------------------------ constants
    def _constants(self) -> dict[ir.Value, np.ndarray]:
        consts = {}
        for value in self.graph.initializers.values():
            if value.const_value is not None:
                consts[value] = value.const_value.numpy()
        for node in self.graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                (name, attr), = node.attributes.items()
                val = attr.value
                arr = np.array(val.numpy()) if hasattr(val, "numpy") else np.array(val, dtype=(
                    np.float32 if "float" in name else np.int64 if "int" in name else None))
                consts[node.outputs[0]] = arr
        return consts

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        return None if value is None else self.consts.get(value)

    def _tensor_attr(self, onnx_name: str, array: np.ndarray | torch.Tensor, trainable: bool | None = None) -> fx.Node:
        tensor = torch.from_numpy(np.array(array)) if isinstance(array, np.ndarray) else array
        if trainable is None:
            trainable = tensor.is_floating_point() and tensor.numel() > 1 and tensor.dim() >= 1
        name = _py_name(onnx_name, self.names)
        # In a submodule: "weights.<name>" cannot collide with a value name exporters invent (val_3, zeros).
        if trainable:
            self.weights.register_parameter(name, torch.nn.Parameter(tensor.clone(), requires_grad=True))
        else:
            self.weights.register_buffer(name, tensor.clone())
        self.attrs["weights." + name] = onnx_name
        if onnx_name in self.pending:
            self.quantized["weights." + name] = self.pending.pop(onnx_name)
        return self.fx.get_attr("weights." + name)

    def arg(self, value: ir.Value | None) -> Any:
        if value is None or value.name == "":
            return None
        if value in self.env:
            return self.env[value]
        if value in self.consts:
            array = self.consts[value]
            if array.dtype == np.int64 and array.ndim <= 1 and array.size <= SMALL_INT_CONSTANT:
                literal = int(array) if array.ndim == 0 else [int(x) for x in array]
            else:
                literal = self._tensor_attr(value.name, array)
            self.env[value] = literal
            return literal
        raise LoweringError(f"value '{value.name}' is used before it is defined (the graph is not sorted)")

    # ------------------------------------------------------------ patterns
    def _producer(self, value: ir.Value | None, op: str) -> ir.Node | None:
        node = value.producer() if value is not None else None
        return node if node is not None and node.op_type == op else None

    def _only_consumer(self, value: ir.Value) -> ir.Node | None:
        users = self.consumers.get(value, [])
        return users[0] if len(users) == 1 and value not in self.graph_outputs else None

    def _weight_dq(self, value: ir.Value, transposed: bool) -> tuple[np.ndarray, np.ndarray] | str:
        """(int8 weight [K, N], scale [N] or scalar) of ``DequantizeLinear(const)``, or why not."""
        if (t := self._producer(value, "Transpose")) is not None:
            perm = t.attributes.get("perm")
            if perm is None or list(perm.value) != [1, 0]:
                return "the weight's Transpose is not a 2-D transpose"
            value, transposed = t.inputs[0], not transposed
        dq = self._producer(value, "DequantizeLinear")
        if dq is None:
            return "the weight is not DequantizeLinear(constant)"
        w, scale = self.const(dq.inputs[0]), self.const(dq.inputs[1])
        zp = self.const(dq.inputs[2]) if len(dq.inputs) > 2 else None
        if w is not None and w.ndim > 2 and all(d == 1 for d in w.shape[2:]):  # a 1x1 conv kernel [Cout, Cin, 1, 1]
            w = w.reshape(w.shape[:2])
        if w is None or scale is None or w.ndim != 2 or w.dtype != np.int8:
            return "the weight is not a constant 2-D int8 tensor"
        if zp is not None and np.any(zp != 0):
            return "the weight has a non-zero zero point (the kernel takes symmetric weights)"
        axis = dq.attributes["axis"].value if "axis" in dq.attributes else 1
        axis = axis + 2 if axis < 0 else axis
        if scale.size > 1 and axis != (0 if transposed else 1):
            return "the weight scale is not per output channel"
        if "block_size" in dq.attributes and dq.attributes["block_size"].value:
            return "blocked weight scales"
        return (w.T if transposed else w), scale.reshape(-1)

    def _constant_bias(self, value: ir.Value) -> np.ndarray | None:
        """A constant, or ``DequantizeLinear(constant int32)`` as ORT's quantizer stores a Gemm bias."""
        if (b := self.const(value)) is not None:
            return b
        dq = self._producer(value, "DequantizeLinear")
        if dq is None or (q := self.const(dq.inputs[0])) is None or (s := self.const(dq.inputs[1])) is None:
            return None
        zp = self.const(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else 0
        return ((q.astype(np.float64) - zp) * s.astype(np.float64)).astype(np.float32)

    def _conv_is_matmul(self, node: ir.Node) -> str | None:
        """Why a Conv is not a plain matmul over channels (None: it is one, a 1x1 conv)."""
        attr = {k: a.value for k, a in node.attributes.items()}
        w = node.inputs[1]
        shape = list(w.shape) if w.shape is not None else []
        if attr.get("group", 1) != 1:
            return "grouped/depthwise Conv (no int8 conv kernel: only 1x1 convolutions run as int8 matmuls)"
        kernel = list(attr.get("kernel_shape", shape[2:]))
        if not kernel or any(k != 1 for k in kernel):
            return (f"Conv with a {'x'.join(map(str, kernel)) or '?'} kernel (no int8 implicit-GEMM kernel yet: only 1x1 "
                    "convolutions run as int8 matmuls)")
        if any(v != 1 for v in attr.get("strides", [1])) or any(v != 1 for v in attr.get("dilations", [1])) or any(
                attr.get("pads", [0])) or attr.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "1x1 Conv with strides, dilations or pads"
        return None

    def _match_qdq(self, node: ir.Node) -> str | None:
        conv = node.op_type == "Conv"
        if conv and (why := self._conv_is_matmul(node)) is not None:
            return why
        transposed = True if conv else _weight_transposed(node)
        if transposed is None:
            return "Gemm with alpha/beta/transA"
        x_dq = self._producer(node.inputs[0], "DequantizeLinear")
        q = self._producer(x_dq.inputs[0], "QuantizeLinear") if x_dq is not None else None
        if q is None:
            return "the activation is not DequantizeLinear(QuantizeLinear(x))"
        s, z = self.const(q.inputs[1]), self.const(q.inputs[2]) if len(q.inputs) > 2 else None
        s2, z2 = self.const(x_dq.inputs[1]), self.const(x_dq.inputs[2]) if len(x_dq.inputs) > 2 else None
        if s is None or z is None or s.size != 1 or z.size != 1 or s2 is None or z2 is None \
                or float(s) != float(s2) or int(z) != int(z2):
            return "the activation scale is not one constant per tensor"
        weight = self._weight_dq(node.inputs[1], transposed)
        if isinstance(weight, str):
            return weight
        w, w_scale = weight
        bias = None
        if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None:
            b = self._constant_bias(node.inputs[2])
            if b is None or b.size != w.shape[1]:
                return f"the {node.op_type} bias is not a constant vector"
            bias = ("p", node.inputs[2].name, b.reshape(-1).astype(np.float32))
        base = node.inputs[1].name
        kw: dict[str, Any] = {"x_" + k: v for k, v in self._scalar_params(q).items()} if self.pt2e else {}
        if kw:  # the pt2e form's weight: [N, K] (or the conv's [C_out, C_in, 1, ..]), per-channel scales, int64 zeros
            shape = self.const(self._weight_source(node.inputs[1])).shape if conv else (w.shape[1], w.shape[0])
            kw["w_t"] = ("w", base + "_int8_t", np.ascontiguousarray(w.T).reshape(shape))
            kw["w_zeros"] = ("w", base + "_zp64", np.zeros(w.shape[1], np.int64))
            w_scale = np.broadcast_to(w_scale, (w.shape[1],)).copy()
        self.fused_kwargs[node] = kw
        self.fused[node] = ("qdq_conv1x1" if conv else "qdq_linear", q.inputs[0], q.inputs[1], q.inputs[2],
                            ("w", base + "_int8", w), ("s", base + "_scale", w_scale.astype(np.float32)), bias)
        return None

    def _weight_source(self, value: ir.Value) -> ir.Value:
        """The int8 constant behind ``DequantizeLinear`` (through a Transpose)."""
        if (t := self._producer(value, "Transpose")) is not None:
            value = t.inputs[0]
        return self._producer(value, "DequantizeLinear").inputs[0]

    def _int32_constant(self, dq: ir.Node) -> bool:
        q = self.const(dq.inputs[0])
        return q is not None and q.dtype == np.int32 and self.const(dq.inputs[1]) is not None and (
            len(dq.inputs) < 3 or dq.inputs[2] is None or self.const(dq.inputs[2]) is not None)

    def _symmetric_int8_weight(self, dq: ir.Node) -> bool:
        w = self.const(dq.inputs[0])
        zp = self.const(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        scale = self.const(dq.inputs[1])
        blocked = "block_size" in dq.attributes and dq.attributes["block_size"].value
        return (w is not None and w.dtype == np.int8 and not blocked and scale is not None and scale.size > 1
                and (zp is None or not np.any(zp != 0)))

    def _scalar_params(self, q: ir.Node) -> dict[str, Any]:
        """A per-tensor QuantizeLinear's scale and zero point as Python numbers ({} if per channel)."""
        s = self.const(q.inputs[1])
        z = self.const(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else None
        if s is None or z is None or s.size != 1 or z.size != 1:
            return {}
        return {"scale_value": float(s.reshape(-1)[0]), "zp_value": int(z.reshape(-1)[0])}

    def _match_dynamic(self, mmi: ir.Node) -> str | None:
        """DynamicQuantizeLinear -> MatMulInteger -> Cast(float) -> Mul(x_scale * w_scale)."""
        dql = self._producer(mmi.inputs[0], "DynamicQuantizeLinear")
        w = self.const(mmi.inputs[1])
        if dql is None or w is None or w.ndim != 2 or w.dtype != np.int8:
            return "the activation is not DynamicQuantizeLinear(x) or the weight is not a constant int8 matrix"
        if len(mmi.inputs) < 3 or mmi.inputs[2] is not dql.outputs[2]:
            return "the activation zero point is not DynamicQuantizeLinear's"
        if len(mmi.inputs) > 3 and mmi.inputs[3] is not None and np.any(self.const(mmi.inputs[3]) != 0):
            return "the weight has a non-zero zero point"
        cast = self._only_consumer(mmi.outputs[0])
        if cast is None or cast.op_type != "Cast" or cast.attributes["to"].value != 1:
            return "the int32 result is not cast to float once"
        mul = self._only_consumer(cast.outputs[0])
        if mul is None or mul.op_type != "Mul":
            return "the float result is not scaled by one Mul"
        scale_value = mul.inputs[1] if mul.inputs[0] is cast.outputs[0] else mul.inputs[0]
        smul = self._producer(scale_value, "Mul")
        if smul is None:
            return "the scale is not x_scale * w_scale"
        w_scale_value = smul.inputs[1] if smul.inputs[0] is dql.outputs[1] else (
            smul.inputs[0] if smul.inputs[1] is dql.outputs[1] else None)
        w_scale = self.const(w_scale_value)
        if w_scale is None or w_scale.size not in (1, w.shape[1]):
            return "the weight scale is not a constant per tensor or per output channel"
        base = mmi.inputs[1].name
        scale = w_scale.reshape(-1).astype(np.float32)
        if self.trainable:  # the int8 weight as its float values, trained through fake quantization (STE)
            self.pending[base + "_float"] = {"onnx": base, "axis": 1}
            self.fused[mul] = ("dynamic_linear_ste", dql.inputs[0], ("q", base + "_float", w.astype(np.float32) * scale),
                               ("s", base + "_scale", scale), ("b", base + "_zp", np.zeros(scale.shape, np.int8)))
        else:
            self.fused[mul] = ("dynamic_linear", dql.inputs[0], ("w", base + "_int8", w), ("s", base + "_scale", scale))
        self.skipped.update((mmi, cast))
        return None

    def _match_sparse(self, node: ir.Node) -> bool:
        transposed = _weight_transposed(node)
        if transposed is None:
            return False
        w = self.const(node.inputs[1])
        if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
            return False
        w = w.T if transposed else w
        from slimc.kernels import sparse24

        if w.shape[0] < 8 or not sparse24.is_24(torch.from_numpy(np.array(w))):
            return False
        bias = None
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            b = self.const(node.inputs[2])
            if b is None or b.size != w.shape[1]:
                return False
            bias = node.inputs[2]
        values, meta = sparse24.compress(torch.from_numpy(np.array(w)))
        base = node.inputs[1].name
        self.fused[node] = ("sparse24_linear", node.inputs[0], ("p", base + "_values", values),
                            ("m", base + "_meta", meta), bias)
        return True

    def _match_fake_quant(self, q: ir.Node) -> None:
        """Q -> DQ pairs with equal parameters are fake quantization: one op with a straight-through gradient."""
        out = q.outputs[0]
        users = self.consumers.get(out, [])
        if not users or out in self.graph_outputs:
            return

        def params(node):
            arrays = [self.const(v) for v in list(node.inputs[1:3])]
            axis = node.attributes["axis"].value if "axis" in node.attributes else 1
            block = node.attributes["block_size"].value if "block_size" in node.attributes else 0
            return arrays, axis, block

        q_arrays, q_axis, q_block = params(q)
        if any(a is None for a in q_arrays) or len(q_arrays) < 2:
            return
        for dq in users:
            if dq.op_type != "DequantizeLinear" or dq.inputs[0] is not out:
                return
            arrays, axis, block = params(dq)
            if len(arrays) != len(q_arrays) or any(a is None or not np.array_equal(a, b) for a, b in zip(arrays, q_arrays)):
                return
            if (axis != q_axis and q_arrays[0].size > 1) or block != q_block:
                return
        for dq in users:
            self.fake_quant[dq] = q
        self.skipped.add(q)

    def find_patterns(self) -> None:
        for node in self.graph:
            if node.op_type == "QuantizeLinear":
                self._match_fake_quant(node)
        for node in self.graph:
            if node.op_type == "MatMulInteger":
                why = self._match_dynamic(node)
                if why is not None:
                    self.report.left_generic[node.name or node.outputs[0].name] = (
                        "MatMulInteger lowered to the exact int32 kernel, not the fused one: " + why)
            elif node.op_type in ("MatMul", "Gemm", "Conv") and not self.trainable:  # trainable: plain float math
                x_dq = self._producer(node.inputs[0], "DequantizeLinear")
                if x_dq is not None or self._producer(node.inputs[1], "DequantizeLinear") is not None:
                    why = self._match_qdq(node)
                    if why is not None:
                        self.report.left_generic[node.name or node.outputs[0].name] = (
                            f"quantized {node.op_type} lowered as float math on dequantized values: " + why)
                elif node.op_type != "Conv":
                    self._match_sparse(node)

    # ------------------------------------------------------------ emission
    def _fused_call(self, spec: tuple, kwargs: dict[str, Any] | None = None) -> fx.Node:
        from slimc import kernels

        kind, *items = spec

        def value(item):
            if isinstance(item, tuple):  # (tag, name, array): a new parameter ("p") or buffer
                tag, name, array = item
                tensor = torch.from_numpy(np.array(array)) if not isinstance(array, torch.Tensor) else array
                return self._tensor_attr(name, tensor.contiguous(), trainable=(tag in ("p", "q")))
            return self.arg(item)

        args = [value(item) for item in items]
        kw = {k: value(v) if isinstance(v, (tuple, ir.Value)) else v for k, v in (kwargs or {}).items()}
        self.report.kernels[kind] += 1
        return self.fx.call_function(getattr(ops, kind, None) or getattr(kernels, kind), tuple(args), kw)

    def emit(self, node: ir.Node) -> None:
        if node in self.skipped:
            return
        if node.op_type == "Constant" and node.outputs[0] in self.consts:
            return
        self.report.ops[node.op_type] += 1
        if node in self.fused:
            kw = self.fused_kwargs.get(node)
            if kw and node.inputs[0] in self.pt2e_codes:
                kw = {**kw, "x_q": self.pt2e_codes[node.inputs[0]]}
            self.env[node.outputs[0]] = self._fused_call(self.fused[node], kw)
            return
        if self.pt2e and node.op_type == "DequantizeLinear" and self._int32_constant(node):
            # An int32 bias: a float parameter, as PT2E keeps one (XNNPACK took a bias computed at run time
            # from int32 as garbage: every output of EfficientNet-Lite0's first conv was one value).
            self.env[node.outputs[0]] = self._tensor_attr(
                node.outputs[0].name, torch.from_numpy(self._constant_bias(node.outputs[0])), trainable=True)
            return
        if self.trainable and node.op_type == "DequantizeLinear" and self._integer_weight(node):
            self.env[node.outputs[0]] = self._trainable_weight(node)
            return
        if node in self.fake_quant:
            q = self.fake_quant[node]
            kwargs = {k: _attr_value(a) for k, a in q.attributes.items() if k in ("axis", "block_size")}
            if self.pt2e:
                kwargs.update(self._scalar_params(q))
            args = (self.arg(q.inputs[0]), self.arg(q.inputs[1]), self.arg(q.inputs[2]) if len(q.inputs) > 2 else None)
            if self.pt2e and "scale_value" in kwargs and any(use in self.fused for use, _ in node.outputs[0].uses()):
                # A kernel-lowered matmul/conv shares this activation with another consumer (a residual Add):
                # the pt2e form quantizes it once and dequantizes per consumer, as PT2E writes it. Two
                # quantize nodes of one float tensor made XNNPACK compute wrong values (EfficientNet-Lite0).
                codes = self.fx.call_function(ops.fake_quant_codes, args, kwargs)
                self.pt2e_codes[node.outputs[0]] = codes
                pt2e = {k: kwargs[k] for k in ("scale_value", "zp_value")}
                self.env[node.outputs[0]] = self.fx.call_function(ops.fake_quant_values, (codes, args[2]), pt2e)
                return
            self.env[node.outputs[0]] = self.fx.call_function(ops.fake_quant, args, kwargs)
            return
        args = tuple(self.arg(v) for v in node.inputs)
        while args and args[-1] is None:
            args = args[:-1]
        kwargs = {}
        moved = _MOVED_ATTRS.get(node.op_type, {})
        ignored = _IGNORED_ATTRS.get(node.op_type, set())
        for key, attr in node.attributes.items():
            if key not in ignored:
                kwargs[moved.get(key, key)] = _attr_value(attr)
        fn = self._function(node)
        if node.op_type in _CREATES_TENSORS and self.device_anchor is not None:
            kwargs["like"] = self.device_anchor
        if self.pt2e and node.op_type == "DequantizeLinear" and self._symmetric_int8_weight(node):
            n = self.const(node.inputs[1]).size
            kwargs["weight_zeros"] = self._tensor_attr(node.inputs[0].name + "_zp64", np.zeros(n, np.int64), False)
        if fn is _matmul_nbits:
            self.report.kernels["matmul_nbits"] += 1
        elif fn is _matmul_integer:
            self.report.kernels["matmul_integer"] += 1
        result = self.fx.call_function(fn, args, kwargs)
        outputs = [o for o in node.outputs]
        if len(outputs) == 1 and not self._multi(node):
            self.env[outputs[0]] = result
        else:
            for i, out in enumerate(outputs):
                if out is not None and out.name:
                    self.env[out] = self.fx.call_function(operator.getitem, (result, i))

    def _integer_weight(self, dq: ir.Node) -> bool:
        w = self.const(dq.inputs[0])
        return (w is not None and w.dtype in (np.int8, np.uint8) and w.size > 1 and self.const(dq.inputs[1]) is not None
                and (len(dq.inputs) < 3 or dq.inputs[2] is None or self.const(dq.inputs[2]) is not None))

    def _trainable_weight(self, dq: ir.Node) -> fx.Node:
        """``DequantizeLinear(int8 constant)`` as ``fake_quant(float parameter)``: the same values, a gradient."""
        kwargs = {k: _attr_value(a) for k, a in dq.attributes.items() if k in ("axis", "block_size")}
        tensors = [torch.from_numpy(np.array(self.const(v))) if v is not None else None for v in list(dq.inputs[:3])]
        tensors += [None] * (3 - len(tensors))
        values = ops.DequantizeLinear(*tensors, **kwargs)
        self.pending[dq.inputs[0].name + "_float"] = {"onnx": dq.inputs[0].name, **kwargs}
        param = self._tensor_attr(dq.inputs[0].name + "_float", values, trainable=True)
        return self.fx.call_function(ops.fake_quant, (param, self.arg(dq.inputs[1]), self.arg(dq.inputs[2]) if len(
            dq.inputs) > 2 else None), kwargs)

    @staticmethod
    def _multi(node: ir.Node) -> bool:
        return node.op_type in ("Split", "TopK", "Dropout", "LayerNormalization", "DynamicQuantizeLinear")

    def _function(self, node: ir.Node):
        if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            if len(node.inputs) > 4 and node.inputs[4] is not None and node.inputs[4].name:
                raise LoweringError(f"MatMulNBits '{node.name}' has g_idx (act-order group indices), which slimc's "
                                    "torch lowering does not take yet (slimc's int4 pass never writes it)")
            return _matmul_nbits
        if node.op_type == "MatMulInteger" and node.domain in ("", "ai.onnx"):
            w = self.const(node.inputs[1])
            if w is not None and w.dtype == np.int8 and w.ndim == 2 and (
                    len(node.inputs) < 4 or node.inputs[3] is None or not np.any(self.const(node.inputs[3]) != 0)):
                return _matmul_integer
            return _matmul_integer_generic
        if node.domain not in ("", "ai.onnx"):
            raise LoweringError(f"op {node.domain}.{node.op_type} (node '{node.name}') has no torch lowering in slimc; "
                                f"supported: the ONNX ops {', '.join(supported_ops())}")
        fn = getattr(ops, node.op_type, None)
        if fn is None or not node.op_type[:1].isupper() or node.op_type == "T":
            raise LoweringError(f"ONNX op {node.op_type} (node '{node.name}') has no torch lowering in slimc yet; "
                                f"supported ops: {', '.join(supported_ops())}. Run this model with the onnxruntime "
                                f"backend, or open an issue with the op.")
        return fn

    def lower(self) -> fx.GraphModule:
        self.device_anchor = None
        for value in self.graph.inputs:
            if value in self.consts:
                continue
            self.env[value] = self.fx.placeholder(_py_name(value.name, self.names))
            self.device_anchor = self.device_anchor or self.env[value]
        if self.use_kernels:
            self.find_patterns()
        for node in self.graph:
            self.report.nodes += 1
            self.emit(node)
        outs = []
        for value in self.graph.outputs:
            got = self.arg(value)
            if not isinstance(got, fx.Node) or got.op == "get_attr":  # a constant or shape value as an output
                got = self.fx.call_function(ops.output_tensor, (got, self.device_anchor))
            outs.append(got)
        self.fx.output(tuple(outs))
        self.fx.eliminate_dead_code()
        gm = fx.GraphModule(self.root, self.fx, class_name="SlimcModule")
        kept = {n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}
        gm.onnx_names = {k: v for k, v in self.attrs.items() if k in kept}
        gm.quantized = {k: v for k, v in self.quantized.items() if k in kept}
        gm.input_names = [v.name for v in self.graph.inputs if v not in self.consts]
        gm.output_names = [v.name for v in self.graph.outputs]
        gm.input_dtypes = {v.name: ops.DTYPES[int(v.dtype)] for v in self.graph.inputs
                           if v not in self.consts and v.dtype is not None and int(v.dtype) in ops.DTYPES}
        self.report.parameters = sum(p.numel() for p in gm.parameters())
        self.report.buffers = sum(b.numel() for b in gm.buffers())
        return gm


def _weight_transposed(node: ir.Node) -> bool | None:
    """Whether a MatMul/Gemm's constant second input is the weight transposed (Gemm ``transB=1``);
    None for a Gemm that is not ``A @ B (+ C)`` (alpha, beta or transA), which no kernel takes."""
    if node.op_type != "Gemm":
        return False
    attr = {k: a.value for k, a in node.attributes.items()}
    if attr.get("alpha", 1.0) != 1 or attr.get("beta", 1.0) != 1 or attr.get("transA", 0):
        return None
    return attr.get("transB", 0) == 1


def _matmul_nbits(a, b, scales, zero_points=None, g_idx=None, bias=None, *, K, N, bits=4, block_size=32):  # noqa: N803
    """com.microsoft.MatMulNBits: inputs A, B, scales, zero_points, g_idx, bias (ONNX Runtime's order)."""
    from slimc import kernels

    return kernels.matmul_nbits(a, b, scales, zero_points, bias, K=K, N=N, bits=bits, block_size=block_size)


def _matmul_integer(a, b, a_zp=None, b_zp=None):
    from slimc import kernels

    return kernels.matmul_integer(a, b, a_zp)


def _matmul_integer_generic(a, b, a_zp=None, b_zp=None):
    """MatMulInteger in float64 (exact for 8-bit inputs), for weights the kernel does not take."""
    af = a.to(torch.float64) - (a_zp.to(torch.float64) if a_zp is not None else 0.0)
    bz = b_zp.to(torch.float64).reshape(1, -1) if b_zp is not None and b_zp.numel() > 1 else (
        b_zp.to(torch.float64) if b_zp is not None else 0.0)
    return torch.round(torch.matmul(af, b.to(torch.float64) - bz)).to(torch.int32)


def lower(model: ir.Model, *, kernels: bool = True, pt2e: bool = False,
          trainable: bool = False) -> tuple[fx.GraphModule, LoweringReport]:
    """The model as a `torch.fx.GraphModule` (inputs in graph order, a tuple of outputs), and a report.

    ``kernels=False`` lowers every node generically (quantized ops as float math on dequantized
    values), the baseline the kernels are checked against. ``pt2e=True`` also stores what the
    ``decomposed("pt2e")`` export form needs (per-tensor activation parameters as numbers, weights
    as [N, K], int64 zero points): for the ExecuTorch target. ``trainable=True`` (for `distill`) makes
    every constant int8 weight a float parameter behind fake quantization with a straight-through
    gradient, matmuls plain float math (no sparse or int8 kernels), and records in ``gm.quantized``
    which parameter maps back to which integer initializer.
    """
    lowerer = _Lowerer(model, kernels, pt2e, trainable)
    gm = lowerer.lower()
    return gm, lowerer.report
