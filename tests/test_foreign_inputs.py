"""Models from other converters: Constant weights, dims they leave open, configuration inputs, data they need.

Built models (tests/foreign_models.py) reproduce each habit; the real files that silero-vad and
rapidocr-onnxruntime ship (the `dev` extra) are used where installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from foreign_models import (
    CONSTANT_CNN_PARAMS, byte_classifier, constant_cnn, constant_mlp, looped_mlp, reshape_by_input, sized_detector,
    sized_detector_macs, streaming_vad, string_matcher,
)

import slimc
from slimc import data, frontends
from slimc.analysis import percent_fewer
from slimc.errors import DataError
from slimc.tools.cli import main


def _save(model: onnx.ModelProto, tmp_path: Path, name: str = "model") -> Path:
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def _run(model, feed: dict) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString()).run(None, feed)


# ---------------------------------------------------------------- Constant weights


def test_constant_weights_become_initializers_and_count(tmp_path):
    original = constant_cnn()
    loaded = frontends.load(_save(original, tmp_path))
    assert not [n for n in loaded.model.graph if n.op_type == "Constant"]
    assert slimc.analysis.count_params(loaded.model)[0] == CONSTANT_CNN_PARAMS
    assert any("Constant nodes" in note for note in loaded.notes)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(loaded.model, {"x": x})[0], _run(original, {"x": x})[0])


def test_constant_weights_are_pruned_and_quantized(tmp_path):
    pruned = slimc.compile(_save(constant_cnn(), tmp_path), "prune(ratio=0.5)", measure_latency=False)
    report = pruned.receipt.passes[0]
    assert report.details["params_after"] < report.details["params_before"] == CONSTANT_CNN_PARAMS
    assert "100.0% fewer" not in report.summary
    quantized = slimc.compile(_save(constant_mlp(), tmp_path, "mlp"), "int8(mode=dynamic, force=true)", measure_latency=False)
    ops = {n.op_type for n in quantized.model.graph}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops


def test_percent_fewer_states_no_ratio_without_parameters():
    assert percent_fewer(0, 0) == "no parameters before"
    assert percent_fewer(200, 50) == "75.0% fewer"


def test_subgraph_constants_count_as_parameters(tmp_path):
    loaded = frontends.load(_save(streaming_vad(samples=8, hidden=4), tmp_path))
    # two branch weights of [8, 1] and their scales (bodies keep their Constants), plus the state's [4, 4]
    assert slimc.analysis.count_params(loaded.model)[0] == 8 + 1 + 8 + 1 + 16


# ---------------------------------------------------------------- shapes the model leaves open


def test_negative_dims_are_dynamic_and_inspect_does_not_crash(tmp_path, capsys):
    model = constant_cnn(batch=-1)
    path = _save(model, tmp_path)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"][0]["shape"][0] is None and info["params"] == CONSTANT_CNN_PARAMS
    assert info["macs_inputs"]["x"] == [1, 3, 224, 224]  # unstated image size: the documented default


def test_metadata_image_size_sizes_synthetic_inputs_and_macs(tmp_path):
    result = slimc.compile(_save(sized_detector(32), tmp_path), "cleanup", measure_latency=False)
    source = result.receipt.fidelity["data"]
    assert "images float32 [2,3,32,32] normal(0, 1), height x width 32x32 from metadata imgsz" in source
    assert result.receipt.before["macs"] == sized_detector_macs(32)
    assert result.receipt.before["macs_unresolved_nodes"] == 0


def test_image_folder_is_resized_to_the_metadata_size(tmp_path):
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    loaded = frontends.load(_save(sized_detector(32), tmp_path))
    ds = data.load(tmp_path / "photos", loaded)
    assert ds[0]["images"].shape == (3, 3, 32, 32) and "at 32x32" in ds.source


def test_static_shapes_size_synthetic_inputs(tmp_path):
    path = _save(sized_detector(32, metadata=False), tmp_path)
    with pytest.raises(DataError, match="on the synthetic inputs.*224x224.*--eval"):
        slimc.compile(path, "cleanup", measure_latency=False)
    result = slimc.compile(path, "cleanup", measure_latency=False, static_shapes="images=1x3x32x32")
    assert "images float32 [2,3,32,32]" in result.receipt.fidelity["data"]
    assert "from --static-shapes 1x3x32x32" in result.receipt.fidelity["data"]


# ---------------------------------------------------------------- values the model implies


def test_byte_input_indexing_a_constant_table_gets_plausible_ids(tmp_path):
    loaded = frontends.load(_save(byte_classifier(), tmp_path))
    (spec,) = loaded.inputs
    assert (spec.kind, spec.high) == ("tokens", 256)
    values = np.concatenate([b["bytes"].ravel() for b in data.synthetic(loaded.inputs, 3)])
    assert values.min() >= 0 and values.max() < 256 and len(np.unique(values)) > 10


def test_compared_scalar_takes_a_constant_the_model_tests_it_against(tmp_path):
    loaded = frontends.load(_save(streaming_vad(), tmp_path))
    specs = {s.name: s for s in loaded.inputs}
    assert specs["sr"].values == (16000, 8000)  # the second Equal sits inside the else branch
    assert (specs["input"].batch_axis, specs["state"].batch_axis, specs["sr"].batch_axis) == (0, 1, None)
    ds = data.synthetic(loaded.inputs, 2)
    assert all(int(b["sr"]) == 16000 and b["state"].shape == (2, 2, 4) for b in ds)
    assert "sr int64 [] = 16000 (a value the model compares it with; it also takes 8000)" in ds.source


def test_parameter_and_string_inputs_ask_for_data():
    from slimc.model import infer_input_specs

    with pytest.raises(DataError, match=r"input 'shape': it sets the target shape of a Reshape node.*--eval"):
        data.synthetic(infer_input_specs(ir.serde.deserialize_model(reshape_by_input())))
    with pytest.raises(DataError, match=r"input 'words': it is a string tensor.*--eval"):
        data.synthetic(infer_input_specs(ir.serde.deserialize_model(string_matcher())))
    silero_like = ir.serde.deserialize_model(streaming_vad())
    for node in list(silero_like.graph.all_nodes()):  # sr tested against nothing: its valid values are unknown
        if node.op_type == "Equal":
            node.replace_input_with(0, node.inputs[1])
    with pytest.raises(DataError, match=r"input 'sr': it is a 0-d integer.*--eval"):
        data.synthetic(infer_input_specs(silero_like))


# ---------------------------------------------------------------- data for such models


def _vad_data(n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"input": rng.standard_normal((n, 8)).astype(np.float32), "sr": np.array(16000),
            "state": rng.standard_normal((2, n, 4)).astype(np.float32)}


@pytest.mark.parametrize("batch_name", ["batch", None])
def test_npz_batches_split_along_each_inputs_batch_axis(tmp_path, batch_name):
    np.savez(tmp_path / "vad.npz", **_vad_data(5))
    loaded = frontends.load(_save(streaming_vad(batch_name=batch_name), tmp_path))
    ds = data.load(tmp_path / "vad.npz", loaded, batch_size=2)
    assert [b["input"].shape[0] for b in ds] == [2, 2, 1]
    assert [b["state"].shape for b in ds] == [(2, 2, 4), (2, 2, 4), (2, 1, 4)]
    assert all(b["sr"].shape == () for b in ds)
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in ds], axis=1), _vad_data(5)["state"])


def test_batch_axes_that_disagree_are_a_data_error(tmp_path):
    loaded = frontends.load(_save(streaming_vad(), tmp_path))
    bad = {**_vad_data(4), "state": np.zeros((2, 3, 4), np.float32)}
    with pytest.raises(DataError, match=r"batch axes: \{'input': 4, 'state': 3\} \(axes \{'input': 0, 'state': 1\}\)"):
        data.load(bad, loaded)


@pytest.mark.parametrize("passes", ["cleanup", "int8(mode=dynamic, force=true)", "fp16"])
def test_if_model_runs_every_pass_with_its_data(tmp_path, passes):
    np.savez(tmp_path / "vad.npz", **_vad_data(4))
    result = slimc.compile(_save(streaming_vad(), tmp_path), passes, evaluation=str(tmp_path / "vad.npz"),
                           measure_latency=False)
    out = tmp_path / "out.onnx"
    result.save(out)
    onnx.checker.check_model(str(out), full_check=True)
    assert sum(n.op_type == "If" for n in onnx.load(out).graph.node) == 1
    session = ort.InferenceSession(str(out))
    feed = {**_vad_data(3), "sr": np.array(8000)}  # the other branch, at another batch size
    feed = {i.name: feed[i.name].astype(np.float16 if "16" in i.type else feed[i.name].dtype)
            for i in session.get_inputs()}
    assert session.run(None, feed)[0].shape == (3, 1)


@pytest.mark.parametrize("passes", ["cleanup", "int8(mode=dynamic, force=true)", "fp16"])
def test_loop_body_reading_a_lifted_outer_weight_survives_every_pass(tmp_path, passes):
    original = looped_mlp()
    result = slimc.compile(_save(original, tmp_path), passes, measure_latency=False)
    out = tmp_path / "out.onnx"
    result.save(out)
    onnx.checker.check_model(str(out), full_check=True)
    assert [n.op_type for n in onnx.load(out).graph.node if n.op_type not in ("Cast",)] == ["Loop"]
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(ort.InferenceSession(str(out)).run(None, {"x": x})[0], _run(original, {"x": x})[0],
                               atol=2e-2)


def test_if_model_without_data_says_which_inputs_it_invented(tmp_path):
    # the synthetic sample rate is a compared constant, so the original runs and cleanup succeeds
    result = slimc.compile(_save(streaming_vad(), tmp_path), "cleanup", measure_latency=False)
    assert "sr int64 [] = 16000" in result.receipt.fidelity["data"]


def test_dict_of_arrays_without_a_shared_batch_dim_is_one_example(tmp_path):
    example = {"x": np.arange(6, dtype=np.float32).reshape(3, 2), "shape": np.array([2, 3])}
    result = slimc.compile(_save(reshape_by_input(), tmp_path), "cleanup", evaluation=example, measure_latency=False)
    assert result.receipt.fidelity["batches"] == 1 and "1 example" in result.receipt.fidelity["data"]


def test_string_inputs_are_accepted(tmp_path):
    words = np.array(["yes", "no", "yes", "maybe"])
    result = slimc.compile(_save(string_matcher(), tmp_path), "cleanup", evaluation={"words": words},
                           measure_latency=False)
    np.testing.assert_array_equal(_run(result.model, {"words": words.astype(object)})[0], [1, 0, 1, 0])
    with pytest.raises(DataError, match="the model takes strings"):
        data.load({"words": np.array([1.0, 2.0])}, frontends.load(_save(string_matcher(), tmp_path, "s2")))


# ---------------------------------------------------------------- files PyPI packages ship


def _shipped(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it (and its deps)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (scripts/install.sh dev installs it)")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        pytest.skip(f"{package} ships no {relative} in this version")
    return path


def test_silero_vad_runs_with_npz_and_asks_for_data_without(tmp_path):
    path = _shipped("silero_vad", "data/silero_vad.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "audio.npz", input=rng.uniform(-0.5, 0.5, (4, 512)).astype(np.float32), sr=np.array(16000),
             state=np.zeros((2, 4, 128), np.float32))
    # fp16 converts the weights inside the If branches; the npz feeds state [2, 4, 128] split along axis 1
    result = slimc.compile(path, "fp16", evaluation=str(tmp_path / "audio.npz"), measure_latency=False)
    assert result.receipt.fidelity["metrics"]["cosine"] > 0.99
    assert result.receipt.before["params"] > 300_000  # weights inside the If branches count
    assert result.receipt.after["weight_bytes"] < 0.6 * result.receipt.before["weight_bytes"]
    with pytest.raises(DataError, match="on the synthetic inputs.*sr int64 \\[\\] = 16000.*--eval"):
        slimc.compile(path, "cleanup", measure_latency=False)


def test_paddle_ocr_classifier_reports_prunes_its_weights(tmp_path):
    path = _shipped("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    result = slimc.compile(path, "prune(ratio=0.3)", measure_latency=False)
    before, after = result.receipt.before, result.receipt.after
    assert before["params"] > 100_000 and after["params"] < 0.9 * before["params"]
    assert after["macs"] < before["macs"] and before["macs_inputs"]["x"] == [1, 3, 224, 224]


def test_a_0d_integer_compared_with_a_threshold_takes_the_threshold(tmp_path):
    """``If(mode > 0)``: the graph handles the threshold itself, so synthetic data may feed it."""
    from onnx import TensorProto, helper

    branch = lambda name, k: helper.make_graph(  # noqa: E731
        [helper.make_node("Mul", ["x", f"{name}_k"], [f"{name}_y"])], name, [],
        [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.float32(k), f"{name}_k")])
    nodes = [helper.make_node("Greater", ["mode", "zero"], ["on"]),
             helper.make_node("If", ["on"], ["y"], then_branch=branch("a", 2.0), else_branch=branch("b", 3.0))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                                           helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              [onnx.numpy_helper.from_array(np.array(0, np.int64), "zero")])
    path = tmp_path / "threshold.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = slimc.compile(str(path), "cleanup", measure_latency=False)
    assert "mode int64 [] = 0" in result.receipt.fidelity["data"]


@pytest.mark.parametrize("spec", ["cleanup", "fp16"])
def test_shapes_inferred_on_load_keep_sequence_values_sequences(tmp_path, spec):
    """A file without value_info whose graph holds a sequence (SplitToSequence -> SequenceAt, as the
    unoptimised dynamo export of GPT-2 does): inferred types must not turn it into a tensor, on load
    or in fp16's own inference (which made it a float16 tensor the checker rejected)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("SplitToSequence", ["r"], ["parts"], axis=1),
             helper.make_node("SequenceAt", ["parts", "one"], ["p1"]), helper.make_node("Neg", ["p1"], ["a"]),
             helper.make_node("Abs", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
                              [onnx.numpy_helper.from_array(np.array(1, np.int64), "one")])
    path = tmp_path / "seq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = slimc.compile(str(path), spec, measure_latency=False)
    result.save(tmp_path / "out.onnx")
    ort.InferenceSession(str(tmp_path / "out.onnx"))


@pytest.mark.parametrize("axis,opset", [(-1, 17), (2, 13)])
def test_ort_simplified_layer_norm_in_the_onnx_domain_is_rewritten_on_load(tmp_path, axis, opset):
    """ORT's optimizer writes RMS norms as SimplifiedLayerNormalization in the ONNX domain (Llama through
    optimize_model): ORT runs it, the checker refused every pass at load. It becomes standard ops, same outputs."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["n"], axis=axis, epsilon=1e-6),
             helper.make_node("MatMul", ["n", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
                              [onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "scale"),
                               onnx.numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")])
    path = tmp_path / "rms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    x = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32) * 3}
    expected = ort.InferenceSession(str(path)).run(None, x)[0]
    result = slimc.compile(str(path), "cleanup", measure_latency=False)
    assert any("SimplifiedLayerNormalization" in note for note in result.loaded.notes)
    result.save(tmp_path / "out.onnx")
    saved = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(saved, full_check=True)
    assert "SimplifiedLayerNormalization" not in {n.op_type for n in saved.graph.node}
    np.testing.assert_allclose(ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, x)[0], expected, rtol=1e-5, atol=1e-5)
