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


# Peak RSS above the bare interpreter's, per weight byte: the 1.5x goal for every pass (docs/memory.md).
# Measured at 0.5 GB: cleanup 1.22, prune 1.19, int8 1.52, int4 1.45 (before this round: 1.22, 1.69,
# 6.23, 1.57); int8 at 2.4 GB 1.30. The interpreter and ORT cost ~0.1 GB more than idle once sessions exist.
BOUNDS = {"cleanup": 1.5, "prune(ratio=0.3)": 1.5, "int8": 1.5, "int4": 1.5}


@pytest.mark.exhaustive
@pytest.mark.slow
@pytest.mark.parametrize("passes", list(BOUNDS))
def test_peak_rss_of_compile_on_a_1gb_external_data_model(tmp_path, passes):
    weights = build_mlp(tmp_path / "mlp.onnx", 1_000_000_000)
    idle = measure("idle", "none")
    got = measure(str(tmp_path / "mlp.onnx"), passes)
    assert "error" not in got, got
    assert got["peak_rss_compile"] - idle["peak_rss"] <= BOUNDS[passes] * weights, (got, idle, weights)
