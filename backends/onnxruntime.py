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


def create_session(path: str | os.PathLike, threads: int | None = None,
                   shared: dict[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """An `InferenceSession` on the CPU for the model file at ``path``.

    ``shared``: initializer arrays (`shareable_initializers`) the session uses in place instead of
    reading its own copy from the file: sessions of several model states then hold each unchanged
    weight once, in the IR's memory-mapped array. Weight prepacking is off for such a session (a
    prepacked copy would double the weights it shares).
    """
    opts = session_options(threads)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (shared or {}).values()]
    for name, value in zip(shared or {}, values):
        opts.add_initializer(name, value)
    if values:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        # no arena: it keeps the largest run's activations (an LM's logits) for the session's lifetime
        opts.enable_cpu_mem_arena = False
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise BackendError(f"ONNX Runtime cannot load {Path(path).name}: {first_line(exc, 1000)}") from None
    session.slimc_shared = values  # ORT does not own shared arrays: they live as long as the session
    session.slimc_arrays = list((shared or {}).values())
    # building the session read the shared weights (constant folding: ORT's float32 copies of float16
    # weights): their pages leave the resident set until a run reads them
    release_mapped_pages(session.slimc_arrays)
    return session


# Ops whose weights ONNX Runtime repacks at load for its integer/low-bit kernels (a static int8 model's
# DequantizeLinear weights are fused into them): without prepacking they run 10-500x slower
# (int8 MatMulInteger 1.6 -> 16-24 ms, int4 MatMulNBits 0.9 -> 530 ms on a 67 MB MLP, 2-core Xeon).
PREPACKED_OPS = frozenset({
    "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger",
    "QLinearMatMul", "QLinearConv", "DequantizeLinear", "GatherBlockQuantized", "QAttention",
})


def shares_weights(model) -> bool:
    """Whether sessions of ``model`` may share the IR's weights (no prepacking): float models only."""
    return not any(node.op_type in PREPACKED_OPS for node in model.graph.all_nodes())


# ORT element types a NumPy array can be handed over as (no bit-packed or ml_dtypes types).
_SHAREABLE = {np.dtype(t) for t in (np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.int32, np.int64)}
SHARE_MIN_BYTES = 1 << 20


def shareable_initializers(model) -> dict[str, np.ndarray]:
    """The main graph's large initializers whose arrays a session can use in place: memory-mapped
    external data and NumPy-backed tensors of plain types, at least ``SHARE_MIN_BYTES`` each."""
    import onnx_ir as ir

    shared = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < SHARE_MIN_BYTES:
            continue
        if isinstance(tensor, ir.TensorProtoTensor) and np.dtype(tensor.dtype.numpy()) in _SHAREABLE:
            # weights inline in the file: NumPy-backed once (a protobuf tensor copies on every numpy() call),
            # so every session shares this array; the protobuf's bytes go once no tensor refers to them
            tensor = value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name,
                                                   doc_string=tensor.doc_string)
        if isinstance(tensor, ir.ExternalTensor) or (isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray)):
            array = tensor.numpy()
            if array.dtype in _SHAREABLE and array.flags.c_contiguous:
                shared[name] = array
    return shared


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
        array = _empty_past(meta, np.asarray(batch[meta.name]))
        feed[meta.name] = array.astype(want) if want is not None else array.copy()
    return feed


def _empty_past(meta, array: np.ndarray) -> np.ndarray:
    """An empty KV-cache past (length 0) in this session's own head count and head size.

    The data of both models of a compile is made once, from the model as loaded; a pass that
    pruned KV heads changed the cache's static dims (`slimc.kvcache`). A past of length 0 holds
    no values, so giving it the session's shape changes nothing but the shape; a non-empty past
    is passed as given (a mismatch is the caller's error, and ORT names it)."""
    from slimc import kvcache

    if array.ndim != 4 or array.shape[2] != 0 or not kvcache.is_cache_input(meta.name) or len(meta.shape) != 4:
        return array
    dims = [d if isinstance(d, int) and d >= 0 else array.shape[i] for i, d in enumerate(meta.shape)]
    dims[0], dims[2] = array.shape[0], 0
    return array if tuple(dims) == array.shape else np.zeros(dims, array.dtype)


def run(session: ort.InferenceSession, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run one batch; returns outputs in the session's output order."""
    feed = prepare_feed(session, batch)
    try:
        return session.run(None, feed)
    except Exception as exc:
        raise BackendError(f"ONNX Runtime failed to run the model: {first_line(exc, 1000)}") from None


def release_mapped_pages(arrays) -> None:
    """Drop the resident pages of memory-mapped weight arrays from this process (``MADV_DONTNEED``).

    The files stay in the page cache and the arrays stay valid: a later read maps the pages again.
    Called before building sessions that read their own copy, so the two are not resident together.
    """
    import mmap

    seen = set()
    for array in arrays:
        base = array
        while isinstance(base, (np.ndarray, memoryview)):  # array views -> the buffer they were made from
            base = base.obj if isinstance(base, memoryview) else base.base
        if isinstance(base, mmap.mmap) and id(base) not in seen and hasattr(mmap, "MADV_DONTNEED"):
            seen.add(id(base))
            base.madvise(mmap.MADV_DONTNEED)


def release_model_pages(model) -> None:
    """`release_mapped_pages` for every memory-mapped (external) initializer of ``model``'s main graph."""
    import onnx_ir as ir

    release_mapped_pages(v.const_value.numpy() for v in model.graph.initializers.values()
                         if isinstance(v.const_value, ir.ExternalTensor))


def return_freed_memory() -> None:
    """Hand memory freed by dropped sessions back to the system (glibc ``malloc_trim``; elsewhere a no-op).

    glibc raises its mmap threshold after large frees, so a dropped session's weight buffers end up
    in the heap and stay resident: measured 260-440 MB kept of a 0.5 GB model's two dropped sessions.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


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


# Weights from which latency sessions are built one at a time: two prepacked float copies would double them.
LEAN_BYTES = 256 << 20


def measure_latency_files(
    paths: dict[str, str | os.PathLike],
    batch: dict[str, np.ndarray],
    threads: int | None = None,
    *,
    weight_bytes: int = 0,
    mapped=(),
    **protocol,
) -> dict[str, Latency]:
    """Latency of the model files at ``paths``, each in a session of its own with ORT's defaults
    (prepacked weights, as deployed). Below ``LEAN_BYTES`` of ``weight_bytes`` the sessions live
    together and the runs interleave (`measure_latency`); above, one session is built at a time
    (`slimc.backends.timing.one_at_a_time`), after the resident pages of ``mapped`` arrays (weights
    shared with other sessions) are released. ``protocol``: warmup, repeats, rounds, budget_s."""
    from slimc.backends.timing import one_at_a_time

    if weight_bytes < LEAN_BYTES:
        return measure_latency({name: create_session(path, threads) for name, path in paths.items()}, batch, **protocol)

    def build(path):
        return_freed_memory()  # the previous model's session was just dropped
        release_mapped_pages(mapped)  # not resident next to this session's own packed copy
        session = create_session(path, threads)
        feed = prepare_feed(session, batch)
        return lambda: session.run(None, feed)

    protocol.setdefault("warmup", 2)
    stats = one_at_a_time({name: (lambda p=p: build(p)) for name, p in paths.items()}, **protocol)
    return_freed_memory()
    return stats


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
