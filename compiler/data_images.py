"""Image data: files, folders or arrays -> normalised image batches at the model's input size.

See `slimc.data` for the resize / crop / normalisation rule.
"""

from __future__ import annotations

import os

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimc.data import (
    Batch,
    Dataset,
    DEFAULT_BATCH_SIZE,
    IMAGE_SUFFIXES,
    _LazyBatches,
    _shape_str,
    to_numpy,
    validate_batch,
)
from slimc.data_batching import _groups
from slimc.errors import DataError, first_line
from slimc.model import InputSpec, LoadedModel


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Images:
    """Images not yet preprocessed (paths, HWC arrays or PIL images): `load` applies the model's
    own size and normalization, so one photo set serves models with different preprocessing."""

    def __init__(self, images: Sequence[Any], source: str = "images", size: tuple[int, int] | None = None):
        self.images, self.source, self.size = list(images), source, size  # size: used if the model has none

    def __len__(self) -> int:
        return len(self.images)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("image data needs Pillow: pip install pillow") from None
    return Image


def _image_layout(spec: InputSpec, pre: dict[str, Any], fallback: tuple[int, int] | None, label: str):
    """(channels_last, channels, (H, W)) for the image input."""
    shape = tuple(spec.shape) + (None,) * (4 - len(spec.shape))
    last = isinstance(shape[3], int) and shape[3] in (1, 3) and not (isinstance(shape[1], int) and shape[1] in (1, 3))
    channels = shape[3 if last else 1] if isinstance(shape[3 if last else 1], int) else 3
    static = shape[1:3] if last else shape[2:4]
    size = (tuple(static) if all(isinstance(d, int) for d in static) else None) or pre.get("size") or fallback
    if size is None:
        raise DataError(
            f"{label}: input {spec.name!r} has dynamic height/width {_shape_str(spec.shape)} and the model states "
            "no image size. Pass images already at the size you want as a .npz, or re-export with a static size."
        )
    return last, channels, ((size, size) if isinstance(size, int) else tuple(size))


def _pixels(image: Any, mode: str, Image: Any, label: str) -> Any:
    """A PIL image in ``mode`` from a path, a PIL image, or an HWC/HW array (uint8, or floats in [0, 1])."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert(mode)  # a new image: still valid once the file is closed
        except Image.DecompressionBombError:
            raise DataError(
                f"{label}: image {image} has more pixels than Pillow decodes safely (limit "
                f"{Image.MAX_IMAGE_PIXELS:,}), so it is not read. Resize it to about the model's input size first."
            ) from None
        except MemoryError:
            raise DataError(f"{label}: image {image} is too large to decode in memory; resize it first.") from None
        # Pillow's decoders raise OSError, ValueError, SyntaxError (bad headers), EOFError, struct.error ...
        except Exception as exc:  # noqa: BLE001 - any failure to decode is the file's fault, not a bug
            raise DataError(f"{label}: cannot read image {image}: {first_line(exc)}. Remove it or re-save it "
                            "as PNG/JPEG.") from None
    if isinstance(image, Image.Image):
        return image.convert(mode)
    arr = to_numpy(image)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise DataError(f"{label}: an image array holds NaN or inf; pixel values must be finite.")
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).convert(mode)


def _preprocess(image: Any, size: tuple[int, int], channels: int, stretch: bool, Image: Any, label: str) -> np.ndarray:
    im = _pixels(image, "L" if channels == 1 else "RGB", Image, label)
    h, w = size
    if stretch:
        return np.asarray(im.resize((w, h), Image.BILINEAR), np.float32)
    scale = max(h / im.height, w / im.width)  # the shorter side fits, the longer is cropped
    im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BILINEAR)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return np.asarray(im.crop((left, top, left + w, top + h)), np.float32)


def from_images(
    images: Images | Sequence[Any], loaded: LoadedModel, *, batch_size: int = DEFAULT_BATCH_SIZE, where: str = "data"
) -> Dataset:
    """Resize, crop and normalize images for the model's one image input (see module docstring)."""
    images = images if isinstance(images, Images) else Images(images)
    label = f"{where} {images.source}"
    specs = [s for s in loaded.inputs if s.kind == "image"]
    if len(specs) != 1 or len(loaded.inputs) != 1:
        raise DataError(
            f"{label}: images fill a model with exactly one image input, but the model takes "
            f"{[f'{s.name} ({s.kind})' for s in loaded.inputs]}. Pass a .npz with every input instead."
        )
    spec, pre = specs[0], loaded.image_preprocess or {}
    last, channels, size = _image_layout(spec, pre, images.size, label)
    mean = np.asarray(pre.get("mean", IMAGENET_MEAN[:channels] if channels == 3 else 0.5), np.float32)
    std = np.asarray(pre.get("std", IMAGENET_STD[:channels] if channels == 3 else 0.5), np.float32)
    # A mean stated in 0-255 pixel units means the model takes unscaled pixels.
    scale = 1.0 if mean.max() > 1.0 else 1.0 / 255.0
    stretch, Image = pre.get("resize") == "stretch", _pil()

    def build(index_range: range) -> Batch:
        hwc = [_preprocess(images.images[i], size, channels, stretch, Image, label) for i in index_range]
        x = (np.stack([a.reshape(*size, channels) for a in hwc]) * scale - mean) / std
        x = x if last else x.transpose(0, 3, 1, 2)
        return validate_batch({spec.name: x}, loaded.inputs, f"{label}, images {index_range.start}-{index_range.stop - 1}",
                              first_sample=index_range.start)

    groups = _groups(len(images), loaded.inputs, batch_size)
    dataset = Dataset(_LazyBatches(groups, build), f"{images.source}: {len(images)} images at {size[0]}x{size[1]}"
                      + ("" if "mean" in pre else " (ImageNet mean/std: the model states none)"))
    if len(dataset):
        dataset[0]  # fail at load time, not mid-calibration, when the images cannot fit the model
    return dataset


def _image_folder(folder: Path) -> Images:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}). Pass a folder of images, "
            "a text file or a .npz of input arrays."
        )
    return Images(files, folder.name)
