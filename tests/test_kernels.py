"""Every Triton kernel against its PyTorch reference twin, run by Triton's interpreter on the CPU.

Shapes are small and odd on purpose (pruned widths are not powers of two): every tile has masked
rows, columns and K tails. The custom ops are also checked with `torch.library.opcheck` (schema,
fake tensors, autograd registration) and their gradients against hand-written math.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from slimc import kernels  # noqa: E402
from slimc.kernels import _triton, sparse24, w8a8, wnbits  # noqa: E402

ODD = [(1, 37, 19), (5, 64, 33), (17, 100, 7), (33, 20, 40)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _int8(*shape, seed=0):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=_gen(seed))


@pytest.mark.parametrize("m,k,n", ODD)
def test_w8a8_int32_is_exact(m, k, n):
    a, b = _int8(m, k), _int8(k, n, seed=1)
    zp = torch.tensor([3], dtype=torch.int32)
    expect = (a.to(torch.int64) - 3) @ b.to(torch.int64)
    assert torch.equal(w8a8.reference(a, b, None, zp).to(torch.int64), expect)
    assert torch.equal(w8a8.triton_w8a8(a, b, None, zp).to(torch.int64), expect)
    assert torch.equal(w8a8.triton_w8a8(a, b).to(torch.int64), a.to(torch.int64) @ b.to(torch.int64))


@pytest.mark.parametrize("m,k,n", ODD)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_w8a8_fused_epilogue(m, k, n, per_token, out_dtype):
    a, b = _int8(m, k), _int8(k, n, seed=1)
    a_scale = torch.rand(m if per_token else 1, generator=_gen(2)) * 0.05 + 1e-3
    a_zp = torch.randint(-10, 10, (m if per_token else 1,), dtype=torch.int32, generator=_gen(3))
    b_scale = torch.rand(n, generator=_gen(4)) * 0.05 + 1e-3
    bias = torch.randn(n, generator=_gen(5))
    ref = w8a8.reference(a, b, a_scale, a_zp, b_scale, bias, out_dtype)
    got = w8a8.triton_w8a8(a, b, a_scale, a_zp, b_scale, bias, out_dtype)
    assert got.dtype == out_dtype
    # The math, written out: (acc - zp * colsum) * sa * sb + bias.
    acc = a.double() @ b.double() - a_zp.double().reshape(-1, 1) * b.double().sum(0)
    math = acc * a_scale.double().reshape(-1, 1) * b_scale.double() + bias.double()
    tol = 1e-5 if out_dtype == torch.float32 else 2e-3
    assert torch.allclose(ref.double(), math, rtol=tol, atol=tol * math.abs().max().item())
    assert torch.allclose(got.double(), ref.double(), rtol=tol, atol=tol * math.abs().max().item())


def test_uint8_activations_shift_to_int8_without_changing_a_minus_zp():
    a = torch.randint(0, 256, (4, 9), dtype=torch.uint8, generator=_gen())
    q, zp = w8a8.as_int8(a, torch.tensor(131, dtype=torch.uint8))
    assert q.dtype == torch.int8
    assert torch.equal(q.to(torch.int32) - zp, a.to(torch.int32) - 131)


def _nbits_weight(n, k, bits, block, zp_kind, seed=0):
    blocks = -(-k // block)
    codes = torch.randint(0, 2**bits, (n, blocks * block), dtype=torch.uint8, generator=_gen(seed))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)) if bits == 4 else codes
    b = packed.reshape(n, blocks, block * bits // 8).contiguous()
    scales = torch.rand(n * blocks, generator=_gen(seed + 1)) * 0.1 + 0.01
    if zp_kind == "none":
        zp = None
    elif zp_kind == "packed":
        zcodes = torch.randint(0, 2**bits, (n, blocks + blocks % 2), dtype=torch.uint8, generator=_gen(seed + 2))
        zp = (zcodes[:, 0::2] | (zcodes[:, 1::2] << 4)).reshape(-1) if bits == 4 else zcodes[:, :blocks].reshape(-1)
    else:
        zp = torch.rand(n * blocks, generator=_gen(seed + 3)) * 2**bits
    return codes[:, :k], b, scales, zp


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zp_kind", ["none", "packed", "float"])
@pytest.mark.parametrize("m,k,n,block", [(1, 70, 21, 32), (3, 64, 16, 16), (19, 48, 37, 32), (2, 130, 9, 64)])
def test_nbits_kernel_matches_reference(bits, zp_kind, m, k, n, block):
    codes, b, scales, zp = _nbits_weight(n, k, bits, block, zp_kind)
    # The layout, decoded by hand: element k of row n is code[n, k] minus its block's zero point, times its scale.
    blocks = -(-k // block)
    if zp_kind == "none":
        zfull = torch.full((n, blocks), 2.0 ** (bits - 1))
    else:
        zfull = wnbits._zero_points(zp, n, blocks, bits)
    w = (codes.float() - zfull.repeat_interleave(block, 1)[:, :k]) * scales.reshape(n, blocks).repeat_interleave(block, 1)[:, :k]
    assert torch.allclose(wnbits.dequantize(b, scales, zp, k, bits, block), w, atol=1e-6)
    a = torch.randn(m, k, generator=_gen(7))
    ref = wnbits.reference(a, b, scales, zp, None, k, bits, block)
    assert torch.allclose(ref, a @ w.t(), rtol=1e-5, atol=1e-4)
    got = wnbits.triton_nbits(a, b, scales, zp, None, k, bits, block)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_nbits_kernel_fp16_activations_and_bias():
    codes, b, scales, zp = _nbits_weight(24, 96, 4, 32, "none")
    a = torch.randn(5, 96, generator=_gen(8)).half()
    bias = torch.randn(24, generator=_gen(9)).half()
    ref = wnbits.reference(a, b, scales.half(), zp, bias, 96, 4, 32)
    got = wnbits.triton_nbits(a, b, scales.half(), zp, bias, 96, 4, 32)
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def _sparse24_weight(k, n, seed=0):
    w = torch.randn(k, n, generator=_gen(seed))
    groups = w.reshape(k // 4, 4, n)
    drop = groups.abs().argsort(dim=1)[:, :2]
    return groups.scatter(1, drop, 0.0).reshape(k, n)


@pytest.mark.parametrize("m,k,n", [(1, 24, 13), (7, 20, 33), (18, 64, 5), (40, 36, 16)])
def test_sparse24_kernel_matches_reference(m, k, n):
    w = _sparse24_weight(k, n)
    values, meta = sparse24.compress(w)
    assert values.shape == (k // 2, n) and meta.shape == (k // 4, n) and meta.dtype == torch.uint8
    assert torch.equal(sparse24.decompress(values, meta), w)
    a = torch.randn(m, k, generator=_gen(1))
    bias = torch.randn(n, generator=_gen(2))
    ref = sparse24.reference(a, values, meta, bias)
    assert torch.allclose(ref, a @ w + bias, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sparse24.triton_sparse24(a, values, meta, bias), ref, rtol=1e-5, atol=1e-5)


def test_sparse24_refuses_dense_and_keeps_groups_with_fewer_nonzeros():
    assert not sparse24.is_24(torch.ones(8, 3))
    with pytest.raises(ValueError, match="not 2:4"):
        sparse24.compress(torch.ones(8, 3))
    w = torch.zeros(8, 2)
    w[3, 0] = 1.5  # one non-zero in a group; another group all zero
    values, meta = sparse24.compress(w)
    assert torch.equal(sparse24.decompress(values, meta), w)


def test_custom_ops_dispatch_to_triton_when_asked(monkeypatch):
    """SLIMC_KERNELS=triton sends the registered op itself to the (interpreted) Triton kernel."""
    a, b = _int8(6, 40), _int8(40, 11, seed=1)
    s = torch.tensor([0.02]), torch.rand(11, generator=_gen(3))
    calls = []
    real = w8a8.triton_w8a8
    monkeypatch.setattr(w8a8, "triton_w8a8", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    monkeypatch.setenv("SLIMC_KERNELS", "triton")
    assert _triton.use_triton(a)
    got = torch.ops.slimc.w8a8_mm(a, b, s[0], torch.tensor([1], dtype=torch.int32), s[1], None, torch.float32)
    monkeypatch.setenv("SLIMC_KERNELS", "reference")
    ref = torch.ops.slimc.w8a8_mm(a, b, s[0], torch.tensor([1], dtype=torch.int32), s[1], None, torch.float32)
    assert calls == [1]
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("SLIMC_KERNELS", "auto")
    assert not _triton.use_triton(a)  # CPU tensors: the reference serves real runs


def test_custom_ops_pass_opcheck():
    x = torch.randn(5, 24, generator=_gen(), requires_grad=True)
    w = _int8(24, 7)
    w_scale = torch.rand(7, generator=_gen(1)) * 0.01
    bias = torch.randn(7, generator=_gen(2), requires_grad=True)
    torch.library.opcheck(torch.ops.slimc.qdq_linear, (x, torch.tensor(0.05), torch.tensor(128, dtype=torch.uint8), w,
                                                       w_scale, bias))
    torch.library.opcheck(torch.ops.slimc.dynamic_linear, (x, w, w_scale, bias))
    _, b, scales, _ = _nbits_weight(7, 24, 4, 16, "none")
    torch.library.opcheck(torch.ops.slimc.matmul_nbits, (x, b, scales, None, bias, 24, 4, 16))
    values, meta = sparse24.compress(_sparse24_weight(24, 7))
    torch.library.opcheck(torch.ops.slimc.sparse24_mm, (x, values.requires_grad_(), meta, bias))


def test_gradients_reach_activations_bias_and_kept_sparse_values():
    x = torch.randn(6, 16, generator=_gen(), requires_grad=True)
    w = _sparse24_weight(16, 5)
    values, meta = sparse24.compress(w)
    values.requires_grad_()
    out = kernels.sparse24_linear(x, values, meta)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.allclose(x.grad, grad @ w.t(), atol=1e-5)
    dense_grad = x.detach().t() @ grad
    assert torch.allclose(sparse24.decompress(values.grad, meta), dense_grad * (w != 0), atol=1e-5)

    x.grad = None
    _, b, scales, _ = _nbits_weight(5, 16, 4, 16, "none")
    bias = torch.zeros(5, requires_grad=True)
    out = kernels.matmul_nbits(x, b, scales, None, bias, K=16, N=5, bits=4, block_size=16)
    out.backward(grad)
    assert torch.allclose(x.grad, grad @ wnbits.dequantize(b, scales, None, 16, 4, 16), atol=1e-5)
    assert torch.allclose(bias.grad, grad.sum(0))


def test_qdq_linear_straight_through_gradient_stops_where_clamped():
    x = torch.tensor([[0.0, 1.0, 100.0]], requires_grad=True)  # 100 / 0.1 saturates int8
    w = torch.ones(3, 2, dtype=torch.int8)
    out = kernels.qdq_linear(x, torch.tensor(0.1), torch.tensor(0, dtype=torch.int8), w, torch.tensor([1.0, 2.0]))
    assert torch.allclose(out, torch.tensor([[12.7 + 1.0, 2 * (12.7 + 1.0)]]), atol=1e-5)
    out.sum().backward()
    assert torch.allclose(x.grad, torch.tensor([[3.0, 3.0, 0.0]]))


def test_leading_dims_are_flattened_and_restored():
    x = torch.randn(2, 3, 24, generator=_gen())
    values, meta = sparse24.compress(_sparse24_weight(24, 5))
    assert kernels.sparse24_linear(x, values, meta).shape == (2, 3, 5)


def test_tuned_picks_one_config_per_shape_class(monkeypatch):
    """On a GPU every candidate of the shape class is timed once and the winner reused."""
    import sys
    import types

    timings = iter([3.0, 1.0, 2.0])
    fake = types.ModuleType("triton.testing")
    fake.do_bench = lambda fn, warmup, rep: (fn(), next(timings))[1]
    monkeypatch.setitem(sys.modules, "triton.testing", fake)
    monkeypatch.setattr(_triton, "_BEST", {})
    launched = []
    configs = {"interpret": [{"B": 0}], "decode": [{"B": 1}, {"B": 2}, {"B": 3}], "small": [{"B": 4}], "prefill": [{"B": 5}]}
    _triton.tuned("k", configs, 1, (8, 8), lambda **c: launched.append(c["B"]), on_gpu=True)
    assert launched == [1, 2, 3, 2]  # timed all three, then ran the fastest
    _triton.tuned("k", configs, 4, (8, 8), lambda **c: launched.append(c["B"]), on_gpu=True)
    assert launched[-1] == 2 and len(launched) == 5  # cached: no re-timing
    _triton.tuned("k", configs, 4096, (8, 8), lambda **c: launched.append(c["B"]), on_gpu=True)
    assert launched[-1] == 5
