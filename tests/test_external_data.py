"""Models whose weights live in external data files compile through every pass.

The input is saved the way users save it (``onnx.save_model(..., save_as_external_data=True)``)
and given as a relative path, an absolute path, a bare name in the current folder, or an
``onnx_ir.Model`` from ``ir.load``. The result is checked against the input through ORT (exact
passes) and re-loaded from its own files. A model over 2 GB (the protobuf limit) is built
with memory-mapped writes in the slow suite.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimc
from slimc.onnx_io import data_file_pattern, external_files, load_onnx

RNG = np.random.default_rng(0)


def mlp(dims=(32, 64, 64, 16)) -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        inits += [numpy_helper.from_array((RNG.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(RNG.standard_normal(b).astype(np.float32) * 0.1, f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        x = f"a{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dims[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dims[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_external(proto: onnx.ModelProto, path) -> None:
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)


def outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture()
def external_model(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "model.onnx"
    save_external(mlp(), path)
    return path


@pytest.mark.parametrize("how", ["absolute", "relative", "current-folder", "ir.load"])
def test_cleanup_compiles_external_data_given_any_way(external_model, tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path if how == "relative" else external_model.parent)
    source = {"absolute": external_model, "relative": "in/model.onnx", "current-folder": "model.onnx",
              "ir.load": ir.load(str(external_model))}[how]
    result = slimc.compile(source, "cleanup", measure_latency=False)
    assert result.loaded.source_paths[-1] == external_model.with_name("model.onnx.data").absolute()
    out = tmp_path / "out.onnx"
    result.save(out)
    x = RNG.standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_allclose(outputs(out, x), outputs(external_model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("passes", ["prune(ratio=0.25)", "int8(mode=dynamic, force=true)", "int4(force=true)",
                                    "fp16", "sparsify", "smoothquant,int8(mode=static, force=true)"])
def test_every_pass_compiles_external_data(external_model, tmp_path, passes):
    data = tmp_path / "calib.npz"
    np.savez(data, x=RNG.standard_normal((8, 32)).astype(np.float32))
    before = external_model.with_name("model.onnx.data").read_bytes()
    result = slimc.compile(external_model, passes, calibration=data, measure_latency=False)
    for external in (False, True):  # the result saved inline and as external data reloads and runs
        out = tmp_path / f"out-{external}.onnx"
        slimc.onnx_io.save_onnx(result.model, out, external_data=external, protect=result.loaded.source_paths)
        assert bool(external_files(load_onnx(out))) == external
        assert outputs(out, np.ones((2, 32), np.float32)).shape == (2, 16)
    assert external_model.with_name("model.onnx.data").read_bytes() == before  # the input is untouched


def test_result_with_external_data_names_its_own_file(external_model, tmp_path):
    result = slimc.compile(external_model, "cleanup", measure_latency=False)
    written = slimc.onnx_io.save_onnx(result.model, tmp_path / "big.onnx", external_data=True)
    assert data_file_pattern(written[0]).fullmatch(written[1].name)
    assert external_files(load_onnx(written[0])) == (written[1].absolute(),)


def test_single_file_targets_inline_an_external_data_work_file(external_model, tmp_path, monkeypatch):
    """ort-mobile (like tflite and ncnn) converts one ONNX file: a work file that keeps its weights in
    external data is inlined for it, and a model over the protobuf limit is refused with a reason."""
    from slimc.backends import targets
    from slimc.errors import TargetError

    result = slimc.compile(external_model, "cleanup", target="ort-mobile", measure_latency=False)
    assert result.exported.report["fidelity_vs_input"]["max_abs_error"] < 1e-4
    target, copy = targets.get("ort-mobile"), tmp_path / "one.onnx"
    assert target.single_file(external_model, copy) == copy and not external_files(load_onnx(copy))
    np.testing.assert_array_equal(outputs(copy, np.ones((2, 32), np.float32)),
                                  outputs(external_model, np.ones((2, 32), np.float32)))
    monkeypatch.setattr(slimc.onnx_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    with pytest.raises(TargetError, match="exceed 1.8 GB"):
        target.single_file(external_model, tmp_path / "two.onnx")


# ---- over the 2 GB protobuf limit (slow) ---------------------------------------------------------


def big_external_model(folder, layers: int = 9, width: int = 8192):
    """``layers`` square MatMul+Relu layers, fp32, written straight to a memory-mapped data file
    (~2.4 GB with the defaults): no copy of the weights is ever held in memory."""
    data_name = "big.onnx.data"
    shape = (width, width)
    nbytes = width * width * 4
    total = np.memmap(folder / data_name, dtype=np.float32, mode="w+", shape=(layers * width * width,))
    rng = np.random.default_rng(0)
    scale = np.float32(1 / np.sqrt(width))
    for i in range(layers):
        for row in range(0, width, 1024):  # 32 MB at a time
            start = i * width * width + row * width
            total[start:start + 1024 * width] = rng.standard_normal(1024 * width, dtype=np.float32) * scale
    total.flush()
    del total
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        t = onnx.TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", data_name), ("offset", str(i * nbytes)), ("length", str(nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    path = folder / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("passes", ["cleanup", "int8(mode=dynamic, force=true)"])
def test_external_data_over_2gb(tmp_path, passes):
    path = big_external_model(tmp_path)
    assert path.with_name("big.onnx.data").stat().st_size > 2**31
    result = slimc.compile(path, passes, measure_latency=False)
    written = result.save(tmp_path / "out.onnx")
    if passes == "cleanup":  # still over the limit: the result keeps external data, in its own file
        assert len(written) == 2 and data_file_pattern(written[0]).fullmatch(written[1].name)
    x = np.ones((1, 8192), np.float32)
    got, ref = outputs(written[0], x), outputs(path, x)
    cosine = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref) + 1e-30))
    assert cosine > 0.99
