"""Calibration and evaluation data: files and Python objects turned into batches the model accepts.

A *batch* is ``dict[str, np.ndarray]`` keyed by graph input name; a :class:`Dataset` is a
re-iterable sequence of batches plus a human description of where they came from.

Sources accepted by :func:`load`:

- text file → token ids cut into non-overlapping windows of ``seq_len`` tokens. Window ``i`` of
  the token stream ``t`` is ``prefix + t[i·L : (i+1)·L] + suffix`` with
  ``L = seq_len − |prefix| − |suffix|``, where prefix/suffix are the tokenizer's own special
  tokens ([CLS] … [SEP], <bos>): the model was trained with them, so activations are typical.
  attention_mask = 1, token_type_ids = 0, position_ids = arange(seq_len).
- image folder, image file or :class:`Images` (paths / HWC arrays awaiting the model's own
  preprocessing, e.g. ``slimc.datasets.photo_dataset``) → RGB, scaled by
  ``s = max(H/h, W/w)`` so the shorter side fits, center-cropped to H×W (or stretched when
  ``image_preprocess["resize"] == "stretch"``), ``x = (pixel·scale − mean) / std`` with
  ``scale = 1/255`` unless the mean is given in 0–255 pixel units; NCHW (or the model's NHWC).
- ``.npz`` / ``.npy`` / dict of arrays / one array → split into batches along each input's batch
  axis (`InputSpec.batch_axis`: ``state [2, batch, 128]`` splits along axis 1); 0-d arrays and
  inputs without a batch axis go whole into every batch; arrays that are one example of a model
  with no dynamic batch axis (``theta [2, 2, 3]`` with ``size [4]``) are one batch.
- list (or any iterable) of dicts, tuples (positional) or arrays → one batch each.
- no data → `slimc.data_synthetic.synthetic` (its docstring has the value rules).

A KV-cache graph (`slimc.kvcache`) takes past key/values and position ids that data seldom holds: a
batch without them gets an empty past (length 0, so the graph computes the full forward) and the
positions transformers' ``generate()`` gives its tokens (`slimc.kvcache.position_ids`: ``arange``
under an all-ones mask), before it is checked (`complete_cache_inputs`).

Every batch is checked against the model's :class:`InputSpec`\\ s: names, rank, static dims,
symbolic dims shared between inputs, dtype castability (int32 → int64 is fine, float → int64 is
not; string inputs take str arrays), value ranges (token ids in ``[0, high)``, masks in {0, 1}) and
finiteness (no NaN or inf in float inputs; lazily built batches are checked as each is built). A mismatch is a
:class:`DataError` naming the input, what the model expects and what it got.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimc.errors import DataError
from slimc.model import InputSpec, LoadedModel

Batch = dict[str, np.ndarray]
DEFAULT_BATCH_SIZE = 8
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
TEXT_KINDS = ("tokens", "attention_mask", "token_type_ids", "position_ids")


class Dataset:
    """A re-iterable sequence of batches; ``batches`` may build each batch on access (images)."""

    def __init__(self, batches: Sequence[Batch], source: str, *, synthetic: bool = False):
        self._batches = batches
        self.source = source
        self.synthetic = synthetic

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index: int) -> Batch:
        return self._batches[index]

    def __iter__(self) -> Iterator[Batch]:
        return (self._batches[i] for i in range(len(self._batches)))

    def __repr__(self) -> str:
        return f"Dataset({self.source!r}, {len(self)} batches, synthetic={self.synthetic})"

    def head(self, n: int) -> Dataset:
        """The first ``n`` batches."""
        if n >= len(self):
            return self
        return Dataset(self._batches[:n], f"{self.source}, first {n} batches", synthetic=self.synthetic)

    def split(self, n_holdout: int) -> tuple[Dataset, Dataset]:
        """``(first len−n, last n)`` batches: calibrate on the first, measure fidelity on the rest."""
        if not 0 < n_holdout < len(self):
            raise DataError(
                f"cannot hold out {n_holdout} of {len(self)} batches from {self.source}: both parts "
                "must be non-empty. Pass more data, or separate calibration and evaluation data."
            )
        k = len(self) - n_holdout
        first = Dataset(self._batches[:k], f"{self.source}, batches 1-{k}", synthetic=self.synthetic)
        rest = Dataset(self._batches[k:], f"{self.source}, batches {k + 1}-{len(self)}", synthetic=self.synthetic)
        return first, rest


class _LazyBatches(Sequence):
    """Batches built on access from per-batch items (image paths), so a folder is never all in memory."""

    def __init__(self, items: Sequence[Any], build: Callable[[Any], Batch]):
        self._items, self._build = list(items), build

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return _LazyBatches(self._items[index], self._build)
        return self._build(self._items[index])


# ---------------------------------------------------------------- validation


def _shape_str(shape: Sequence[Any]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _advice(spec: InputSpec) -> str:
    if np.dtype(spec.dtype) == np.dtype(object):
        return f"Pass string arrays of shape {_shape_str(spec.shape)}."
    if spec.kind == "image":
        return "Pass a folder of images (slimc resizes and normalizes them) or arrays of the expected shape."
    if spec.kind in TEXT_KINDS:
        return "Pass a text file (tokenized with the model's tokenizer) or arrays of the expected shape."
    return f"Pass {np.dtype(spec.dtype)} arrays of shape {_shape_str(spec.shape)}."


def _cast(arr: np.ndarray, spec: InputSpec, label: str) -> np.ndarray:
    want = np.dtype(spec.dtype)
    if arr.dtype == want:
        return arr
    ok = bool(np.can_cast(arr.dtype, want, casting="same_kind"))
    if ok and np.issubdtype(want, np.integer) and np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(want)  # a narrowing integer cast is fine only if every value fits
        ok = bool(arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max))
    if want == np.bool_ and np.issubdtype(arr.dtype, np.integer):
        ok = bool(np.isin(arr, (0, 1)).all())  # 0/1 integer masks are a common spelling of bools
    if not ok:
        raise DataError(
            f"{label}: expected dtype {want}, got {arr.dtype}, which cannot be cast without changing "
            f"values. {_advice(spec)}"
        )
    return arr.astype(want)


def _strings(arr: np.ndarray, spec: InputSpec, label: str) -> np.ndarray:
    """A string input's values as the object array ONNX Runtime takes."""
    if arr.dtype.kind in "US" or (arr.dtype == object and all(isinstance(v, (str, bytes)) for v in arr.flat)):
        return arr.astype(object)
    raise DataError(f"{label}: the model takes strings here, got {arr.dtype} values. Pass an array of str.")


def _check_values(arr: np.ndarray, spec: InputSpec, label: str) -> None:
    if arr.size == 0:
        return
    if spec.kind in ("tokens", "token_type_ids") and np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or (spec.high is not None and hi >= spec.high):
            bound = f"[0, {spec.high})" if spec.high is not None else ">= 0"
            raise DataError(
                f"{label}: ids must be in {bound} (the model's embedding has {spec.high} rows), got "
                f"values in [{lo}, {hi}]. Tokenize with the model's own tokenizer, or pass a text file."
            )
    if spec.kind == "attention_mask" and not np.isin(arr, (0, 1)).all():
        raise DataError(f"{label}: an attention mask holds only 0 and 1, got values {np.unique(arr)[:8]}.")


def _check_finite(arr: np.ndarray, label: str, first_sample: int | None) -> None:
    """NaN or inf in data poisons calibration statistics (a NaN mean, a NaN scale) and every metric."""
    if not np.issubdtype(arr.dtype, np.floating) or np.isfinite(arr).all():  # one cheap pass per batch
        return
    bad = np.argwhere(~np.isfinite(arr))[0]
    value = arr[tuple(bad)]
    kind = "NaN" if np.isnan(value) else ("+inf" if value > 0 else "-inf")
    index = [int(i) for i in bad]
    if index and first_sample is not None:
        index[0] += first_sample  # counted over the whole data, as the user wrote it
    which = "sample" if first_sample is not None else "sample (in this batch)"
    raise DataError(
        f"{label}: {which} {index[0] if index else 0} holds {kind} (first at index {tuple(index)}). Calibration "
        "and evaluation data must be finite: drop or fix that sample."
    )


def _check_array(arr: np.ndarray, spec: InputSpec, label: str, dims: dict[str, tuple[int, str]],
                 first_sample: int | None = None) -> np.ndarray:
    expected = _shape_str(spec.shape)
    if np.dtype(spec.dtype) == object:  # an ONNX string tensor: numpy str/bytes or objects that all are
        arr = _strings(arr, spec, label)
    elif arr.dtype == object:
        raise DataError(f"{label}: got ragged or non-numeric data; {_advice(spec)}")
    if arr.ndim != len(spec.shape):
        raise DataError(
            f"{label}: expected rank {len(spec.shape)} {expected}, got shape {arr.shape}. {_advice(spec)}"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, arr.shape)):
        if isinstance(want, int) and want != got:
            raise DataError(
                f"{label}: expected shape {expected}, got {arr.shape} (dim {axis} must be {want}). {_advice(spec)}"
            )
        if isinstance(want, str):  # a symbolic dim shared between inputs must agree across them
            seen, where = dims.setdefault(want, (got, spec.name))
            if seen != got:
                raise DataError(
                    f"{label}: dim {want!r} is {got} here but {seen} in input {where!r}; inputs "
                    "sharing a dim name must agree (e.g. ids and mask of the same length)."
                )
    # An empty array is a valid tensor (empty axes, zero boxes); a batch with no data at all is
    # refused by the loaders (no complete batch).
    if arr.dtype == object:  # a string input, checked above
        return arr
    _check_finite(arr, label, first_sample)  # before the cast: NaN cast to an integer dtype is arbitrary
    arr = _cast(arr, spec, label)
    _check_values(arr, spec, label)
    return arr


def validate_batch(batch: Mapping[str, Any], inputs: Sequence[InputSpec], where: str = "batch",
                   first_sample: int | None = None) -> Batch:
    """Check one batch against the specs; return it with arrays as numpy in the inputs' dtypes.

    ``first_sample``: the index of the batch's first sample in the whole data, so that an error
    (NaN, inf) names the sample as the user counts it; without it the sample is counted in the batch.
    """
    batch = complete_cache_inputs(batch, inputs)
    names = [spec.name for spec in inputs]
    missing = [n for n in names if n not in batch]
    extra = [n for n in batch if n not in names]
    if missing or extra:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise DataError(
            f"{where}: the model takes inputs {names}; got {sorted(batch)} ({', '.join(parts)}). "
            "Key arrays by graph input name, or pass them positionally in this order."
        )
    dims: dict[str, tuple[int, str]] = {}
    checked = {
        spec.name: _check_array(to_numpy(batch[spec.name]), spec, f"{where}, input {spec.name!r}", dims, first_sample)
        for spec in inputs
    }
    # An empty tensor is valid data (no boxes, no axes, an empty string list), but text with no tokens
    # or an image with no pixels is a mistake.
    for spec in inputs:
        if checked[spec.name].size == 0 and spec.kind in (*TEXT_KINDS, "image"):
            raise DataError(f"{where}, input {spec.name!r}: got an empty array of shape {checked[spec.name].shape}. "
                            f"{_advice(spec)}")
    return checked


def complete_cache_inputs(batch: Mapping[str, Any], inputs: Sequence[InputSpec]) -> Mapping[str, Any]:
    """A KV-cache graph's batch with what it left out filled in: empty past tensors, and position ids
    for the last ``seq`` tokens of the attention mask (all ones when the batch has none). Other models'
    batches, and batches without token ids to size them by, are returned as they are."""
    from slimc import kvcache

    if not any(spec.kind == "past_key_values" for spec in inputs):
        return batch
    absent = [spec for spec in inputs if spec.kind in ("past_key_values", "position_ids") and spec.name not in batch]
    tokens = next((spec.name for spec in inputs if spec.kind == "tokens" and spec.name in batch), None)
    if not absent or tokens is None:
        return batch
    ids = to_numpy(batch[tokens])
    if ids.ndim != 2:
        return batch  # the shape check names the problem
    mask = next((to_numpy(batch[s.name]) for s in inputs if s.kind == "attention_mask" and s.name in batch), None)
    out = dict(batch)
    for spec in absent:
        if spec.kind == "position_ids":
            out[spec.name] = kvcache.position_ids(np.ones(ids.shape, np.int64) if mask is None else mask, ids.shape[1])
        else:
            out[spec.name] = np.zeros(spec.concrete_shape({"batch": ids.shape[0]}), spec.dtype)
    return out


def to_numpy(value: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors are detached and moved to the CPU (no torch import)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


# ---------------------------------------------------------------- arrays and objects


def _positional(arrays: Sequence[Any], inputs: Sequence[InputSpec], where: str) -> dict[str, Any]:
    names = [spec.name for spec in inputs]
    if len(arrays) != len(names):
        raise DataError(
            f"{where}: got {len(arrays)} positional arrays but the model takes {len(names)} inputs "
            f"{names}. Pass one array per input in this order, or a dict keyed by input name."
        )
    return dict(zip(names, arrays))


def _is_array(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) or (hasattr(obj, "detach") and hasattr(obj, "shape"))


def _from_object(obj: Any, inputs: Sequence[InputSpec], batch_size: int, where: str) -> Dataset:
    from slimc.data_batching import from_arrays

    if isinstance(obj, Mapping):
        return from_arrays(obj, inputs, batch_size=batch_size, name="dict", where=where)
    if _is_array(obj):
        return from_arrays(_positional([obj], inputs, where), inputs, batch_size=batch_size, name="array", where=where)
    if not isinstance(obj, Iterable):
        raise DataError(
            f"{where}: cannot use a {type(obj).__name__}; pass a path (text file, image folder, .npz), "
            "a dict of arrays, a list of such dicts, a list of tuples, or an array."
        )
    batches, seen = [], 0  # seen: samples before this batch, so an error names the sample as the user counts it
    for i, item in enumerate(obj):  # a generator is consumed once here, so the Dataset re-iterates
        label = f"{where}, batch {i}"
        if isinstance(item, Mapping):
            batches.append(validate_batch(item, inputs, label, first_sample=seen))
        elif _is_array(item) or isinstance(item, (tuple, list)):
            named = _positional([item] if _is_array(item) else item, inputs, label)
            batches.append(validate_batch(named, inputs, label, first_sample=seen))
        else:
            raise DataError(f"{label}: got a {type(item).__name__}; each batch must be a dict, a tuple or an array.")
        first = next(iter(batches[-1].values()), np.zeros(()))
        seen += first.shape[0] if first.ndim else 1
    return Dataset(batches, f"{type(obj).__name__} of {len(batches)} batches")


def _npz(path: Path, inputs: Sequence[InputSpec], batch_size: int, where: str) -> Dataset:
    from slimc.data_batching import from_arrays

    try:
        if path.suffix.lower() == ".npy":
            arrays = _positional([np.load(path, allow_pickle=False)], inputs, f"{where} {path.name}")
        else:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{where} {path}: not a readable numpy file ({exc}). Write it with np.savez.") from exc
    positional = [f"arr_{i}" for i in range(len(arrays))]
    if sorted(arrays) == sorted(positional) and not set(arrays) & {s.name for s in inputs}:
        arrays = _positional([arrays[k] for k in positional], inputs, f"{where} {path.name}")
    return from_arrays(arrays, inputs, batch_size=batch_size, name=path.name, where=where)


# ---------------------------------------------------------------- entry point


def _from_path(path: Path, loaded: LoadedModel, seq_len: int, batch_size: int | None, where: str) -> Dataset:
    try:
        exists = path.exists()
    except OSError:  # e.g. a whole text given where a path belongs: the name is too long
        exists = False
    if not exists:
        raise DataError(
            f"{where} {str(path)[:80]!r} does not exist: pass a text file, a folder of images or a .npz of "
            "input arrays (text in memory: slimc.data.from_text)."
        )
    from slimc.data_images import Images, _image_folder, from_images
    from slimc.data_text import from_text

    suffix = path.suffix.lower()
    if path.is_dir() or suffix in IMAGE_SUFFIXES:
        images = _image_folder(path) if path.is_dir() else Images([path], path.name)
        return from_images(images, loaded, batch_size=batch_size or DEFAULT_BATCH_SIZE, where=where)
    if suffix in (".npz", ".npy"):
        return _npz(path, loaded.inputs, batch_size or DEFAULT_BATCH_SIZE, where)
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:  # binary: an .onnx or weights file given by mistake
        raise DataError(f"{where} {path} is not a text file; pass text, a folder of images or a .npz of input arrays.")
    text = raw.decode("utf-8", errors="replace")
    return from_text(text, loaded, seq_len=seq_len, batch_size=batch_size or 4, name=path.name, where=where)


def _revalidated(source: Dataset, inputs: Sequence[InputSpec], where: str) -> Dataset:
    """A given Dataset checked against this model: lists at once, lazy batches as they are built."""
    check = lambda i: validate_batch(source[i], inputs, f"{where} {source.source}, batch {i}")  # noqa: E731
    if isinstance(source._batches, list):
        return Dataset([check(i) for i in range(len(source))], source.source, synthetic=source.synthetic)
    dataset = Dataset(_LazyBatches(range(len(source)), check), source.source, synthetic=source.synthetic)
    if len(dataset):
        dataset[0]
    return dataset


def load(
    source: Any, loaded: LoadedModel, *, seq_len: int = 128, batch_size: int | None = None,
    max_batches: int | None = None, role: str = "calibration",
) -> Dataset:
    """Validated batches for ``loaded`` from a path, `Images`, a `Dataset` or Python arrays.

    ``batch_size`` defaults to 4 windows for text and 8 samples otherwise; a model exported
    with a static batch size uses that instead.
    """
    from slimc.data_images import Images, from_images

    where = f"{role} data"
    if isinstance(source, Dataset):
        dataset = _revalidated(source, loaded.inputs, where)
    elif isinstance(source, Images):
        dataset = from_images(source, loaded, batch_size=batch_size or DEFAULT_BATCH_SIZE, where=where)
    elif isinstance(source, (str, os.PathLike)):
        dataset = _from_path(Path(source), loaded, seq_len, batch_size, where)
    else:
        dataset = _from_object(source, loaded.inputs, batch_size or DEFAULT_BATCH_SIZE, where)
    if max_batches is not None:
        dataset = dataset.head(max_batches)
    if len(dataset) == 0:
        from slimc.data_batching import _static_batch

        fixed = _static_batch(loaded.inputs)
        need = f" (the model takes batches of exactly {fixed})" if fixed else ""
        raise DataError(f"{where} {dataset.source} holds no complete batch{need}: give at least one sample.")
    return dataset


def __getattr__(name: str) -> Any:
    # Text and image loaders live in their own modules; keep them reachable as slimc.data.X.
    if name in ("from_arrays", "first_samples", "sample_axis"):
        from slimc import data_batching

        return getattr(data_batching, name)
    if name in ("synthetic",):
        from slimc import data_synthetic

        return getattr(data_synthetic, name)
    if name in ("from_text",):
        from slimc import data_text

        return getattr(data_text, name)
    if name in ("from_images", "Images", "IMAGENET_MEAN", "IMAGENET_STD"):
        from slimc import data_images

        return getattr(data_images, name)
    raise AttributeError(f"module 'slimc.data' has no attribute '{name}'")


def first_batches(data: Any, n: int) -> Any:
    """The first ``n`` batches of a `Dataset` (``head``, keeping its source label) or of any sequence of batches."""
    return data.head(n) if hasattr(data, "head") else list(data)[:n]
