"""W8A8: int8 activations x int8 weights -> int32, with the dequantization fused into the epilogue.

``out[m, n] = (sum_k a[m, k] * b[k, n] - a_zp[m] * colsum(b)[n]) * a_scale[m] * b_scale[n] + bias[n]``

* ``a``: int8 [M, K]. uint8 activations (ONNX's asymmetric ones) are shifted to int8 by the caller
  (`as_int8`): ``a - 128`` with ``zp - 128``, which leaves ``a - zp`` unchanged.
* ``a_scale`` / ``a_zp``: per tensor (one value) or per token (M values); ``b_scale``: per tensor
  or per output channel (N values); the weight is symmetric (zero point 0).
* without scales the raw int32 accumulator (minus the zero-point term) is returned: ONNX
  ``MatMulInteger``.

`w8a8_mm` is registered as the custom op ``slimc::w8a8_mm`` so `torch.compile` and
`torch.export` keep it as one node; `reference` is its PyTorch twin, used on the CPU and wherever
Triton cannot run.
"""

from __future__ import annotations

import torch

from slimc.kernels import _triton

CONFIGS = {
    "interpret": [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)],
    "decode": [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128), dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128),
               dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256)],
    "small": [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128),
              dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64)],
    "prefill": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
                dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64)],
}

if _triton.available():
    import triton.language as tl

    @_triton.kernel
    def _w8a8_kernel(a_ptr, b_ptr, out_ptr, a_scale_ptr, a_zp_ptr, b_scale_ptr, colsum_ptr, bias_ptr,
                     M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
                     A_PER_ROW: tl.constexpr, HAS_ZP: tl.constexpr, HAS_SCALE: tl.constexpr,
                     B_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak,
                        mask=m_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(b_ptr + (k0 + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if HAS_ZP:
            colsum = tl.load(colsum_ptr + rn, mask=n_ok, other=0)
            if A_PER_ROW:
                zp = tl.load(a_zp_ptr + rm, mask=m_ok, other=0)
                acc = acc - zp[:, None] * colsum[None, :]
            else:
                acc = acc - tl.load(a_zp_ptr) * colsum[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
        if HAS_SCALE:
            out = acc.to(tl.float32)
            if A_PER_ROW:
                out = out * tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)[:, None]
            else:
                out = out * tl.load(a_scale_ptr)
            if B_PER_COL:
                out = out * tl.load(b_scale_ptr + rn, mask=n_ok, other=0.0)[None, :]
            else:
                out = out * tl.load(b_scale_ptr)
            if HAS_BIAS:
                out = out + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptrs, acc, mask=mask)


def as_int8(a: torch.Tensor, zp: torch.Tensor | int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 -> int8 by subtracting 128 from values and zero point (their difference is kept)."""
    zp_t = torch.as_tensor(0 if zp is None else zp, device=a.device).to(torch.int32)
    if a.dtype == torch.uint8:
        return (a.to(torch.int16) - 128).to(torch.int8), zp_t - 128
    return a, zp_t


def reference(a, b, a_scale=None, a_zp=None, b_scale=None, bias=None, out_dtype=torch.float32):
    """The PyTorch twin: exact int32 accumulation (``torch._int_mm`` on the CPU, float64 elsewhere)."""
    if a.device.type == "cpu":
        acc = torch._int_mm(a, b) if a.shape[0] and a.shape[1] else torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32)
    else:
        acc = torch.round(a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)
    if a_zp is not None:
        zp = a_zp.reshape(-1, 1) if a_zp.numel() > 1 else a_zp.reshape(())
        acc = acc - zp.to(torch.int32) * b.to(torch.int32).sum(0, keepdim=True)
    if a_scale is None:
        return acc
    out = acc.to(torch.float32) * (a_scale.reshape(-1, 1) if a_scale.numel() > 1 else a_scale.reshape(()))
    out = out * (b_scale.reshape(1, -1) if b_scale.numel() > 1 else b_scale.reshape(()))
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def triton_w8a8(a, b, a_scale=None, a_zp=None, b_scale=None, bias=None, out_dtype=torch.float32, colsum=None):
    """The Triton kernel (compiled on CUDA tensors, interpreted on CPU ones)."""
    m, k = a.shape
    n = b.shape[1]
    has_scale = a_scale is not None
    out = torch.empty(m, n, device=a.device, dtype=out_dtype if has_scale else torch.int32)
    if m == 0 or n == 0:
        return out
    dummy = torch.zeros(1, device=a.device, dtype=torch.float32)
    izero = torch.zeros(1, device=a.device, dtype=torch.int32)
    has_zp = a_zp is not None
    if has_zp and colsum is None:
        colsum = b.to(torch.int32).sum(0)
    a_per_row = (a_scale is not None and a_scale.numel() > 1) or (a_zp is not None and a_zp.numel() > 1)
    a_scale_t = (a_scale.reshape(-1).float().expand(m).contiguous() if a_per_row else a_scale.reshape(-1).float()) \
        if has_scale else dummy
    a_zp_t = (a_zp.reshape(-1).to(torch.int32).expand(m).contiguous() if a_per_row else a_zp.reshape(-1).to(torch.int32)) \
        if has_zp else izero

    def launch(BLOCK_M, BLOCK_N, BLOCK_K):  # noqa: N803 - Triton block-size names
        grid = (_triton.cdiv(m, BLOCK_M), _triton.cdiv(n, BLOCK_N))
        _w8a8_kernel[grid](
            a, b, out, a_scale_t, a_zp_t,
            b_scale.reshape(-1).float() if has_scale else dummy,
            colsum.to(torch.int32) if has_zp else izero,
            bias if bias is not None else dummy,
            m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            A_PER_ROW=a_per_row, HAS_ZP=has_zp, HAS_SCALE=has_scale,
            B_PER_COL=has_scale and b_scale.numel() > 1, HAS_BIAS=bias is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )

    _triton.tuned("w8a8", CONFIGS, m, (n, k, has_scale), launch, a.is_cuda)
    return out


@torch.library.custom_op("slimc::w8a8_mm", mutates_args=())
def w8a8_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None, a_zp: torch.Tensor | None,
            b_scale: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """int8 [M, K] x int8 [K, N] -> int32 (no scales) or ``out_dtype`` (scales fused)."""
    if _triton.use_triton(a, b):
        return triton_w8a8(a, b, a_scale, a_zp, b_scale, bias, out_dtype)
    return reference(a, b, a_scale, a_zp, b_scale, bias, out_dtype)


@w8a8_mm.register_fake
def _(a, b, a_scale, a_zp, b_scale, bias, out_dtype):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype if a_scale is not None else torch.int32)


# ------------------------------------------------------------- QDQ linear: float in, float out, trainable


def quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """ONNX QuantizeLinear to int8 codes: ``clamp(round(x / s) + zp)`` in the zero point's range, then
    shifted to int8 if it was uint8."""
    lo, hi = (0, 255) if zp.dtype == torch.uint8 else (-128, 127)
    q = torch.clamp(torch.round(x.to(torch.float32) / scale) + zp.to(torch.float32), lo, hi)
    return (q - 128 if zp.dtype == torch.uint8 else q).to(torch.int8)


@torch.library.custom_op("slimc::qdq_linear", mutates_args=())
def qdq_linear(x: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x)) @ DequantizeLinear(w)`` (+ bias) as one int8 matmul.

    x: float [M, K]; x_scale/x_zp: per tensor (uint8 or int8 zero point); w: int8 [K, N], symmetric,
    w_scale per tensor or per output channel.
    """
    q = quantize(x, x_scale, x_zp)
    zp = x_zp.to(torch.int32) - (128 if x_zp.dtype == torch.uint8 else 0)
    return w8a8_mm(q, w, x_scale.float().reshape(1), zp.reshape(1), w_scale.float(), bias, x.dtype)


@qdq_linear.register_fake
def _(x, x_scale, x_zp, w, w_scale, bias):
    return x.new_empty(x.shape[0], w.shape[1])


def dequantize_weight(w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """A symmetric int8 weight [K, N] in float32: per output channel (N scales) or per tensor."""
    return w.to(torch.float32) * (w_scale.reshape(1, -1) if w_scale.numel() > 1 else w_scale.float())


def _qdq_setup(ctx, inputs, output):
    x, x_scale, x_zp, w, w_scale, bias = inputs
    ctx.save_for_backward(x, x_scale, x_zp, w, w_scale)
    ctx.has_bias = bias is not None


def _qdq_backward(ctx, grad):
    """Straight-through estimator: the gradient passes the rounding and stops where x was clamped."""
    x, x_scale, x_zp, w, w_scale = ctx.saved_tensors
    lo, hi = (0, 255) if x_zp.dtype == torch.uint8 else (-128, 127)
    pos = x.to(torch.float32) / x_scale + x_zp.to(torch.float32)
    inside = (pos >= lo - 0.5) & (pos <= hi + 0.5)
    grad_x = (grad.to(torch.float32) @ dequantize_weight(w, w_scale).t()) * inside
    grad_bias = grad.sum(0) if ctx.has_bias else None
    return grad_x.to(x.dtype), None, None, None, None, grad_bias


qdq_linear.register_autograd(_qdq_backward, setup_context=_qdq_setup)


def dynamic_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear (uint8, per tensor, range including 0), as int8 codes + zero point."""
    lo = torch.clamp(x.min(), max=0.0).float()
    hi = torch.clamp(x.max(), min=0.0).float()
    scale = (hi - lo) / 255.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / safe), 0, 255)
    q = torch.clamp(torch.round(x.float() / safe) + zp, 0, 255)
    return (q - 128).to(torch.int8), scale, (zp - 128).to(torch.int32)


@torch.library.custom_op("slimc::dynamic_linear", mutates_args=())
def dynamic_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """ONNX Runtime's dynamic int8 MatMul (DynamicQuantizeLinear -> MatMulInteger -> scale) as one op."""
    q, scale, zp = dynamic_quantize(x)
    return w8a8_mm(q, w, scale.reshape(1), zp.reshape(1), w_scale.float(), bias, x.dtype)


@dynamic_linear.register_fake
def _(x, w, w_scale, bias):
    return x.new_empty(x.shape[0], w.shape[1])


def _dyn_setup(ctx, inputs, output):
    x, w, w_scale, bias = inputs
    ctx.save_for_backward(w, w_scale)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _dyn_backward(ctx, grad):
    w, w_scale = ctx.saved_tensors
    grad_x = grad.to(torch.float32) @ dequantize_weight(w, w_scale).t()  # the dynamic range never clamps: plain STE
    return grad_x.to(ctx.x_dtype), None, None, grad.sum(0) if ctx.has_bias else None


dynamic_linear.register_autograd(_dyn_backward, setup_context=_dyn_setup)
