"""Reading bad files gives typed errors; writing is atomic and supports external data."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_models import tiny_cnn

from slimc.errors import ModelLoadError, OutputPathError, UnsafeModelError
from slimc.frontends import load
from slimc.onnx_io import check_output_path, data_file_pattern, load_onnx, save_onnx


@pytest.fixture()
def cnn_path(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(), path)
    return path


def test_truncated_file(cnn_path, tmp_path):
    data = cnn_path.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or not ONNX"):
        load_onnx(bad)


def test_not_a_model(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are my notes, not a model\n" * 20)
    with pytest.raises(ModelLoadError):
        load_onnx(bad)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_onnx(tmp_path / "absent.onnx")
    with pytest.raises(ModelLoadError, match="folder"):
        load_onnx(tmp_path)


def test_external_data_round_trip_and_missing_data(tmp_path):
    model = ir.serde.deserialize_model(tiny_cnn())
    written = save_onnx(model, tmp_path / "ext.onnx", external_data=True)
    assert written[0].name == "ext.onnx" and data_file_pattern(written[0]).fullmatch(written[1].name)
    loaded = load_onnx(tmp_path / "ext.onnx")
    np.testing.assert_array_equal(
        loaded.graph.initializers["conv.w"].const_value.numpy(), model.graph.initializers["conv.w"].const_value.numpy()
    )
    os.remove(written[1])
    with pytest.raises(ModelLoadError, match=f"external data files that are missing: {written[1].name}"):
        load_onnx(tmp_path / "ext.onnx")


def test_external_data_loaded_from_another_cwd(tmp_path, monkeypatch):
    save_onnx(ir.serde.deserialize_model(tiny_cnn()), tmp_path / "ext.onnx", external_data=True)
    monkeypatch.chdir("/")
    loaded = load_onnx(tmp_path / "ext.onnx")
    assert loaded.graph.initializers["fc.w"].const_value.numpy().shape == (5, 4)


def test_output_path_checks(cnn_path, tmp_path):
    with pytest.raises(OutputPathError, match="overwrite the input"):
        check_output_path(cnn_path, (cnn_path,))
    with pytest.raises(OutputPathError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.onnx")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if os.access(readonly, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_path(readonly / "out.onnx")
    finally:
        readonly.chmod(0o700)


def test_unwritable_folder_as_any_user(tmp_path, monkeypatch):
    # As root every folder is writable, so simulate the permission check's answer.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputPathError, match="not writable"):
        check_output_path(tmp_path / "out.onnx")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = ir.serde.deserialize_model(tiny_cnn())

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", boom)
    with pytest.raises(OutputPathError, match="No space left"):
        save_onnx(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_pickled_pt_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeModelError, match="arbitrary Python code.*torch.export.save"):
        load(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "model.xyz"
    path.write_text("x")
    with pytest.raises(ModelLoadError, match="unknown model format"):
        load(path)


def test_large_models_switch_to_external_data_automatically(tmp_path, monkeypatch):
    # The real threshold is ~1.8 GB; lower it so a tiny model takes the same path.
    import onnxruntime as ort

    import slimc.onnx_io as onnx_io

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 100)
    model = ir.serde.deserialize_model(tiny_cnn())
    written = save_onnx(model, tmp_path / "big.onnx")
    assert written[0].name == "big.onnx" and data_file_pattern(written[0]).fullmatch(written[1].name)
    session = ort.InferenceSession(str(tmp_path / "big.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.zeros((1, 3, 8, 8), np.float32)})[0]
    assert out.shape == (1, 5)


def test_first_line_of_library_errors():
    from slimc.errors import first_line

    assert first_line(RuntimeError("\n  boom: bad node\nstack...\n")) == "boom: bad node"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(RuntimeError("x" * 50), limit=10) == "x" * 10 + "..."
