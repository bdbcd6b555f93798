"""Channel importance of a group: magnitude, Wanda, FLAP, random.

Every score is a vector over the group's channels (its leaf atom). A weight slot contributes
through `Atoms.coords`, which maps each index of the slot to the channel it belongs to, so a
head's score gathers all its rows in q/k/v and all its columns in the output projection.

- ``magnitude`` (data-free): sum over every weight of the group of the squared entries that
  belong to the channel, each weight's contribution divided by its mean so that layers of
  different scale weigh alike (Torch-Pruning's group L2 importance).
- ``wanda``: for each consumer (a weight contracting the channel), |W|·‖X‖ summed over the
  consumer's outputs, with ‖X‖ the channel's L2 norm over the calibration tokens.
- ``flap``: FLAP's fluctuation metric, Var(X) · ‖W_col‖², from the same statistics.
- ``random``: a seeded baseline.

Activation statistics come from `slimc.calibrate.collect`: reductions added to the graph and
streamed batch by batch; only per-channel sums (and Grams for least squares) are kept.
"""

from __future__ import annotations

import numpy as np

from slimc.calibrate import ChannelStats, StatRequest
from slimc.passes.prune.graph import Contraction, DependencyGraph, Group


def _scatter(values: np.ndarray, coords: np.ndarray | None, n: int) -> np.ndarray:
    if coords is None:
        return np.zeros(n)
    ok = coords >= 0
    return np.bincount(coords[ok], weights=values[ok], minlength=n)


def _normalised(v: np.ndarray) -> np.ndarray:
    mean = float(np.mean(v))
    return v / mean if mean > 0 else v


def _per_index(array: np.ndarray, axis: int, power: int) -> np.ndarray:
    """Sum of |w|^power over every axis but ``axis`` (einsum: no squared copy, 3-4x faster)."""
    letters = "abcdefghij"[: array.ndim]
    spec = f"{letters},{letters}->{letters[axis]}" if power == 2 else f"{letters}->{letters[axis]}"
    operands = (array, array) if power == 2 else (np.abs(array),)
    return np.einsum(spec, *operands).astype(np.float64)


def magnitude(g: DependencyGraph, group: Group) -> np.ndarray:
    score = np.zeros(group.size)
    for value, axis in group.weights:
        per = _per_index(g.array(value), axis, 2)
        score += _normalised(_scatter(per, g.atoms.coords(g.slots[value][axis], group.atom), group.size))
    return score


def stat_requests(groups: list[Group], gram: bool) -> set[StatRequest]:
    return {StatRequest(c.act.name, c.act_axis, gram and c.node.op_type in ("MatMul", "Gemm")) for grp in groups for c in grp.contractions}


def activation_aware(g: DependencyGraph, group: Group, stats: dict, method: str) -> np.ndarray:
    """Wanda or FLAP score over the group's consumers; magnitude for a group without any."""
    if not group.contractions:
        return magnitude(g, group)
    score = np.zeros(group.size)
    for c in group.contractions:
        st = _stats_for(stats, c)
        w = g.array(c.weight)
        if method == "wanda":
            per = _per_index(w, c.weight_axis, 1) * (st.norm if st is not None else 1.0)
        else:
            per = _per_index(w, c.weight_axis, 2) * (st.var if st is not None else 1.0)
        score += _normalised(_scatter(per, g.atoms.coords(g.slots[c.weight][c.weight_axis], group.atom), group.size))
    return score


def _stats_for(stats: dict, c: Contraction) -> ChannelStats | None:
    for gram in (False, True):
        st = stats.get(StatRequest(c.act.name, c.act_axis, gram))
        if st is not None:
            n = c.weight.const_value.shape[c.weight_axis]
            return st if st.sum.shape[0] == n else None  # grouped conv: per-group weights, no 1:1 map
    return None


def scores(g: DependencyGraph, group: Group, method: str, stats: dict | None, rng: np.random.Generator) -> np.ndarray:
    if method == "random":
        return rng.random(group.size)
    if method == "magnitude":
        return magnitude(g, group)
    return activation_aware(g, group, stats or {}, method)
