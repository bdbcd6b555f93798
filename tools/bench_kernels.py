"""Kernel benchmark: slimc's Triton kernels against torch's own matmuls, at the shapes of real layers.

    python -m slimc.tools.bench_kernels [--shapes 4096x4096,4096x11008,8192x8192] [--m 1,16,128,2048,8192]
                                        [--out benchmarks/kernels/gpu.json] [--markdown FILE] [--smoke]

Per weight shape K x N and rows M (tokens), on a CUDA GPU:

* ``bf16``: ``torch.matmul`` in bfloat16 (cuBLAS), the baseline every ratio is against;
* ``w8a8``: `slimc.kernels.w8a8.triton_w8a8` (int8 x int8, per-token activation scale and per-channel
  weight scale fused, bf16 out) and ``torch._int_mm`` (+ the same scaling in torch) side by side;
* ``w4a16``: `slimc.kernels.wnbits.triton_nbits` (MatMulNBits layout, block 32, bf16 activations);
* ``2:4``: `slimc.kernels.sparse24.triton_sparse24` and ``torch.sparse.to_sparse_semi_structured``.

Times are the median of `triton.testing.do_bench` (warm-up excluded); every kernel's output is
checked against its reference on the same inputs first, and the relative error is in the table.
The goals of issue 6 are checked per row (W8A8 >= 1.5x bf16 at M >= 2048; W4A16 >= 2.5x at M = 1;
2:4 >= 1.2x at M >= 2048). ``--smoke`` runs tiny shapes on the CPU (kernels interpreted, timings
meaningless) so CI keeps the tool working where there is no GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from slimc.tools import write_json, write_results

GOALS = {"w8a8": (2048, 1.5), "w4a16": (1, 2.5), "sparse24": (2048, 1.2)}  # kernel -> (M condition, min speed-up)


def _bench(fn, on_gpu: bool, repeats: int = 5) -> float:
    """Median milliseconds of ``fn`` (do_bench on a GPU; perf_counter in smoke runs)."""
    if on_gpu:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _goal_met(kernel: str, m: int, speedup: float | None) -> bool | None:
    cond_m, target = GOALS[kernel]
    applies = m >= cond_m if kernel != "w4a16" else m == cond_m
    return None if (not applies or speedup is None) else speedup >= target


def bench_shape(k: int, n: int, m: int, device: str) -> list[dict[str, Any]]:
    import torch

    from slimc.kernels import sparse24, w8a8, wnbits

    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(k, n, generator=g) / k**0.5).to(device=device, dtype=dtype)
    rows = []
    base_ms = _bench(lambda: x @ w, on_gpu)

    def row(kernel, impl, ms, err):
        speed = base_ms / ms if ms else None
        rows.append({"K": k, "N": n, "M": m, "kernel": kernel, "impl": impl, "ms": ms, "bf16_ms": base_ms,
                     "speedup_vs_bf16": speed, "rel_error_vs_reference": err,
                     "goal_met": _goal_met(kernel, m, speed) if on_gpu and kernel in GOALS and impl.startswith("slimc")
                     else None})

    # W8A8: per-token activation scales, per-channel weight scales.
    xs = x.float().abs().amax(1).clamp_min(1e-8) / 127
    xq = torch.round(x.float() / xs[:, None]).clamp(-127, 127).to(torch.int8)
    ws = w.float().abs().amax(0).clamp_min(1e-8) / 127
    wq = torch.round(w.float() / ws).clamp(-127, 127).to(torch.int8).contiguous()
    ref = w8a8.reference(xq.cpu(), wq.cpu(), xs.cpu(), None, ws.cpu(), None, torch.float32)
    got = w8a8.triton_w8a8(xq, wq, xs, None, ws, None, dtype)
    row("w8a8", "slimc triton", _bench(lambda: w8a8.triton_w8a8(xq, wq, xs, None, ws, None, dtype), on_gpu),
        _rel(got.cpu(), ref))
    if on_gpu and m > 16 and k % 8 == 0 and n % 8 == 0:
        def int_mm():
            return (torch._int_mm(xq, wq).float() * xs[:, None] * ws).to(dtype)

        row("w8a8", "torch._int_mm + scale", _bench(int_mm, on_gpu), _rel(int_mm().cpu(), ref))

    # W4A16 in the MatMulNBits layout (symmetric, block 32).
    block = 32
    blocks = -(-k // block)
    wt = w.float().t().contiguous()  # [N, K]
    padded = torch.nn.functional.pad(wt, (0, blocks * block - k)).reshape(n, blocks, block)
    scale = padded.abs().amax(-1).clamp_min(1e-8) / 7
    codes = (torch.round(padded / scale[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(n, -1)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, blocks, block // 2).contiguous()
    scales = scale.reshape(-1).to(dtype).contiguous()
    ref = wnbits.reference(x.cpu().float(), packed.cpu(), scales.cpu().float(), None, None, k, 4, block)
    got = wnbits.triton_nbits(x, packed, scales, None, None, k, 4, block)
    row("w4a16", "slimc triton", _bench(lambda: wnbits.triton_nbits(x, packed, scales, None, None, k, 4, block), on_gpu),
        _rel(got.cpu(), ref))

    # 2:4 along K.
    if k % 4 == 0:
        groups = w.float().reshape(k // 4, 4, n)
        drop = groups.abs().argsort(dim=1)[:, :2]
        w24 = groups.scatter(1, drop, 0.0).reshape(k, n).to(dtype)
        values, meta = sparse24.compress(w24)
        ref = sparse24.reference(x.cpu().float(), values.cpu().float(), meta.cpu(), None)
        got = sparse24.triton_sparse24(x, values, meta, None)
        row("sparse24", "slimc triton", _bench(lambda: sparse24.triton_sparse24(x, values, meta, None), on_gpu),
            _rel(got.cpu(), ref))
        if on_gpu:
            try:
                from torch.sparse import to_sparse_semi_structured

                ws24 = to_sparse_semi_structured(w24.t().contiguous())  # [N, K]: the weight of x @ W^T
                out = torch.nn.functional.linear(x, ws24)
                row("sparse24", "torch semi-structured", _bench(lambda: torch.nn.functional.linear(x, ws24), on_gpu),
                    _rel(out.cpu(), ref))
            except Exception as exc:  # not every GPU / build has cuSPARSELt
                rows.append({"K": k, "N": n, "M": m, "kernel": "sparse24", "impl": "torch semi-structured",
                             "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return rows


def run(shapes: list[tuple[int, int]], ms: list[int], device: str, out: Path | None = None) -> dict[str, Any]:
    import torch

    from slimc.kernels import _triton

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --smoke for the CPU check, or on a GPU machine")
    if not _triton.available():
        raise SystemExit("triton is not installed: pip install triton")
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU smoke run (Triton interpreter)"
    result: dict[str, Any] = {"device": machine, "torch": torch.__version__, "rows": []}
    import triton

    result["triton"] = triton.__version__
    for k, n in shapes:
        for m in ms:
            result["rows"] += bench_shape(k, n, m, device)
            write_json(result, out)
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Device: {result['device']}, torch {result['torch']}, triton {result.get('triton', '?')}", "",
             "| K x N | M | kernel | implementation | ms | bf16 ms | speed-up vs bf16 | rel. error | goal |",
             "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['kernel']} | {r['impl']} | - | - | - | - | {r['error']} |")
            continue
        goal = {True: "met", False: "NOT met", None: ""}[r["goal_met"]]
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['kernel']} | {r['impl']} | {r['ms']:.4f} | {r['bf16_ms']:.4f} | "
                     f"{r['speedup_vs_bf16']:.2f}x | {r['rel_error_vs_reference']:.2g} | {goal} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimc.tools.bench_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,4096x11008,8192x8192", help="K x N weight shapes")
    p.add_argument("--m", default="1,16,128,2048,8192", help="rows (tokens) per call")
    p.add_argument("--out", type=Path, default=Path("benchmarks/kernels/gpu.json"))
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreted): checks the tool, not speed")
    args = p.parse_args(argv)
    if args.smoke:
        shapes, ms, device = [(64, 48)], [1, 17], "cpu"
    else:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        ms, device = [int(v) for v in args.m.split(",")], "cuda"
    result = run(shapes, ms, device, args.out)
    write_results(result, markdown(result), None, args.markdown)  # run() wrote the JSON
    return 0


if __name__ == "__main__":
    sys.exit(main())
