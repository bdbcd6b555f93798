"""Block-wise 4-bit weight quantization (round-to-nearest and GPTQ) and the MatMulNBits layout.

Pure numpy; `slimc.passes.quant.int4` turns the results into ``com.microsoft.MatMulNBits`` nodes.

Quantization grid (the one ONNX Runtime's own quantizer uses, so the two agree code for code).
A weight ``W`` of shape [K, N] (ONNX MatMul: K inputs, N outputs) is cut along K into blocks of
``block_size`` rows; every (block, output column) pair gets a scale ``s`` and a zero point
``z`` in 0..15, and each weight becomes a 4-bit code ``q = clamp(round(w / s + z), 0, 15)``
(``round`` halves away from zero, as C's ``roundf``), dequantized as ``(q - z) * s``:

- symmetric: ``s = -m / 8`` where ``m`` is the block's value of largest magnitude, ``z = 8``
  (not stored). ``m`` itself maps to code 0 (-8), so the larger side of the block gets the
  eight negative steps and the other side seven; ``s`` is negative when ``m`` is positive.
- asymmetric: the block's range widened to include 0, ``s = (max - min) / 15``,
  ``z = round(-min / s)``.

Round-to-nearest (`rtn`) rounds every weight on that grid. GPTQ (Frantar et al., 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers") quantizes
the K input dimensions one at a time and spreads each one's rounding error over the dimensions
not yet quantized, weighted by the inverse of the layer's input Hessian ``H = 2 XᵀX / n``
(``X`` the calibration activations, [n, K]), which minimises the output error
``‖X W − X Ŵ‖²`` instead of the weight error. Details, in the original's order: dead inputs
(``H_ii = 0``) get their weight row zeroed and ``H_ii = 1``; ``H += damp · mean(diag H) · I``;
the upper Cholesky factor ``U`` of ``H⁻¹`` gives the update ``W[j+1:] -= (w_j − q_j) / U_jj ·
U_j,j+1:``, applied lazily: within a batch of 128 dimensions at once, to the rest after each
batch. A block's scale and zero point are computed when GPTQ reaches its first dimension, from
the weights as updated so far.

MatMulNBits layout (``bits=4``; ``n_blocks = ceil(K / block_size)``, K padded to a whole
number of blocks with codes that dequantize to 0):

- ``B``: uint8 [N, n_blocks, block_size / 2]; output column ``n``'s codes along K, two per byte,
  the even position in the low nibble;
- ``scales``: [N, n_blocks], the weight's float type;
- ``zero_points`` (asymmetric only): uint8 [N, ceil(n_blocks / 2)], packed the same way (a
  padding nibble is 8); without it every zero point is 8.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BITS = 4
MAX_CODE = (1 << BITS) - 1  # 15
MID = 1 << (BITS - 1)  # 8: the implicit zero point of symmetric quantization
LAZY_BATCH = 128  # GPTQ's lazy-update batch (dimensions of K)


@dataclasses.dataclass
class Quantized:
    """A [K, N] weight quantized in blocks of ``block_size`` along K.

    ``codes`` is uint8 [N, n_blocks * block_size] (K padded with each block's zero point),
    ``scales`` float32 and ``zero_points`` uint8, both [N, n_blocks].
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int
    block_size: int
    symmetric: bool

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        """The weight the quantized model computes with, float32 [K, N]."""
        return dequantize(self.codes, self.scales, self.zero_points, self.block_size)[:, : self.k].T.copy()


def n_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, halves away from zero (C's ``roundf``; numpy rounds halves to even)."""
    r = np.round(x)
    frac = x - np.trunc(x)
    tie = np.abs(frac) == 0.5
    return np.where(tie, np.trunc(x) + np.sign(x), r)


def block_params(w: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (uint8) of each row of ``w`` [..., block], reduced over the last axis."""
    w = w.astype(np.float32, copy=False)
    lo, hi = w.min(axis=-1), w.max(axis=-1)
    if symmetric:
        peak = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scale = (-peak / np.float32(MID)).astype(np.float32)
        return scale, np.full(scale.shape, MID, np.uint8)
    lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
    scale = ((hi - lo) / np.float32(MAX_CODE)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(scale != 0, np.float32(0) - lo / scale, lo).astype(np.float32)
    zp = np.clip(round_half_away(zp), 0, MAX_CODE).astype(np.uint8)
    return scale, zp


def encode(w: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """Codes of ``w`` [..., B] with one scale / zero point per row ([...]): float32 arithmetic as ORT's."""
    with np.errstate(divide="ignore"):
        recip = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    x = (w.astype(np.float32) * recip[..., None]).astype(np.float32) + zp[..., None].astype(np.float32)
    return np.clip(round_half_away(x), 0, MAX_CODE).astype(np.uint8)


def decode(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return ((codes.astype(np.float32) - zp[..., None].astype(np.float32)) * scale[..., None]).astype(np.float32)


def dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int) -> np.ndarray:
    """Dequantized weight as stored, float32 [N, n_blocks * block_size] (padding included)."""
    n, nb = scales.shape
    blocks = codes.reshape(n, nb, block_size)
    return decode(blocks, scales, zero_points).reshape(n, nb * block_size)


def _padded(weight: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> [N, n_blocks * block_size] float32, K padded with zeros."""
    k, _ = weight.shape
    pad = n_blocks(k, block_size) * block_size - k
    return np.pad(np.asarray(weight, np.float32).T, ((0, 0), (0, pad)))


def _pad_codes(codes: np.ndarray, zero_points: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Set the codes past K to their block's zero point (they dequantize to exactly 0)."""
    if codes.shape[1] > k:
        last = np.repeat(zero_points, block_size, axis=1)
        codes[:, k:] = last[:, k:]
    return codes


# Weight elements encoded at once by `rtn` (its float32 temporaries are a few times this many bytes).
RTN_CHUNK_ELEMENTS = 1 << 20


def rtn(weight: np.ndarray, block_size: int, symmetric: bool = True) -> Quantized:
    """Round-to-nearest block-wise quantization of a [K, N] weight.

    Output columns are independent (each has its own blocks), so they are encoded a chunk of
    columns at a time: the temporaries are those of ``RTN_CHUNK_ELEMENTS`` weights, not of the
    whole weight, and the codes are the same."""
    k, n = weight.shape
    nb = n_blocks(k, block_size)
    codes = np.empty((n, nb * block_size), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zps = np.empty((n, nb), np.uint8)
    step = max(1, RTN_CHUNK_ELEMENTS // max(1, nb * block_size))
    for start in range(0, n, step):
        stop = min(n, start + step)
        w = _padded(weight[:, start:stop], block_size)
        blocks = w.reshape(stop - start, nb, block_size)
        # padding zeros change neither the largest magnitude nor the (0-including) range of a block
        scales[start:stop], zps[start:stop] = block_params(blocks, symmetric)
        codes[start:stop] = encode(blocks, scales[start:stop], zps[start:stop]).reshape(stop - start, nb * block_size)
    return Quantized(_pad_codes(codes, zps, k, block_size), scales, zps, k, block_size, symmetric)


def hessian(gram: np.ndarray, count: int) -> np.ndarray:
    """GPTQ's ``H = 2 XᵀX / n`` from a Gram matrix over ``count`` rows."""
    return 2.0 * np.asarray(gram, np.float64) / max(int(count), 1)


def _inverse_lower(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower triangular matrix, by halves (numpy has no trtri): about n³/3 multiply-adds."""
    n = lower.shape[0]
    if n <= 128:
        return np.tril(np.linalg.inv(lower))
    m = n // 2
    a_inv, c_inv = _inverse_lower(lower[:m, :m]), _inverse_lower(lower[m:, m:])
    out = np.zeros_like(lower)
    out[:m, :m], out[m:, m:] = a_inv, c_inv
    out[m:, :m] = -(c_inv @ lower[m:, :m]) @ a_inv
    return out


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper triangular ``U`` with ``H⁻¹ = Uᵀ U`` (raises LinAlgError when H is not positive definite).

    With ``J`` the order reversal and ``J H J = M Mᵀ`` (Cholesky), ``H = R Rᵀ`` for the upper
    triangular ``R = J M J``, so ``H⁻¹ = R⁻ᵀ R⁻¹`` and ``U = R⁻¹ = J M⁻¹ J``: one Cholesky and one
    triangular inverse, never the full inverse.
    """
    m = np.linalg.cholesky(h[::-1, ::-1])
    return np.ascontiguousarray(_inverse_lower(m)[::-1, ::-1])


@dataclasses.dataclass
class GptqInfo:
    """What GPTQ needed: dead inputs zeroed, and the damping actually used (raised if H was singular)."""

    dead_inputs: int
    damp: float


def gptq(weight: np.ndarray, h: np.ndarray, block_size: int, symmetric: bool = True, damp: float = 0.01,
         lazy_batch: int = LAZY_BATCH) -> tuple[Quantized, GptqInfo]:
    """GPTQ of a [K, N] weight given the input Hessian ``h`` [K, K] (see the module docstring).

    When ``H + damp·mean(diag H)·I`` is not positive definite (rounding on a nearly singular
    Hessian) the damping is multiplied by 10 until it is; the damping used is returned.
    """
    k, n = weight.shape
    if h.shape != (k, k):
        raise ValueError(f"gptq: Hessian shape {h.shape} does not match K={k}.")
    if lazy_batch % block_size:
        raise ValueError(f"gptq: the lazy batch ({lazy_batch}) must be a multiple of block_size ({block_size}).")
    # GPTQ's "columns" (the dimensions quantized one after another) are the K input dimensions:
    # the rows of an ONNX [K, N] weight, so this works on it as stored, one contiguous row at a time.
    w = np.array(weight, np.float32)
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    mean_diag = float(np.mean(np.diag(h)))
    used = damp
    while True:
        try:
            u = inverse_cholesky_upper(h + used * mean_diag * np.eye(k)).astype(np.float32)
            break
        except np.linalg.LinAlgError:
            used = max(used * 10, 1e-6)
            if used > 1e6:
                raise
    nb = n_blocks(k, block_size)
    codes = np.zeros((n, nb * block_size), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    zps = np.full((n, nb), MID, np.uint8)
    for i1 in range(0, k, lazy_batch):
        i2 = min(i1 + lazy_batch, k)
        w1 = w[i1:i2]  # a view: updated in place
        err = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row, g = i1 + i, (i1 + i) // block_size
            if row % block_size == 0:  # a new block starts: its grid from the weights as updated so far
                scales[:, g], zps[:, g] = block_params(w1[i:i + block_size].T, symmetric)
            q = encode(w1[i][:, None], scales[:, g], zps[:, g])[:, 0]
            codes[:, row] = q
            e = (w1[i] - decode(q[:, None], scales[:, g], zps[:, g])[:, 0]) / u1[i, i]
            w1[i + 1:] -= np.outer(u1[i, i + 1:], e)
            err[i] = e
        w[i2:] -= u[i1:i2, i2:].T @ err
    codes = _pad_codes(codes, zps, k, block_size)
    return Quantized(codes, scales, zps, k, block_size, symmetric), GptqInfo(int(dead.sum()), used)


def output_error(weight: np.ndarray, quantized: np.ndarray, h: np.ndarray, max_columns: int | None = None) -> float:
    """Relative output error on the calibration inputs: ``tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)`` (= ‖XΔW‖² / ‖XW‖²).

    Exact costs K²N multiply-adds (as much as GPTQ itself); ``max_columns`` estimates it on that
    many evenly spaced output columns instead.
    """
    w = np.asarray(weight, np.float64)
    q = np.asarray(quantized, np.float64)
    if max_columns is not None and w.shape[1] > max_columns:
        cols = np.linspace(0, w.shape[1] - 1, max_columns).round().astype(int)
        w, q = w[:, cols], q[:, cols]
    d = w - q
    num = float(np.sum((h @ d) * d))
    den = float(np.sum((h @ w) * w))
    return num / den if den > 0 else 0.0


# ---------------------------------------------------------------- MatMulNBits packing


def pack_nibbles(codes: np.ndarray, pad: int = 0) -> np.ndarray:
    """Pack 4-bit values along the last axis, two per byte, the even position low (odd length: ``pad`` fills)."""
    codes = np.asarray(codes, np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.full((*codes.shape[:-1], 1), pad, np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def unpack_nibbles(packed: np.ndarray, length: int) -> np.ndarray:
    packed = np.asarray(packed, np.uint8)
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :length]


@dataclasses.dataclass
class Packed:
    """MatMulNBits inputs: ``b`` uint8 [N, n_blocks, block_size/2], ``scales`` [N, n_blocks], ``zero_points`` or None."""

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return self.b.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)


def pack(q: Quantized, scale_dtype=np.float32) -> Packed:
    """The MatMulNBits tensors of ``q`` (zero points only when asymmetric)."""
    b = pack_nibbles(q.codes.reshape(q.n, q.n_blocks, q.block_size))
    zp = None if q.symmetric else pack_nibbles(q.zero_points, pad=MID)
    return Packed(b, q.scales.astype(scale_dtype), zp)


def unpack(packed: Packed, k: int, block_size: int) -> np.ndarray:
    """The weight [K, N] (float32) a MatMulNBits node computes with."""
    n, nb, _ = packed.b.shape
    codes = unpack_nibbles(packed.b, block_size).reshape(n, nb * block_size)
    scales = np.asarray(packed.scales, np.float32).reshape(n, nb)
    zps = np.full((n, nb), MID, np.uint8) if packed.zero_points is None else unpack_nibbles(packed.zero_points, nb).reshape(n, nb)
    return dequantize(codes, scales, zps, block_size)[:, :k].T.copy()
