"""Front ends: PyTorch modules, Hugging Face folders and GGUF files, .pt2 archives -> IR.

Every export is checked the same way: ONNX Runtime runs it at a batch size (and sequence
length) the export never saw, and must match PyTorch to float tolerance. The real pretrained
models (MiniLM, EfficientNet-Lite0, SmolLM2) are marked slow: ``pytest -m slow``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import zoo  # noqa: E402

from slimc import frontends, kvcache  # noqa: E402
from slimc.errors import ExportError, ModelLoadError, UnsafeModelError  # noqa: E402
from slimc.frontends import huggingface  # noqa: E402

OUTPUT_NAMES = {"bert": ["last_hidden_state", "pooler_output"]}


def run_onnx(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {k: v.numpy() if hasattr(v, "numpy") else v for k, v in feeds.items() if k in names})


def torch_outputs(module, feeds: dict) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(**feeds)
    return [t.numpy() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_close(got: list[np.ndarray], ref: list[np.ndarray]) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))


# ---- nn.Module: the zoo -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_export_matches_torch_at_new_shapes(zoo_model, name):
    z = zoo_model(name)
    loaded = z.loaded
    assert loaded.task == z.task
    assert [v.name for v in loaded.model.graph.outputs] == OUTPUT_NAMES.get(name, ["logits"])
    for spec in loaded.inputs:
        assert spec.shape[0] == "batch", spec
        if name in zoo.TOKEN_MODELS:
            assert spec.shape == ("batch", "seq"), spec
    if name in zoo.TOKEN_MODELS:
        ids = next(s for s in loaded.inputs if s.name == "input_ids")
        assert (ids.kind, ids.high) == ("tokens", zoo.VOCAB)
    feeds = zoo.shifted_inputs(z.example, batch=3, seq=7)
    assert_close(run_onnx(loaded.model, feeds), torch_outputs(z.module, feeds))


def test_static_export_has_no_symbolic_dims():
    module, example, _ = zoo.convnext()
    loaded = frontends.load(module, example, dynamic=False)
    assert loaded.inputs[0].shape == (2, 3, 32, 32)
    assert loaded.model.graph.outputs[0].shape == ir.Shape([2, 10])


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)
        self.drop = torch.nn.Dropout(0.9)

    def forward(self, x, bias):
        return {"scores": self.drop(self.fc(x)) + bias, "features": x * 2}


def test_module_names_eval_mode_and_size_one_batch():
    torch.manual_seed(0)
    module = _Head().train()
    loaded = frontends.load(module, (torch.randn(1, 8), torch.randn(1, 3)))  # batch 1: must stay dynamic
    assert module.training, "the caller's train/eval mode must be restored"
    assert [s.name for s in loaded.inputs] == ["x", "bias"]
    assert [v.name for v in loaded.model.graph.outputs] == ["scores", "features"]
    assert loaded.inputs[0].shape == ("batch", 8) and loaded.task == "classifier"
    feeds = {"x": torch.randn(5, 8), "bias": torch.randn(5, 3)}
    module.eval()  # dropout 0.9 would make any train-mode export fail this comparison
    assert_close(run_onnx(loaded.model, feeds), torch_outputs(module, feeds))


def test_positional_inputs_take_given_names_and_tuple_outputs_are_numbered():
    class Pair(torch.nn.Module):
        def forward(self, a):
            return a + 1, a.sum(-1)

    loaded = frontends.load(Pair(), torch.randn(2, 4), input_names=["pixels"])
    assert loaded.input_names() == ["pixels"]
    assert [v.name for v in loaded.model.graph.outputs] == ["output_0", "output_1"]
    assert [v.shape for v in loaded.model.graph.outputs] == [ir.Shape(["batch", 4]), ir.Shape(["batch"])]


def test_dim_the_model_fixes_is_static_and_noted():
    class FixedBatch(torch.nn.Module):
        def forward(self, x):
            return x.reshape(2, -1) * 2

    loaded = frontends.load(FixedBatch(), torch.randn(2, 8))
    # torch.onnx writes such a dim as a symbol named "2"; slimc must make it static.
    assert loaded.inputs[0].shape == (2, 8)
    assert any("exported static" in note for note in loaded.notes)


def test_export_failures_are_typed():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x - 1

    with pytest.raises(ExportError, match="Hint"):
        frontends.load(Branchy(), torch.randn(2, 4))
    with pytest.raises(ModelLoadError, match="example inputs"):
        frontends.load(torch.nn.Linear(2, 2))


# ---- Hugging Face folders ---------------------------------------------------------------------


def test_hf_folder_loads_matches_and_hits_the_cache(tmp_path):
    module, example, _ = zoo.bert()
    folder = tmp_path / "bert"
    module.save_pretrained(folder, safe_serialization=True)
    cache = tmp_path / "cache"
    before = huggingface.CACHE_STATS.exports, huggingface.CACHE_STATS.hits
    first = frontends.load(folder, cache_dir=cache)
    second = frontends.load(folder, cache_dir=cache)
    assert (huggingface.CACHE_STATS.exports, huggingface.CACHE_STATS.hits) == (before[0] + 1, before[1] + 1)
    assert len(list(cache.iterdir())) == 1, "one complete entry, no temporary leftovers"
    for loaded in (first, second):
        assert loaded.task == "encoder" and loaded.tokenizer is None  # no tokenizer files saved
        assert [v.name for v in loaded.model.graph.outputs] == ["last_hidden_state"]
        assert loaded.source_paths == (folder,)
        ids = next(s for s in loaded.inputs if s.name == "input_ids")
        assert (ids.kind, ids.high, ids.shape) == ("tokens", zoo.VOCAB, ("batch", "seq"))
    feeds = zoo.shifted_inputs(example, batch=3, seq=7)
    ref = torch_outputs(module, feeds)[:1]
    assert_close(run_onnx(first.model, feeds), ref)
    assert_close(run_onnx(second.model, feeds), ref)


def test_hf_image_folder_takes_preprocessing_and_env_cache_dir(tmp_path, monkeypatch):
    module, example, _ = zoo.convnext()
    folder = tmp_path / "convnext"
    module.save_pretrained(folder, safe_serialization=True)
    pre = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "size": {"shortest_edge": 32}}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(tmp_path / "env-cache"))
    loaded = frontends.load(folder)
    assert loaded.task == "image-classifier" and loaded.tokenizer is None
    assert loaded.image_preprocess == {"size": (32, 32), "mean": [0.5] * 3, "std": [0.25] * 3}
    assert loaded.inputs[0].shape == ("batch", 3, 32, 32) and loaded.inputs[0].kind == "image"
    assert (tmp_path / "env-cache").is_dir() and any((tmp_path / "env-cache").iterdir())
    feeds = zoo.shifted_inputs(example, batch=3)
    assert_close(run_onnx(loaded.model, feeds), torch_outputs(module, feeds))


def test_cache_key_follows_files_and_flags(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"x")
    source = huggingface._source(folder)
    key = huggingface._cache_key(source, dynamic=True)
    assert key == huggingface._cache_key(source, dynamic=True)
    assert key != huggingface._cache_key(source, dynamic=False)
    assert key != huggingface._cache_key(source, dynamic=True, kv_cache=False)  # the plain form is another export
    weights.write_bytes(b"xy")  # size (and mtime) change: the export is stale
    assert key != huggingface._cache_key(source, dynamic=True)


@pytest.mark.parametrize(
    ("files", "error", "message"),
    [
        ({"model.safetensors": b""}, ModelLoadError, "no config.json"),
        ({"config.json": b"{not json", "model.safetensors": b""}, ModelLoadError, "cannot read the model config"),
        ({"config.json": b'{"model_type": "bert"}'}, ModelLoadError, "no weights"),
        ({"config.json": b'{"model_type": "bert"}', "pytorch_model.bin": b"x"}, UnsafeModelError, "pickled"),
        ({"config.json": b'{"model_type": "bert"}', "model.safetensors": b"junk"}, ModelLoadError, "cannot load"),
    ],
)
def test_bad_hf_folders_raise_model_load_errors(tmp_path, files, error, message):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(error, match=message):
        frontends.load(tmp_path, cache_dir=tmp_path / "cache")


# ---- .pt2 and pickles ---------------------------------------------------------------------------


def test_pt2_archive_keeps_its_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    batch = torch.export.Dim("b")
    program = torch.export.export(module, (torch.randn(4, 8),), dynamic_shapes=({0: batch},))
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, path)
    loaded = frontends.load(path)
    assert loaded.inputs[0].shape == ("batch", 8) and loaded.source_paths == (path,)
    x = torch.randn(7, 8)
    assert_close(run_onnx(loaded.model, {loaded.input_names()[0]: x}), [module(x).detach().numpy()])


def test_corrupt_pt2_and_pickles_are_refused(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ModelLoadError, match="not a readable torch.export archive"):
        frontends.load(bad)
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    with pytest.raises(UnsafeModelError, match="arbitrary"):
        frontends.load(pickled)


# ---- real pretrained models (slow) -------------------------------------------------------------


@pytest.mark.slow
def test_minilm_folder_matches_pytorch(tmp_path):
    import transformers

    from slimc.tools import models

    path = models.minilm_path()
    loaded = frontends.load(path, cache_dir=tmp_path)
    assert loaded.task == "encoder" and loaded.tokenizer is not None
    ids = next(s for s in loaded.inputs if s.name == "input_ids")
    assert (ids.high, ids.shape) == (30522, ("batch", "seq"))
    texts = ["a cat sat on the mat", "model compression keeps accuracy while cutting latency", "hi"]
    feeds = dict(loaded.tokenizer(texts, padding=True, return_tensors="pt"))
    reference = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    assert_close(run_onnx(loaded.model, feeds), torch_outputs(reference, feeds)[:1])


def _imagenet_batch(names: list[str], size: int = 224):
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    images = [resize(getattr(skimage_data, n)(), (size, size), anti_aliasing=True).astype(np.float32) for n in names]
    return torch.from_numpy(np.stack([((im - mean) / std).transpose(2, 0, 1) for im in images]))


@pytest.mark.slow
def test_efficientnet_lite0_matches_and_classifies_real_photos():
    from slimc.tools import models

    module = models.efficientnet_lite0()
    loaded = frontends.load(module, torch.randn(2, 3, 224, 224))
    assert loaded.task == "image-classifier" and loaded.inputs[0].shape == ("batch", 3, 224, 224)
    pixels = _imagenet_batch(["chelsea", "coffee", "rocket"])  # batch 3: not the export's 2
    (got,) = run_onnx(loaded.model, {loaded.input_names()[0]: pixels})
    with torch.no_grad():
        ref = module(pixels).numpy()
    assert_close([got], [ref])
    top1 = got.argmax(-1)
    assert 281 <= top1[0] <= 285, f"chelsea (a cat) classified as {top1[0]}"
    assert top1[1] in (504, 967, 968), f"coffee classified as {top1[1]}"


@pytest.mark.slow
def test_smollm2_gguf_matches_pytorch_and_caches(tmp_path):
    import transformers

    from slimc.tools import models

    path = models.smollm2_gguf()
    loaded = frontends.load(path, cache_dir=tmp_path)
    assert loaded.task == "causal-lm" and any("dequantized" in note for note in loaded.notes)
    ids = next(s for s in loaded.inputs if s.name == "input_ids")
    assert (ids.high, ids.shape) == (49152, ("batch", "seq"))
    prompts = ["The capital of France is", "Once upon a time, there was a little"]
    feeds = dict(loaded.tokenizer(prompts, padding=True, return_tensors="pt"))
    # the KV-cache graph (the default) as a full forward: an empty past, positions from the mask
    positions = kvcache.position_ids(feeds["attention_mask"].numpy())
    spec = kvcache.cache_spec(loaded.model)
    got = run_onnx(loaded.model, {**feeds, "position_ids": positions, **spec.empty_past(len(prompts))})[0]
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = reference(**feeds, position_ids=torch.from_numpy(positions), use_cache=False).logits.numpy()
    assert_close([got], [ref])
    last = int(feeds["attention_mask"][0].sum()) - 1  # right padding: the prompt's last real token
    assert got[0, last].argmax() == ref[0, last].argmax()

    hits = huggingface.CACHE_STATS.hits
    again = frontends.load(path, cache_dir=tmp_path)
    assert huggingface.CACHE_STATS.hits == hits + 1
    assert again.tokenizer(prompts[0])["input_ids"] == loaded.tokenizer(prompts[0])["input_ids"]
