"""The `int8` pass: static (QDQ) and dynamic int8, chosen by measurement, guarded, budgeted.

ONNX Runtime's quantization library does the rewriting (QDQ insertion, calibrators, dynamic
MatMulInteger); slimc decides *what* to quantize and refuses what does not pay off:

1. **Candidates.** ``mode=static``: QDQ on the weighted ops (Conv, MatMul and Gemm with a
   constant weight; in CNN-dominated graphs also the data-movement ops between convolutions,
   so ORT keeps int8 tensors flowing from conv to conv). ``mode=dynamic``: MatMul/Gemm with
   runtime-computed activation scales; Conv stays float (ORT's ConvInteger is several times
   slower than its float Conv on CPU). ``mode=auto`` builds the candidates that apply to the
   graph (static, dynamic, static Conv + dynamic MatMul) and keeps the fastest, measured
   side by side with the float model on ONNX Runtime on one sample of the calibration data.
2. **Calibration** (static): ORT's calibrators (min/max, percentile, entropy histograms) fed
   one batch at a time, so memory holds ranges and histograms, never the activations of the
   whole set.
3. **Accuracy budget** (``max_loss``): the model is checked on calibration batches held back
   from the range calibration. Each quantized node's own error is estimated in one streamed
   run (relative error power of its output minus that of its input, float vs quantized);
   if the budget fails, the nodes with the largest errors are kept in float, the smallest
   such set found by bisection.
4. **Latency guard**: the result is measured against the pass's input; slower than
   ``min_speedup`` is refused (`LatencyGuardError`) unless ``force=true``.

With ``--target ort-mobile`` (and ``executorch``, whose XNNPACK delegate takes static int8 in
PT2E's form) the pass builds what ORT's mobile execution providers (NNAPI, QNN,
XNNPACK) accept: static QDQ only (they run no dynamic int8), uint8 per-tensor activations and
symmetric int8 weights (per channel unless ``per_channel=false``), full 8-bit weights
(``reduce_range`` is an x86 workaround), and the latency guard, measured on this host and not
on the phone, reports instead of refusing.

Activation-by-activation MatMuls (attention scores and context) have no constant weight and
stay float; shape inference is onnx's own on the cleaned graph (ORT's ``quant_pre_process``
symbolic shape inference fails on dynamo exports and is not used).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import onnx
import onnx_ir as ir

from slimc import progress, workdir
from slimc.errors import DataError, PassConfigError, SlimcError
from slimc.onnx_io import tensor_bytes
from slimc.passes.quant import common, mapped
from slimc.pipeline import Pass, PassContext, PassReport

WEIGHTED = ("Conv", "MatMul", "Gemm")
# Ops that carry int8 tensors from conv to conv in ORT's QDQ fusions (CNN-dominated graphs only).
CNN_PASSTHROUGH = ("Add", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Resize",
                   "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Split")
# max_loss keys -> (fidelity metric, direction). Aliases keep the CLI short.
LOSS_METRICS = {
    "sqnr": ("sqnr_db", "min"), "sqnr_db": ("sqnr_db", "min"),
    "cosine": ("cosine", "min"), "embedding_cosine": ("embedding_cosine", "min"),
    "top1": ("top1_agreement", "min"), "top1_agreement": ("top1_agreement", "min"),
    "ppl": ("perplexity_ratio", "max"), "perplexity_ratio": ("perplexity_ratio", "max"),
    "kl": ("kl_divergence", "max"), "kl_divergence": ("kl_divergence", "max"),
}

# Export targets whose runtimes execute static QDQ int8 only (no dynamic int8): the pass builds that for them.
STATIC_TARGETS = {"ort-mobile": "NNAPI / QNN / XNNPACK", "executorch": "ExecuTorch's XNNPACK delegate"}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to quantize: ``static`` op kinds get QDQ, ``dynamic`` op kinds dynamic int8."""

    name: str
    static: tuple[str, ...] = ()
    dynamic: tuple[str, ...] = ()


@dataclasses.dataclass
class Int8(Pass):
    """int8 weights and activations: static QDQ or dynamic, per op kind, whichever measures faster.

    Options:
        mode: `auto` builds every candidate that applies (static, dynamic, static Conv + dynamic
            MatMul), measures them and keeps the fastest accurate one; `static` (QDQ, needs
            calibration data) or `dynamic` (MatMulInteger, activation scales at run time).
        per_channel: per-output-channel weight scales (per-tensor when false).
        reduce_range: 7-bit weights; none = auto: on x86 CPUs without VNNI (AVX2 only), whose
            uint8 × int8 kernel saturates in int16; off elsewhere.
        calibrate: activation range calibrator: `minmax`, `percentile`, `entropy` (ONNX Runtime's).
        percentile: the percentile for `calibrate=percentile`.
        exclude: glob patterns on node names, op types, module paths and weight names; matches stay
            float.
        max_loss: fidelity bounds, all must hold: `sqnr` (min dB), `cosine`, `embedding_cosine`,
            `top1`, `ppl` (max perplexity ratio), `kl`; e.g. `{ppl: 1.05}`. Nodes with the largest
            errors are kept float until the bounds hold.
        calibration_batches: calibration batches used for the activation ranges.
        holdout_batches: calibration batches held back from the ranges, for the accuracy checks
            (choosing between candidates, `max_loss`).
        min_speedup: the latency guard's threshold: a result measured slower than this is refused
            (`LatencyGuardError`, model unchanged).
        force: keep a result the latency guard refuses (e.g. for the size).
        latency_seq: sequence length of the guard's timing input for token models (a forward of that
            many tokens). none: a causal LM with a KV cache is timed on one decode step after the
            calibration sample's tokens (a past of that length), other models on the calibration length.
    """

    mode: Literal["auto", "static", "dynamic"] = "auto"
    per_channel: bool = True
    reduce_range: Optional[bool] = None
    calibrate: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = 99.999
    exclude: Optional[list[str]] = None
    max_loss: Optional[dict[str, float]] = None
    calibration_batches: int = 16
    holdout_batches: int = 2
    min_speedup: float = 1.0
    force: bool = False
    latency_seq: Optional[int] = None

    name = "int8"
    exact = False
    description = "int8 quantization (static QDQ / dynamic, chosen by measured latency), latency guard, accuracy budget"

    def __post_init__(self) -> None:
        super().__init__()
        if not 0.0 < self.percentile <= 100.0:
            raise PassConfigError(f"int8: percentile={self.percentile} must be in (0, 100], e.g. 99.999.")
        if self.calibration_batches < 1 or self.holdout_batches < 0:
            raise PassConfigError("int8: calibration_batches must be >= 1 and holdout_batches >= 0.")
        if self.min_speedup <= 0:
            raise PassConfigError("int8: min_speedup must be > 0 (1.0 refuses anything slower than the input).")
        if self.latency_seq is not None and self.latency_seq < 1:
            raise PassConfigError("int8: latency_seq must be >= 1 (1 times a decode-sized step).")
        for key, bound in (self.max_loss or {}).items():
            if key not in LOSS_METRICS:
                raise PassConfigError(
                    f"int8: max_loss has unknown metric '{key}'; use one of sqnr (min dB), cosine, embedding_cosine, "
                    "top1 (min agreement), ppl (max perplexity ratio), kl (max KL divergence), "
                    "e.g. max_loss={sqnr: 25} or max_loss={ppl: 1.05}."
                )
            if not isinstance(bound, (int, float)) or not math.isfinite(bound):
                raise PassConfigError(f"int8: max_loss[{key}] must be a number, not {bound!r}.")

    # ------------------------------------------------------------------ planning

    def _candidates(self, kinds: set[str], mm_share: float, has_static_data: bool,
                    target: str | None = None) -> tuple[list[Candidate], list[str]]:
        """The configurations to measure. ``mm_share``: MatMul/Gemm's share of the weights to quantize.

        ``auto`` tries dynamic only where MatMul/Gemm hold at least half the weights (dynamic
        leaves Conv float, so on a CNN it would quantize only the classifier), and static Conv
        + dynamic MatMul only where both hold at least 10%.
        """
        conv = ("Conv",) if "Conv" in kinds else ()
        mm = tuple(k for k in ("MatMul", "Gemm") if k in kinds)
        # ORT's dynamic quantizer (IntegerOps) has no integer Gemm: dynamic candidates take MatMul only,
        # and where static runs too, Gemm goes static (EfficientNet's classifier had silently stayed float)
        dyn = ("MatMul",) if "MatMul" in kinds else ()
        gemm = ("Gemm",) if "Gemm" in kinds else ()
        notes = []
        if target in STATIC_TARGETS:
            runs_on = STATIC_TARGETS[target]
            if self.mode == "dynamic":
                raise PassConfigError(f"int8: --target {target} runs on {runs_on}, which execute static QDQ int8, not "
                                      "dynamic int8; use int8(mode=static) or mode=auto.")
            if not has_static_data:
                raise DataError(f"int8: --target {target} needs static QDQ int8, and so calibration data: pass --calib.")
            return [Candidate("static", static=conv + mm)], [f"--target {target}: static QDQ only ({runs_on} run no dynamic int8)"]
        if self.mode == "static":
            return [Candidate("static", static=conv + mm)], notes
        if self.mode == "dynamic":
            return ([Candidate("dynamic", dynamic=dyn)] if dyn else []), notes
        found = []
        if has_static_data:
            found.append(Candidate("static", static=conv + mm))
            if conv and dyn and 0.1 <= mm_share <= 0.9:
                found.append(Candidate("static Conv + dynamic MatMul", static=conv + gemm, dynamic=dyn))
        if dyn and (mm_share >= 0.5 or not conv):
            found.append(Candidate("dynamic", dynamic=dyn))
        if not has_static_data:
            if not found:
                raise DataError("int8: this model's weights are mostly in Conv layers, which need static int8 and so "
                                "calibration data: pass --calib FILE (or calibration=... in Python).")
            notes.append("static candidates need calibration data: only dynamic int8 was tried")
        return found, notes

    def _data(self, ctx: PassContext, needs_data: bool):
        calib = ctx.calibration
        if calib is None or not len(calib):
            if needs_data:
                why = "static int8 ranges" if self.mode == "static" else "the accuracy budget (max_loss)"
                raise DataError(f"int8: {why} need calibration data: pass --calib FILE (or calibration=... in Python).")
            return None, None, None
        if self.holdout_batches and len(calib) > self.holdout_batches:
            ranges, holdout = calib.split(self.holdout_batches)
            note = None
        else:
            ranges, holdout = calib, calib.head(max(1, self.holdout_batches))
            note = "accuracy checks (candidate choice, max_loss) ran on calibration batches: too few to hold some out"
        return ranges.head(self.calibration_batches), holdout, note

    def _choose(self, candidates: list[Candidate], speed: dict[str, float], fidelity: dict[str, dict]) -> Candidate:
        """The fastest accurate-enough candidate.

        With ``max_loss``, accurate enough means within it (none within: the most accurate goes
        on to the budget search). Without, it means at most twice the error of the most
        accurate candidate (`_loss`: 3 dB of SQNR; for an LLM, twice the log perplexity
        ratio): a static candidate with clipped activation ranges can be a little faster than a
        dynamic one at a fraction of its accuracy. Speeds within 5% of the fastest are within
        a CPU measurement's noise; among those the most accurate wins.
        """
        loss = {c.name: _loss(fidelity.get(c.name)) for c in candidates}
        pool = candidates
        if fidelity:
            if self.max_loss:
                pool = [c for c in candidates if _within(fidelity[c.name], self.max_loss)]
                if not pool:
                    return min(candidates, key=lambda c: loss[c.name])
            else:
                # twice the best error, and never less than a negligible one (0.1%: SQNR 30 dB,
                # cosine 0.999): an almost exact candidate must not rule out every other
                limit = max(2 * min(loss.values()), 1e-3)
                pool = [c for c in candidates if loss[c.name] <= limit]
        fastest = max(speed[c.name] for c in pool)
        near = [c for c in pool if speed[c.name] >= 0.95 * fastest]
        return min(near, key=lambda c: (loss[c.name], -speed[c.name]))

    # ------------------------------------------------------------------ the pass

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        common.refuse_quantized(model, "int8")
        names = {node: node.name for node in model.graph}
        _name_nodes(model)  # ORT's quantizer addresses nodes by name
        try:
            return self._apply(model, ctx)
        except BaseException:
            for node, name in names.items():  # a refused or failed run leaves the model as it was
                node.name = name
            raise

    def _apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        weighted = common.weighted_ops(model, WEIGHTED)
        if not weighted:
            return PassReport(self.name, False, "nothing to quantize: no Conv, MatMul or Gemm with a constant weight")
        left_alone: list[tuple[str, str]] = []
        user_excluded = [w.node.name for w in weighted if common.node_matches(w.node, self.exclude)]
        paths = {w.node.name: common.module_path(w.node) for w in weighted}
        left_alone += [(f"{n} ({paths[n]})", f"excluded by exclude={self.exclude}") for n in user_excluded]
        attention = [n for n in model.graph if n.op_type == "MatMul" and not any(w.node is n for w in weighted)]
        if attention:
            left_alone.append((f"{len(attention)} activation x activation MatMul(s) (attention)",
                               "no constant weight to quantize ahead of time; kept float"))
        kinds = {w.node.op_type for w in weighted if w.node.name not in user_excluded}
        calib = ctx.calibration
        has_data = calib is not None and len(calib) > 0
        sizes = {kind: sum(w.weight.const_value.size for w in weighted if w.node.op_type == kind and w.node.name not in user_excluded)
                 for kind in kinds}
        mm_share = (sizes.get("MatMul", 0) + sizes.get("Gemm", 0)) / max(1, sum(sizes.values()))
        mobile = ctx.target in STATIC_TARGETS
        candidates, notes = self._candidates(kinds, mm_share, has_data, ctx.target)
        if not candidates:
            return PassReport(self.name, False, "nothing to quantize in dynamic mode: the graph has only Conv weights "
                              "(dynamic int8 Conv is slower than float on ORT CPU; use mode=static)",
                              left_alone=left_alone + [("Conv", "dynamic ConvInteger is slower than float Conv on ORT CPU")])
        needs_data = any(c.static for c in candidates) or bool(self.max_loss)
        ranges_set, holdout, data_note = self._data(ctx, needs_data)
        if data_note:
            notes.append(data_note)
        if any("Conv" not in c.static for c in candidates) and "Conv" in kinds and self.mode == "dynamic":
            left_alone.append(("Conv nodes", "dynamic int8 Conv (ConvInteger) is slower than float Conv on ORT CPU; "
                               "use mode=static or auto"))
        feed = common.latency_feed(ctx, model, self.latency_seq)
        conv_heavy = sum(w.node.op_type == "Conv" for w in weighted) > len(weighted) / 2

        with workdir.new("int8") as tmp:
            work = _Work(Path(tmp), model, self, conv_heavy, user_excluded, mobile=mobile, threads=ctx.threads)
            if any(c.static for c in candidates):
                work.calibrate(ranges_set, candidates)
            built = {c.name: work.build(c, ()) for c in progress.bar(candidates, "int8 candidates", total=len(candidates))}
            empty = [c for c in candidates if not _quantized_counts(built[c.name])]
            if len(empty) == len(candidates):
                return PassReport(self.name, False, "nothing was quantized: ORT's quantizer found no op it could quantize",
                                  left_alone=left_alone)
            candidates = [c for c in candidates if c not in empty]
            built = {c.name: built[c.name] for c in candidates}
            times = work.measure(built, feed)
            speed = {name: times["float"] / ms for name, ms in times.items() if name != "float"}
            fidelity = {}
            if holdout is not None:
                work.set_holdout(holdout, ctx)
                fidelity = {c.name: work.metrics(built[c.name]) for c in candidates}
            chosen = self._choose(candidates, speed, fidelity)
            if work.opset_note:
                notes.append(work.opset_note)
            details: dict[str, Any] = {
                "candidates": [{"name": c.name, "static": list(c.static), "dynamic": list(c.dynamic),
                                "ms": round(times[c.name], 3), "speedup": round(speed[c.name], 3),
                                **({"holdout": _summary(fidelity[c.name]), "loss": _loss(fidelity[c.name])}
                                   if c.name in fidelity else {})}
                               for c in candidates],
                "float_ms": round(times["float"], 3),
                "chosen": chosen.name,
                "reduce_range": work.reduce_range,
                "per_channel": work.per_channel,
                "calibration": None if not work.ranges else {
                    "method": self.calibrate, "batches": len(ranges_set), "tensors": len(work.ranges.data), "data": ranges_set.source},
            }
            for kind in sorted(kinds - set(chosen.static + chosen.dynamic)):
                count = sum(w.node.op_type == kind for w in weighted if w.node.name not in user_excluded)
                why = f"not quantized by the chosen configuration '{chosen.name}'"
                if kind == "Gemm" and chosen.dynamic and not chosen.static:
                    why += " (ORT's dynamic int8 has no integer Gemm; static QDQ, which needs calibration data, quantizes it)"
                left_alone.append((f"{count} {kind} node(s)", why))
            final, final_ms, fallback = built[chosen.name], times[chosen.name], []
            if self.max_loss:
                final, fallback, budget = work.fit_budget(chosen, final, fidelity[chosen.name])
                details["budget"] = budget
                if fallback:
                    final_ms = None
                    left_alone += [(work.label(n), f"kept float for the accuracy budget (error share {e:.2e}, among the "
                                       f"{len(fallback)} largest)") for n, e in fallback]
            if final_ms is None:
                times = work.measure({"final": final}, feed)
                final_ms = times["final"]
            guard = common.guard("int8", model, model, feed, min_speedup=self.min_speedup, force=self.force or mobile,
                                 threads=ctx.threads, before_ms=times["float"], after_ms=final_ms, context=_tried(details))
            if mobile:
                notes.append(f"--target {ctx.target}: the latency guard measured {guard.speedup:.2f}x in ORT on this host, "
                             "which does not decide for the device; the target's own latency is measured after export")
            details["guard"] = guard.to_json()
            if guard.speedup < self.min_speedup and not mobile:
                notes.append(f"kept with force=true although {guard.speedup:.2f}x is below min_speedup={self.min_speedup}")
            counts = _quantized_counts(final)
            common.replace_in_place(model, mapped.to_ir(final, model, work.tmp))
        details["quantized_ops"] = counts
        details["float_weighted_nodes"] = len(user_excluded) + len(fallback)
        if notes:
            details["notes"] = notes
        n_quant = sum(counts.values())
        summary = (f"{chosen.name}: {n_quant} ops quantized, {len(user_excluded) + len(fallback)} weighted nodes left in float; "
                   f"{guard.speedup:.2f}x vs float ({guard.after_ms:.2f} vs {guard.before_ms:.2f} ms, input {guard.feed})")
        summary += "".join(f"; {n}" for n in notes if n.startswith(("opset ", "weights per tensor")))
        return PassReport(self.name, True, summary, details=details, left_alone=left_alone)


class _Work:
    """The pass's scratch state: the float proto, calibration ranges, built candidates on disk."""

    def __init__(self, tmp: Path, model: ir.Model, opts: Int8, conv_heavy: bool, user_excluded: Sequence[str],
                 mobile: bool = False, threads: int | None = None):
        self.tmp, self.opts, self.conv_heavy, self.threads = tmp, opts, conv_heavy, threads
        self.user_excluded = list(user_excluded)
        default = False if mobile else needs_reduced_range()  # the 7-bit workaround is for x86 without VNNI
        self.reduce_range = opts.reduce_range if opts.reduce_range is not None else default
        self._counter = 0
        self.per_channel, self.opset_note = opts.per_channel, None
        # the quantizers get a weightless proto: weights stay in one file in the work folder, read
        # memory-mapped tensor by tensor (`mapped`), never all in memory at once
        self.model, self.weight_bytes = model, tensor_bytes(model)
        proto = mapped.write_float(model, tmp / "000-input.onnx")
        if opts.per_channel:
            proto, self.per_channel, self.opset_note = common.per_channel_opset(proto, tmp)
        with progress.step("int8: shape inference"):
            # weightless ONNX shape inference, then ORT's symbolic inference for what it leaves untyped
            self.proto = common.type_untyped(mapped.infer_shapes(proto, tmp))
        self.float_path = self._save(self.proto, "float")
        self.ranges = None
        self.weighted = {w.node.name: w for w in common.weighted_ops(model, WEIGHTED)}

    def label(self, name: str) -> str:
        """A node's name with the module it came from, for the report."""
        path = common.module_path(self.weighted[name].node)
        return name if path == name else f"{name} ({path})"

    def _path(self, label: str) -> Path:
        self._counter += 1
        return self.tmp / f"{self._counter:03d}-{label.replace(' ', '_').replace('+', '')}.onnx"

    def _save(self, proto: onnx.ModelProto, label: str) -> Path:
        path = self._path(label)
        if _large(proto):  # inline (quantized) weights over the protobuf limit: out to a file of their own
            copied = onnx.ModelProto()
            copied.CopyFrom(proto)  # save_model moves them out of the proto it is given
            onnx.save_model(copied, str(path), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save_model(proto, str(path))  # the float weights stay references to the work folder's file
        return path

    def _static_ops(self, kinds: Sequence[str]) -> list[str]:
        return list(kinds) + (list(CNN_PASSTHROUGH) if self.conv_heavy and "Conv" in kinds else [])

    def calibrate(self, dataset, candidates: Sequence[Candidate]) -> None:
        from onnxruntime.quantization import CalibrationMethod, create_calibrator

        from slimc.backends.onnxruntime import prepare_feed

        ops = sorted({op for c in candidates for op in self._static_ops(c.static)})
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[self.opts.calibrate]
        extra = {"percentile": self.opts.percentile} if self.opts.calibrate == "percentile" else {}
        if self.opts.calibrate != "minmax":
            extra.update(num_bins=2048 if self.opts.calibrate == "percentile" else 512)
        with progress.step("int8: instrumenting for calibration"), mapped.mapped_reads(self.tmp):
            calibrator = create_calibrator(self.float_path, ops, augmented_model_path=str(self.tmp / "augmented.onnx"),
                                           calibrate_method=method, use_external_data_format=_large(self.proto),
                                           extra_options=extra)
        for batch in progress.bar(dataset, f"int8: calibrating ({self.opts.calibrate})", total=len(dataset), unit="batch"):
            try:
                feed = prepare_feed(calibrator.infer_session, batch)
            except DataError as exc:
                raise DataError(f"int8: calibration batch does not fit the model: {exc}") from None
            calibrator.collect_data(_OneBatch(feed))  # one batch at a time: ranges/histograms merge, memory stays flat
        self.ranges = calibrator.compute_data()
        del calibrator

    def build(self, cand: Candidate, keep_float: Sequence[str]) -> onnx.ModelProto:
        """The float model with ``cand`` applied, ``keep_float`` and the user's exclusions left alone."""
        with mapped.mapped_reads(self.tmp):
            proto = self._build(cand, keep_float)
        return self._weightless(proto, cand.name)

    def _weightless(self, proto: onnx.ModelProto, label: str) -> onnx.ModelProto:
        """``proto`` with its inline (quantized) weights moved to a file in the work folder: the
        candidates kept for measuring and choosing hold no weights in memory."""
        path = self._path(label + "-weights")
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
        return onnx.load(str(path), load_external_data=False)

    def _build(self, cand: Candidate, keep_float: Sequence[str]) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
        from onnxruntime.quantization.quant_utils import QuantizationMode

        excluded = self.user_excluded + list(keep_float)
        model = onnx.ModelProto()
        model.CopyFrom(self.proto)
        if cand.static:
            static_names = [n for n, w in self.weighted.items() if w.node.op_type in cand.static]
            static_excluded = excluded + [n for n in self.weighted if n not in static_names]
            quantizer = QDQQuantizer(
                model, self.per_channel, self.reduce_range, QuantType.QInt8, QuantType.QUInt8, self.ranges, None,
                static_excluded + _activation_matmuls(model), self._static_ops(cand.static),
                {"ActivationSymmetric": False, "WeightSymmetric": True},
            )
            quantizer.quantize_model()
            model = quantizer.model.model
        if cand.dynamic:
            quantizer = ONNXQuantizer(
                model, self.per_channel, self.reduce_range, QuantizationMode.IntegerOps, False, QuantType.QInt8,
                QuantType.QUInt8, None, None, excluded, list(cand.dynamic), {"MatMulConstBOnly": True},
            )
            quantizer.quantize_model()
            model = quantizer.model.model
        return model

    def measure(self, built: dict[str, onnx.ModelProto], feed) -> dict[str, float]:
        """The float model and each built proto, timed together (`common.measure_files`)."""
        from slimc.backends import onnxruntime as ort_backend
        from slimc.errors import PassFailedError

        paths = {"float": self.float_path, **{name: self._save(proto, name) for name, proto in built.items()}}
        for name, path in paths.items():  # a model slimc built that ORT rejects is slimc's bug, not the user's
            if name != "float":
                try:
                    ort_backend.create_session(path, self.threads)
                except SlimcError as exc:
                    raise PassFailedError(f"int8 built an invalid model ({name}): {exc}. This is a bug in slimc; "
                                          "please report it (per_channel=false may avoid it).") from None
        # large models: one session at a time, the shared weights' pages released before each
        return common.measure_files(paths, feed, self.threads, weight_bytes=self.weight_bytes, mapped=self._shared().values())

    def _shared(self) -> dict[str, np.ndarray]:
        """The input's memory-mapped arrays a float session can use in place of its own copy."""
        from slimc.backends import onnxruntime as ort_backend

        return ort_backend.shareable_initializers(self.model) if ort_backend.shares_weights(self.model) else {}

    # -------------------------------------------------------------- accuracy budget

    def set_holdout(self, holdout, ctx: PassContext) -> None:
        """Materialise the held-out batches once and run the float model on them (the reference)."""
        from slimc.backends import onnxruntime as ort_backend

        self.holdout = _Listed(holdout)
        shared = self._shared()
        ref = ort_backend.create_session(self.float_path, shared=shared or None)
        self._ref_out = {id(b): ort_backend.run(ref, b) for b in self.holdout}
        ort_backend.release_mapped_pages(shared.values())  # read by the runs: not resident next to the candidates
        self._out_names = [o.name for o in ref.get_outputs()]
        self._task = ctx.loaded.task if ctx.loaded is not None else "generic"
        self._inputs = ctx.loaded.inputs if ctx.loaded is not None else None

    def metrics(self, proto: onnx.ModelProto) -> dict[str, Any]:
        """Fidelity of ``proto`` against the float model on the held-out batches."""
        from slimc import evaluate
        from slimc.backends import onnxruntime as ort_backend

        session = ort_backend.create_session(self._save(proto, "check"))
        return evaluate.evaluate(lambda b: self._ref_out[id(b)], lambda b: ort_backend.run(session, b), self.holdout,
                                 self._task, output_names=self._out_names, inputs=self._inputs)

    def fit_budget(self, cand: Candidate, full: onnx.ModelProto, metrics: dict[str, Any]):
        """Keep the fewest most-sensitive nodes in float so that every ``max_loss`` bound holds."""
        holdout = self.holdout

        def check(proto: onnx.ModelProto) -> tuple[bool, dict[str, Any]]:
            m = self.metrics(proto)
            return _within(m, self.opts.max_loss), m

        ok = _within(metrics, self.opts.max_loss)
        budget: dict[str, Any] = {"max_loss": dict(self.opts.max_loss), "data": holdout.source,
                                  "full": _pick(metrics, self.opts.max_loss)}
        if ok:
            return full, [], {**budget, "kept_float": 0, "result": _pick(metrics, self.opts.max_loss)}
        quantized = [n for n, w in self.weighted.items() if n not in self.user_excluded and w.node.op_type in
                     (cand.static + cand.dynamic)]
        errors = self.node_errors(full, quantized, holdout)
        order = sorted(quantized, key=lambda n: -errors.get(n, 0.0))
        lo, hi = 0, len(order)  # k = lo fails (checked above); does k = hi hold?
        ok_all, m_all = check(self.build(cand, order))
        if not ok_all:
            raise PassConfigError(
                f"int8: max_loss={self.opts.max_loss} cannot be met even with every weighted node in float "
                f"({_pick(m_all, self.opts.max_loss)}); the remaining error comes from quantized pass-through ops. "
                "Loosen max_loss, or exclude more ops."
            )
        best, best_metrics = hi, m_all
        with progress.step("int8: fitting the accuracy budget"):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                ok_mid, m_mid = check(self.build(cand, order[:mid]))
                if ok_mid:
                    hi, best, best_metrics = mid, mid, m_mid
                else:
                    lo = mid
        if best == len(order):
            raise PassConfigError(
                f"int8: max_loss={self.opts.max_loss} cannot be met with any weighted node quantized (quantized: "
                f"{budget['full']}; the bound holds only with all {len(order)} in float). Loosen max_loss."
            )
        kept = order[:best]
        budget.update(kept_float=len(kept), of=len(order), result=_pick(best_metrics, self.opts.max_loss),
                      errors={n: errors.get(n, 0.0) for n in order[: max(best, 10)]})
        return self.build(cand, kept), [(n, errors.get(n, 0.0)) for n in kept], budget

    def node_errors(self, quant: onnx.ModelProto, nodes: Sequence[str], dataset) -> dict[str, float]:
        """Per node: relative error power of its output minus that of its activation input (float vs int8)."""
        from slimc.backends import onnxruntime as ort_backend

        probes = {}
        for n in nodes:
            node = self.weighted[n].node
            probes[n] = (node.inputs[0].name, node.outputs[0].name)
        tensors = sorted({t for pair in probes.values() for t in pair})
        f_sess = ort_backend.create_session(self._save(_with_outputs(self.proto, tensors), "probe-float"),
                                            shared=self._shared() or None)
        q_sess = ort_backend.create_session(self._save(_with_outputs(quant, tensors), "probe-int8"))
        signal = dict.fromkeys(tensors, 0.0)
        noise = dict.fromkeys(tensors, 0.0)
        for batch in progress.bar(dataset, "int8: per-node errors", total=len(dataset), unit="batch"):
            f_out = dict(zip([o.name for o in f_sess.get_outputs()], ort_backend.run(f_sess, batch)))
            q_out = dict(zip([o.name for o in q_sess.get_outputs()], ort_backend.run(q_sess, batch)))
            for t in tensors:
                f, q = f_out[t].astype(np.float64), q_out[t].astype(np.float64)
                signal[t] += float((f * f).sum())
                noise[t] += float(((q - f) ** 2).sum())
        rel = {t: noise[t] / signal[t] if signal[t] > 0 else 0.0 for t in tensors}
        return {n: max(0.0, rel[o] - rel[i]) for n, (i, o) in probes.items()}


def needs_reduced_range() -> bool:
    """True on x86 CPUs without VNNI, where ORT's u8 x s8 kernels can saturate.

    Without VNNI, ORT multiplies uint8 activations by int8 weights with VPMADDUBSW, which adds
    pairs of products into int16 and saturates when both are near full scale. Weights limited
    to 7 bits (``reduce_range``) keep every pair in range. Measured on this project's AVX2 CPU:
    SmolLM2's layer-9 down_proj, dynamic per-channel int8, output SQNR -17.6 dB with 8-bit
    weights, 11.5 dB with 7-bit (numpy emulation of the exact arithmetic: 11.5 dB for both).
    """
    import platform

    from slimc.backends.onnxruntime import cpu_info

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = cpu_info().get("flags")
    if flags is None:
        return True  # unknown x86: the safe choice
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags.split()))


class _OneBatch:
    """A CalibrationDataReader over exactly one feed."""

    def __init__(self, feed):
        self._feed = feed

    def get_next(self):
        feed, self._feed = self._feed, None
        return feed


class _Listed:
    """A dataset view whose batches are the same objects on every iteration (for cached references)."""

    def __init__(self, dataset):
        self._batches = list(dataset)
        self.source = getattr(dataset, "source", "data")

    def __len__(self):
        return len(self._batches)

    def __iter__(self):
        return iter(self._batches)


def _tried(details: dict[str, Any]) -> str:
    tried = ", ".join(f"{c['name']} {c['speedup']:.2f}x" for c in details["candidates"])
    return f"Configurations measured: {tried}."


def _name_nodes(model: ir.Model) -> None:
    """Give every node a unique name: ORT's quantizer addresses nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _activation_matmuls(model: onnx.ModelProto) -> list[str]:
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in consts]


def _with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model


def _within(metrics: dict[str, Any], bounds: dict[str, float]) -> bool:
    for key, bound in bounds.items():
        metric, direction = LOSS_METRICS[key]
        if metric == "sqnr_db" and metrics.get("exact"):
            continue
        value = metrics.get(metric)
        if value is None:
            raise PassConfigError(
                f"int8: max_loss uses '{key}' but this model's fidelity has no '{metric}' "
                f"(available: {', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))})."
            )
        if (direction == "min" and value < bound) or (direction == "max" and value > bound):
            return False
    return True


def _loss(metrics: dict[str, Any] | None) -> float:
    """One error number per candidate, lower is better, on the task's own scale.

    Causal LMs: log of the perplexity ratio (floored at 0); encoders: 1 - embedding cosine;
    classifiers: KL divergence of the predictions; otherwise the noise-to-signal power of the
    main output, 10^(-SQNR/10).
    """
    if not metrics or metrics.get("exact"):
        return 0.0
    if metrics.get("perplexity_ratio") is not None:
        return max(0.0, math.log(metrics["perplexity_ratio"]))
    if metrics.get("embedding_cosine") is not None:
        return max(0.0, 1.0 - metrics["embedding_cosine"])
    if metrics.get("kl_divergence") is not None:
        return max(0.0, metrics["kl_divergence"])
    sqnr = metrics.get("sqnr_db")
    return 10 ** (-sqnr / 10) if sqnr is not None else math.inf


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("sqnr_db", "cosine", "embedding_cosine", "top1_agreement", "perplexity_ratio")
    return {k: metrics[k] for k in keys if metrics.get(k) is not None}


def _pick(metrics: dict[str, Any], bounds: dict[str, float]) -> dict[str, Any]:
    return {LOSS_METRICS[k][0]: metrics.get(LOSS_METRICS[k][0]) for k in bounds}


def _quantized_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """Quantized weighted ops by kind: static (weight through DequantizeLinear) or dynamic (MatMulInteger)."""
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        key = None
        if node.op_type in WEIGHTED and len(node.input) > 1 and producer.get(node.input[1]) == "DequantizeLinear":
            key = f"{node.op_type} (static QDQ)"
        elif node.op_type in ("MatMulInteger", "ConvInteger"):
            key = f"{node.op_type} (dynamic)"
        if key:
            counts[key] = counts.get(key, 0) + 1
    return counts


def _large(proto: onnx.ModelProto) -> bool:
    """Whether ``proto`` must be saved with external data: over ~1.8 GB, or too big for protobuf
    to size at all (``ByteSize`` raises EncodeError past 2 GB)."""
    from google.protobuf.message import EncodeError

    try:
        size = proto.ByteSize()
    except EncodeError:
        return True
    return size < 0 or size > 1_800_000_000
