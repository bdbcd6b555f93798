"""The `int4` pass: weight-only 4-bit quantization to ONNX Runtime's ``MatMulNBits``.

Every MatMul / Gemm whose weight is a constant float matrix becomes one
``com.microsoft.MatMulNBits`` node that keeps the weight in 4 bits (blocks of ``block_size``
along K, one scale and zero point per block and output column; layout in
`slimc.passes.quant.gptq`) and computes ``A x dequant(B)`` directly from them. Activations stay
float; with ``accuracy_level=4`` ONNX Runtime's CPU kernel quantizes them to int8 per block on the
fly and multiplies in int8, which is what makes it faster than float32 (at the default level 0
it dequantizes to float and measured slower than the float model).

1. Find the targets (`_targets`): MatMul with a 2-D constant weight [K, N] (an initializer, or a
   ``Transpose`` of one, as tied embeddings are sometimes exported), and Gemm with constant B
   (``transB`` undone, ``alpha`` folded into the weight, ``beta·C`` kept as an ``Add`` after the
   MatMulNBits). Everything else is reported in ``left_alone`` with the reason.
2. For ``method=gptq``, the input Hessian of every target (``2 XᵀX / n`` over its activation
   input) comes from one calibration run of the float model (`slimc.calibrate.collect`).
3. Quantize each distinct weight once (round to nearest, or GPTQ), pack it, and rewrite its
   nodes. A weight that something else also reads (an embedding Gather tied to the lm_head)
   keeps its float copy for that use, so the file grows by the 4-bit copy; reported. With
   ``embedding=true`` the embedding Gathers become ``GatherBlockQuantized`` instead, reading the
   tied lm_head's 4-bit weight when there is one (`slimc.passes.quant.int4_embedding`), and the
   float table is dropped.
4. The latency guard (`common.guard`) times the float and the quantized model on ONNX Runtime
   CPU and refuses a slower result unless ``force=true``. The pass works on a copy, so a
   refused (or failed) run leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Literal, Optional

import numpy as np
import onnx_ir as ir

from slimc import progress
from slimc.data import first_batches
from slimc.errors import DataError, PassConfigError
from slimc.backends.onnxruntime import release_mapped_pages
from slimc.onnx_io import copy_model
from slimc.passes.quant import common, gptq, int4_embedding
from slimc.passes.quant.common import attr
from slimc.pipeline import Pass, PassContext, PassReport

BLOCK_SIZES = (32, 64, 128)
MS_DOMAIN = "com.microsoft"
ERROR_COLUMNS = 256  # output columns the reported GPTQ/RTN output errors are estimated on
_SCALE_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


@dataclasses.dataclass
class _Target:
    """One node to rewrite: ``y = act @ weight (+ bias)`` with ``weight`` [K, N] as computed here."""

    node: ir.Node
    act: str  # the activation input's name (GPTQ's statistics are keyed by it)
    source: ir.Value  # the constant the weight comes from (an initializer)
    transposed: bool  # weight = source.T (Gemm transB=1, or a Transpose node between them)
    alpha: float  # Gemm's alpha, folded into the weight
    bias: ir.Value | None  # Gemm's C, added after the product
    beta: float
    via: ir.Node | None  # the Transpose node the weight came through, if any

    @property
    def key(self) -> tuple[int, bool, float]:
        return (id(self.source), self.transposed, self.alpha)

    def weight(self) -> np.ndarray:
        w = np.asarray(self.source.const_value.numpy())
        w = w.T if self.transposed else w
        return w * np.asarray(self.alpha, w.dtype) if self.alpha != 1.0 else w

    @property
    def label(self) -> str:
        return f"{self.node.name or self.node.op_type} ({self.node.op_type})"



def _label(node: ir.Node) -> str:
    return f"{node.name or node.op_type} ({node.op_type})"


@dataclasses.dataclass
class Int4(Pass):
    """Weight-only 4-bit quantization of MatMul/Gemm weights to MatMulNBits (round to nearest or GPTQ).

    Options:
        block_size: weights per block along K, each with its own scale: 32, 64 or 128 (smaller is
            more accurate, larger is smaller and faster).
        symmetric: `true`: scale from the largest magnitude, zero point 8 (not stored); `false`: the
            block's range over 15 steps with a stored 4-bit zero point.
        method: `rtn`: round to nearest (data-free, ONNX Runtime's grid); `gptq`: GPTQ with error
            feedback from the layer's input statistics XᵀX (needs calibration data).
        accuracy_level: MatMulNBits' minimum compute precision: 4 = int8 (fast on CPU), 0 = the
            activation's float type, 1-3 = fp32 / fp16 / bf16.
        damp: GPTQ's dampening, H += damp · mean(diag H) · I (raised ×10 automatically if H is
            still singular).
        calibration_batches: calibration batches streamed for GPTQ's statistics.
        exclude: glob patterns; a MatMul/Gemm whose node name, op type, module path or weight name
            matches stays float (e.g. `[lm_head*]`).
        min_speedup: the latency guard refuses a result whose measured speed-up is below this.
        force: keep the result whatever the guard measures (e.g. for the size).
        latency_seq: cut token inputs to this many positions for the guard's timing (`1` times one
            decode step); none times the calibration length (a prefill).
        embedding: also quantize token embedding tables (Gather over a constant [vocab, hidden]
            table) to 4-bit GatherBlockQuantized, round to nearest; a tied lm_head's MatMulNBits
            weight is shared with the lookup, so no float copy of the table remains.
    """

    block_size: int = 32
    symmetric: bool = True
    method: Literal["rtn", "gptq"] = "rtn"
    accuracy_level: int = 4
    damp: float = 0.01
    calibration_batches: int = 16
    exclude: Optional[list[str]] = None
    min_speedup: float = 1.0
    force: bool = False
    latency_seq: Optional[int] = None
    embedding: bool = False

    name = "int4"
    exact = False
    description = "weight-only 4-bit MatMulNBits (block-wise, round to nearest or GPTQ); activations stay float"

    def __post_init__(self) -> None:
        super().__init__()
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES:
            raise PassConfigError(
                f"int4: block_size={self.block_size} is not supported; use 32, 64 or 128 (K is cut into "
                "blocks of that many weights, each with its own scale: smaller is more accurate, larger smaller)."
            )
        if self.method not in ("rtn", "gptq"):
            raise PassConfigError(
                f"int4: method={self.method!r} is unknown; use method=rtn (round to nearest, no data) or "
                "method=gptq (error-compensating, needs calibration data)."
            )
        if isinstance(self.accuracy_level, bool) or self.accuracy_level not in range(5):
            raise PassConfigError(
                f"int4: accuracy_level={self.accuracy_level} is out of range; use 0..4 (MatMulNBits' minimum "
                "compute precision: 4 = int8, the fast one on CPU; 0 = the activation's float type)."
            )
        if not 0.0 <= self.damp < 10.0:
            raise PassConfigError(f"int4: damp={self.damp} is out of range; use a small fraction such as damp=0.01.")
        if self.calibration_batches < 1:
            raise PassConfigError("int4: calibration_batches must be >= 1.")
        if self.min_speedup <= 0:
            raise PassConfigError("int4: min_speedup must be > 0 (1.0 refuses a slower model; force=true keeps any).")
        if self.latency_seq is not None and self.latency_seq < 1:
            raise PassConfigError("int4: latency_seq must be >= 1 (e.g. latency_seq=1 times one decode step), or none.")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]

    # ------------------------------------------------------------ targets

    def _targets(self, model: ir.Model) -> tuple[list[_Target], list[tuple[str, str]]]:
        targets, left = [], []
        for node in model.graph:
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            found = self._target(node)
            if isinstance(found, str):
                left.append((_label(node), found))
            elif common.node_matches(node, self.exclude) or (found.via is not None and common.node_matches(found.via, self.exclude)):
                left.append((_label(node), "matches exclude="))
            else:
                targets.append(found)
        return targets, left

    def _target(self, node: ir.Node) -> _Target | str:
        """The node as a `_Target`, or why it is left alone."""
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return "missing input"
        act, b = node.inputs[0], node.inputs[1]
        if act.const_value is not None:
            return "both inputs are constant (cleanup folds such products)"
        transposed, via, alpha, bias, beta = False, None, 1.0, None, 1.0
        source = b
        if b.const_value is None:
            producer = b.producer()
            if (producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx")
                    and producer.inputs[0] is not None and producer.inputs[0].const_value is not None
                    and len(producer.inputs[0].const_value.shape) == 2
                    and list(attr(producer, "perm", [1, 0])) == [1, 0]):
                source, transposed, via = producer.inputs[0], True, producer
            else:
                return "its second input is computed in the graph (activation x activation, e.g. attention), not a constant weight"
        if source.is_graph_input():
            return "the weight is also a graph input (a caller may replace it at run time)"
        shape = tuple(source.const_value.shape)
        if len(shape) != 2:
            return f"weight of shape {list(shape)} is not a 2-D matrix (batched MatMul)"
        if source.dtype not in _SCALE_DTYPES:
            return f"weight is {source.dtype.name if source.dtype else 'untyped'}; MatMulNBits takes float32 or float16"
        if node.op_type == "Gemm":
            if attr(node, "transA", 0):
                return "Gemm with transA=1"
            transposed = transposed != bool(attr(node, "transB", 0))  # a Transpose before a transB=1 undoes it
            alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                bias = node.inputs[2]
                if beta != 1.0 and bias.const_value is None:
                    return f"Gemm with a computed C and beta={beta}"
        elif act.shape is not None and len(act.shape) < 2:
            return "1-D activation input (MatMulNBits needs [..., K])"
        k = shape[1] if transposed else shape[0]
        if k < self.block_size:
            return (f"K={k} is smaller than one block (block_size={self.block_size}): most of each block would be "
                    "padding; left in float")
        return _Target(node, act.name, source, transposed, alpha, bias, beta, via)

    # ------------------------------------------------------------ calibration

    def _hessians(self, model: ir.Model, targets: Sequence[_Target], ctx: PassContext) -> dict[str, tuple[np.ndarray, int]]:
        """{activation name: (XᵀX, rows)} for every target's input, from one calibration run."""
        from slimc.calibrate import StatRequest, collect

        names = sorted({t.act for t in targets})
        requests = [StatRequest(n, -1, gram=True) for n in names]
        calib = ctx.calibration
        batches = first_batches(calib, self.calibration_batches)
        stats = collect(model, requests, batches, desc="int4 gptq statistics")
        return {r.value: (stats[r].gram, stats[r].count) for r in requests}

    # ------------------------------------------------------------ rewriting

    def _quantize(self, weight: np.ndarray, h: np.ndarray | None) -> tuple[gptq.Quantized, dict]:
        w = np.asarray(weight, np.float32)
        info: dict = {}
        if self.method == "gptq":
            q, gi = gptq.gptq(w, h, self.block_size, self.symmetric, self.damp)
            rtn = gptq.rtn(w, self.block_size, self.symmetric)
            info["output_error"] = gptq.output_error(w, q.dequantize(), h, ERROR_COLUMNS)
            info["rtn_output_error"] = gptq.output_error(w, rtn.dequantize(), h, ERROR_COLUMNS)
            if gi.dead_inputs:
                info["dead_inputs"] = gi.dead_inputs
            if gi.damp != self.damp:
                info["damp_used"] = gi.damp
        else:
            q = gptq.rtn(w, self.block_size, self.symmetric)
        info["weight_error"] = float(np.linalg.norm(w - q.dequantize()) / max(np.linalg.norm(w), 1e-30))
        return q, info

    @staticmethod
    def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        name, i = base, 0
        while name in graph.initializers:
            i += 1
            name = f"{base}_{i}"
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        return value

    def _rewrite(self, graph: ir.Graph, t: _Target, inputs: list[ir.Value], k: int, n: int) -> None:
        """Replace ``t.node`` by MatMulNBits (+ Add for a Gemm's C); the output keeps its name and consumers."""
        node, old = t.node, t.node.outputs[0]
        attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", gptq.BITS),
                 ir.AttrInt64("block_size", self.block_size)]
        if self.accuracy_level:
            attrs.append(ir.AttrInt64("accuracy_level", self.accuracy_level))
        # the node's current input: an earlier rewrite may have replaced the value it read
        mnb = ir.Node(MS_DOMAIN, "MatMulNBits", [node.inputs[0], *inputs], attributes=attrs, name=node.name, num_outputs=1)
        for key, val in node.metadata_props.items():
            mnb.metadata_props[key] = val
        new_nodes = [mnb]
        final = mnb.outputs[0]
        if t.bias is not None:
            bias = t.bias
            if t.beta != 1.0:
                arr = np.asarray(bias.const_value.numpy())
                bias = self._initializer(graph, f"{bias.name}_beta", (arr * np.asarray(t.beta, arr.dtype)).astype(arr.dtype))
            final.name = f"{old.name}__int4"
            final.type = old.type
            add = ir.Node("", "Add", [final, bias], name=f"{node.name}_bias", num_outputs=1)
            new_nodes.append(add)
            final = add.outputs[0]
        name = old.name
        old.name = f"{name}__float"
        final.name, final.type, final.shape = name, old.type, old.shape
        ir.convenience.replace_all_uses_with(old, final, replace_graph_outputs=True)
        graph.insert_after(node, new_nodes)
        graph.remove(node, safe=True)

    # ------------------------------------------------------------ the pass

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        start = time.perf_counter()
        common.refuse_quantized(model, self.name)
        if self.method == "gptq" and ctx.calibration is None:
            raise DataError(
                "int4: method=gptq needs calibration data (the input statistics of every layer). Pass "
                "calibration= to slimc.compile() or --calib on the command line, or use int4(method=rtn)."
            )
        work = copy_model(model)
        targets, left = self._targets(work)
        if not targets and not self.embedding:
            return PassReport(name=self.name, modified=False, summary="nothing to quantize: no MatMul/Gemm with a constant float weight qualifies",
                              details={"quantized_nodes": 0}, left_alone=left, seconds=time.perf_counter() - start)
        grams = self._hessians(work, targets, ctx) if self.method == "gptq" and targets else {}

        groups: dict[tuple, list[_Target]] = {}
        for t in targets:
            groups.setdefault(t.key, []).append(t)
        graph = work.graph
        graph.opset_imports[MS_DOMAIN] = 1
        layers, bytes_before, bytes_after = [], 0, 0
        shared: dict[int, int4_embedding.SharedWeight] = {}  # table id -> the MatMulNBits weight made from its transpose
        for group in progress.bar(list(groups.values()), f"int4 {self.method}", total=len(groups), unit="weight"):
            first = group[0]
            weight = first.weight()
            k, n = weight.shape
            h = None
            if self.method == "gptq":
                gram = sum(grams[t.act][0] for t in group)
                rows = sum(grams[t.act][1] for t in group)
                h = gptq.hessian(gram, rows)
            q, info = self._quantize(weight, h)
            packed = gptq.pack(q, _SCALE_DTYPES[first.source.dtype])
            base = first.source.name or "weight"
            inputs = [self._initializer(graph, f"{base}_Q4", packed.b), self._initializer(graph, f"{base}_scales", packed.scales)]
            if packed.zero_points is not None:
                inputs.append(self._initializer(graph, f"{base}_zero_points", packed.zero_points))
            for t in group:
                self._rewrite(graph, t, inputs, k, n)
            if first.transposed and first.alpha == 1.0:
                shared[id(first.source)] = int4_embedding.SharedWeight(inputs, k, n, self.method)
            bytes_before += int(weight.nbytes)
            bytes_after += packed.nbytes
            release_mapped_pages([weight])  # a memory-mapped float weight is not needed resident any more
            layers.append({"nodes": [t.node.name for t in group], "weight": first.source.name, "K": k, "N": n,
                           "float_bytes": int(weight.nbytes), "int4_bytes": packed.nbytes,
                           **{key: (round(v, 6) if isinstance(v, float) else v) for key, v in info.items()}})
        tables, table_left = [], []
        if self.embedding:
            tables, table_left = int4_embedding.quantize_gathers(
                graph, shared, block_size=self.block_size, symmetric=self.symmetric, exclude=self.exclude,
                new_initializer=self._initializer)
            left += table_left
            if not targets and not tables:
                return PassReport(name=self.name, modified=False, summary="nothing to quantize: no MatMul/Gemm weight "
                                  "or embedding table qualifies", details={"quantized_nodes": 0}, left_alone=left,
                                  seconds=time.perf_counter() - start)
        kept = self._drop_orphans(graph, targets)
        for table in tables:
            table["float_dropped"] = table["table"] not in graph.initializers
        kept_bytes = sum(int(v.const_value.nbytes) for v in kept)

        guard = self._guard(model, work, ctx)
        common.replace_in_place(model, work)

        nodes = sum(len(layer["nodes"]) for layer in layers)
        summary = (f"{nodes} of {nodes + len(left)} MatMul/Gemm nodes -> 4-bit MatMulNBits ({self.method}, block {self.block_size}, "
                   f"{'symmetric' if self.symmetric else 'asymmetric'}, accuracy_level {self.accuracy_level}); "
                   f"weights {_mb(bytes_before)} -> {_mb(bytes_after)}")
        summary += int4_embedding.summary(tables, _mb)
        if kept:
            summary += (f"; {len(kept)} weight(s) also used elsewhere keep their float copy, so the file grows by "
                        f"their 4-bit copy ({_mb(kept_bytes)} float kept)"
                        + ("" if self.embedding else "; int4(embedding=true) quantizes embedding tables too"))
        if self.method == "gptq" and layers:
            errs = [layer["output_error"] for layer in layers]
            rtn = [layer["rtn_output_error"] for layer in layers]
            summary += f"; mean relative output error {np.mean(errs):.2e} (rtn would give {np.mean(rtn):.2e})"
        if guard is not None:
            summary += f"; latency {guard.before_ms:.2f} -> {guard.after_ms:.2f} ms ({guard.speedup:.2f}x, input {guard.feed})"
        details = {
            "method": self.method, "block_size": self.block_size, "symmetric": self.symmetric,
            "accuracy_level": self.accuracy_level, "quantized_nodes": nodes, "quantized_weights": len(layers),
            "weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after,
            "float_copies_kept": [v.name for v in kept], "float_copies_kept_bytes": kept_bytes,
            "layers": layers, "guard": guard.to_json() if guard is not None else None,
            "embedding": self.embedding, "embedding_tables": tables,
        }
        if self.method == "gptq":
            details["calibration_batches"] = min(self.calibration_batches, len(ctx.calibration))
            details["hessian_source"] = "float model (one calibration run)"
        return PassReport(name=self.name, modified=True, summary=summary, details=details, left_alone=left,
                          seconds=time.perf_counter() - start)

    @staticmethod
    def _drop_orphans(graph: ir.Graph, targets: Sequence[_Target]) -> list[ir.Value]:
        """Remove the Transposes and float weights only the rewritten nodes used; return the weights still in use."""
        for via in {id(t.via): t.via for t in targets if t.via is not None}.values():
            if not via.outputs[0].uses() and not via.outputs[0].is_graph_output():
                graph.remove(via, safe=True)
        kept = []
        for source in {id(t.source): t.source for t in targets}.values():
            if source.uses() or source.is_graph_output() or source.is_graph_input():
                kept.append(source)
            elif source.name in graph.initializers:
                del graph.initializers[source.name]
        for t in targets:  # Gemm biases scaled by beta leave the original C behind
            bias = t.bias
            if bias is not None and bias.name in graph.initializers and not (bias.uses() or bias.is_graph_output() or bias.is_graph_input()):
                del graph.initializers[bias.name]
        return kept

    def _guard(self, before: ir.Model, after: ir.Model, ctx: PassContext) -> common.GuardResult | None:
        try:
            feed = common.latency_feed(ctx, before, self.latency_seq)
        except DataError as exc:
            if self.force:
                return None  # nothing to time on, and the user keeps the result regardless
            raise DataError(f"int4: {exc} Or use int4(force=true) to skip the latency check.") from exc
        tokens = any(v.ndim >= 2 and v.shape[1] > 1 and not np.issubdtype(v.dtype, np.floating) for v in feed.values())
        hint = ("4-bit weights pay off when few rows are multiplied at a time (decoding), less in a prefill: "
                "int4(latency_seq=1) times one decode step.") if tokens and self.latency_seq is None else ""
        return common.guard(self.name, before, after, feed, min_speedup=self.min_speedup, force=self.force, threads=ctx.threads,
                            context=hint)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
