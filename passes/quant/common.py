"""What the quantization passes share: weighted-op discovery, exclusion globs, refusing a model
that is already quantized, and the latency guard.

The latency guard is the promise that a quantization pass never hands back a slower model
without saying so: the pass saves its input and its result, measures both on the target backend
(ONNX Runtime CPU, same `SessionOptions`, interleaved rounds, median) on one sample of the
calibration data, and refuses a result below ``min_speedup`` unless the user forces it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401 - TopologicalSortPass

from slimc import workdir
from slimc.errors import DataError, LatencyGuardError, PassConfigError  # noqa: F401 - re-exported
from slimc.passes.prune.graph import module_path  # noqa: F401 - the PyTorch module a node came from
from slimc.passes.prune.rules import attr  # noqa: F401 - a node attribute's value, or a default

# Ops that only exist in a model that has been quantized already (by slimc, ORT, NNCF, ...).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "QLinearConv", "QLinearMatMul", "MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QGemm", "QLinearAdd", "QLinearMul", "GatherBlockQuantized", "QAttention",
})


def node_matches(node: ir.Node, patterns: Sequence[str] | None) -> bool:
    """Whether a glob in ``patterns`` matches the node's name, op type, module path or weight name."""
    if not patterns:
        return False
    names = [node.name or "", node.op_type, module_path(node)]
    names += [v.name for v in node.inputs if v is not None and v.const_value is not None and v.name]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


@dataclasses.dataclass(frozen=True)
class WeightedOp:
    """A MatMul/Gemm/Conv whose weight is a constant: ``weight`` is input ``index`` of ``node``.

    ``k_axis`` is the weight's reduction (input-channel) axis and ``n_axis`` its output axis, in
    the weight as stored (Gemm with transB=1 stores [N, K]; Conv stores [N, K/group, kh, kw]).
    """

    node: ir.Node
    index: int
    weight: ir.Value
    k_axis: int
    n_axis: int

    @property
    def array(self) -> np.ndarray:
        return self.weight.const_value.numpy()



def weighted_ops(model: ir.Model, op_types: Sequence[str] = ("MatMul", "Gemm", "Conv")) -> list[WeightedOp]:
    """Every node of ``op_types`` in the main graph whose weight is a float constant initializer.

    MatMul counts only with a 2-D constant second input (an activation x weight product, not
    attention's activation x activation); Gemm with a constant B; Conv with a constant W.
    """
    found = []
    for node in model.graph:
        if node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        w = node.inputs[1]
        if w.const_value is None or w.dtype is None or not w.dtype.is_floating_point():
            continue
        shape = tuple(w.const_value.shape)
        if node.op_type == "MatMul" and len(shape) == 2:
            found.append(WeightedOp(node, 1, w, 0, 1))
        elif node.op_type == "Gemm" and len(shape) == 2:
            trans = bool(attr(node, "transB", 0))
            found.append(WeightedOp(node, 1, w, 1 if trans else 0, 0 if trans else 1))
        elif node.op_type == "Conv" and len(shape) >= 3:
            found.append(WeightedOp(node, 1, w, 1, 0))
    return found


def refuse_quantized(model: ir.Model, pass_name: str) -> None:
    """Raise if ``model`` already contains quantized ops (quantizing twice compounds the error)."""
    ops = sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in QUANTIZED_OPS})
    if ops:
        raise PassConfigError(
            f"{pass_name}: the model is already quantized (it contains {', '.join(ops)}). Run {pass_name} on the "
            "float model; to combine quantizations, put them in one --passes list on the float model."
        )


def latency_feed(ctx, model: ir.Model, seq: int | None = None) -> dict[str, np.ndarray]:
    """One sample to time on: the first calibration batch's first row, else synthetic inputs.

    ``seq`` cuts token inputs (integer inputs with a sequence axis) to their first ``seq``
    positions: ``seq=1`` times a decode-sized step, the calibration length times a prefill.
    A causal LM with a KV cache (`slimc.kvcache`) and ``seq=None`` is timed as it generates: one
    decode step after the sample's tokens (a past of that length; `slimc.measure_decode`).
    """
    from slimc import data
    from slimc.data_batching import first_samples

    batch = None
    if ctx is not None and ctx.calibration is not None and len(ctx.calibration):
        batch = ctx.calibration[0]
    elif ctx is not None and ctx.loaded is not None:
        batch = data.synthetic(ctx.loaded.inputs, n_batches=1, seed=ctx.seed + 2000, sizes={"seq": 64})[0]
    if batch is None:
        raise DataError("the latency guard needs an example input: pass calibration data.")
    inputs = ctx.loaded.inputs if ctx is not None and ctx.loaded is not None else None
    feed = first_samples(batch, inputs, 1)
    if seq is None and model is not None:
        step = _decode_step(model, feed)
        if step is not None:
            return step
    if seq is not None:
        feed = {k: (v[:, :seq] if v.ndim >= 2 and not np.issubdtype(v.dtype, np.floating) else v) for k, v in feed.items()}
    return feed


def _decode_step(model: ir.Model, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """A decode-step feed after the sample's tokens, for a graph with a KV cache (else None)."""
    from slimc.kvcache import cache_spec
    from slimc.measure_decode import synthetic_step_feed

    spec = cache_spec(model)
    ids = feed.get("input_ids")
    if spec is None or ids is None or np.ndim(ids) != 2 or np.shape(ids)[1] == 0:
        return None
    return synthetic_step_feed(spec, np.asarray(ids), {v.name for v in model.graph.inputs})


@dataclasses.dataclass
class GuardResult:
    before_ms: float
    after_ms: float
    speedup: float
    feed: str
    machine: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure(models: Mapping[str, ir.Model], feed: Mapping[str, np.ndarray], threads: int | None = None,
            budget_s: float = 30.0) -> dict[str, float]:
    """Median ORT CPU latency (ms) of each model on ``feed``, measured interleaved in one run."""
    from slimc.backends.onnxruntime import shareable_initializers
    from slimc.onnx_io import save_onnx, tensor_bytes

    with workdir.new("guard") as tmp:
        paths, mapped = {}, []
        for i, (name, model) in enumerate(models.items()):
            paths[name] = Path(tmp) / f"{i:02d}.onnx"
            external = any(isinstance(v.const_value, (ir.ExternalTensor, ir.LazyTensor))
                           for v in model.graph.initializers.values())
            # memory-mapped (or lazily made) weights are streamed to an external data file, not copied into a proto
            save_onnx(model, paths[name], external_data=True if external else None)
            mapped += list(shareable_initializers(model).values())  # pages released before each session
        weight_bytes = max(tensor_bytes(m) for m in models.values())
        return measure_files(paths, feed, threads, budget_s, weight_bytes=weight_bytes, mapped=mapped)


def measure_files(paths: Mapping[str, Path], feed: Mapping[str, np.ndarray], threads: int | None = None,
                  budget_s: float = 30.0, *, weight_bytes: int = 0, mapped=()) -> dict[str, float]:
    """`measure` for models already saved: the guard's one timing protocol (2 warm-up runs, 15
    timed runs in 3 alternating rounds, cut to fit ``budget_s``; large models one session at a time,
    see `slimc.backends.onnxruntime.measure_latency_files`)."""
    from slimc.backends import onnxruntime as ort_backend

    stats = ort_backend.measure_latency_files(dict(paths), dict(feed), threads, weight_bytes=weight_bytes, mapped=mapped,
                                              warmup=2, repeats=15, rounds=3, budget_s=budget_s)
    return {name: s.median_ms for name, s in stats.items()}


def guard(pass_name: str, before: ir.Model, after: ir.Model, feed: Mapping[str, np.ndarray], *,
          min_speedup: float = 1.0, force: bool = False, threads: int | None = None,
          before_ms: float | None = None, after_ms: float | None = None, context: str = "") -> GuardResult:
    """Measure ``after`` against ``before``; raise `LatencyGuardError` below ``min_speedup`` unless ``force``.

    Pass ``before_ms``/``after_ms`` when they were already measured (in one interleaved run);
    ``context`` (e.g. the other configurations tried) is added to the refusal message.
    """
    from slimc.backends.onnxruntime import machine_description

    if before_ms is None or after_ms is None:
        times = measure({"before": before, "after": after}, feed, threads)
        before_ms, after_ms = times["before"], times["after"]
    shape = "x".join(str(d) for d in next(iter(feed.values())).shape) if feed else "scalar"
    past = next((v.shape[2] for k, v in feed.items() if k.startswith("past_key_values.") and np.ndim(v) == 4), 0)
    if past:  # a causal LM timed as it generates (`latency_feed`)
        shape = f"decode step {shape}, past {past}"
    result = GuardResult(before_ms, after_ms, before_ms / after_ms, shape, machine_description(threads))
    if result.speedup < min_speedup and not force:
        raise LatencyGuardError(
            f"{pass_name}: the quantized model is slower than its input on this backend "
            f"({after_ms:.2f} ms vs {before_ms:.2f} ms, {result.speedup:.2f}x, input {shape}; "
            f"{result.machine}). Refused. Use {pass_name}(force=true) to keep it anyway "
            f"(e.g. for the size), or a target where it pays off.{(' ' + context) if context else ''}"
        )
    return result


def to_proto(model: ir.Model):
    """The IR as an `onnx.ModelProto` holding every weight, external ones included (for libraries
    that work on protos: ORT's quantizer, float16)."""
    from slimc.onnx_io import model_proto

    return model_proto(model)


def _check_in(proto: Any, folder: Any) -> None:
    """onnx's checker on ``proto`` saved in ``folder`` (its external references resolve there)."""
    import onnx

    path = Path(folder) / "opset-check.onnx"
    try:
        onnx.save_model(proto, str(path))
        onnx.checker.check_model(str(path))
    finally:
        path.unlink(missing_ok=True)


def replace_in_place(model: ir.Model, new: Any) -> None:
    """Make ``model`` (which passes modify in place) hold ``new`` (an `ir.Model` or `onnx.ModelProto`)."""
    if not isinstance(new, ir.Model):
        new = ir.serde.deserialize_model(new)
    # Library rewriters (ORT's quantizers) can append nodes out of order; ONNX requires topological order.
    ir.passes.common.TopologicalSortPass()(new)
    model.graph = new.graph  # opset imports live on the graph in onnx_ir
    model.functions.clear()
    model.functions.update(new.functions)


PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis attribute (per-channel scales) exists from opset 13


def per_channel_opset(proto: Any, folder: Any = None) -> tuple[Any, bool, str | None]:
    """``(model, per_channel, note)``: a model below opset 13 is converted to opset 13 (onnx's version
    converter) so per-channel weights are valid; where it does not convert, weights go per tensor.

    ``folder``: where ``proto``'s external data lies (a weightless proto): the converted model is
    checked from a file there, so the checker finds the data its references name."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    if opset >= PER_CHANNEL_OPSET:
        return proto, True, None
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, PER_CHANNEL_OPSET)
        if folder is None:
            onnx.checker.check_model(converted)
        else:
            _check_in(converted, folder)
    except Exception as exc:  # noqa: BLE001 - the converter lacks adapters for some ops: per tensor instead
        return proto, False, (f"weights per tensor: opset {opset} has no per-channel DequantizeLinear (axis needs opset "
                              f"{PER_CHANNEL_OPSET}) and onnx's version converter could not raise it "
                              f"({type(exc).__name__}: {str(exc)[:200]})")
    return converted, True, (f"opset {opset} converted to {PER_CHANNEL_OPSET} (onnx's version converter) for "
                             "per-channel weights")


def _untyped(proto: Any) -> int:
    """How many node outputs have no tensor element type in ``value_info`` or the graph's outputs."""
    graph = proto.graph
    typed = {v.name for v in (*graph.value_info, *graph.output) if v.type.tensor_type.elem_type or
             v.type.HasField("sequence_type") or v.type.HasField("optional_type")}
    return sum(1 for node in graph.node for out in node.output if out and out not in typed)


def type_untyped(inferred: Any) -> Any:
    """``inferred`` (ONNX's shape inference done), or ONNX Runtime's symbolic shape inference of it where
    that types more of the values ONNX left untyped. ORT's quantizer looks up each tensor's type and
    raises deep inside ("Unable to find data type for weight_name") when one is missing; ONNX's shape
    inference does not know ``com.microsoft`` ops (everything after ORT's fused Attention or
    SkipLayerNormalization stays untyped), ONNX Runtime's symbolic shape inference does."""
    missing = _untyped(inferred)
    if not missing:
        return inferred
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    from slimc.typeinfer import ort_symbolic

    symbolic = ort_symbolic(inferred)  # None where it fails: ONNX's types are kept
    if symbolic is None or _untyped(symbolic) >= missing:
        return inferred
    add_infer_metadata(symbolic)
    return symbolic
