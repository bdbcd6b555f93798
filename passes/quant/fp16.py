"""The `fp16` pass: float32 weights and computation to float16, with the fragile parts kept float32.

ONNX Runtime's converter (``onnxruntime.transformers.float16.convert_float_to_float16``) does the
rewriting: it retypes every float tensor, converts the initializers, and puts Cast nodes around
the nodes it is told to keep in float32 and at the graph boundary. slimc decides *what* stays
float32 and repairs what the converter gets wrong on exported graphs:

1. **Refusals.** A quantized model (QDQ, MatMulNBits, integer ops) is refused; a model that
   already holds float16 or bfloat16 tensors is left unchanged (a no-op report: converting again
   would cast its float32 islands down).
2. **What stays float32** (``keep_fragile=true``, the default), found in the graph:

   - *norm statistics*: ``Pow(x, 2)`` or ``Mul(x, x)`` feeding a ``ReduceMean``/``ReduceSum``,
     and the ``Add(eps) -> Sqrt -> Reciprocal`` chain after it (RMSNorm, decomposed LayerNorm).
     ``x**2`` overflows float16 once ``|x| > 256``; the variance then becomes inf and the
     normalised output 0. ``ReduceSumSquare``, ``ReduceL2`` and ``ReduceLogSumExp`` stay
     float32 for the same reason.
   - *position angles*: ``Sin``/``Cos`` and the cone of nodes computing their argument when it
     is built from integer positions or constants only (rotary embeddings, sinusoidal
     timestep embeddings). float16 holds integers exactly only up to 2048; at position 5000 the
     angle is off by up to 2 rad.

   The converter's own block list (ops with no float16 kernels or semantics: ``Range``,
   ``TopK``, ``NonMaxSuppression``, ``CumSum``, ``Min``/``Max``, the ML ops ...) always applies,
   and so does what the installed ONNX Runtime says it cannot load in float16
   (`slimc.passes.quant.fp16_kernels`: ``Celu``, ``HannWindow``, ...); these are kept float32 with
   Casts around them instead of refusing the model;
   ``block=`` adds op types (exact names) and globs on node names, module paths and weight
   names (`common.node_matches`).
3. **Constants beyond the float16 range** (``|x| > 65504``: attention-mask fills such as
   ``torch.finfo(float32).min`` = -3.4e38) are clipped to ``+-clip_to`` (default 1e4) and
   counted. The converter would clip them to +-65504, where ``mask + score`` already overflows
   to -inf, and a fully masked row (left padding) turns into NaN, which then spreads to every
   position through the next attention's values. Nonzero constants below float16's smallest
   subnormal (5.96e-8) become +-5.96e-8 (the converter's rule; counted, not zeroed).
4. **Repairs.** ``Constant`` nodes with ``value_float(s)`` attributes (which the converter leaves
   float32) become tensor constants; the converter appends its Cast nodes at the end of the graph
   (the ONNX checker rejects the order), so the graph is topologically sorted again.
5. **Casts.** Cast -> Cast chains and casts to the type a value already has are counted.
   float16 -> float32 -> float16 pairs cancel exactly and are removed; float32 -> float16 ->
   float32 round trips (two adjacent float32 islands, or a float32 graph input feeding a float32
   node) are removed too: the float32 node then reads the float32 value it was meant to.
6. **Latency guard** (only with ``min_speedup``): ORT's CPU provider has few float16 kernels
   and inserts casts around the rest, so a float16 model is usually *slower* on CPU; the pass is
   for GPU / edge runtimes and for size. With ``min_speedup`` set the result is timed against the
   input on ORT CPU and refused below it; the model is converted as a copy, so a refusal leaves
   it unchanged.

``keep_io_types=true`` (default) keeps float32 graph inputs and outputs (Cast nodes at the
boundary); ``false`` makes the interface float16 and says so in the report: callers must feed
float16.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any, Optional

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from slimc import normalize
from slimc.analysis import count_params
from slimc.backends.onnxruntime import release_mapped_pages
from slimc.errors import PassConfigError
from slimc.onnx_io import copy_model, inline_weights
from slimc.passes.quant import common, fp16_weights
from slimc.passes.quant.fp16_kernels import runtime_failure, without_fp16_kernel
from slimc.pipeline import Pass, PassContext, PassReport

log = logging.getLogger("slimc")

FP16_MAX = 65504.0
FP16_MIN_POSITIVE = 5.96e-08  # smallest float16 subnormal; the converter's min_positive_val
LOW_PRECISION = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
# Reductions whose running sum is a sum of squares or exponentials: float16 overflows early.
SQUARING_REDUCTIONS = ("ReduceSumSquare", "ReduceL2", "ReduceLogSumExp")
# Elementwise steps from a variance to the factor that normalises x (eps, sqrt, 1/sqrt).
_NORM_TAIL = ("Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow")
# Ops a position-angle computation goes through between integer positions and Sin/Cos.
_ANGLE_OPS = ("Cast", "Mul", "MatMul", "Div", "Add", "Sub", "Neg", "Concat", "Transpose", "Reshape", "Unsqueeze",
              "Squeeze", "Expand", "Slice", "Gather", "Identity", "Range", "Shape", "ConstantOfShape", "Constant")
_ANGLE_DEPTH = 12
_FLOAT_WIDTH = {ir.DataType.FLOAT16: 16, ir.DataType.BFLOAT16: 16, ir.DataType.FLOAT: 32, ir.DataType.DOUBLE: 64}


@dataclasses.dataclass
class Fp16(Pass):
    """Convert float32 weights and computation to float16; norm statistics and position angles stay float32.

    Options:
        keep_io_types: `true`: graph inputs and outputs stay float32 (Casts at the boundary);
            `false`: the interface becomes float16 and callers must feed float16.
        block: more nodes to keep float32: op types (exact names, e.g. `Softmax`) and globs on node
            names, module paths and weight names.
        keep_fragile: keep numerically fragile subgraphs float32 (norm statistics, position angles).
        clip_to: float32 constants beyond the float16 range (|x| > 65504) become ±clip_to.
        min_speedup: none: no latency guard; a number: time the result on ONNX Runtime CPU and
            refuse it when slower than this.
    """

    keep_io_types: bool = True
    block: Optional[list[str]] = None
    keep_fragile: bool = True
    clip_to: float = 1e4
    min_speedup: Optional[float] = None

    name = "fp16"
    exact = False
    description = "float16 weights and compute (ORT's converter), fragile ops kept float32, mask fills clipped, casts folded"

    def __post_init__(self) -> None:
        super().__init__()
        if self.block is not None:
            if isinstance(self.block, str) or not all(isinstance(b, str) and b.strip() for b in self.block):
                raise PassConfigError(
                    "fp16: block must be a list of op types or globs, e.g. block=[Softmax, '*lm_head*']."
                )
        if not 0.0 < self.clip_to <= FP16_MAX:
            raise PassConfigError(
                f"fp16: clip_to={self.clip_to} is out of range; use a magnitude in (0, {FP16_MAX:g}] "
                "(constants beyond the float16 range become +-clip_to; 1e4 leaves head-room for mask + score)."
            )
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise PassConfigError("fp16: min_speedup must be > 0 (e.g. 1.0: not slower), or none for no latency guard.")

    # ------------------------------------------------------------ the pass

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        start = time.perf_counter()
        common.refuse_quantized(model, self.name)
        already = _low_precision_tensors(model)
        if already:
            return PassReport(
                name=self.name, modified=False,
                summary=f"nothing converted: the model already holds float16/bfloat16 tensors ({already})",
                details={"already_low_precision": already},
                left_alone=[("model", f"already float16/bfloat16 ({already}); converting again would cast its "
                             "float32 islands (kept-float ops, boundary casts) down")],
                seconds=time.perf_counter() - start,
            )
        if not any(v.dtype == ir.DataType.FLOAT for v in _all_values(model)):
            return PassReport(name=self.name, modified=False, summary="nothing converted: the model has no float32 tensors",
                              left_alone=[("model", "no float32 tensors to convert")], seconds=time.perf_counter() - start)
        params0, bytes0 = count_params(model)
        float_bytes0 = _float_weight_bytes(model)
        casts0 = _count_op(model, "Cast")

        work = copy_model(model)  # external weights stay memory-mapped: the converter gets none (`fp16_weights`)
        ir_common.NameFixPass()(work)  # unique node names: the converter blocks nodes by name
        if not _typed(work):  # finding what stays float32 needs every value's type
            try:
                normalize.infer_shapes(work)  # sequences stay sequences (SplitToSequence -> SequenceAt)
            except Exception as exc:  # best effort: the converter runs its own inference
                log.info("fp16: shape inference failed (%s); values without a type are not kept float32", exc)
        _tensor_constants(work)

        blocked, unmatched = self._blocked(work)
        clip = _clip_constants(work, set(blocked), self.clip_to)
        converted = self._convert_runnable(work, blocked, ctx)

        cast_stats = _fold_casts(converted)
        ir_common.RemoveUnusedNodesPass()(converted)
        cast_stats["chains_left"] = _count_chains(converted)
        ir_common.TopologicalSortPass()(converted)

        guard = None
        if self.min_speedup is not None:
            guard = common.guard(self.name, model, converted, common.latency_feed(ctx, model), min_speedup=self.min_speedup,
                                 threads=ctx.threads)
        common.replace_in_place(model, converted)

        params1, bytes1 = count_params(model)
        kept_fp32 = [v.name for v in model.graph.initializers.values()
                     if v.const_value is not None and v.dtype == ir.DataType.FLOAT and v.const_value.size > 1]
        io = _interface(model)
        casts1 = _count_op(model, "Cast")
        left = _left_alone(blocked, kept_fp32)
        details: dict[str, Any] = {
            "weight_bytes_before": bytes0, "weight_bytes_after": bytes1,
            "float32_weight_bytes_before": float_bytes0, "float32_weight_bytes_after": _float_weight_bytes(model),
            "params": params0,
            "initializers_kept_float32": kept_fp32,
            "blocked": {reason: dict(collections.Counter(ops)) for reason, ops in _by_reason(blocked).items()},
            "blocked_nodes": len(blocked), "block_unmatched": unmatched,
            "clipped_values": clip["clipped"], "clipped_tensors": clip["tensors"], "clip_to": self.clip_to,
            "raised_tiny_values": clip["tiny"],
            "casts_before": casts0, "casts_after": casts1, "cast_chains": cast_stats,
            "interface": io, "keep_io_types": self.keep_io_types,
        }
        if guard is not None:
            details["latency_guard"] = guard.to_json()
        summary = (f"float16: weights {_si(bytes0)} -> {_si(bytes1)} ({bytes1 / max(bytes0, 1):.2f}x); "
                   f"{len(blocked)} nodes kept float32")
        if clip["clipped"]:
            summary += f"; {clip['clipped']} constant values beyond +-65504 clipped to +-{self.clip_to:g}"
        removed = cast_stats["identity_pairs_removed"] + cast_stats["round_trips_removed"] + cast_stats["redundant_removed"]
        summary += f"; casts {casts0} -> {casts1} ({removed} cancelling removed, {cast_stats['chains_left']} Cast->Cast chains left)"
        if unmatched:
            summary += f"; block entries matching nothing: {', '.join(unmatched)}"
        if not self.keep_io_types and io["float16"]:
            summary += f"; interface changed: {', '.join(io['float16'])} now float16 (feed float16)"
        if guard is not None:
            summary += f"; ORT CPU speedup {guard.speedup:.2f}x"
        return PassReport(name=self.name, modified=True, summary=summary, details=details, left_alone=left,
                          seconds=time.perf_counter() - start)

    # ------------------------------------------------------------ steps

    def _blocked(self, model: ir.Model) -> tuple[dict[str, tuple[str, str]], list[str]]:
        """{node name: (op type, reason)} of the nodes to keep float32, and the ``block`` entries that matched nothing."""
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

        blocked: dict[str, tuple[str, str]] = {}
        nodes = list(model.graph.all_nodes())
        default = set(DEFAULT_OP_BLOCK_LIST)
        for node in nodes:
            if node.op_type in default and _has_float_io(node):
                blocked[node.name] = (node.op_type, "no float16 support (ORT converter's block list)")
        if self.keep_fragile:
            for node in _norm_statistics(nodes):
                blocked.setdefault(node.name, (node.op_type, "norm statistics: x**2 overflows float16 above 256"))
            for node in _position_angles(nodes):
                blocked.setdefault(node.name, (node.op_type, "position angles: float16 positions are inexact above 2048"))
        for node in without_fp16_kernel(model, [n for n in nodes if n.name not in blocked]):
            blocked[node.name] = (node.op_type, "ONNX Runtime cannot load it in float16 (no kernel, or an attribute fixes its type)")
        unmatched = []
        for pattern in self.block or []:
            hits = [n for n in nodes if n.op_type == pattern or common.node_matches(n, [pattern])]
            if not hits:
                unmatched.append(pattern)
            for node in hits:
                blocked[node.name] = (node.op_type, f"block={pattern}")
        return blocked, unmatched

    def _convert_runnable(self, model: ir.Model, blocked: dict[str, tuple[str, str]], ctx: PassContext) -> ir.Model:
        """`_convert`, then run once in ORT: an op its float16 kernel refuses at run time stays float32
        (every node of that type) and the model is converted again (`fp16_kernels.runtime_failure`)."""
        try:
            feed = common.latency_feed(ctx, model)
        except Exception:  # noqa: BLE001 - no example input: the load probes are all there is
            feed = None
        converted = self._convert(model, blocked)
        for _ in range(8):
            ir_common.TopologicalSortPass()(converted)
            failure = runtime_failure(converted, model, feed)
            if failure is None:
                break
            node, why = failure
            fresh = [n for n in model.graph.all_nodes() if n.op_type == node.op_type and n.domain == node.domain
                     and n.name not in blocked and _has_float_io(n)]
            if not fresh:
                break
            for n in fresh:
                blocked[n.name] = (n.op_type, f"ONNX Runtime fails on it in float16 ({why[:160]})")
            converted = self._convert(model, blocked)
        return converted

    def _convert(self, model: ir.Model, blocked: dict[str, tuple[str, str]]) -> ir.Model:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        typed = _typed(model)
        ops = set(DEFAULT_OP_BLOCK_LIST) | {b for b in self.block or [] if any(n.op_type == b for n in model.graph.all_nodes())}
        # weightless: large initializers are placeholders of their type and shape, converted one at a
        # time afterwards (`fp16_weights.restore`), never all in one proto
        with fp16_weights.weightless(model) as weights, inline_weights(model, keep=fp16_weights.is_placeholder):
            proto = ir.serde.serialize_model(model)
        # value_info entries naming initializers get retyped to float16 even when the initializer
        # stays float32 (read only by float32 nodes): the checker then sees a type mismatch.
        _drop_initializer_value_info(proto.graph)
        with fp16_weights.shapes_from_dims():
            proto = convert_float_to_float16(
                proto, keep_io_types=self.keep_io_types, disable_shape_infer=typed,
                op_block_list=sorted(ops), node_block_list=sorted(blocked), force_fp16_initializers=False,
            )
        converted = ir.serde.deserialize_model(proto)
        fp16_weights.restore(converted, weights)
        return converted


# ---------------------------------------------------------------- graph facts


def _drop_initializer_value_info(graph) -> None:
    """Remove the value_info entries of ``graph``'s initializers, in subgraphs too (the tensor has the type)."""
    names = {t.name for t in graph.initializer}
    keep = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
                _drop_initializer_value_info(sub)


def _low_precision_tensors(model: ir.Model) -> str:
    """A short description of the float16/bfloat16 tensors in ``model``, '' when there are none."""
    inits = sum(1 for v in model.graph.initializers.values() if v.dtype in LOW_PRECISION)
    io = [v.name for v in (*model.graph.inputs, *model.graph.outputs) if v.dtype in LOW_PRECISION]
    casts = sum(1 for n in model.graph.all_nodes() if n.op_type == "Cast" and _cast_to(n) in LOW_PRECISION)
    values = sum(1 for n in model.graph.all_nodes() for v in n.outputs if v.dtype in LOW_PRECISION)
    parts = [f"{inits} initializers" if inits else "", f"inputs/outputs {', '.join(io)}" if io else "",
             f"{casts} casts to float16" if casts else "", f"{values} computed values" if values and not casts else ""]
    return ", ".join(p for p in parts if p)


def _typed(model: ir.Model) -> bool:
    return all(v.dtype is not None for n in model.graph.all_nodes() for v in n.outputs)


def _all_values(model: ir.Model):
    yield from model.graph.initializers.values()
    yield from model.graph.inputs
    for node in model.graph.all_nodes():
        yield from node.outputs


def _float_weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None and v.dtype == ir.DataType.FLOAT)


def _count_op(model: ir.Model, op_type: str) -> int:
    return sum(1 for n in model.graph.all_nodes() if n.op_type == op_type)


def _cast_to(node: ir.Node) -> ir.DataType | None:
    attr = node.attributes.get("to")
    return None if attr is None else ir.DataType(attr.value)


def _is_const(value: ir.Value | None) -> bool:
    if value is None:
        return True
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def _has_float_io(node: ir.Node) -> bool:
    return any(v is not None and v.dtype == ir.DataType.FLOAT for v in (*node.inputs, *node.outputs))


def _const_array(value: ir.Value) -> np.ndarray | None:
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value.numpy()
    return None


def _norm_statistics(nodes: list[ir.Node]) -> list[ir.Node]:
    """Squares feeding a mean/sum, the reduction, and the eps/sqrt/reciprocal chain after it."""
    found = [n for n in nodes if n.op_type in SQUARING_REDUCTIONS and _has_float_io(n)]
    for node in nodes:
        if node.op_type not in ("ReduceMean", "ReduceSum") or not node.inputs or node.inputs[0] is None:
            continue
        square = node.inputs[0].producer()
        if square is None or not _is_square(square):
            continue
        found += [square, node]
        current = node
        while True:
            uses = current.outputs[0].uses()
            if len(uses) != 1:
                break
            nxt = uses[0].node
            others = [v for i, v in enumerate(nxt.inputs) if i != uses[0].idx]
            if nxt.op_type not in _NORM_TAIL or not all(_is_const(v) for v in others):
                break
            found.append(nxt)
            current = nxt
    return found


def _is_square(node: ir.Node) -> bool:
    if node.op_type == "Mul" and len(node.inputs) == 2:
        return node.inputs[0] is node.inputs[1] and node.inputs[0] is not None
    if node.op_type == "Pow" and len(node.inputs) == 2 and node.inputs[1] is not None:
        exponent = _const_array(node.inputs[1])
        return exponent is not None and exponent.size == 1 and float(exponent.reshape(())) >= 2.0
    return False


def _position_angles(nodes: list[ir.Node]) -> list[ir.Node]:
    """Sin/Cos whose argument is computed from integer positions and constants, with that computation."""
    found: list[ir.Node] = []
    for node in nodes:
        if node.op_type not in ("Sin", "Cos") or not node.inputs or node.inputs[0] is None:
            continue
        cone: dict[int, ir.Node] = {}
        if _angle_cone(node.inputs[0], cone, 0):
            found.append(node)
            found += [n for n in cone.values() if _has_float_io(n)]
    return found


def _angle_cone(value: ir.Value, cone: dict[int, ir.Node], depth: int) -> bool:
    """Whether ``value`` is computed from constants and integer tensors only; collects its float producers."""
    if value.const_value is not None or (value.dtype is not None and not value.dtype.is_floating_point()):
        return True
    producer = value.producer()
    if producer is None:  # a float graph input: an activation, not a position
        return False
    if id(producer) in cone:
        return True
    if producer.op_type not in _ANGLE_OPS or depth >= _ANGLE_DEPTH:
        return False
    cone[id(producer)] = producer
    return all(v is None or _angle_cone(v, cone, depth + 1) for v in producer.inputs)


def _tensor_constants(model: ir.Model) -> None:
    """Rewrite ``Constant(value_float(s)=...)`` as tensor constants and give ``ConstantOfShape`` its
    default value explicitly, which the converter then converts."""
    for node in model.graph.all_nodes():
        if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx") and "value" not in node.attributes:
            # its default value is a float32 0 the converter cannot see: spell it out so it converts
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float32)))
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for name in ("value_float", "value_floats"):
            attr = node.attributes.get(name)
            if attr is not None:
                array = np.asarray(attr.value, dtype=np.float32)
                del node.attributes[name]
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))


def _clip_constants(model: ir.Model, blocked: set[str], clip_to: float) -> dict[str, Any]:
    """Clip float32 constants beyond the float16 range to +-clip_to; count values and tiny ones."""
    stats: dict[str, Any] = {"clipped": 0, "tiny": 0, "tensors": []}

    def fix(name: str, tensor: ir.TensorProtocol) -> ir.Tensor | None:
        if tensor.dtype != ir.DataType.FLOAT:
            return None
        array = tensor.numpy()
        finite = np.isfinite(array)
        over = finite & (np.abs(array) > FP16_MAX)
        stats["tiny"] += int(np.count_nonzero(finite & (array != 0) & (np.abs(array) < FP16_MIN_POSITIVE)))
        if isinstance(tensor, ir.ExternalTensor):
            release_mapped_pages([array])  # read once here: memory-mapped weights are not kept resident
        if not over.any():
            return None
        stats["clipped"] += int(over.sum())
        stats["tensors"].append(name)
        return ir.tensor(np.where(over, np.sign(array) * np.float32(clip_to), array).astype(np.float32), name=tensor.name)

    for graph in (model.graph, *(g for n in model.graph.all_nodes() for a in n.attributes.values()
                                 for g in _subgraphs(a))):
        for value in graph.initializers.values():
            if value.const_value is None or (value.uses() and all(u.node.name in blocked for u in value.uses())):
                continue
            new = fix(value.name or "", value.const_value)
            if new is not None:
                value.const_value = new
    for node in model.graph.all_nodes():
        if node.op_type in ("Constant", "ConstantOfShape") and node.name not in blocked:
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                new = fix(node.name or node.op_type, attr.value)
                if new is not None:
                    node.attributes["value"] = ir.AttrTensor("value", new)
    return stats


def _subgraphs(attr: Any) -> list[ir.Graph]:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.value]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.value)
    return []


def _fold_casts(model: ir.Model) -> dict[str, int]:
    """Count Cast -> Cast chains and same-type casts; remove those that cancel (see the module docstring)."""
    stats = {"chains": 0, "identity_pairs_removed": 0, "round_trips_removed": 0, "redundant": 0, "redundant_removed": 0}
    for node in list(model.graph.all_nodes()):
        if node.graph is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
            continue
        source, out, to = node.inputs[0], node.outputs[0], _cast_to(node)
        if source.dtype is not None and source.dtype == to:
            stats["redundant"] += 1
            stats["redundant_removed"] += _bypass(node, out, source)
            continue
        first = source.producer()
        if first is None or first.op_type != "Cast" or not first.inputs or first.inputs[0] is None:
            continue
        stats["chains"] += 1
        original = first.inputs[0]
        t0, t1 = original.dtype, _cast_to(first)
        if t0 != to or t0 not in _FLOAT_WIDTH or t1 not in _FLOAT_WIDTH:
            continue
        kind = "identity_pairs_removed" if _FLOAT_WIDTH[t1] > _FLOAT_WIDTH[t0] else "round_trips_removed"
        stats[kind] += _bypass(node, out, original)
    return stats


def _count_chains(model: ir.Model) -> int:
    return sum(1 for n in model.graph.all_nodes() if n.op_type == "Cast" and n.inputs and n.inputs[0] is not None
               and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "Cast")


def _bypass(node: ir.Node, out: ir.Value, replacement: ir.Value) -> bool:
    """Make ``out``'s readers read ``replacement`` instead; a graph output takes over its name."""
    graph = node.graph
    if out.is_graph_output():
        if graph is None or replacement.is_graph_input() or replacement.is_graph_output() or replacement.is_initializer():
            return False
        if replacement.producer() is None or replacement.producer().graph is not graph:
            return False
        name = out.name
        out.replace_all_uses_with(replacement, replace_graph_outputs=True)
        out.name = f"{name}_bypassed"
        replacement.name = name
        if replacement.shape is None:
            replacement.shape = out.shape
    else:
        out.replace_all_uses_with(replacement)
    if graph is not None:
        graph.remove(node, safe=True)
    return True


def _interface(model: ir.Model) -> dict[str, list[str]]:
    values = (*model.graph.inputs, *model.graph.outputs)
    return {"float32": [v.name for v in values if v.dtype == ir.DataType.FLOAT],
            "float16": [v.name for v in values if v.dtype == ir.DataType.FLOAT16]}


def _by_reason(blocked: dict[str, tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for op_type, reason in blocked.values():
        grouped.setdefault(reason, []).append(op_type)
    return grouped


def _left_alone(blocked: dict[str, tuple[str, str]], kept_fp32: list[str]) -> list[tuple[str, str]]:
    left = []
    for reason, ops in _by_reason(blocked).items():
        counts = collections.Counter(ops)
        what = ", ".join(f"{n} {op}" for op, n in counts.most_common())
        left.append((f"{len(ops)} nodes kept float32 ({what})", reason))
    if kept_fp32:
        shown = ", ".join(kept_fp32[:5]) + (f" and {len(kept_fp32) - 5} more" if len(kept_fp32) > 5 else "")
        left.append((f"{len(kept_fp32)} float32 initializers ({shown})", "read only by nodes kept float32"))
    return left


def _si(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
