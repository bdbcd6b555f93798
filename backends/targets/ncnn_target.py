"""The ``ncnn`` target: ``.param`` + ``.bin`` through pnnx, run in ncnn's Python runtime.

pnnx reads the ONNX file directly (``pnnx model.onnx inputshape=[...] fp16=0``) and writes the
ncnn graph (``model.ncnn.param``/``.bin``); ``fp16=0`` keeps float32 weights, and the runtime's
fp16/bf16 storage and arithmetic are switched off for the verification, so the receipt measures
the conversion (ncnn's defaults, fp16 storage and arithmetic, measured 7e-3 off ORT on a toy
conv net). On a phone, turn them back on in ``net.opt`` for speed.

What it cannot hold, refused before converting:
- **dynamic input shapes**: pnnx traces one shape; pin them with ``--static-shapes``;
- **int8 QDQ / integer ops**: pnnx turns QuantizeLinear/DequantizeLinear into layers ncnn does
  not have (``pnnx.Expression``); ncnn's int8 comes from its own calibration tools
  (``ncnn2table``/``ncnn2int8``) on the float model, so export the float model for ncnn.
After conversion, a param file with a layer ncnn's runtime does not know is an error naming it.

ncnn has no batch axis: the runner feeds one sample at a time (``in0``, ``in1``, ... in the ONNX
input order; ``out0``, ... in its output order) and reshapes each output to the ONNX shape.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from slimc.backends.targets import (INTEGER_OPS, Runner, Target, TargetError, dynamic_inputs, failure, graph_inputs,
                                    op_types, ort_only_ops)

TIMEOUT_S = 600


class NcnnTarget(Target):
    name = "ncnn"
    suffix = ".param"
    extra = "ncnn"
    modules = ("ncnn", "pnnx")

    def unsupported(self, proto: onnx.ModelProto) -> dict[str, str]:
        bad = {op: "int8 QDQ / integer ops have no ncnn layer; ncnn quantizes with its own ncnn2table/ncnn2int8 "
                   "from the float model, so export ncnn without int8/int4" for op in op_types(proto) if op in INTEGER_OPS}
        bad.update(dynamic_inputs(proto, "pnnx needs one shape"))
        bad.update(ort_only_ops(proto))
        return bad

    def convert(self, onnx_path: Path, out_dir: Path, stem: str) -> list[Path]:
        proto = onnx.load(str(onnx_path), load_external_data=False)
        final = stem
        stem = "pnnx_model"  # pnnx rewrites file names it does not like ('-' -> '_'); rename at the end
        model = out_dir / f"{stem}.onnx"
        self.single_file(onnx_path, model)
        shapes = ",".join("[" + ",".join(map(str, dims)) + "]" + _pnnx_type(elem) for _, dims, elem in graph_inputs(proto))
        cmd = [self.command("pnnx"), model.name, f"inputshape={shapes}", "fp16=0", "optlevel=2"]
        try:
            done = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise TargetError(f"target 'ncnn': pnnx did not finish in {TIMEOUT_S} s.") from None
        param, binary = out_dir / f"{stem}.ncnn.param", out_dir / f"{stem}.ncnn.bin"
        if done.returncode != 0 or not param.exists():
            log = done.stdout + done.stderr  # pnnx prints progress with timings: not what failed
            noise = lambda ln: ln.endswith("ms") or "Unknown CPU vendor" in ln  # noqa: E731
            raise TargetError(f"target 'ncnn': pnnx failed (exit {done.returncode}): {failure(log, noise)}")
        unknown = _unknown_layers(param)
        if unknown:
            raise TargetError(f"target 'ncnn': pnnx left layers ncnn's runtime does not have: {', '.join(unknown)} "
                              "(ops pnnx could not map to ncnn). Nothing was written.")
        keep = [out_dir / f"{final}.param", out_dir / f"{final}.bin"]
        os.replace(param, keep[0])
        os.replace(binary, keep[1])
        for leftover in out_dir.glob(f"{stem}*"):
            if leftover not in keep:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        return keep

    def load(self, files: Sequence[Path], threads: int | None, source: onnx.ModelProto) -> Runner:
        import ncnn

        net = ncnn.Net()
        for option in ("use_fp16_storage", "use_fp16_arithmetic", "use_fp16_packed", "use_bf16_storage"):
            if hasattr(net.opt, option):
                setattr(net.opt, option, False)
        if threads:
            net.opt.num_threads = int(threads)
        if net.load_param(str(files[0])) != 0 or net.load_model(str(files[1])) != 0:
            raise TargetError(f"target 'ncnn': ncnn cannot load {files[0].name} / {files[1].name}.")
        in_names, out_names = list(net.input_names()), list(net.output_names())
        inputs = [name for name, _, _ in graph_inputs(source)]
        shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in source.graph.output]

        def one(sample_feed):
            ex = net.create_extractor()
            for blob, array in zip(in_names, sample_feed):
                ex.input(blob, ncnn.Mat(array).clone())
            outs = []
            for blob in out_names:
                ret, mat = ex.extract(blob)
                if ret != 0:
                    raise TargetError(f"target 'ncnn': extracting {blob} failed (ncnn error {ret}).")
                outs.append(np.array(mat.numpy()))
            return outs

        def feed(batch):
            arrays = [np.asarray(batch[name]) for name in inputs]
            return [[np.ascontiguousarray(a[i].astype(np.float32)) for a in arrays] for i in range(len(arrays[0]))]

        def run(batch):
            samples = [one(f) for f in feed(batch)]
            return [np.stack([_reshaped(s[k], shape[1:]) for s in samples]) for k, shape in enumerate(shapes)]

        def bind(batch):
            first = feed(batch)[0]
            return lambda: one(first)

        return Runner(run=run, bind=bind, runtime=f"ncnn {ncnn.__version__}")


def _reshaped(array: np.ndarray, dims: list[int]) -> np.ndarray:
    """ncnn's Mat as the ONNX output's per-sample shape. A dim the ONNX output leaves symbolic (0 here,
    e.g. a sequence length a converter did not tie to the inputs) is inferred; with more than one such
    dim the shape is ambiguous and ncnn's own is kept."""
    unknown = sum(d <= 0 for d in dims)
    if unknown > 1:
        return array
    return array.reshape([d if d > 0 else -1 for d in dims])


def _pnnx_type(elem: int) -> str:
    return {onnx.TensorProto.INT64: "i64", onnx.TensorProto.INT32: "i32", onnx.TensorProto.FLOAT16: "f16"}.get(elem, "f32")


def _unknown_layers(param: Path) -> list[str]:
    import ncnn

    layers = {line.split()[0] for line in param.read_text().splitlines()[2:] if line.strip()}
    return sorted(t for t in layers if t.startswith("pnnx.") or ncnn.layer_to_index(t) < 0)

