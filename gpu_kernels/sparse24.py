"""2:4 sparse weight x dense activation, from compressed values and 2-bit metadata.

A weight ``w`` [K, N] (``y = x @ w``) is 2:4 sparse when every group of 4 consecutive rows (along
K, the reduction axis) holds at most 2 non-zeros in each column. `compress` stores it as

* ``values`` [K/2, N]: the two kept entries of each group, in order;
* ``meta`` uint8 [K/4, N]: their two positions within the group, ``i0 | i1 << 2``;

1.25 bytes per dense fp16 element instead of 2 (the weight's memory traffic drops 37.5%). The Triton
kernel rebuilds each dense tile in registers and runs an ordinary ``tl.dot``: Triton exposes no
sparse tensor-core instruction, so the gain is memory traffic (decode), not FLOPs. On CUDA,
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt) is the FLOP-halving alternative; the
benchmark (tools/bench_kernels.py) measures both, and the receipt claims no sparse speed-up.
"""

from __future__ import annotations

import torch

from slimc.kernels import _triton

CONFIGS = {
    "interpret": [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)],
    "decode": [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128), dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64)],
    "small": [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32)],
    "prefill": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32), dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)],
}


def is_24(w: torch.Tensor) -> bool:
    """Whether ``w`` [K, N] has at most 2 non-zeros in every group of 4 rows (K a multiple of 4)."""
    if w.dim() != 2 or w.shape[0] % 4 or w.numel() == 0:
        return False
    nonzero = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(1)
    return bool((nonzero <= 2).all())


def compress(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [K/2, N], meta uint8 [K/4, N])`` of a 2:4-sparse ``w`` [K, N]."""
    if not is_24(w):
        raise ValueError("the weight is not 2:4 sparse along its first (reduction) axis")
    k, n = w.shape
    groups = w.reshape(k // 4, 4, n)
    # The two positions to keep per group: non-zeros first (stable), so an all-zero group keeps 0, 1.
    order = torch.argsort((groups == 0).to(torch.int8), dim=1, stable=True)[:, :2]
    pos = torch.sort(order, dim=1).values  # i0 < i1
    values = torch.gather(groups, 1, pos).reshape(k // 2, n)
    meta = (pos[:, 0] | (pos[:, 1] << 2)).to(torch.uint8)
    return values.contiguous(), meta.contiguous()


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense [K, N] weight back from `compress`'s output."""
    g, n = meta.shape
    m = meta.to(torch.int64)
    pos = torch.stack([m % 4, (m // 4) % 4], dim=1)  # not & and >>: ExecuTorch has no shift op  # [G, 2, N]
    dense = torch.zeros(g, 4, n, dtype=values.dtype, device=values.device)
    return dense.scatter(1, pos, values.reshape(g, 2, n)).reshape(4 * g, n)


if _triton.available():
    import triton.language as tl

    @_triton.kernel
    def _sparse24_kernel(a_ptr, v_ptr, meta_ptr, bias_ptr, out_ptr, M, N, K,
                         stride_am, stride_ak, stride_vk, stride_vn, stride_gk, stride_gn, stride_om, stride_on,
                         HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
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
            group = kk // 4
            where = (kk % 4)[:, None]
            wmask = k_ok[:, None] & n_ok[None, :]
            meta = tl.load(meta_ptr + group[:, None] * stride_gk + rn[None, :] * stride_gn, mask=wmask, other=0)
            v0 = tl.load(v_ptr + (2 * group)[:, None] * stride_vk + rn[None, :] * stride_vn, mask=wmask, other=0.0)
            v1 = tl.load(v_ptr + (2 * group + 1)[:, None] * stride_vk + rn[None, :] * stride_vn, mask=wmask,
                         other=0.0)
            i0 = (meta & 3).to(tl.int32)
            i1 = ((meta >> 2) & 3).to(tl.int32)
            w = tl.where(i0 == where, v0, 0.0) + tl.where(i1 == where, v1, 0.0)
            if IEEE:  # fp32 activations: full precision, not TF32 (exact graphs must stay exact)
                acc = tl.dot(a, w.to(a.dtype), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.to(a.dtype), acc)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def reference(a, values, meta, bias):
    out = a.to(torch.float32) @ decompress(values, meta).to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(a.dtype)


def triton_sparse24(a, values, meta, bias):
    m, k = a.shape
    n = values.shape[1]
    out = torch.empty(m, n, device=a.device, dtype=a.dtype)
    if m == 0 or n == 0:
        return out
    dummy = torch.zeros(1, device=a.device, dtype=a.dtype)

    def launch(BLOCK_M, BLOCK_N, BLOCK_K):  # noqa: N803 - Triton block-size names
        grid = (_triton.cdiv(m, BLOCK_M), _triton.cdiv(n, BLOCK_N))
        _sparse24_kernel[grid](
            a, values, meta, bias if bias is not None else dummy, out, m, n, k,
            a.stride(0), a.stride(1), values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
            out.stride(0), out.stride(1), HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )

    _triton.tuned("sparse24", CONFIGS, m, (n, k), launch, a.is_cuda)
    return out


@torch.library.custom_op("slimc::sparse24_mm", mutates_args=())
def sparse24_mm(a: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a [M, K] x the 2:4 weight (values [K/2, N], meta [K/4, N]) -> [M, N]."""
    if _triton.use_triton(a, values):
        return triton_sparse24(a, values, meta, bias)
    return reference(a, values, meta, bias)


@sparse24_mm.register_fake
def _(a, values, meta, bias):
    return a.new_empty(a.shape[0], values.shape[1])


def _setup(ctx, inputs, output):
    a, values, meta, bias = inputs
    ctx.save_for_backward(a, values, meta)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """Gradients for the activation and for the kept values only: fine-tuning keeps the 2:4 pattern."""
    a, values, meta = ctx.saved_tensors
    dense = decompress(values, meta).to(torch.float32)
    g = grad.to(torch.float32)
    grad_a = (g @ dense.t()).to(a.dtype)
    grad_dense = a.to(torch.float32).t() @ g  # [K, N]
    gk, n = meta.shape
    m = meta.to(torch.int64)
    pos = torch.stack([m % 4, (m // 4) % 4], dim=1)  # not & and >>: ExecuTorch has no shift op
    grad_values = torch.gather(grad_dense.reshape(gk, 4, n), 1, pos).reshape(2 * gk, n).to(values.dtype)
    return grad_a, grad_values, None, grad.sum(0) if ctx.has_bias else None


sparse24_mm.register_autograd(_backward, setup_context=_setup)
