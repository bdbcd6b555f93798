"""Arrays holding many samples cut into batches: along each input's batch axis, or whole.

The batch axis of an input is `InputSpec.batch_axis` (`slimc.input_rules` decides it from the
model's declared shapes): ``input [batch, samples]`` batches along axis 0, ``state [2, batch, 128]``
along axis 1, a 0-d ``sr`` and an input without a batch axis go whole into every batch. A model
whose batch axes are all static (exported with a fixed batch) takes batches of exactly that size;
an incomplete last batch is dropped. Arrays that already are one example of such a model (every
array has its input's declared shape: ``theta [2, 2, 3]`` with ``size [4]``) are one batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from slimc.data import DEFAULT_BATCH_SIZE, Batch, Dataset, to_numpy, validate_batch
from slimc.errors import DataError
from slimc.model import InputSpec


def sample_axis(spec: InputSpec | None, ndim: int) -> int | None:
    """The axis of an array for ``spec`` that indexes samples; None: the array is passed whole."""
    if ndim == 0:
        return None
    if spec is None:
        return 0
    axis = spec.batch_axis
    return axis if axis is not None and axis < min(ndim, len(spec.shape)) else None


def _static_batch(inputs: Sequence[InputSpec]) -> int | None:
    """A model exported with a fixed batch size forces it on every batch."""
    for spec in inputs:
        axis = sample_axis(spec, len(spec.shape))
        if axis is not None and isinstance(spec.shape[axis], int):
            return spec.shape[axis]
    return None


def _groups(n: int, inputs: Sequence[InputSpec], batch_size: int) -> list[range]:
    """Sample index ranges per batch; with a static batch dim an incomplete last batch is dropped."""
    fixed = _static_batch(inputs)
    size = fixed or batch_size
    groups = [range(i, min(i + size, n)) for i in range(0, n, size)]
    return [g for g in groups if fixed is None or len(g) == fixed]


def first_samples(batch: Mapping[str, Any], inputs: Sequence[InputSpec] | None, n: int = 1) -> Batch:
    """The first ``n`` samples of a batch, cut along each input's batch axis (0-d and unbatched inputs whole;
    axis 0 when the inputs are not known). A fixed batch axis keeps its size: the model takes no other."""
    specs = {spec.name: spec for spec in inputs or ()}
    out = {}
    for key, value in batch.items():
        arr = np.asarray(value)
        spec = specs.get(key)
        axis = sample_axis(spec, arr.ndim) if inputs is not None else (0 if arr.ndim else None)
        fixed = spec is not None and axis is not None and axis < len(spec.shape) and isinstance(spec.shape[axis], int)
        out[key] = arr if fixed else _take(arr, axis, range(n))
    return out


def _one_example(arrays: Mapping[str, np.ndarray], specs: Mapping[str, InputSpec]) -> bool:
    """True when the arrays are one multi-input example as they stand: every array has its input's
    declared rank and static dims, and no input has a dynamic batch axis to split along (the inputs
    share no batch dim, e.g. ``theta [2, 2, 3]`` with ``size [4]``)."""
    for key, arr in arrays.items():
        spec = specs.get(key)
        if spec is None or arr.ndim != len(spec.shape):
            return False
        if any(isinstance(want, int) and want != got for want, got in zip(spec.shape, arr.shape)):
            return False
        axis = sample_axis(spec, arr.ndim)
        if axis is not None and not isinstance(spec.shape[axis], int):
            return False
    return bool(arrays)


def _take(arr: np.ndarray, axis: int | None, group: range) -> np.ndarray:
    return arr if axis is None else arr[(slice(None),) * axis + (slice(group.start, group.stop),)]


def from_arrays(
    arrays: Mapping[str, Any], inputs: Sequence[InputSpec], *, batch_size: int = DEFAULT_BATCH_SIZE,
    name: str = "arrays", where: str = "data",
) -> Dataset:
    """Arrays keyed by input name (all samples), split into batches along each input's batch axis.

    0-d arrays and inputs without a batch axis go whole into every batch; arrays that already are
    one example of a model without a dynamic batch axis are one batch (see `_one_example`).
    """
    arrays = {k: to_numpy(v) for k, v in arrays.items()}
    specs = {spec.name: spec for spec in inputs}
    if _one_example(arrays, specs):
        return Dataset([validate_batch(arrays, inputs, f"{where} {name}")], f"{name}: 1 example")
    axes = {k: sample_axis(specs.get(k), a.ndim) for k, a in arrays.items()}
    lengths = {k: a.shape[axes[k]] for k, a in arrays.items() if axes[k] is not None}
    if len(set(lengths.values())) > 1:
        held = {k: axes[k] for k in lengths}
        raise DataError(
            f"{where} {name}: arrays hold different numbers of samples along their batch axes: {lengths} (axes {held}). The batch "
            "axis is the one the model's declared shapes name as batch; 0-d arrays and inputs without one are "
            "passed whole. Give every batched input the same number of samples."
        )
    n = next(iter(lengths.values()), 1)
    groups = _groups(n, inputs, batch_size)
    batches = [
        validate_batch({k: _take(a, axes[k], g) for k, a in arrays.items()}, inputs, f"{where} {name}, batch {i}",
                       first_sample=g.start)
        for i, g in enumerate(groups)
    ]
    return Dataset(batches, f"{name}: {n} samples in {len(batches)} batches")
