"""The ``tflite`` target: a LiteRT (TensorFlow Lite) flatbuffer through onnx2tf, run in LiteRT.

onnx2tf rewrites the ONNX graph into TensorFlow ops, transposing NCHW activations to NHWC, and
writes ``<stem>_float32.tflite``. slimc asks it to keep every input in the ONNX layout
(``-k``: the artifact takes exactly what the ONNX model takes, and onnx2tf's download of sample
images for NHWC image inputs, impossible offline, never triggers), to keep the ONNX input and
output names (``-coion``) and to write signatures (``-osd``), which the runner uses to match
outputs by name. A 4-D output onnx2tf leaves in NHWC is transposed back by the runner.

onnx2tf runs in a subprocess (TensorFlow is heavy and noisy to import), with onnxsim first as
by default; if that conversion fails it runs once more without onnxsim (see `convert`). Its dependencies are
pinned to old releases of numpy/onnx/onnxruntime; ``scripts/install.sh tflite`` installs
TensorFlow, LiteRT and onnx2tf's helpers at the project's versions and onnx2tf itself with
``--no-deps``. Measured here: float models convert and match ORT; int8 QDQ models convert
but compute wrong numbers (max error above 1 on a toy conv net), so QDQ is refused up front.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from slimc.backends.targets import INTEGER_OPS, Runner, Target, TargetError, failure, log_lines, op_types, ort_only_ops

TIMEOUT_S = 1200


class TfliteTarget(Target):
    name = "tflite"
    suffix = ".tflite"
    extra = "tflite"
    modules = ("onnx2tf", "tensorflow", "ai_edge_litert")
    install = ("scripts/install.sh tflite (onnx2tf pins old numpy/onnx releases, so it is installed with --no-deps "
               "beside TensorFlow and LiteRT)")

    def __init__(self) -> None:
        self._notes: list[str] = []

    def unsupported(self, proto: onnx.ModelProto) -> dict[str, str]:
        bad = {op: "onnx2tf converts int8 QDQ / integer ops but the LiteRT model computes wrong numbers (measured: "
                   "max error > 1 on a toy conv net); export the float model, LiteRT's own int8 needs its converter's "
                   "calibration" for op in op_types(proto) if op in INTEGER_OPS}
        return {**bad, **ort_only_ops(proto)}

    def convert(self, onnx_path: Path, out_dir: Path, stem: str) -> list[Path]:
        """onnx2tf as it runs by default (onnxsim first), then once more without onnxsim if that fails.

        onnxsim 0.8 fuses eager attention (MatMul/Softmax/MatMul) into ONNX ``Attention``, which
        onnx2tf 1.29 cannot convert (measured: the zoo ViT); slimc's ``cleanup`` has already folded
        what onnxsim would, so the second attempt loses nothing but onnxsim's fusions.
        """
        proto = onnx.load(str(onnx_path), load_external_data=False)
        ops = {n.name: n.op_type for n in proto.graph.node}
        inits = {i.name for i in proto.graph.initializer}
        layouts = [v.name for v in proto.graph.input if v.name not in inits and 3 <= len(v.type.tensor_type.shape.dim) <= 5]
        failures = []
        for simplify in (True, False):
            done, produced = self.run_onnx2tf(onnx_path, out_dir, stem, layouts, simplify)
            if done.returncode == 0 and produced.exists():
                break
            failures.append(f"{'with' if simplify else 'without'} onnxsim (exit {done.returncode}): "
                            f"{_error(done.stdout + done.stderr, ops)}")
        else:
            raise TargetError(f"target 'tflite': onnx2tf failed {failures[0]}; and {failures[1]}")
        if failures:
            self._notes.append(f"converted without onnxsim: onnx2tf failed after it, {failures[0]}")
        out = out_dir / f"{stem}.tflite"
        os.replace(produced, out)
        shutil.rmtree(out_dir / "tf", ignore_errors=True)
        (out_dir / f"{stem}.onnx").unlink()
        return [out]

    def run_onnx2tf(self, onnx_path: Path, out_dir: Path, stem: str, layouts: list[str],
                    simplify: bool) -> tuple[subprocess.CompletedProcess, Path]:
        """One onnx2tf run on a fresh copy of ``onnx_path`` (onnxsim rewrites its input in place);
        ``layouts``: the inputs kept in the ONNX layout (``-k``)."""
        model = out_dir / f"{stem}.onnx"
        self.single_file(onnx_path, model)
        shutil.rmtree(out_dir / "tf", ignore_errors=True)
        cmd = [self.command("onnx2tf"), "-i", model.name, "-o", "tf", "-coion", "-osd", "-n",
               *(["-k", *layouts] if layouts else []), *([] if simplify else ["-nuo"])]
        # onnx2tf calls `onnxsim` from PATH: put this Python's scripts first, so an unactivated venv
        # runs the same conversion as an activated one (without it onnxsim was silently skipped).
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "PATH": path, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        try:
            done = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired:
            raise TargetError(f"target 'tflite': onnx2tf did not finish in {TIMEOUT_S} s.") from None
        return done, out_dir / "tf" / f"{stem}_float32.tflite"

    def notes(self, proto: onnx.ModelProto) -> list[str]:
        return list(self._notes)

    def load(self, files: Sequence[Path], threads: int | None, source: onnx.ModelProto) -> Runner:
        from ai_edge_litert import interpreter as litert

        interp = litert.Interpreter(model_path=str(files[0]), num_threads=threads or os.cpu_count() or 1)
        runner = interp.get_signature_runner()
        details = runner.get_input_details()
        onnx_outputs = [(o.name, [d.dim_value for d in o.type.tensor_type.shape.dim]) for o in source.graph.output]

        def feed(batch):
            out = {}
            for name, info in details.items():
                if name not in batch:
                    raise TargetError(f"target 'tflite': the model takes {name!r}, which the data does not give.")
                out[name] = np.asarray(np.asarray(batch[name]).astype(info["dtype"], copy=False), order="C")
            return out

        def run(batch):
            result = runner(**feed(batch))
            return [_layout(np.asarray(result[name] if name in result else list(result.values())[k]), shape)
                    for k, (name, shape) in enumerate(onnx_outputs)]

        def bind(batch):
            ready = feed(batch)
            return lambda: runner(**ready)

        import ai_edge_litert

        return Runner(run=run, bind=bind, runtime=f"LiteRT {getattr(ai_edge_litert, '__version__', '')}".strip())


def _layout(array: np.ndarray, onnx_shape: list[int]) -> np.ndarray:
    """A 4-D output in NHWC where the ONNX model gives NCHW is transposed back."""
    if array.ndim == 4 and len(onnx_shape) == 4 and list(array.shape) != onnx_shape:
        if list(array.transpose(0, 3, 1, 2).shape) == onnx_shape:
            return array.transpose(0, 3, 1, 2)
    return array


def _error(log: str, ops: dict[str, str]) -> str:
    """onnx2tf's failure, as the ONNX node and op it stopped at plus the exception's last line."""
    noise = lambda ln: ln.startswith(("I0000", "W0000", "WARNING: All log"))  # noqa: E731  (TensorFlow's start-up)
    lines = [ln for ln in log_lines(log) if not noise(ln)]
    exceptions = [ln for ln in lines if re.match(r"[A-Za-z_.]*(Error|Exception)\b", ln)]
    failed_at = next((m.group(1) for ln in lines if (m := re.match(r"ERROR: onnx_op_name: (\S+)", ln))), None)
    if failed_at is not None:
        where = (f"op {ops[failed_at]}" if failed_at in ops else
                 "a node of onnx2tf's own rewritten graph, e.g. an attention block it fused")
        return f"it cannot convert node {failed_at!r} ({where}): {(exceptions or ['no message'])[-1]}"[:800]
    return failure(log, noise)
