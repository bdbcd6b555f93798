"""Triton kernels for quantized and sparse matmuls, each with its PyTorch reference twin.

Each kernel is a torch custom op (``torch.ops.slimc.*``), so `torch.compile` and `torch.export`
see one node, and a saved ``.pt2`` needs ``import slimc.kernels`` before `torch.export.load`.
The Triton version runs on CUDA tensors when ``triton`` imports; everywhere else the reference
runs (``SLIMC_KERNELS=reference`` forces it, ``SLIMC_KERNELS=triton`` forces Triton, interpreted
on the CPU, for tests).

=========================  ============================================================
`w8a8.w8a8_mm`             int8 x int8 -> int32, fused per-token/per-tensor activation scale,
                           per-channel weight scale, bias and output dtype
`w8a8.qdq_linear`          ONNX QDQ MatMul/Gemm and 1x1 Conv (static int8), trainable (straight-through)
`w8a8.dynamic_linear`      ONNX Runtime's dynamic int8 MatMul (DynamicQuantizeLinear+MatMulInteger)
`wnbits.matmul_nbits`      W4A16 / W8A16, group-wise scales, ONNX ``MatMulNBits`` layout
`sparse24.sparse24_mm`     2:4 sparse weight (values + 2-bit metadata) x dense activation
=========================  ============================================================

The functions below take activations of any rank (``[..., K]``) and flatten them for the ops.
"""

from __future__ import annotations

import torch

from slimc.kernels import sparse24, w8a8, wnbits

__all__ = ["DECOMPOSE", "dynamic_linear", "matmul_integer", "matmul_nbits", "qdq_conv1x1", "qdq_linear",
           "sparse24_linear"]

# Set inside `slimc.backends.triton.module.decomposed()` ("reference" or "pt2e"): the functions below
# compute with plain PyTorch ops instead of calling the custom ops, for exporters that do not know
# torch.ops.slimc ("pt2e": static int8 as quantized_decomposed Q/DQ around float ops, for XNNPACK).
DECOMPOSE: str | bool = False


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def pt2e_qdq(x, scale: float, zp: int, dtype: torch.dtype):
    """``quantized_decomposed`` quantize + dequantize per tensor (constant parameters), as PT2E writes it."""
    return pt2e_dequantize(pt2e_quantize(x, scale, zp, dtype), scale, zp, dtype)


def pt2e_quantize(x, scale: float, zp: int, dtype: torch.dtype):
    """The int8 codes of ``quantized_decomposed.quantize_per_tensor``; a uint8 tensor is written as the
    same values in int8 (codes and zero point - 128), which XNNPACK's qs8 kernels take."""
    return _quantized_decomposed().quantize_per_tensor(x, scale, *_as_int8(zp, dtype))


def pt2e_dequantize(codes, scale: float, zp: int, dtype: torch.dtype):
    return _quantized_decomposed().dequantize_per_tensor(codes, scale, *_as_int8(zp, dtype))


def _as_int8(zp: int, dtype: torch.dtype) -> tuple[int, int, int, torch.dtype]:
    return (zp - 128 if dtype == torch.uint8 else zp), -128, 127, torch.int8


def pt2e_weight(w, w_scale, zeros, axis: int):
    """A symmetric int8 weight dequantized per channel along ``axis`` by ``quantized_decomposed``.
    ``zeros``: an int64 buffer of zero points (XNNPACK wants a constant, not a computed tensor)."""
    return _quantized_decomposed().dequantize_per_channel(w, w_scale, zeros, axis, -127, 127, torch.int8)


def _quantized_decomposed():
    """``torch.ops.quantized_decomposed`` (registered by torch.ao's PT2E module on import)."""
    if not hasattr(torch.ops.quantized_decomposed, "quantize_per_tensor"):
        import importlib

        importlib.import_module("torch.ao.quantization.fx._decomposed")
    return torch.ops.quantized_decomposed


def qdq_linear(x, x_scale, x_zp, w, w_scale, bias=None, *, x_scale_value=None, x_zp_value=None, w_zeros=None,
               w_t=None, x_q=None):
    """``x_scale_value`` / ``x_zp_value``: the activation parameters as Python numbers; ``w_t``: the
    weight as [N, K] and ``w_zeros`` its zero points (int64 buffers); ``x_q``: the int8 codes of ``x``
    where another consumer shares its quantize (PT2E writes one quantize per tensor, a dequantize per
    consumer): what the pt2e form needs."""
    if DECOMPOSE == "pt2e" and x_scale_value is not None and w_t is not None:
        # dequantize -> linear -> (the next quantize) with no reshape between: XNNPACK's partitioner takes a
        # quantized linear only in exactly that pattern (measured: a reshape on either side left it float).
        xd = (pt2e_dequantize(x_q, x_scale_value, x_zp_value, x_zp.dtype) if x_q is not None else
              pt2e_qdq(x, x_scale_value, x_zp_value, x_zp.dtype))
        return torch.nn.functional.linear(xd, pt2e_weight(w_t, w_scale, w_zeros, 0), bias)
    rows, lead = _rows(x)
    if DECOMPOSE:
        q = w8a8.quantize(rows, x_scale, x_zp).to(torch.float32)
        zp = x_zp.to(torch.float32) - (128 if x_zp.dtype == torch.uint8 else 0)
        out = _dequantized_mm((q - zp) * x_scale.float(), w, w_scale, bias).to(x.dtype)
    else:
        out = w8a8.qdq_linear(rows, x_scale, x_zp, w, w_scale, bias)
    return out.reshape(*lead, w.shape[1])


def qdq_conv1x1(x, x_scale, x_zp, w, w_scale, bias=None, *, x_scale_value=None, x_zp_value=None, w_zeros=None,
                w_t=None, x_q=None):
    """A QDQ 1x1 convolution (stride 1, no padding) is a matmul over channels: ``x`` [N, C, *spatial]
    goes channels-last through `qdq_linear` with ``w`` [C_in, C_out] and comes back channels-first.
    pt2e form: ``w_t`` is the conv weight [C_out, C_in, 1, ...]."""
    if DECOMPOSE == "pt2e" and x_scale_value is not None and w_t is not None:
        xd = (pt2e_dequantize(x_q, x_scale_value, x_zp_value, x_zp.dtype) if x_q is not None else
              pt2e_qdq(x, x_scale_value, x_zp_value, x_zp.dtype))
        conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[x.dim() - 3]
        return conv(xd, pt2e_weight(w_t, w_scale, w_zeros, 0), bias)
    out = qdq_linear(x.movedim(1, -1), x_scale, x_zp, w, w_scale, bias)
    return out.movedim(-1, 1)


def _dequantized_mm(x, w, w_scale, bias):
    out = x @ w8a8.dequantize_weight(w, w_scale)
    return out + bias.float() if bias is not None else out


def dynamic_linear(x, w, w_scale, bias=None):
    rows, lead = _rows(x)
    if DECOMPOSE:
        q, scale, zp = w8a8.dynamic_quantize(rows)
        out = _dequantized_mm((q.to(torch.float32) - zp.to(torch.float32)) * scale, w, w_scale, bias).to(x.dtype)
    else:
        out = w8a8.dynamic_linear(rows, w, w_scale, bias)
    return out.reshape(*lead, w.shape[1])


def matmul_integer(a, b, a_zp=None, b_zp=None):
    """ONNX MatMulInteger with a constant symmetric int8 weight ``b`` [K, N]: exact int32."""
    rows, lead = _rows(a)
    q, zp = w8a8.as_int8(rows, a_zp)
    if DECOMPOSE:  # float64 is exact for 8-bit products summed over any practical K
        out = torch.round((q.to(torch.float64) - zp.to(torch.float64)) @ b.to(torch.float64)).to(torch.int32)
    else:
        out = w8a8.w8a8_mm(q, b, None, zp.reshape(1), None, None, torch.int32)
    return out.reshape(*lead, b.shape[1])


def matmul_nbits(a, b, scales, zero_points=None, bias=None, *, K, N, bits=4, block_size=32):  # noqa: N803
    rows, lead = _rows(a)
    op = wnbits.reference if DECOMPOSE else wnbits.matmul_nbits
    return op(rows, b, scales, zero_points, bias, K, bits, block_size).reshape(*lead, N)


def sparse24_linear(x, values, meta, bias=None):
    rows, lead = _rows(x)
    op = sparse24.reference if DECOMPOSE else sparse24.sparse24_mm
    return op(rows, values, meta, bias).reshape(*lead, values.shape[1])
