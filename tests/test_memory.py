"""Memory: sessions share the IR's weights, verification streams, and peak RSS stays near the weights.

The default suite checks the mechanisms on small models: a float model's sessions use the IR's
memory-mapped arrays in place (no copy per session), quantized models keep ORT's prepacking, the
exactness check in sub-batches gives the verdict of the whole-batch check, and released pages are
read back intact. The slow suite measures peak RSS of `compile` in a subprocess on a ~1 GB
external-data MLP (`slimc.tools.bench_memory`).
"""

from __future__ import annotations

import numpy as np
import pytest

from slimc.backends import onnxruntime as ort_backend
from slimc.onnx_io import load_onnx
from slimc.tools.bench_memory import build_mlp, measure
from slimc.verify import outputs_match, runs_match


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    build_mlp(path, 3 * 256 * 256 * 4, hidden=256)  # 3 layers of 256 KB weights, external data
    return path


def test_float_sessions_use_the_ir_arrays_in_place(mlp, monkeypatch):
    monkeypatch.setattr(ort_backend, "SHARE_MIN_BYTES", 4096)  # the weights, not the 1 KB biases
    model = load_onnx(mlp)
    shared = ort_backend.shareable_initializers(model)
    assert ort_backend.shares_weights(model) and set(shared) == {"w0", "w1", "w2"}
    session = ort_backend.create_session(mlp, 1, shared=shared)
    for name, array in shared.items():  # the session's weights are the IR's memory-mapped arrays
        assert np.shares_memory(array, model.graph.initializers[name].const_value.numpy())
    assert session.slimc_arrays == list(shared.values())
    x = {"x": np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)}
    own = ort_backend.create_session(mlp, 1)  # reads its own copy from the file, prepacked
    np.testing.assert_allclose(ort_backend.run(session, x)[0], ort_backend.run(own, x)[0], rtol=1e-5, atol=1e-5)

    ort_backend.release_mapped_pages(shared.values())  # pages dropped, data read back on the next run
    np.testing.assert_allclose(ort_backend.run(session, x)[0], ort_backend.run(own, x)[0], rtol=1e-5, atol=1e-5)


def test_quantized_models_keep_prepacking():
    import onnx_ir as ir

    node = ir.node("MatMulNBits", [], domain="com.microsoft")
    graph = ir.Graph([], [], nodes=[node], opset_imports={"": 17, "com.microsoft": 1})
    assert not ort_backend.shares_weights(ir.Model(graph, ir_version=10))


def test_exactness_in_sub_batches_scales_with_the_whole_batch(monkeypatch):
    """|diff| of a small row is judged against max|ref| of the whole batch, as in `outputs_match`."""
    from slimc import evaluate

    monkeypatch.setattr(evaluate, "CHUNK_ELEMENTS", 4)  # float64 work on 4 elements at a time
    ref = np.ones((4, 6), np.float32) * 1e-3
    ref[0] = 100.0  # the batch's scale: tolerance 1e-5 + 1e-4 * 100 = 0.01
    got = ref.copy()
    got[3] += 0.005  # within the batch's tolerance, 5x larger than row 3's own values
    batch = {"x": np.arange(4)}

    def run(outputs):
        return lambda b: [outputs[b["x"]]]

    whole = outputs_match([[ref]], [[got]], ["y"])
    rows = runs_match(run(ref), run(got), [batch], ["y"], max_output_bytes=1)  # one row per run
    assert whole.ok and rows.ok and rows.max_abs == pytest.approx(whole.max_abs)
    assert rows.max_scaled == pytest.approx(whole.max_scaled)
    got[3] += 0.02  # now beyond it, in sub-batches too
    assert not runs_match(run(ref), run(got), [batch], ["y"], max_output_bytes=1).ok


# Peak RSS above the bare interpreter's, per weight byte: the 1.5x goal (docs/memory.md); fp16 is held to
# 2.5x: ONNX Runtime's CPU session of a float16 model holds float32 copies of its weights (1x).
# Measured at 0.5 GB (compile, above idle): cleanup 1.2, prune 1.2, int8 1.2, int4 1.35, fp16 2.0,
# smoothquant,int8 and int8(mode=static) 1.2-1.45.
BOUNDS = {"cleanup": 1.5, "prune(ratio=0.3)": 1.5, "int8": 1.5, "int4": 1.5, "smoothquant,int8": 1.5,
          "int8(mode=static)": 1.5, "fp16": 2.5}
CALIBRATED = ("smoothquant,int8", "int8(mode=static)")


@pytest.mark.exhaustive
@pytest.mark.slow
@pytest.mark.parametrize("passes", list(BOUNDS))
def test_peak_rss_of_compile_on_a_1gb_external_data_model(tmp_path, passes):
    weights = build_mlp(tmp_path / "mlp.onnx", 1_000_000_000)
    calib = None
    if passes in CALIBRATED:
        calib = tmp_path / "calib.npz"
        np.savez(calib, x=np.random.default_rng(2).standard_normal((16, 2048), dtype=np.float32))
    idle = measure("idle", "none")
    got = measure(str(tmp_path / "mlp.onnx"), passes, calibration=None if calib is None else str(calib))
    assert "error" not in got, got
    assert got["peak_rss_compile"] - idle["peak_rss"] <= BOUNDS[passes] * weights, (got, idle, weights)


# ---------------------------------------------------------------- weights kept out of memory


def _resident(path) -> int | None:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps); None without /proc."""
    import os

    try:
        text = open("/proc/self/smaps").read()
    except OSError:
        return None
    total, inside = 0, False
    for line in text.splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and os.path.realpath(fields[5]) == os.path.realpath(path)
        elif inside and fields[:1] == ["Rss:"]:
            total += int(fields[1]) * 1024
    return total


def test_released_keeps_mapped_weights_out_of_the_resident_set(tmp_path):
    import time

    from slimc.backends import pages

    path = tmp_path / "mlp.onnx"  # a file of its own: no other mapping of it in this process
    build_mlp(path, 3 * 256 * 256 * 4, hidden=256)
    model = load_onnx(path)
    arrays = [v.const_value.numpy() for v in model.graph.initializers.values()]
    data = str(path) + ".data"
    if _resident(data) is None:
        pytest.skip("no /proc/self/smaps")
    total = sum(float(a.sum()) for a in arrays)  # every page read: resident
    assert _resident(data) >= 3 * 256 * 256 * 4
    with pages.released(arrays, interval_s=0.005) as thread:
        deadline = time.monotonic() + 5
        while thread.rounds < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert thread.rounds >= 2
        assert _resident(data) == 0  # released in the background while the block runs
        again = sum(float(a.sum()) for a in arrays)  # read back from the page cache, intact
    assert again == total and _resident(data) == 0  # released once more on exit
    with pages.released([np.ones(4)]) as none:  # no memory-mapped array: no thread
        assert none is None


def test_large_latency_runs_suspend_the_stage_sessions_and_rebuild_them(mlp, monkeypatch):
    """Above LEAN_BYTES the stage sessions are dropped while latency sessions are built one at a time, and
    rebuilt for fidelity: the receipt has both measurements, as below it."""
    import slimc

    monkeypatch.setattr(ort_backend, "LEAN_BYTES", 0)
    suspended = []
    from slimc import api

    original = api.Stage.suspend

    def spy(self):
        suspended.append(self.label)
        return original(self)

    monkeypatch.setattr(api.Stage, "suspend", spy)
    result = slimc.compile(str(mlp), "int8(force=true)")  # a tiny model: int8 may not be faster
    assert sorted(suspended) == ["input", "int8"]
    assert result.receipt.latency.get("one_at_a_time") and "error" not in result.receipt.latency
    assert "error" not in result.receipt.fidelity and result.receipt.fidelity["metrics"]


@pytest.fixture(scope="module")
def inline_mlp(mlp, tmp_path_factory):
    """``mlp`` with its weights inside the .onnx file."""
    import onnx

    path = tmp_path_factory.mktemp("inline") / "mlp.onnx"
    onnx.save(onnx.load(str(mlp)), str(path))
    return path


def _weights(model) -> dict[str, np.ndarray]:
    return {name: np.array(v.const_value.numpy()) for name, v in model.graph.initializers.items()}


def test_fp16_converts_memory_mapped_weights_one_at_a_time_with_the_converters_bytes(mlp, inline_mlp, monkeypatch):
    """The weightless conversion gives the bytes ORT's converter gives on the whole proto, from external
    data (lazily, in chunks) and from inline weights alike."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from slimc.passes.quant import fp16_weights
    from slimc.passes.quant.fp16 import Fp16
    from slimc.pipeline import PassContext

    monkeypatch.setattr(fp16_weights, "CHUNK_ELEMENTS", 1000)  # several chunks per weight
    reference = convert_float_to_float16(onnx.load(str(mlp)), keep_io_types=True)
    want = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    for path in (mlp, inline_mlp):
        model = load_onnx(path)
        Fp16().apply(model, PassContext())
        got = _weights(model)
        assert set(got) == set(want)
        for name, array in want.items():
            assert got[name].dtype == array.dtype and np.array_equal(got[name].view(np.uint16), array.view(np.uint16)), name
        lazy = [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
        assert bool(lazy) == (path == mlp)  # memory-mapped sources are converted when read, never held


def test_smoothquant_scales_memory_mapped_weights_lazily_with_the_same_bytes(mlp, inline_mlp):
    import onnx_ir as ir

    from slimc import data
    from slimc.passes.quant.smoothquant import SmoothQuant
    from slimc.pipeline import PassContext

    results = []
    for path in (mlp, inline_mlp):
        model = load_onnx(path)
        rng = np.random.default_rng(3)
        calib = data.Dataset([{"x": (rng.standard_normal((4, 256)) * np.linspace(0.1, 20, 256)).astype(np.float32)}
                              for _ in range(2)], source="test")
        report = SmoothQuant().apply(model, PassContext(calibration=calib))
        assert report.details["groups_smoothed"], report.left_alone
        lazy = [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
        assert bool(lazy) == (path == mlp)
        results.append(_weights(model))
    external, inline = results
    assert set(external) == set(inline)
    for name in inline:
        assert np.array_equal(external[name], inline[name]), name


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_rtn_in_column_chunks_gives_the_same_codes(monkeypatch, symmetric):
    from slimc.passes.quant import gptq

    w = np.random.default_rng(4).standard_normal((100, 37)).astype(np.float32)  # K not a multiple of the block
    whole = gptq.rtn(w, 32, symmetric)
    monkeypatch.setattr(gptq, "RTN_CHUNK_ELEMENTS", 300)  # 2 columns at a time
    chunked = gptq.rtn(w, 32, symmetric)
    for a, b in ((whole.codes, chunked.codes), (whole.scales, chunked.scales), (whole.zero_points, chunked.zero_points)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
