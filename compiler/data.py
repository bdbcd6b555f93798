"""Calibration and evaluation data: files or tensors -> validated batches for the model's inputs.

A batch is ``dict[input name -> np.ndarray]``. Sources:

- text file: tokenized with the model's tokenizer, cut into non-overlapping windows of
  ``seq_len`` tokens (the tail shorter than a window is dropped), ``batch_size`` windows a batch;
  ``attention_mask`` ones, ``token_type_ids`` zeros, ``position_ids`` 0..seq_len-1;
- folder of images: shorter side resized to the target, center-cropped to H x W, scaled to
  [0, 1], normalised with mean/std (the model's, else ImageNet's), NCHW float32;
- ``.npz``: arrays named after the inputs (or ``arr_0``, ``arr_1``, ... in input order),
  split along axis 0;
- Python: a `Dataset`, a dict of arrays/tensors, a list of such dicts, a list of tuples
  (positional), or one array/tensor for a single-input model.

Every batch is checked against the model's `InputSpec`s; a mismatch is a `DataError` naming
the input, what it expects and what it got.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from slimc.errors import DataError
from slimc.model import InputSpec, LoadedModel

Batch = dict[str, np.ndarray]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class Dataset:
    """A re-iterable list of batches with a description of where it came from."""

    def __init__(self, batches: list[Batch], source: str, synthetic: bool = False):
        self.batches = batches
        self.source = source
        self.synthetic = synthetic

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def samples(self) -> int:
        return sum(next(iter(b.values())).shape[0] for b in self.batches if b)

    def split(self, n_holdout: int) -> tuple[Dataset, Dataset]:
        """(first part, last ``n_holdout`` batches): calibrate on one, evaluate on the other."""
        if not 0 < n_holdout < len(self.batches):
            raise DataError(f"cannot hold out {n_holdout} of {len(self.batches)} batches from {self.source}.")
        head, tail = self.batches[:-n_holdout], self.batches[-n_holdout:]
        return Dataset(head, f"{self.source} (first {len(head)} batches)"), Dataset(tail, f"{self.source} (last {len(tail)} batches, held out)")


def synthetic(inputs: list[InputSpec], n_batches: int = 4, seed: int = 0, sizes: dict[str, int] | None = None) -> Dataset:
    """Valid random inputs: token ids below the vocabulary, masks of ones, normal floats."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        batch = {}
        for spec in inputs:
            shape = spec.concrete_shape(sizes)
            batch[spec.name] = _synthetic_value(spec, shape, rng)
        batches.append(batch)
    shapes = ", ".join(f"{s.name}{list(s.concrete_shape(sizes))}" for s in inputs)
    return Dataset(batches, f"{n_batches} synthetic batches ({shapes}, seed {seed})", synthetic=True)


def _synthetic_value(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if spec.kind == "tokens":
        return rng.integers(0, spec.high or 100, size=shape).astype(spec.dtype)
    if spec.kind == "attention_mask":
        return np.ones(shape, spec.dtype)
    if spec.kind == "position_ids":
        return np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype).copy()
    if spec.kind in ("token_type_ids", "int"):
        return np.zeros(shape, spec.dtype)
    if spec.kind == "bool":
        return np.ones(shape, np.bool_)
    return rng.standard_normal(shape).astype(spec.dtype)


def load(
    source: Any,
    loaded: LoadedModel,
    *,
    seq_len: int = 128,
    batch_size: int | None = None,
    max_batches: int | None = None,
    role: str = "calibration",
) -> Dataset:
    """Turn ``source`` into validated batches for ``loaded``'s inputs (see module docstring)."""
    if isinstance(source, Dataset):
        dataset = source
    elif isinstance(source, (str, os.PathLike)):
        dataset = _from_path(Path(source), loaded, seq_len, batch_size)
    else:
        dataset = _from_python(source, loaded.inputs, batch_size)
    if max_batches is not None:
        dataset = Dataset(dataset.batches[:max_batches], dataset.source, dataset.synthetic)
    if not len(dataset):
        raise DataError(f"the {role} data {dataset.source or source!r} is empty: give at least one sample.")
    dataset.batches = [validate(batch, loaded.inputs, role) for batch in dataset.batches]
    return dataset


def _from_path(path: Path, loaded: LoadedModel, seq_len: int, batch_size: int | None) -> Dataset:
    if not path.exists():
        raise DataError(f"data path {path} does not exist.")
    if path.is_dir():
        return images_from_folder(path, loaded, batch_size or 8)
    if path.suffix == ".npz":
        return _from_npz(path, loaded.inputs, batch_size)
    return text_windows(path.read_text(encoding="utf-8", errors="replace"), loaded, seq_len, batch_size or 4, str(path))


def text_windows(text: str, loaded: LoadedModel, seq_len: int, batch_size: int = 4, name: str = "text") -> Dataset:
    """Tokenize ``text`` and cut it into non-overlapping ``seq_len`` windows."""
    if loaded.tokenizer is None:
        raise DataError(
            f"{name} is text, but this model has no tokenizer (it was not loaded from a Hugging Face folder or "
            "GGUF file). Give the token ids as an .npz file instead."
        )
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}.")
    ids = np.asarray(loaded.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"{name} has {len(ids)} tokens, fewer than one window of {seq_len}: give more text or a smaller --seq-len.")
    windows = ids[: n * seq_len].reshape(n, seq_len)
    batches = [_token_batch(windows[i : i + batch_size], loaded.inputs) for i in range(0, n, batch_size)]
    return Dataset(batches, f"{name}: {n} windows of {seq_len} tokens")


def _token_batch(ids: np.ndarray, inputs: list[InputSpec]) -> Batch:
    batch: Batch = {}
    for spec in inputs:
        if spec.kind == "tokens":
            batch[spec.name] = ids
        elif spec.kind == "attention_mask":
            batch[spec.name] = np.ones_like(ids)
        elif spec.kind == "position_ids":
            batch[spec.name] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        elif spec.kind == "token_type_ids":
            batch[spec.name] = np.zeros_like(ids)
        else:
            raise DataError(f"cannot fill input '{spec.name}' ({spec.kind}) from text: give an .npz with every input.")
    return batch


def images_from_folder(folder: Path, loaded: LoadedModel, batch_size: int = 8) -> Dataset:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    from PIL import Image

    arrays = []
    for path in files:
        try:
            with Image.open(path) as img:
                arrays.append(np.asarray(img.convert("RGB")))
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
    return images_to_dataset(arrays, loaded, batch_size, f"{folder}: {len(files)} images")


def images_to_dataset(images: list[np.ndarray], loaded: LoadedModel, batch_size: int = 8, name: str = "images") -> Dataset:
    """HWC uint8 images -> normalised NCHW batches at the model's input size."""
    image_inputs = [s for s in loaded.inputs if s.kind == "image"]
    if len(image_inputs) != 1:
        raise DataError(f"images given, but the model has {len(image_inputs)} image inputs (needs exactly one 4-D float input).")
    spec = image_inputs[0]
    pre = loaded.image_preprocess or {}
    size = pre.get("size") or tuple(d if isinstance(d, int) else 224 for d in spec.shape[2:4])
    mean = np.asarray(pre.get("mean", IMAGENET_MEAN), np.float32)[:, None, None]
    std = np.asarray(pre.get("std", IMAGENET_STD), np.float32)[:, None, None]
    chw = np.stack([(_resize_crop(img, size).transpose(2, 0, 1) / 255.0 - mean) / std for img in images]).astype(spec.dtype)
    batches = [{spec.name: chw[i : i + batch_size]} for i in range(0, len(chw), batch_size)]
    return Dataset(batches, name)


def _resize_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    h, w = size
    scale = max(h / img.height, w / img.width)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BILINEAR)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)), np.float32)


def _from_npz(path: Path, inputs: list[InputSpec], batch_size: int | None) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from None
    if all(k.startswith("arr_") for k in arrays) and arrays:
        arrays = {spec.name: arrays[f"arr_{i}"] for i, spec in enumerate(inputs) if f"arr_{i}" in arrays}
    dataset = _split_arrays(arrays, batch_size or 8)
    dataset.source = f"{path}: {dataset.source}"
    return dataset


def _split_arrays(arrays: dict[str, np.ndarray], batch_size: int) -> Dataset:
    lengths = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"inputs have different sample counts along axis 0: {lengths}.")
    n = next(iter(lengths.values()), 0)
    batches = [{k: v[i : i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]
    return Dataset(batches, f"{n} samples")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _from_python(source: Any, inputs: list[InputSpec], batch_size: int | None) -> Dataset:
    names = [s.name for s in inputs]
    if isinstance(source, dict):
        return _split_arrays({k: _to_numpy(v) for k, v in source.items()}, batch_size or 8)
    if hasattr(source, "shape"):
        if len(names) != 1:
            raise DataError(f"one array given, but the model has {len(names)} inputs ({', '.join(names)}): give a dict.")
        return _split_arrays({names[0]: _to_numpy(source)}, batch_size or 8)
    if isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        batches = []
        for item in source:
            if isinstance(item, dict):
                batches.append({k: _to_numpy(v) for k, v in item.items()})
            elif isinstance(item, (tuple, list)):
                batches.append({name: _to_numpy(v) for name, v in zip(names, item)})
            else:
                batches.append({names[0]: _to_numpy(item)} if len(names) == 1 else {})
        return Dataset(batches, f"{len(batches)} batches given in Python")
    raise DataError(f"cannot use a {type(source).__name__} as data: give a path, a dict of arrays or a list of batches.")


def validate(batch: Batch, inputs: list[InputSpec], role: str = "data") -> Batch:
    """Check names, ranks, static sizes, dtypes and token ranges; cast safe integer/float widths."""
    expected = {s.name for s in inputs}
    missing, extra = sorted(expected - set(batch)), sorted(set(batch) - expected)
    if missing or extra:
        raise DataError(
            f"{role} data does not match the model's inputs: missing {missing or 'none'}, unexpected {extra or 'none'}. "
            f"The model takes: {', '.join(f'{s.name}{list(s.shape)}' for s in inputs)}."
        )
    out = {}
    for spec in inputs:
        out[spec.name] = _validate_one(np.asarray(batch[spec.name]), spec, role)
    return out


def _validate_one(array: np.ndarray, spec: InputSpec, role: str) -> np.ndarray:
    where = f"{role} input '{spec.name}'"
    if array.ndim != len(spec.shape):
        raise DataError(f"{where}: expected rank {len(spec.shape)} {list(spec.shape)}, got shape {list(array.shape)}.")
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
        if isinstance(want, int) and want != got:
            raise DataError(f"{where}: axis {axis} must be {want} (model shape {list(spec.shape)}), got shape {list(array.shape)}.")
    want_int = np.issubdtype(spec.dtype, np.integer)
    if want_int and not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise DataError(f"{where}: expects integers ({spec.dtype}), got {array.dtype}. Token ids must be integers.")
    if np.issubdtype(spec.dtype, np.floating) and not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{where}: expects {spec.dtype}, got {array.dtype}.")
    if spec.kind == "tokens" and spec.high is not None and array.size and (array.max() >= spec.high or array.min() < 0):
        raise DataError(f"{where}: token ids must be in [0, {spec.high}), got [{array.min()}, {array.max()}]. Was the right tokenizer used?")
    return array.astype(spec.dtype, copy=False)
