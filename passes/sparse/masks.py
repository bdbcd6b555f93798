"""Sparsity masks for one weight matrix: magnitude, Wanda, SparseGPT, N:M groups, OWL layer ratios.

Pure numpy, on one canonical layout: a weight ``W`` of shape [K, N], K the reduction (input)
dimension and N the outputs, so that ``y = x @ W``. ONNX MatMul weights are stored so already;
`slimc.passes.sparse.sparsify` maps Gemm and Conv weights to it and back. A mask is a boolean
array of W's shape, True where the weight is *kept*.

- **magnitude** (data-free baseline): drop the ``ratio`` share of the layer's weights of
  smallest |w|, compared over the whole matrix (a layer-wise threshold, as in the Wanda paper's
  baseline).
- **wanda** (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language
  Models"): score ``|w_kn| · ‖X_k‖₂`` (‖X_k‖ the L2 norm of input k over every calibration
  token); within each output ``n`` drop the ``ratio`` share of its K weights with the lowest
  score. No weight update.
- **sparsegpt** (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot"): the OBS update of GPTQ with pruning instead of rounding.
  With ``H = 2 XᵀX / n`` (dampened by ``damp · mean(diag H)``) and ``U`` the upper Cholesky
  factor of ``H⁻¹``, the K inputs are visited in order; in each block of ``block`` inputs the
  mask is chosen once from ``w² / U_kk²`` (the OBS saliency: the output error of removing w
  with the remaining weights re-fitted), the ``ratio`` share of the lowest over the whole block
  dropped; each dropped weight's error ``(w − 0) / U_kk`` is spread over the inputs not yet
  visited through row k of U, lazily per block as in GPTQ. The kept weights change.
- **N:M** (``keep`` of every ``m`` consecutive inputs of each output, NVIDIA's 2:4 keeps two of
  four): the same scores, compared inside each group of m instead of the whole row/block;
  SparseGPT chooses each group's mask when it reaches the group's first input (as the paper).
- **OWL** (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity"): a layer's outlier ratio is
  the share of its Wanda scores above ``owl_m`` times the layer's mean score; layers with more
  outliers get a lower sparsity. The ratios are spread linearly over ±lambda around the target
  (most outliers: target − lambda) and shifted so that the parameter-weighted mean sparsity is
  exactly the target, clipped to the ±lambda band and [0, 1].
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slimc.passes.quant.gptq import inverse_cholesky_upper

SPARSEGPT_BLOCK = 128


def _drop_count(size: int, ratio: float) -> int:
    return int(round(size * ratio))


def magnitude(w: np.ndarray, ratio: float) -> np.ndarray:
    """Keep mask dropping the ``ratio`` share of |w| smallest over the whole matrix."""
    score = np.abs(np.asarray(w, np.float32)).ravel()
    drop = _drop_count(score.size, ratio)
    keep = np.ones(score.size, bool)
    if drop:
        keep[np.argpartition(score, drop - 1)[:drop]] = False
    return keep.reshape(np.shape(w))


def per_output(score: np.ndarray, ratio: float) -> np.ndarray:
    """Keep mask dropping, within each output column of ``score`` [K, N], the ``ratio`` share lowest."""
    k = score.shape[0]
    drop = _drop_count(k, ratio)
    keep = np.ones(score.shape, bool)
    if drop:
        idx = np.argpartition(score, drop - 1, axis=0)[:drop]
        np.put_along_axis(keep, idx, False, axis=0)
    return keep


def n_of_m(score: np.ndarray, keep_n: int, m: int) -> np.ndarray:
    """Keep mask with the ``keep_n`` highest scores of every group of ``m`` consecutive rows (per column)."""
    k, n = score.shape
    if k % m:
        raise ValueError(f"N:M sparsity needs K ({k}) to be a multiple of M ({m}).")
    groups = score.reshape(k // m, m, n)
    keep = np.zeros(groups.shape, bool)
    if keep_n:
        top = np.argpartition(-groups, keep_n - 1, axis=1)[:, :keep_n]
        np.put_along_axis(keep, top, True, axis=1)
    return keep.reshape(k, n)


def wanda_score(w: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """``|W| · ‖X‖``: ``norms`` is [K] (one per input) or [K, N] (grouped convolutions)."""
    norms = np.asarray(norms, np.float64)
    return np.abs(np.asarray(w, np.float64)) * (norms[:, None] if norms.ndim == 1 else norms)


def mask(score: np.ndarray, ratio: float, nm: tuple[int, int] | None, per_row: bool) -> np.ndarray:
    """The keep mask of ``score``: N:M groups, else per output (``per_row``) or over the whole matrix."""
    if nm is not None:
        return n_of_m(score, nm[0], nm[1])
    if per_row:
        return per_output(score, ratio)
    return magnitude(score, ratio)  # |score| = score for non-negative scores


@dataclasses.dataclass
class SparseGptInfo:
    dead_inputs: int
    damp: float


def sparsegpt(w: np.ndarray, h: np.ndarray, ratio: float, nm: tuple[int, int] | None = None, damp: float = 0.01,
              block: int = SPARSEGPT_BLOCK) -> tuple[np.ndarray, SparseGptInfo]:
    """SparseGPT of a [K, N] weight with input Hessian ``h`` [K, K]: the new weight (zeros where pruned).

    Raises ValueError on a Hessian of the wrong shape, or an N:M block that does not divide K.
    When the dampened H is not positive definite the damping is raised tenfold until it is.
    """
    k, n = w.shape
    if h.shape != (k, k):
        raise ValueError(f"sparsegpt: Hessian shape {h.shape} does not match K={k}.")
    if nm is not None and (k % nm[1] or block % nm[1]):
        raise ValueError(f"sparsegpt: N:M groups of {nm[1]} must divide K ({k}) and the block ({block}).")
    out = np.array(w, np.float32)
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    # Unlike GPTQ, a dead input's weights are not zeroed outright (that would overshoot the
    # ratio): the damping below makes H_kk small but positive, so they are the first pruned.
    mean_diag = float(np.mean(np.diag(h)))
    if mean_diag <= 0 or not np.isfinite(mean_diag):  # no input ever non-zero: no information at all
        h, mean_diag = np.eye(k), 1.0
    h, mean_diag = h / mean_diag, 1.0  # the masks and updates are scale-free; float32 U stays in range
    used = damp
    while True:
        try:
            u = inverse_cholesky_upper(h + used * mean_diag * np.eye(k)).astype(np.float32)
            break
        except np.linalg.LinAlgError:
            used = max(used * 10, 1e-6)
            if used > 1e6:
                raise
    diag = np.diag(u)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = out[i1:i2]  # a view: updated in place
        d1 = diag[i1:i2]
        err = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        keep1 = None
        if nm is None:
            keep1 = magnitude(w1**2 / (d1**2)[:, None], ratio)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = w1[i:i + nm[1]] ** 2 / (d1[i:i + nm[1]] ** 2)[:, None]
                keep_g = n_of_m(group, nm[0], nm[1])
            row = keep1[i] if keep1 is not None else keep_g[i % nm[1]]
            q = np.where(row, w1[i], np.float32(0))
            e = (w1[i] - q) / u1[i, i]
            w1[i] = q
            w1[i + 1:] -= np.outer(u1[i, i + 1:], e)
            err[i] = e
        out[i2:] -= u[i1:i2, i2:].T @ err
    # the in-block updates never touch a row once it is visited, so pruned weights stay exactly 0
    return out, SparseGptInfo(int(dead.sum()), used)


def outlier_ratio(score: np.ndarray, m: float) -> float:
    """OWL's layer outlier ratio: the share of scores above ``m`` times their mean."""
    score = np.asarray(score)
    mean = float(score.mean())
    return float(np.mean(score > m * mean)) if mean > 0 else 0.0


def owl_ratios(outliers: np.ndarray, sizes: np.ndarray, target: float, lam: float, tol: float = 1e-9) -> np.ndarray:
    """Per-layer sparsity from outlier ratios (see module docstring); weighted by ``sizes``, mean = target."""
    outliers = np.asarray(outliers, np.float64)
    sizes = np.asarray(sizes, np.float64)
    span = outliers.max() - outliers.min()
    # most outliers -> -lam, fewest -> +lam (before the shift)
    z = lam - 2 * lam * (outliers - outliers.min()) / span if span > 0 else np.zeros_like(outliers)
    lo, hi = max(target - lam, 0.0), min(target + lam, 1.0)

    def ratios(shift: float) -> np.ndarray:
        return np.clip(target + z + shift, lo, hi)

    def mean(shift: float) -> float:
        return float(np.sum(ratios(shift) * sizes) / np.sum(sizes))

    a, b = -2 * lam - 1, 2 * lam + 1  # mean(a) = lo <= target <= hi = mean(b); mean is monotone in shift
    for _ in range(200):
        mid = (a + b) / 2
        if mean(mid) < target:
            a = mid
        else:
            b = mid
        if b - a < tol:
            break
    return ratios((a + b) / 2)


def nm_valid(w: np.ndarray, keep_n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive rows (per column) of a [K, N] weight has at most ``keep_n`` non-zeros."""
    k, n = w.shape
    if k % m:
        return False
    return bool(((w.reshape(k // m, m, n) != 0).sum(axis=1) <= keep_n).all())


def output_error(w: np.ndarray, new: np.ndarray, h: np.ndarray | None = None, norms: np.ndarray | None = None) -> float:
    """Relative output error on the calibration inputs, ``‖X ΔW‖² / ‖X W‖²``.

    With the Hessian ``h`` (∝ XᵀX) it is exact; with only input ``norms`` it is the diagonal
    estimate ``Σ ΔW² ‖X_k‖² / Σ W² ‖X_k‖²`` (cross terms between inputs ignored).
    """
    w = np.asarray(w, np.float64)
    d = w - np.asarray(new, np.float64)
    if h is not None:
        den = float(np.sum((h @ w) * w))
        return float(np.sum((h @ d) * d)) / den if den > 0 else 0.0
    if norms is None:
        raise ValueError("output_error needs the Hessian or the input norms.")
    sq = np.asarray(norms, np.float64) ** 2
    sq = sq[:, None] if sq.ndim == 1 else sq
    den = float(np.sum(w * w * sq))
    return float(np.sum(d * d * sq)) / den if den > 0 else 0.0


def compressed_bytes(w: np.ndarray) -> int:
    """A sparse storage estimate: one bit per weight (the mask) plus the non-zero values."""
    w = np.asarray(w)
    return int(-(-w.size // 8) + np.count_nonzero(w) * w.dtype.itemsize)
