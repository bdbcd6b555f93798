"""ONNX Runtime backend: build sessions, run batches, measure latency fairly.

Fair latency: both models get the same `SessionOptions` (thread counts, optimisation level,
sequential execution, no thread spinning), the same input feed and the same warm-up; measurement alternates
between the models in rounds so that drift on a busy machine (thermal, other processes)
hits both alike. The reported figure is the median over all timed runs; p10/p90 show spread.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort

from slimc.backends.timing import Latency, interleaved
from slimc.errors import BackendError, DataError, first_line

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(int16)": np.int16,
}


def default_threads() -> int:
    """Intra-op threads: the machine's core count (ORT's own default), fixed so runs compare."""
    return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: ORT warns about unused initializers etc.
    # No busy-waiting between runs: slimc keeps several sessions alive and times them interleaved,
    # and a spinning idle session steals the cores of the running one. Measured on EfficientNet-Lite0
    # (2 cores): two spinning sessions ran 6.5-7.5 ms each with ratios off by up to 14% for the same
    # model; without spinning 3.3 ms each, ratio 1.00 (one session alone: 3.6 ms spinning, 4.3 not).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def create_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """An `InferenceSession` on the CPU for the model file at ``path``."""
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise BackendError(f"ONNX Runtime cannot load {Path(path).name}: {first_line(exc, 1000)}") from None


def prepare_feed(session: ort.InferenceSession, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Select and cast the batch's arrays to the session's declared input types, as copies.

    ORT binds a numpy input without copying it, and some kernels write into their inputs (a float32
    ``BatchNormalization(training_mode=1)`` between float16 casts updated the caller's running mean
    and variance): the caller's data must come back as it was given."""
    feed = {}
    for meta in session.get_inputs():
        if meta.name not in batch:
            raise DataError(
                f"the model needs input '{meta.name}' ({meta.type}, shape {meta.shape}) but the data has only "
                f"{', '.join(batch) or 'nothing'}."
            )
        want = _ORT_TO_NUMPY.get(meta.type)
        array = np.asarray(batch[meta.name])
        feed[meta.name] = array.astype(want) if want is not None else array.copy()
    return feed


def run(session: ort.InferenceSession, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run one batch; returns outputs in the session's output order."""
    feed = prepare_feed(session, batch)
    try:
        return session.run(None, feed)
    except Exception as exc:
        raise BackendError(f"ONNX Runtime failed to run the model: {first_line(exc, 1000)}") from None


def measure_latency(
    sessions: dict[str, ort.InferenceSession],
    batch: dict[str, np.ndarray],
    *,
    warmup: int = 3,
    repeats: int = 20,
    rounds: int = 5,
    budget_s: float = 60.0,
) -> dict[str, Latency]:
    """Median latency of each session on ``batch``, interleaved in rounds after warm-up
    (`slimc.backends.timing.interleaved`: ``repeats`` runs per model over ``rounds`` rounds,
    cut to stay near ``budget_s``)."""
    feeds = {name: prepare_feed(s, batch) for name, s in sessions.items()}
    calls = {name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in sessions.items()}
    return interleaved(calls, warmup=warmup, repeats=repeats, rounds=rounds, budget_s=budget_s)


def cpu_info() -> dict[str, str]:
    """The first ``model name`` and ``flags`` lines of /proc/cpuinfo ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags"):
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def machine_description(threads: int | None = None) -> str:
    """CPU model, core count, threads used and ORT version: printed next to every timing."""
    cpu = cpu_info().get("model name") or platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, onnxruntime {ort.__version__} CPUExecutionProvider, "
        f"{threads or default_threads()} intra-op threads"
    )
