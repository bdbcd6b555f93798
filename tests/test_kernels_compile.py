"""Every GPU config of every Triton kernel, compiled ahead of time for A100 (sm_80) and H100/H200
(sm_90) on this CPU-only machine: it compiles, its dot runs on tensor cores (``mma``/``wgmma``
with the expected operand types in the PTX) and it fits the GPU's shared memory. The
interpreter (test_kernels.py) checks the numbers; this checks what the GPU compiler makes."""

from __future__ import annotations

import itertools
import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

from slimc.kernels import _triton, sparse24, w8a8, wnbits  # noqa: E402

GPU_CLASSES = ("decode", "small", "prefill")
CAPABILITIES = (80, 90)
I32 = "i32"


def _configs(module):
    return [cfg for cls in GPU_CLASSES for cfg in module.CONFIGS[cls]]


def _check(compiled, capability, operands: str | None, block_m: int = 64):
    ptx = compiled.asm["ptx"]
    if operands is not None:
        mma = [ln for ln in ptx.splitlines() if re.search(r"\b(wgmma\.mma_async|mma\.sync)", ln)]
        assert mma, "the dot did not become a tensor-core instruction"
        assert all(operands in ln for ln in mma), mma[0]
        if capability == 90 and block_m >= 64:  # wgmma needs 64 rows per warp group; decode tiles use mma.sync
            assert any("wgmma" in ln for ln in mma), "Hopper should use wgmma"
    assert compiled.metadata.shared <= _triton.SHARED_MEMORY_LIMIT[capability]


W8A8_SIG = {"a_ptr": "*i8", "b_ptr": "*i8", "out_ptr": "*bf16", "a_scale_ptr": "*fp32", "a_zp_ptr": "*i32",
            "b_scale_ptr": "*fp32", "colsum_ptr": "*i32", "bias_ptr": "*fp32", **dict.fromkeys(
                ["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_om", "stride_on"], I32)}


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("cfg", _configs(w8a8), ids=str)
def test_w8a8_compiles_to_int8_tensor_cores(capability, cfg):
    flags = dict(A_PER_ROW=True, HAS_ZP=True, HAS_SCALE=True, B_PER_COL=True, HAS_BIAS=True)
    compiled = _triton.compile_for_gpu(w8a8._w8a8_kernel, W8A8_SIG, {**flags, **cfg}, capability)
    _check(compiled, capability, ".s8", cfg["BLOCK_M"])


def test_w8a8_int32_output_variant_compiles():
    flags = dict(A_PER_ROW=False, HAS_ZP=True, HAS_SCALE=False, B_PER_COL=False, HAS_BIAS=False)
    sig = {**W8A8_SIG, "out_ptr": "*i32"}
    _check(_triton.compile_for_gpu(w8a8._w8a8_kernel, sig, {**flags, **w8a8.CONFIGS["prefill"][0]}, 90), 90, ".s8")


def _nbits_sig(dtype, zp_type):
    return {"a_ptr": f"*{dtype}", "b_ptr": "*u8", "scale_ptr": f"*{dtype}", "zp_ptr": zp_type, "bias_ptr": f"*{dtype}",
            "out_ptr": f"*{dtype}", **dict.fromkeys(["M", "N", "K", "blocks", "row_bytes", "zp_row", "stride_am",
                                                     "stride_ak", "stride_om", "stride_on"], I32)}


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cfg", _configs(wnbits), ids=str)
def test_nbits_compiles_to_bf16_tensor_cores(capability, bits, cfg):
    consts = dict(BITS=bits, GROUP=32, ZP_MODE=0, HAS_BIAS=False, IEEE=False, **cfg)
    compiled = _triton.compile_for_gpu(wnbits._nbits_kernel, _nbits_sig("bf16", "*bf16"), consts, capability)
    _check(compiled, capability, "bf16", cfg["BLOCK_M"])


@pytest.mark.parametrize("zp_mode, zp_type, dtype", [(1, "*u8", "fp16"), (2, "*fp16", "fp16"), (0, "*fp32", "fp32")])
def test_nbits_zero_point_and_dtype_variants_compile(zp_mode, zp_type, dtype):
    consts = dict(BITS=4, GROUP=64, ZP_MODE=zp_mode, HAS_BIAS=True, IEEE=dtype == "fp32", **wnbits.CONFIGS["decode"][0])
    compiled = _triton.compile_for_gpu(wnbits._nbits_kernel, _nbits_sig(dtype, zp_type), consts, 90)
    _check(compiled, 90, "f16" if dtype == "fp16" else None, 16)  # fp32 IEEE: FMA, not tensor cores


SPARSE_SIG = {"a_ptr": "*bf16", "v_ptr": "*bf16", "meta_ptr": "*u8", "bias_ptr": "*bf16", "out_ptr": "*bf16",
              **dict.fromkeys(["M", "N", "K", "stride_am", "stride_ak", "stride_vk", "stride_vn", "stride_gk", "stride_gn",
                               "stride_om", "stride_on"], I32)}


@pytest.mark.parametrize("capability, cfg", list(itertools.product(CAPABILITIES, _configs(sparse24))), ids=str)
def test_sparse24_compiles_to_bf16_tensor_cores(capability, cfg):
    consts = dict(HAS_BIAS=True, IEEE=False, **cfg)
    compiled = _triton.compile_for_gpu(sparse24._sparse24_kernel, SPARSE_SIG, consts, capability)
    _check(compiled, capability, "bf16", cfg["BLOCK_M"])
