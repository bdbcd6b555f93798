"""The calibration data as rows for training: shuffled batches, a held-back part, augmentation,
and a teacher-output cache within a memory budget.

Rows are the calibration batches concatenated along each input's batch axis (text: the token
windows `slimc.data` cut; images: preprocessed pictures). The last `holdout` rows never train:
they measure the held-back loss for early stopping. Images get, per batch, a random crop of 80-100%
of each side resized back to the input size, and a horizontal flip per row; augmented inputs are new
every step, so their teacher outputs are computed, never cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slimc.errors import DataError

MAX_HOLDOUT = 64


class Rows:
    """All calibration rows as tensors keyed by input name, split into training and held-back rows."""

    def __init__(self, calibration: Any, inputs: Sequence[Any], names: list[str]):
        specs = {s.name: s for s in inputs}
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for batch in calibration:
            for name in names:
                if name not in batch:
                    raise DataError(f"distill: a calibration batch has no input '{name}'.")
                parts[name].append(np.asarray(batch[name]))
        self.axes = {n: specs[n].batch_axis if n in specs else 0 for n in names}
        self.tensors: dict[str, torch.Tensor] = {}
        for name, arrays in parts.items():
            axis = self.axes[name]
            if axis is None:
                self.tensors[name] = torch.from_numpy(np.array(arrays[0]))
                continue
            shapes = {a.shape[:axis] + a.shape[axis + 1:] for a in arrays}
            if len(shapes) > 1:
                raise DataError(f"distill: the calibration batches give input '{name}' different shapes {sorted(shapes)}; "
                                "distill trains on rows of one shape (text: one window length; images: one size).")
            self.tensors[name] = torch.from_numpy(np.concatenate(arrays, axis=axis))
        batched = [n for n in names if self.axes[n] is not None]
        self.count = int(self.tensors[batched[0]].shape[self.axes[batched[0]]]) if batched else 1
        if self.count < 2:
            raise DataError(f"distill: the calibration data holds {self.count} row(s); it needs at least 2 (one to train "
                            "on, one held back for early stopping). Pass more --calib data.")
        self.holdout = max(1, min(self.count // 10, MAX_HOLDOUT))
        self.train = self.count - self.holdout
        self.images = [n for n in names if getattr(specs.get(n), "kind", None) == "image"]

    def take(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        ix = torch.from_numpy(np.asarray(index, dtype=np.int64))
        return {n: (t if self.axes[n] is None else t.index_select(self.axes[n], ix)) for n, t in self.tensors.items()}

    def held(self, batch_size: int) -> list[np.ndarray]:
        rows = np.arange(self.train, self.count)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]

    def tokens_per_row(self) -> int:
        token = next((t for n, t in self.tensors.items() if not t.is_floating_point() and t.dim() >= 2), None)
        return int(token.shape[1]) if token is not None else 0


class Sampler:
    """Shuffled training rows, epoch after epoch, from a seeded generator."""

    def __init__(self, count: int, seed: int):
        self.count, self.rng, self.order, self.pos = count, np.random.default_rng(seed), np.empty(0, np.int64), 0
        self.epochs = 0

    def next(self, size: int) -> np.ndarray:
        size = min(size, self.count)
        if self.pos + size > len(self.order):
            self.order, self.pos = self.rng.permutation(self.count), 0
            self.epochs += 1
        out = self.order[self.pos:self.pos + size]
        self.pos += size
        return out


def augment(batch: dict[str, torch.Tensor], images: list[str], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random crop (80-100% of each side, resized back) and horizontal flips of the image inputs."""
    out = dict(batch)
    for name in images:
        x = batch[name]
        nhwc = x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
        x = x.permute(0, 3, 1, 2) if nhwc else x
        h, w = x.shape[-2:]
        frac = 0.8 + 0.2 * float(torch.rand((), generator=gen))
        ch, cw = max(1, int(h * frac)), max(1, int(w * frac))
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
        crop = F.interpolate(x[..., top:top + ch, left:left + cw].float(), size=(h, w), mode="bilinear",
                             align_corners=False).to(x.dtype)
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        crop[flip] = crop[flip].flip(-1)
        out[name] = crop.permute(0, 2, 3, 1).contiguous() if nhwc else crop
    return out


class TeacherCache:
    """Teacher targets per row, kept while they fit ``budget`` bytes (rows beyond it are recomputed)."""

    def __init__(self, budget: int):
        self.budget, self.used, self.rows = budget, 0, {}

    def get(self, index: np.ndarray) -> list | None:
        if not all(int(i) in self.rows for i in index):
            return None
        per_row = [self.rows[int(i)] for i in index]
        return [_stack([r[k] for r in per_row]) for k in range(len(per_row[0]))]

    def put(self, index: np.ndarray, targets: list) -> None:
        for j, i in enumerate(index):
            if int(i) in self.rows:
                continue
            row = [_row(t, j) for t in targets]
            size = sum(_nbytes(t) for t in row)
            if self.used + size > self.budget:
                return
            self.rows[int(i)], self.used = row, self.used + size


def _row(t, j: int):
    return tuple(x[j].clone() for x in t) if isinstance(t, tuple) else t[j].clone()


def _stack(items: list):
    if isinstance(items[0], tuple):
        return tuple(torch.stack([it[k] for it in items]) for k in range(len(items[0])))
    return torch.stack(items)


def _nbytes(t) -> int:
    return sum(x.numel() * x.element_size() for x in t) if isinstance(t, tuple) else t.numel() * t.element_size()
