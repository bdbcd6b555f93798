"""Weight-only W4A16 / W8A16 matmul in ONNX Runtime's ``MatMulNBits`` layout.

``y[m, n] = sum_k a[m, k] * (q[n, k] - zp[n, k // bs]) * scale[n, k // bs]`` (+ bias[n])

* ``b``: uint8 [N, blocks, bs * bits / 8]: each output channel's K values in blocks of ``bs``; 4-bit
  codes two per byte, the even element in the low nibble;
* ``scales``: [N * blocks] (or [N, blocks]) in the activation's float type;
* ``zero_points``: absent (``2 ** (bits - 1)``, symmetric), packed uint8 like the codes, or float.

The Triton kernel unpacks and dequantizes a tile of codes in registers and feeds the tensor cores
in the activation's dtype: the weight crosses memory at 4 (or 8) bits, which is what decode
(M = 1..16, memory-bound) gains from. Decode and prefill use different tile shapes (`CONFIGS`).
"""

from __future__ import annotations

import torch

from slimc.kernels import _triton

CONFIGS = {
    "interpret": [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)],
    "decode": [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128), dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),
               dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256), dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64)],
    "small": [dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
              dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)],
    "prefill": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32), dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
                dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=32)],
}

if _triton.available():
    import triton.language as tl

    @_triton.kernel
    def _nbits_kernel(a_ptr, b_ptr, scale_ptr, zp_ptr, bias_ptr, out_ptr,
                      M, N, K, blocks, row_bytes, zp_row, stride_am, stride_ak, stride_om, stride_on,
                      BITS: tl.constexpr, GROUP: tl.constexpr, ZP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wmask = k_ok[:, None] & n_ok[None, :]
            if BITS == 4:
                byte = tl.load(b_ptr + rn[None, :] * row_bytes + (kk // 2)[:, None], mask=wmask, other=0)
                q = ((byte >> ((kk % 2) * 4)[:, None]) & 0xF).to(tl.float32)
            else:
                q = tl.load(b_ptr + rn[None, :] * row_bytes + kk[:, None], mask=wmask, other=0).to(tl.float32)
            group = kk // GROUP
            s = tl.load(scale_ptr + rn[None, :] * blocks + group[:, None], mask=wmask, other=0.0).to(tl.float32)
            if ZP_MODE == 0:
                zp = 2.0 ** (BITS - 1)
            elif ZP_MODE == 1:  # packed like the codes
                if BITS == 4:
                    zb = tl.load(zp_ptr + rn[None, :] * zp_row + (group // 2)[:, None], mask=wmask, other=0)
                    zp = ((zb >> ((group % 2) * 4)[:, None]) & 0xF).to(tl.float32)
                else:
                    zp = tl.load(zp_ptr + rn[None, :] * zp_row + group[:, None], mask=wmask, other=0).to(tl.float32)
            else:  # float zero points, one per scale
                zp = tl.load(zp_ptr + rn[None, :] * blocks + group[:, None], mask=wmask, other=0.0).to(tl.float32)
            w = ((q - zp) * s).to(a.dtype)
            if IEEE:  # fp32 activations: full precision, not TF32
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def unpack(b: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Codes [N, K] (int16) from the packed [N, blocks, blob] uint8 layout."""
    n = b.shape[0]
    flat = b.reshape(n, -1)
    if bits == 4:  # % and // rather than & and >>: exporters mistype shifts of uint8
        wide = flat.to(torch.int16)
        codes = torch.stack([wide % 16, wide // 16], dim=-1).reshape(n, -1)
    elif bits == 8:
        codes = flat
    else:
        raise ValueError(f"MatMulNBits with bits={bits}: slimc lowers 4 and 8 bits")
    return codes[:, :k].to(torch.int16)


def _zero_points(zero_points, n: int, blocks: int, bits: int) -> torch.Tensor:
    if zero_points is None:
        return torch.full((n, blocks), float(2 ** (bits - 1)))
    if zero_points.dtype == torch.uint8:
        return unpack(zero_points.reshape(n, -1), blocks, bits).to(torch.float32)
    return zero_points.reshape(n, blocks).to(torch.float32)


def dequantize(b, scales, zero_points, k: int, bits: int, block_size: int) -> torch.Tensor:
    """The float weight [N, K] that ``b`` encodes."""
    n = b.shape[0]
    blocks = -(-k // block_size)
    codes = unpack(b, k, bits).to(torch.float32)
    s = scales.reshape(n, blocks).to(torch.float32).repeat_interleave(block_size, dim=1)[:, :k]
    zp = _zero_points(zero_points, n, blocks, bits).to(codes.device).repeat_interleave(block_size, dim=1)[:, :k]
    return (codes - zp) * s


def reference(a, b, scales, zero_points, bias, k: int, bits: int, block_size: int) -> torch.Tensor:
    w = dequantize(b, scales, zero_points, k, bits, block_size)
    out = a.to(torch.float32) @ w.t()
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(a.dtype)


def triton_nbits(a, b, scales, zero_points, bias, k: int, bits: int, block_size: int) -> torch.Tensor:
    m = a.shape[0]
    n = b.shape[0]
    blocks = -(-k // block_size)
    out = torch.empty(m, n, device=a.device, dtype=a.dtype)
    if m == 0 or n == 0:
        return out
    dummy = torch.zeros(1, device=a.device, dtype=a.dtype)
    zp_mode = 0 if zero_points is None else (1 if zero_points.dtype == torch.uint8 else 2)
    zp = zero_points.reshape(n, -1).contiguous() if zero_points is not None else dummy
    b2 = b.reshape(n, -1).contiguous()
    scales2 = scales.reshape(n, blocks).contiguous()

    def launch(BLOCK_M, BLOCK_N, BLOCK_K):  # noqa: N803 - Triton block-size names
        grid = (_triton.cdiv(m, BLOCK_M), _triton.cdiv(n, BLOCK_N))
        _nbits_kernel[grid](
            a, b2, scales2, zp, bias if bias is not None else dummy, out,
            m, n, k, blocks, b2.shape[1], zp.shape[1] if zero_points is not None else 0,
            a.stride(0), a.stride(1), out.stride(0), out.stride(1),
            BITS=bits, IEEE=a.dtype == torch.float32, GROUP=block_size, ZP_MODE=zp_mode, HAS_BIAS=bias is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )

    _triton.tuned("nbits", CONFIGS, m, (n, k, bits, block_size), launch, a.is_cuda)
    return out


@torch.library.custom_op("slimc::matmul_nbits", mutates_args=())
def matmul_nbits(a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 bias: torch.Tensor | None, k: int, bits: int, block_size: int) -> torch.Tensor:
    """a [M, K] float x MatMulNBits weight -> [M, N] in a's dtype."""
    if _triton.use_triton(a, b):
        return triton_nbits(a, b, scales, zero_points, bias, k, bits, block_size)
    return reference(a, b, scales, zero_points, bias, k, bits, block_size)


@matmul_nbits.register_fake
def _(a, b, scales, zero_points, bias, k, bits, block_size):
    return a.new_empty(a.shape[0], b.shape[0])


def _setup(ctx, inputs, output):
    a, b, scales, zero_points, bias, k, bits, block_size = inputs
    ctx.save_for_backward(b, scales, zero_points if zero_points is not None else torch.empty(0))
    ctx.meta = (k, bits, block_size, zero_points is not None, bias is not None, a.dtype)


def _backward(ctx, grad):
    """Gradients reach the activation (and bias): the frozen weight is dequantized for ``grad @ W``."""
    b, scales, zp = ctx.saved_tensors
    k, bits, block_size, has_zp, has_bias, dtype = ctx.meta
    w = dequantize(b, scales, zp if has_zp else None, k, bits, block_size)
    grad_a = (grad.to(torch.float32) @ w).to(dtype)
    return grad_a, None, None, None, grad.sum(0) if has_bias else None, None, None, None


matmul_nbits.register_autograd(_backward, setup_context=_setup)
