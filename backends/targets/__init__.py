"""Export targets: turn the compressed ONNX model into an artifact for one runtime, then run it.

A target (`Target`) knows four things: which optional extra provides its converter and runtime
(`require` raises `MissingExtraError` with the ``pip install`` command), which ONNX ops it
cannot represent (`unsupported`, checked before anything is converted), how to convert an
ONNX file into its files (`convert`, into a work folder), and how to load those files in its
runtime and run a batch (`load` -> `Runner`). `slimc.export` drives them: prepare the ONNX
(opset, static shapes), convert, load, compare with the source on held-out inputs, time.

The registry maps the ``--target`` name to ``module:class``, imported on first use, so a target
whose runtime is not installed costs nothing until it is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slimc.errors import MissingExtraError, TargetError

TARGETS: dict[str, str] = {
    "onnx": "slimc.backends.targets.onnx_targets:OnnxTarget",
    "ort-mobile": "slimc.backends.targets.onnx_targets:OrtMobileTarget",
    "openvino": "slimc.backends.targets.openvino_target:OpenVinoTarget",
    "ncnn": "slimc.backends.targets.ncnn_target:NcnnTarget",
    "tflite": "slimc.backends.targets.tflite_target:TfliteTarget",
    "executorch": "slimc.backends.targets.executorch_target:ExecuTorchTarget",
}
# Asked for by users and planned, not available yet: the reason is the error.
NOT_YET: dict[str, str] = {}

Batch = Mapping[str, np.ndarray]
__all__ = ["ORT_FUSED_OPS", "TARGETS", "MissingExtraError", "Runner", "Target", "TargetError", "chunked", "dynamic_inputs", "get",
           "graph_inputs", "op_types", "ort_only_ops"]
# Integer and quantized ops: what the `int8` / `int4` passes leave in a graph (refused by float-only targets).
INTEGER_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                         "QLinearConv", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})

# ONNX Runtime's fused contrib ops (the `fuse` pass, int4(embedding=true), GenAI builder graphs): only ONNX Runtime runs them.
ORT_FUSED_OPS = frozenset({"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
                           "GroupQueryAttention", "GatherBlockQuantized"})


def ort_only_ops(proto: onnx.ModelProto) -> dict[str, str]:
    """`Target.unsupported` entries for ONNX Runtime's fused contrib ops, for targets that are not ONNX Runtime."""
    return {op: "an ONNX Runtime contrib op (written by the fuse pass or int4(embedding=true)) that only ONNX Runtime "
                "runs; leave fuse / embedding=true out of pipelines for this target (they are for --target onnx)"
            for op in op_types(proto) if op in ORT_FUSED_OPS}


def get(name: str) -> Target:
    """The target called ``name`` (an instance), or a `TargetError` listing the valid names."""
    key = str(name).strip().lower()
    if key in NOT_YET:
        raise TargetError(NOT_YET[key])
    if key not in TARGETS:
        raise TargetError(f"unknown target {name!r}. Available targets: {', '.join(TARGETS)}.")
    module, _, cls = TARGETS[key].partition(":")
    return getattr(importlib.import_module(module), cls)()


@dataclasses.dataclass
class Runner:
    """A loaded artifact: ``run(batch)`` returns the outputs in the source model's output order.

    ``bind(batch)`` returns a no-argument callable that runs that batch with the inputs already
    converted (what latency is measured on). A batch axis pinned by ``--static-shapes`` is honoured
    by the caller (`chunked`), not here.
    """

    run: Callable[[Batch], list[np.ndarray]]
    bind: Callable[[Batch], Callable[[], Any]]
    runtime: str  # "openvino 2025.1.0", ...


class Target:
    """Base class; see the module docstring. ``files`` in `convert`'s result: the main file first."""

    name: str = ""
    suffix: str = ""  # the main file's suffix, which ``-o`` must end in
    extra: str = ""  # pip extra: pip install "slimc[extra]"
    modules: tuple[str, ...] = ()  # import names the extra provides

    @property
    def install(self) -> str:
        """The command that installs this target's converter and runtime (said by every missing-extra error)."""
        return f'pip install "slimc[{self.extra}]" (or scripts/install.sh {self.extra})'

    def require(self) -> None:
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingExtraError(
                f"target {self.name!r} needs {', '.join(missing)}, which is not installed. Install it with: {self.install}."
            )

    def command(self, name: str) -> str:
        """A converter's console script: on PATH, or beside this Python (a venv used without activating it)."""
        found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        if found is None:
            raise MissingExtraError(f"target {self.name!r}: the {name} command is not on PATH; install it with: {self.install}.")
        return found

    def unsupported(self, proto: onnx.ModelProto) -> dict[str, str]:
        """{op_type: why} for the ops of ``proto`` this target cannot represent (checked before converting)."""
        return {}

    def notes(self, proto: onnx.ModelProto) -> list[str]:
        """What the receipt should say about how this target runs ``proto`` (e.g. int8 it runs as float)."""
        return []

    def convert(self, onnx_path: Path, out_dir: Path, stem: str) -> list[Path]:
        raise NotImplementedError

    def load(self, files: Sequence[Path], threads: int | None, source: onnx.ModelProto) -> Runner:
        """``source``: the ONNX model the files were converted from (weights not loaded), for its I/O."""
        raise NotImplementedError


def op_types(proto: onnx.ModelProto) -> dict[str, str]:
    """{op_type: domain} of every node, subgraphs included."""
    found: dict[str, str] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found.setdefault(node.op_type, node.domain or "ai.onnx")
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    walk(sub)

    walk(proto.graph)
    return found


def graph_inputs(proto: onnx.ModelProto) -> list[tuple[str, list[int], int]]:
    """``(name, dims, elem_type)`` of each real graph input (initializers left out); -1 for a dynamic dim."""
    inits = {i.name for i in proto.graph.initializer}
    out = []
    for value in proto.graph.input:
        if value.name in inits:
            continue
        t = value.type.tensor_type
        out.append((value.name, [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim], t.elem_type))
    return out


def dynamic_inputs(proto: onnx.ModelProto, why: str) -> dict[str, str]:
    """`Target.unsupported` entries for inputs with a dynamic dim, for targets that need one shape
    (``why``: the runtime's reason), each with the ``--static-shapes`` value that would pin it."""
    return {f"input {name}": f"dynamic shape {dims}: {why}; pin it, e.g. --static-shapes {name}="
            + "x".join(str(d if d > 0 else 1) for d in dims)
            for name, dims, _ in graph_inputs(proto) if any(d <= 0 for d in dims)}


def split_batch(batch: Batch, size: int) -> list[dict[str, np.ndarray]]:
    """``batch`` cut along axis 0 into pieces of ``size`` samples (the last may be smaller).

    A 0-d array (a scalar configuration input) has no samples to cut: every piece gets it whole.
    """
    n = min((int(np.shape(v)[0]) for v in batch.values() if np.ndim(v)), default=0)
    return [{k: np.asarray(v)[i : i + size] if np.ndim(v) else np.asarray(v) for k, v in batch.items()}
            for i in range(0, n, size)]


def chunked(run_one: Callable[[Batch], list[np.ndarray]], size: int | None) -> Callable[[Batch], list[np.ndarray]]:
    """A `run` for an artifact with a fixed batch ``size``: split, run, concatenate along axis 0."""
    if size is None:
        return run_one

    def run(batch: Batch) -> list[np.ndarray]:
        pieces = [run_one(piece) for piece in split_batch(batch, size)]
        return [np.concatenate(parts, axis=0) for parts in zip(*pieces)]

    return run


def failure(log: str, noise: Callable[[str], bool] = lambda line: False) -> str:
    """What a converter's log says failed: colours stripped, ``noise`` lines dropped, the last three
    lines that mention a failure (or the last three lines), cut at 800 characters."""
    lines = [ln for ln in log_lines(log) if not noise(ln)]
    failed = [ln for ln in lines if re.search(r"fail|error|not support|unsupported", ln, re.I)]
    return " | ".join((failed or lines[-3:])[-3:])[:800] or "no message"


def log_lines(log: str) -> list[str]:
    """A converter's output as non-blank lines without terminal colour codes."""
    return [s for s in (re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in log.splitlines()) if s]


def describe_unsupported(target: str, ops: dict[str, str]) -> str:
    by_reason: dict[str, list[str]] = {}
    for op, why in sorted(ops.items()):
        by_reason.setdefault(why, []).append(op)
    listed = "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items())
    return (f"target {target!r} cannot represent {len(ops)} op type(s) of this model: {listed}. Nothing was written. "
            "Exclude the pass that introduced them, or choose another target (--target onnx always works).")
