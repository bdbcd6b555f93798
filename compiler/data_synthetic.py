"""Synthetic inputs: what slimc feeds a model when no data is given, and exactly what it says it fed.

Shapes come from `InputSpec.concrete_shape` (static dims as declared; image height/width from the
model's metadata, ``--static-shapes`` or 224; batch 2; other dynamic dims 16). Values follow each
input's kind (`slimc.model`, `slimc.input_rules`):

=====================  ======================================================================
kind                   values
=====================  ======================================================================
tokens                 integers uniform in ``[0, rows)`` of the table they index (100 if unknown)
attention_mask, bool   ones (every position attended; ``True``)
position_ids           ``0 .. n-1`` along the last axis
past_key_values        empty: past length 0, so a KV-cache graph computes the full forward
token_type_ids         zeros (segment 0 exists in every table)
image, float           standard normal
int, compared          the first constant the model compares it with (``sr == 16000``)
int, bounded           integers uniform in ``[0, depth)`` of the ``OneHot`` it feeds
int, other             zeros (a valid index for any table; no value range is known)
=====================  ======================================================================

An input whose value cannot be invented (a shape, size, axis or count; another 0-d integer; a string) makes
`synthetic` raise a `DataError` that names it and asks for data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slimc.data import Dataset
from slimc.errors import DataError
from slimc.model import InputSpec

TOKEN_FALLBACK_HIGH = 100


def _random_value(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if spec.kind == "tokens":
        return rng.integers(0, spec.high or TOKEN_FALLBACK_HIGH, size=shape).astype(dtype)
    if spec.kind in ("attention_mask", "bool"):
        return np.ones(shape, dtype)
    if spec.kind == "position_ids" and shape:
        return np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
    if spec.kind == "past_key_values":
        return np.zeros(shape, dtype)
    if spec.kind in ("image", "float"):
        return rng.standard_normal(shape).astype(dtype)
    if spec.values:
        return np.full(shape, spec.values[0], dtype)
    if spec.kind == "int" and spec.high:
        return rng.integers(0, spec.high, size=shape).astype(dtype)
    return np.zeros(shape, dtype)


def _rule(spec: InputSpec) -> str:
    """What `_random_value` feeds this input, in words."""
    if spec.kind == "tokens":
        return (f"integers in [0, {spec.high}) (rows of the table they index)" if spec.high
                else f"integers in [0, {TOKEN_FALLBACK_HIGH}) (no table size found)")
    if spec.kind in ("attention_mask", "bool"):
        return "ones"
    if spec.kind == "position_ids":
        return "0..n-1"
    if spec.kind == "past_key_values":
        return "empty past (length 0: a full forward)"
    if spec.kind in ("image", "float"):
        return "normal(0, 1)"
    if spec.values:
        others = f"; it also takes {', '.join(map(str, spec.values[1:]))}" if len(spec.values) > 1 else ""
        return f"= {spec.values[0]} (a value the model compares it with{others})"
    if spec.kind == "int" and spec.high:
        return f"integers in [0, {spec.high}) (the OneHot depth)"
    return "zeros" + (" (no value range known)" if spec.kind == "int" else "")


def describe(spec: InputSpec, shape: Sequence[int]) -> str:
    """``"images float32 [2,3,320,320] normal(0, 1), height x width 320x320 from metadata imgsz"``."""
    dims = ",".join(map(str, shape))
    return f"{spec.name} {np.dtype(spec.dtype)} [{dims}] {_rule(spec)}" + (f", {spec.dim_source}" if spec.dim_source else "")


def check_inventable(inputs: Sequence[InputSpec]) -> None:
    """Raise a `DataError` naming every input whose value slimc cannot invent."""
    blocked = [spec for spec in inputs if spec.needs_data]
    if blocked:
        reasons = "; ".join(f"input {spec.name!r}: {spec.needs_data}" for spec in blocked)
        raise DataError(
            f"slimc cannot make synthetic inputs for this model ({reasons}). Pass data holding every input: "
            "--eval FILE (and --calib FILE) on the command line, evaluation= / calibration= in Python; e.g. a .npz "
            "or a dict of arrays keyed by input name (see docs/data.md)."
        )


def synthetic(
    inputs: Sequence[InputSpec], n_batches: int = 4, seed: int = 0, sizes: dict[str, int] | None = None
) -> Dataset:
    """Random but valid inputs (rules in the module docstring); same seed, same data. The Dataset's
    ``source`` says exactly what was fed, input by input."""
    check_inventable(inputs)
    rng = np.random.default_rng(seed)
    shapes = {spec.name: spec.concrete_shape(sizes) for spec in inputs}
    batches = [{spec.name: _random_value(spec, shapes[spec.name], rng) for spec in inputs} for _ in range(n_batches)]
    fed = "; ".join(describe(spec, shapes[spec.name]) for spec in inputs)
    return Dataset(batches, f"synthetic: {n_batches} random batches (seed {seed}): {fed}", synthetic=True)
