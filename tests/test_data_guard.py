"""Non-finite data and non-finite results (issue 16, items 5 and 7): NaN/inf in calibration or
evaluation data is a `DataError` naming the input and the sample; a pass that turns finite outputs
into NaN fails verification (lossy passes too) and nothing is written; images Pillow refuses to
decode (decompression bombs, corrupt files) are a `DataError`, not a Pillow traceback."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_models import tiny_cnn

import slimc
from slimc import data, frontends
from slimc.errors import DataError, PassFailedError, VerificationError
from slimc.pipeline import Pass, PassReport
from slimc.tools.cli import main


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    onnx.save(tiny_cnn(junk=False), path)
    return path


@pytest.fixture(scope="module")
def loaded(cnn_path):
    return frontends.load(cnn_path)


def _images(n=12, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("bad, kind", [(np.nan, "NaN"), (np.inf, "+inf"), (-np.inf, "-inf")])
def test_non_finite_arrays_name_the_input_and_the_sample(loaded, bad, kind):
    x = _images()
    x[10, 2, 1, 1] = bad  # batch 1 (batches of 8), sample 10 counted over the whole array
    with pytest.raises(DataError) as info:
        data.load({"x": x}, loaded, role="calibration")
    message = str(info.value)
    assert "calibration data" in message and "input 'x'" in message
    assert f"sample 10 holds {kind}" in message and "(10, 2, 1, 1)" in message


def test_a_list_of_batches_counts_samples_across_batches(loaded):
    batches = [{"x": _images(3, seed=1)}, {"x": _images(3, seed=2)}]
    batches[1]["x"][2, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"batch 1, input 'x': sample 5 holds NaN"):
        data.load(batches, loaded, role="evaluation")


def test_lazily_built_batches_are_checked_as_each_is_built(loaded):
    good, bad = {"x": _images(4, seed=3)}, {"x": _images(4, seed=4)}
    bad["x"][1, 0, 0, 0] = np.inf
    source = data.Dataset(data._LazyBatches([good, bad], lambda b: b), "stream")
    dataset = data.load(source, loaded, role="calibration")  # the first batch is fine
    with pytest.raises(DataError, match=r"stream, batch 1, input 'x': sample \(in this batch\) 1 holds \+inf"):
        list(dataset)


def test_image_arrays_with_nan_are_refused(loaded):
    images = [np.full((8, 8, 3), 0.5, np.float32) for _ in range(3)]
    images[2][0, 0, 0] = np.nan  # a NaN pixel would otherwise become an arbitrary uint8
    with pytest.raises(DataError, match="NaN or inf"):
        list(data.load(data.Images(images, "arrays"), loaded, role="calibration"))


def test_nan_calibration_fails_before_any_pass_and_writes_nothing(cnn_path, tmp_path, capsys):
    x = _images(16)
    x[3, 0, 0, 0] = np.nan
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    out = tmp_path / "out.onnx"
    rc = main([str(cnn_path), "--passes", "prune(ratio=0.25, importance=wanda, compensate=bias)", "--calib",
               str(calib), "-o", str(out), "--no-latency"])
    err = capsys.readouterr().err
    assert rc == 2 and "sample 3 holds NaN" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(DataError, match="sample 3 holds NaN"):
        slimc.compile(cnn_path, "int8(mode=static, force=true)", calibration={"x": x}, measure_latency=False)


@dataclasses.dataclass
class _PoisonWeights(Pass):
    """A lossy test pass that writes NaN into the last weight of the graph (a broken pass)."""

    name = "poison"
    exact = False

    def apply(self, model: ir.Model, ctx) -> PassReport:
        name, value = list(model.graph.initializers.items())[-1]
        array = value.const_value.numpy().copy()
        array.flat[0] = np.nan
        value.const_value = ir.tensor(array, name=name)
        return PassReport(self.name, True, "poisoned one weight")


@pytest.mark.parametrize("verify", [True, False])
def test_a_lossy_pass_that_makes_outputs_nan_fails_verification(cnn_path, verify):
    with pytest.raises(PassFailedError, match=r"pass 'poison' \(after cleanup\) made output 'logits' NaN or inf"):
        slimc.compile(cnn_path, ["cleanup", _PoisonWeights()], verify=verify, measure_latency=False)


def test_non_finite_outputs_introduced_on_evaluation_data_are_counted_and_refused():
    from slimc.evaluate import Fidelity
    from slimc.fidelity_guard import check

    fidelity = Fidelity("generic")
    ref = np.ones((2, 3), np.float32)
    ref_nan = ref.copy()
    ref_nan[0, 0] = np.nan  # the reference's own NaN is not the candidate's fault
    cand = ref_nan.copy()
    cand[1, 2] = np.inf
    fidelity.update([ref_nan], [cand])
    metrics = fidelity.result()
    assert metrics["nonfinite"] == 2 and metrics["nonfinite_introduced"] == 1
    with pytest.raises(VerificationError, match="NaN or inf on 1 output values"):
        check({"metrics": metrics, "data": "test data"}, "generic")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` RGB pixels, with one tiny IDAT chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_png_is_a_data_error(loaded, tmp_path, cnn_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(20000, 20000))
    with pytest.raises(DataError, match="more pixels than Pillow decodes safely"):
        data.load(bomb, loaded)
    rc = main([str(cnn_path), "--passes", "int8(mode=static)", "--calib", str(bomb), "--no-latency"])
    err = capsys.readouterr().err
    assert rc == 2 and "bomb.png" in err and "Traceback" not in err


@pytest.mark.parametrize("name, content", [
    ("broken.png", _png_header(16, 16)),  # a valid header, too little pixel data: Pillow's OSError
    ("maxval0.ppm", b"P6\n4 4\n0\n" + b"\x00" * 48),  # Pillow raises ValueError for this header
], ids=["truncated-png", "ppm-maxval-0"])
def test_an_undecodable_image_is_a_data_error(loaded, tmp_path, name, content):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / name).write_bytes(content)
    with pytest.raises(DataError, match=f"cannot read image .*{name}"):
        data.load(folder, loaded)
