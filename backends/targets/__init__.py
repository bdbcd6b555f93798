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
    "genai": "slimc.backends.targets.genai_target:GenAiTarget",
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
    # A generating runtime: ``decode(prompt_ids, new_tokens)`` -> (seconds to the first token, seconds
    # per later token), greedy, never stopping early (`decode_latency` times it).
    decode: Callable[[np.ndarray, int], tuple[float, float]] | None = None


class Target:
    """Base class; see the module docstring. ``files`` in `convert`'s result: the main file first."""

    name: str = ""
    suffix: str = ""  # the main file's suffix, which ``-o`` must end in
    folder: bool = False  # the artifact is a folder: ``-o`` names the folder (see `slimc.export.save_folder`)
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

    def single_file(self, onnx_path: Path, dest: Path) -> Path:
        """``onnx_path`` as one self-contained file at ``dest``, for converters that read a single file:
        a work file keeps its weights in external data for memory's sake (above 64 MB), and the copy
        inlines them. Above ~1.8 GB one protobuf cannot hold them: a `TargetError`."""
        from slimc.onnx_io import EXTERNAL_DATA_THRESHOLD, external_files, load_onnx, save_onnx, tensor_bytes

        model = load_onnx(onnx_path)
        if not external_files(model):
            shutil.copyfile(onnx_path, dest)
            return dest
        if tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            raise TargetError(f"target {self.name!r}: the model's weights exceed 1.8 GB and its converter reads one "
                              "ONNX file, which holds at most 2 GB. Compress it further (int8 / int4) first.")
        save_onnx(model, dest, external_data=False)
        return dest

    def use_source(self, loaded: Any) -> None:
        """The `LoadedModel` compiled, for targets that need more than the graph (a tokenizer, a config)."""

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


def decode_latency(runners: Mapping[str, Runner], prompt: np.ndarray, new_tokens: int = 32,
                   rounds: int = 3) -> dict[str, Any]:
    """Time to first token and decode tokens/s of each runner that decodes, rounds interleaved, medians."""
    decoding = {name: r for name, r in runners.items() if r.decode is not None}
    for runner in decoding.values():  # warm-up: first-run allocations are not the model's speed
        runner.decode(prompt, 2)
    first: dict[str, list[float]] = {name: [] for name in decoding}
    per_token: dict[str, list[float]] = {name: [] for name in decoding}
    for _ in range(rounds):
        for name, runner in decoding.items():
            ttft, step = runner.decode(prompt, new_tokens)
            first[name].append(ttft)
            per_token[name].append(step)
    out: dict[str, Any] = {"prompt_tokens": int(len(prompt)), "new_tokens": new_tokens, "rounds": rounds}
    for name in decoding:
        out[name] = {"ttft_ms": round(float(np.median(first[name])) * 1e3, 3),
                     "decode_tokens_per_s": round(1.0 / max(float(np.median(per_token[name])), 1e-9), 2),
                     "decode_tokens_per_s_range": [round(1.0 / max(v, 1e-9), 2) for v in
                                                   (max(per_token[name]), min(per_token[name]))]}
    if "before" in out and "after" in out:
        out["decode_speedup"] = round(out["after"]["decode_tokens_per_s"] / out["before"]["decode_tokens_per_s"], 3)
    return out
