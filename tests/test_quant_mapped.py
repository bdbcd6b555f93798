"""Memory on external-data models: quantizers read weights memory-mapped, stages map what passes made.

- `int8` drives ONNX Runtime's quantizers on a weightless proto (`slimc.passes.quant.mapped`):
  no external weight is ever loaded into memory whole, and the result is the one ORT's own
  `quantize_dynamic` builds from the fully loaded model (same quantized weights, same outputs).
- After a pass, the weights it made in memory (pruned arrays) become memory maps of the stage
  file they were written to; a result's model stays usable after its work folder is gone.
The peak-RSS bounds themselves are measured in tests/test_memory.py (slow suite).
"""

from __future__ import annotations

import gc

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import slimc
from slimc import data, onnx_io
from slimc.model import InputSpec
from slimc.onnx_io import load_onnx, save_onnx
from slimc.passes.quant import mapped
from slimc.passes.quant.int8 import Int8, needs_reduced_range
from slimc.pipeline import PassContext
from slimc.tools.bench_memory import build_mlp

HIDDEN = 256


@pytest.fixture()
def mlp(tmp_path):
    path = tmp_path / "in" / "mlp.onnx"
    path.parent.mkdir()
    build_mlp(path, 3 * HIDDEN * HIDDEN * 4, hidden=HIDDEN)  # 3 MatMul weights of 256 KB, external data
    return path


def _calibration():
    return data.synthetic([InputSpec("x", np.dtype(np.float32), ("batch", HIDDEN))], n_batches=2)


def _no_weight_loads(monkeypatch):
    """Fail on any load of an external weight into memory (a proto or an inline copy)."""
    real = onnx.external_data_helper.load_external_data_for_tensor

    def guarded(tensor, base_dir):
        if tensor.name.startswith("w"):
            raise AssertionError(f"weight {tensor.name} loaded into memory")
        return real(tensor, base_dir)

    def inline(tensor):
        raise AssertionError(f"weight {tensor.name} copied into memory")

    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_tensor", guarded)
    monkeypatch.setattr(onnx_io, "_in_memory", inline)


def test_dynamic_int8_reads_weights_mapped_and_matches_ort(mlp, tmp_path, monkeypatch):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce_range = needs_reduced_range()
    reference = tmp_path / "ort.onnx"
    quantize_dynamic(mlp, reference, per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    ours = load_onnx(mlp)
    calib = _calibration()
    to_array = onnx.numpy_helper.to_array
    with monkeypatch.context() as patched:
        _no_weight_loads(patched)
        Int8(mode="dynamic", force=True, reduce_range=reduce_range).apply(ours, PassContext(calibration=calib))
    assert onnx.numpy_helper.to_array is to_array  # the swap is undone
    got = {v.name: v.const_value.numpy() for v in ours.graph.initializers.values()}
    want = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(reference)).graph.initializer}
    quantized = [n for n in want if n.endswith("_quantized")]
    assert len(quantized) == 3
    for name in quantized + [n for n in want if n.endswith(("_scale", "_zero_point"))]:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    ours_path = tmp_path / "ours.onnx"
    save_onnx(ours, ours_path)
    x = {"x": np.random.default_rng(0).standard_normal((4, HIDDEN)).astype(np.float32)}
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, x)[0] for p in (ours_path, reference)]
    np.testing.assert_array_equal(run[0], run[1])


def test_quantized_ir_holds_no_proto_and_keeps_input_weights(mlp):
    """Unchanged float weights (the biases) stay the input's memory-mapped tensors; quantized ones own
    their arrays (no tensor refers into the quantizer's proto, which would keep every weight alive)."""
    model = load_onnx(mlp)
    biases = {v.name: v.const_value for v in model.graph.initializers.values() if v.name.startswith("b")}
    Int8(mode="dynamic", force=True).apply(model, PassContext(calibration=_calibration()))
    kinds = {v.name: v.const_value for v in model.graph.initializers.values()}
    assert all(kinds[name] is tensor for name, tensor in biases.items())
    assert not any(isinstance(t, ir.TensorProtoTensor) for t in kinds.values())


def test_weightless_proto_round_trip(mlp, tmp_path):
    model = load_onnx(mlp)
    proto = mapped.write_float(model, tmp_path / "float.onnx")
    assert all(not t.HasField("raw_data") for t in proto.graph.initializer if t.name.startswith("w"))
    with mapped.mapped_reads(tmp_path):
        array = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w1"))
    assert isinstance(array, np.memmap)
    np.testing.assert_array_equal(array, model.graph.initializers["w1"].const_value.numpy())


def test_pruned_weights_become_maps_of_the_stage_file_and_outlive_the_work_folder(mlp, tmp_path, monkeypatch):
    from slimc import api

    monkeypatch.setattr(api, "STAGE_EXTERNAL_BYTES", 1 << 16)
    monkeypatch.setattr(api.ort_backend, "SHARE_MIN_BYTES", 4096)  # the 128 KB pruned weights, not the biases
    result = slimc.compile(str(mlp), "prune(ratio=0.5)", measure_latency=False)
    weights = {v.name: v.const_value for v in result.model.graph.initializers.values() if v.name.startswith("w")}
    assert weights and all(isinstance(t, ir.ExternalTensor) for t in weights.values())
    assert all(t.shape[1] == HIDDEN // 2 for n, t in weights.items() if n != "w2")
    expected = {n: t.numpy().copy() for n, t in weights.items()}
    model, work = result.model, result._workdir.name
    del result, weights
    gc.collect()  # the result's work folder goes with it
    import os

    assert not os.path.exists(work)
    out = tmp_path / "out.onnx"
    save_onnx(model, out)
    saved = load_onnx(out)
    for name, array in expected.items():
        np.testing.assert_array_equal(saved.graph.initializers[name].const_value.numpy(), array)


def test_a_result_of_an_external_data_input_is_written_with_external_data(mlp, tmp_path):
    """Streamed to a data file, not serialized into one protobuf (a copy of every weight in memory)."""
    result = slimc.compile(str(mlp), "cleanup", measure_latency=False)
    written = result.save(tmp_path / "out.onnx")
    assert len(written) == 2 and onnx_io.external_files(load_onnx(written[0])) == (written[1].absolute(),)
