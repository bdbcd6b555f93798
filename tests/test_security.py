"""Loading a model never runs code from it, never reads a file outside it.

Each hostile file here carries a payload that creates a marker file when it runs; the test
asserts both the typed refusal (or a clean load) and that the marker never appeared:

- `.pt2` archives: a real ``torch.export.save`` archive with its sample-inputs pickle replaced
  (torch.export.load unpickles it with ``weights_only=False``), a pickled weight, a symbolic
  shape string (sympy evaluates it), an op target outside ``torch.ops``;
- pickles under every suffix slimc might be handed, ``.onnx`` included;
- external-data ``location`` leaving the model's folder;
- a Hugging Face folder whose config asks for custom code (``auto_map``).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimc import frontends
from slimc.errors import ModelLoadError, UnsafeModelError


class Payload:
    """Unpickling this creates ``marker``: proof that the file's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


# ---- .pt2 archives ------------------------------------------------------------------------------


@pytest.fixture()
def pt2(tmp_path):
    """A real torch.export.save archive of a small MLP with a dynamic batch, and its module."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    program = torch.export.export(module, (torch.randn(4, 8),), dynamic_shapes=({0: torch.export.Dim("b")},))
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, path)
    return path, module


def rewrite_archive(src: Path, dst: Path, change) -> None:
    """Copy a zip archive, passing each member's (name, bytes) through ``change``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info.filename)))


def run_onnx(loaded, x: np.ndarray) -> np.ndarray:
    import onnx_ir as ir
    import onnxruntime as ort

    session = ort.InferenceSession(ir.serde.serialize_model(loaded.model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {loaded.input_names()[0]: x})[0]


def test_pt2_sample_inputs_pickle_never_runs_and_the_program_loads(pt2, tmp_path):
    path, module = pt2
    marker = tmp_path / "sample-inputs-ran"
    evil = tmp_path / "evil.pt2"
    rewrite_archive(path, evil, lambda name, data: payload(marker) if name.endswith("sample_inputs/model.pt") else data)
    loaded = frontends.load(evil)
    assert not marker.exists()
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    import torch

    np.testing.assert_allclose(run_onnx(loaded, x), module(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_pt2_pickled_weight_is_refused_unread(pt2, tmp_path):
    path, _ = pt2
    marker = tmp_path / "weight-ran"
    evil = tmp_path / "evil.pt2"

    def change(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            return payload(marker)
        return data

    rewrite_archive(path, evil, change)
    with pytest.raises(UnsafeModelError, match="is a pickle"):
        frontends.load(evil)
    assert not marker.exists()


def _edit_program(path: Path, dst: Path, edit) -> None:
    def change(name, data):
        if name.endswith("models/model.json"):
            return json.dumps(edit(json.loads(data))).encode()
        return data

    rewrite_archive(path, dst, change)


def _nodes(program: dict) -> list[dict]:
    return program["graph_module"]["graph"]["nodes"]


def test_pt2_symbolic_shape_string_is_not_evaluated(pt2, tmp_path):
    path, _ = pt2
    marker = tmp_path / "sympy-ran"
    evil = tmp_path / "evil.pt2"
    code = f"__import__('pathlib').Path('{marker}').touch()"

    def edit(program):
        text = json.dumps(program)
        assert '"expr_str"' in text  # the dynamic batch is a symbolic shape: the payload has a place to go
        return json.loads(text.replace('"expr_str": "', '"expr_str": "' + code.replace('"', '\\"') + ' + ', 1))

    _edit_program(path, evil, edit)
    with pytest.raises(UnsafeModelError, match="not sympy arithmetic"):
        frontends.load(evil)
    assert not marker.exists()


def test_pt2_call_outside_torch_ops_is_refused(pt2, tmp_path):
    path, _ = pt2
    evil = tmp_path / "evil.pt2"

    def edit(program):
        relu = next(n for n in _nodes(program) if n["target"] == "torch.ops.aten.relu.default")
        relu["target"] = "torch.os.system"  # resolves by getattr under torch: os.system
        return program

    _edit_program(path, evil, edit)
    # torch's own verifier refuses it while deserialising; slimc checks every target again after.
    with pytest.raises(ModelLoadError, match="not an allowed operator|not a PyTorch operator"):
        frontends.load(evil)


def test_pt2_guards_code_and_imports_are_never_used(pt2, tmp_path):
    path, _ = pt2
    evil = tmp_path / "evil.pt2"
    _edit_program(path, evil, lambda p: {**p, "graph_module": {**p["graph_module"], "note": {"__enum__": True}}})
    with pytest.raises(UnsafeModelError, match="import"):
        frontends.load(evil)


# ---- pickles under any name ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl", ".ckpt"])
def test_pickles_are_refused_by_suffix(tmp_path, suffix):
    marker = tmp_path / "ran"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(payload(marker))
    with pytest.raises(UnsafeModelError, match="arbitrary Python code"):
        frontends.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.onnx", "model.pt2"])
def test_pickle_under_a_model_suffix_is_not_read_as_a_pickle(tmp_path, name):
    marker = tmp_path / "ran"
    path = tmp_path / name
    path.write_bytes(payload(marker))
    if name.endswith(".pt2"):
        pytest.importorskip("torch")
    with pytest.raises(ModelLoadError):
        frontends.load(path)
    assert not marker.exists()


# ---- external data outside the model's folder --------------------------------------------------


def _mlp_with_location(folder: Path, location: str) -> Path:
    w = np.ones((4, 3), np.float32)
    tensor = numpy_helper.from_array(w, "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [tensor])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("kind", ["parent", "absolute", "nested-escape"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, kind):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(12, dtype=np.float32).tobytes())  # readable: only the location rule refuses it
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    location = {"parent": "../secret.bin", "absolute": str(secret), "nested-escape": "sub/../../secret.bin"}[kind]
    path = _mlp_with_location(folder, location)
    with pytest.raises(ModelLoadError, match="not a path inside the model's folder"):
        frontends.load(path)


def test_external_data_in_a_subfolder_is_fine(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(np.ones((4, 3), np.float32).tobytes())
    loaded = frontends.load(_mlp_with_location(tmp_path, "weights/w.bin"))
    assert (tmp_path / "weights" / "w.bin").absolute() in loaded.source_paths


# ---- Hugging Face folders asking for custom code ----------------------------------------------


def test_hf_folder_with_custom_code_never_runs_it(tmp_path):
    pytest.importorskip("transformers")
    safetensors = pytest.importorskip("safetensors.numpy")
    marker = tmp_path / "custom-code-ran"
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "slimc_evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    }))
    (folder / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    (folder / "configuration_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    safetensors.save_file({"w": np.ones((2, 2), np.float32)}, str(folder / "model.safetensors"))
    with pytest.raises(UnsafeModelError, match="never runs a model folder's code"):
        frontends.load(folder, cache_dir=tmp_path / "cache")  # and no "run the custom code? [y/N]" prompt
    assert not marker.exists()
    assert "modeling_evil" not in str(os.listdir(tmp_path))  # nothing copied into a modules cache here either
