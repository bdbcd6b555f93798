"""The ``openvino`` target: OpenVINO IR (``.xml`` + ``.bin``), run in OpenVINO's CPU plugin.

Conversion is OpenVINO's own ONNX front end (`openvino.convert_model`) and `openvino.save_model`
with ``compress_to_fp16=False``: the weights stay as the compressed ONNX holds them (float32, or
int8 behind QDQ), so what the receipt measures is the conversion, not a silent fp16 cast.
QuantizeLinear/DequantizeLinear pairs become OpenVINO FakeQuantize operations, which its CPU
plugin executes as int8 (the low-precision transformations); per-channel weight scales are kept.
Float compute is pinned to f32 (``INFERENCE_PRECISION_HINT``): on CPUs with bf16 support the
plugin would otherwise run float models in bfloat16.

An op OpenVINO's ONNX front end cannot read is named in the error: its front end lists the
unsupported operations when it fails, and conversion happens in the work folder, so nothing is
written to the output path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from slimc.backends.targets import Runner, Target, TargetError, op_types, ort_only_ops
from slimc.errors import first_line


class OpenVinoTarget(Target):
    name = "openvino"
    suffix = ".xml"
    extra = "openvino"
    modules = ("openvino",)

    def unsupported(self, proto: onnx.ModelProto) -> dict[str, str]:
        # Standard ops OpenVINO lacks are listed by its own front end at conversion (in the work folder,
        # so nothing is written either way); custom domains other than ORT's are known to fail up front.
        bad = {op: f"custom domain {domain!r}, which OpenVINO's ONNX front end does not read"
               for op, domain in op_types(proto).items() if domain not in ("ai.onnx", "com.microsoft")}
        return {**bad, **ort_only_ops(proto)}  # OpenVINO fuses the unfused form itself

    def notes(self, proto: onnx.ModelProto) -> list[str]:
        dynamic = sorted(set(op_types(proto)) & {"DynamicQuantizeLinear", "MatMulInteger", "MatMulIntegerToFloat",
                                                   "DynamicQuantizeMatMul"})
        if not dynamic:
            return []
        return [f"OpenVINO has no dynamic int8 MatMul: {', '.join(dynamic)} are folded to float at conversion, so "
                "these layers run in float32 and the .bin stores their weights as float (measured on MiniLM: as large "
                "as the float model, slower than it). For int8 in OpenVINO use int8(mode=static): QDQ becomes "
                "FakeQuantize and runs as int8."]

    def convert(self, onnx_path: Path, out_dir: Path, stem: str) -> list[Path]:
        import openvino as ov

        try:
            model = ov.convert_model(str(onnx_path))
        except Exception as exc:  # OpenVINO raises OpConversionFailure / GeneralFailure with the node
            raise TargetError(f"target 'openvino': OpenVINO cannot convert this model: {_op_message(exc)}") from None
        xml = out_dir / f"{stem}.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        return [xml, xml.with_suffix(".bin")]

    def load(self, files: Sequence[Path], threads: int | None, source) -> Runner:
        import openvino as ov

        core = ov.Core()
        # f32 compute: on CPUs with bf16 (AVX-512 BF16, AMX) the plugin otherwise computes float models in
        # bfloat16 (measured 4e-3..7e-3 off ORT on a toy conv net), which is not what slimc was asked to do.
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            compiled = core.compile_model(str(files[0]), "CPU", config)
        except Exception as exc:
            raise TargetError(f"target 'openvino': the CPU plugin cannot compile the model: {first_line(exc, 600)}") from None
        inputs = [(i.get_any_name(), i.get_element_type().to_dtype()) for i in compiled.inputs]
        outputs = list(compiled.outputs)
        request = compiled.create_infer_request()

        def feed(batch):
            missing = [name for name, _ in inputs if name not in batch]
            if missing:
                raise TargetError(f"target 'openvino': the IR takes {', '.join(missing)}, which the data does not give.")
            # asarray(order="C"), not ascontiguousarray, which makes a 0-d input (a scalar flag) 1-d
            return {name: np.asarray(np.asarray(batch[name]).astype(dtype, copy=False), order="C") for name, dtype in inputs}

        def run(batch):
            ready = feed(batch)
            try:
                result = request.infer(ready)
            except RuntimeError as exc:
                raise TargetError(f"target 'openvino': the CPU plugin cannot run the model: {_run_message(exc)}") from None
            return [np.array(result[o]) for o in outputs]

        def bind(batch):
            ready = feed(batch)
            return lambda: request.infer(ready)

        return Runner(run=run, bind=bind, runtime=f"openvino {ov.get_version().split('-')[0]}")


def _run_message(exc: Exception) -> str:
    """OpenVINO's run-time errors open with source locations ("Exception from src/...cpp:224:",
    "Check '...' failed at ...:"); the message a user can act on is the line after them."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    said = [ln for ln in lines if not re.match(r"(Exception from \S+:\d+:|Check '.*' failed at \S+:\d+:)$", ln)]
    return "; ".join((said or lines or [type(exc).__name__])[:2])[:600]


def _op_message(exc: Exception) -> str:
    """OpenVINO's conversion errors are pages long; keep the lines that name the node and op."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "OpenVINO does not support" in ln or "No conversion rule" in ln or "node" in ln.lower()]
    return "; ".join((named or lines or [type(exc).__name__])[:3])[:800]
