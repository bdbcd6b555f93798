"""Triton availability, and kernels that run compiled on a GPU and interpreted on the CPU.

`kernel(fn)` keeps the Python source of a ``@triton.jit`` function and builds the compiled
`JITFunction` on first use with CUDA tensors, or Triton's interpreter (what ``TRITON_INTERPRET=1``
selects globally) with CPU tensors, so the same kernel is tested on a CPU-only machine without
changing the process environment. Kernels must not call other ``@jit`` functions.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch


@functools.cache
def available() -> bool:
    """Whether the ``triton`` package imports (it ships Linux x86-64/aarch64 wheels only)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is the same as none: the reference runs
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """The Triton kernel serves a call when its tensors are on a CUDA GPU and Triton imports, unless
    ``SLIMC_KERNELS=reference``; ``SLIMC_KERNELS=triton`` also selects it on the CPU (interpreted:
    slow, for tests). Otherwise the PyTorch reference twin runs."""
    choice = os.environ.get("SLIMC_KERNELS", "auto")
    if choice == "reference" or not available():
        return False
    if choice == "triton":
        return True
    return all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))


def cdiv(a: int, b: int) -> int:
    """Programs along one grid axis: ``a`` elements in blocks of ``b``."""
    return -(-a // b)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class kernel:  # noqa: N801 - used as a decorator, like triton.jit
    """A ``@triton.jit`` function built lazily, compiled for CUDA tensors or interpreted for CPU ones."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled = None
        self._interpreted = None
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._for(args)[grid](*args, **kwargs)

    def _for(self, args: tuple[Any, ...]):
        on_gpu = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        if on_gpu and not interpreting():
            if self._compiled is None:
                from triton.runtime.jit import JITFunction

                self._compiled = JITFunction(self.fn)
            return self._compiled
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted


_BEST: dict[tuple, dict[str, int]] = {}


def shape_class(m: int) -> str:
    """Rows per call decide the tile shape: decode (one token to a few), small batches, prefill."""
    return "decode" if m <= 16 else "small" if m <= 256 else "prefill"


def tuned(name: str, configs: dict[str, list[dict[str, int]]], m: int, key: tuple, launch, on_gpu: bool) -> None:
    """Launch with the fastest config of ``m``'s shape class, timed once per (kernel, class, key).

    ``configs`` maps each class to candidate block sizes (``"interpret"``: the one CPU runs use,
    small because the interpreter is slow and tests use small shapes). On a GPU the candidates are
    timed with `triton.testing.do_bench` on the first call of a shape class and the winner is kept.
    """
    if not on_gpu:
        launch(**configs["interpret"][0])
        return
    cls = shape_class(m)
    cache_key = (name, cls, *key)
    best = _BEST.get(cache_key)
    if best is None:
        candidates = configs[cls]
        if len(candidates) == 1:
            best = candidates[0]
        else:
            from triton.testing import do_bench

            timings = []
            for cfg in candidates:
                try:
                    timings.append((do_bench(lambda cfg=cfg: launch(**cfg), warmup=5, rep=20), cfg))
                except Exception:  # a config that does not fit (shared memory, registers) is skipped
                    continue
            best = min(timings, key=lambda t: t[0])[1]
        _BEST[cache_key] = best
    launch(**best)


# Shared memory per block (bytes) the launch may use: A100 (sm_80) and H100/H200 (sm_90).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def compile_for_gpu(k: kernel, signature: dict[str, str], constexprs: dict[str, Any], capability: int = 90,
                    num_warps: int = 4, num_stages: int = 3):
    """Compile ``k`` ahead of time for an NVIDIA GPU of compute ``capability``, without one.

    ``signature`` maps each runtime argument to a Triton type (``"*bf16"``, ``"i32"``); the result
    is a `CompiledKernel` whose ``asm["ptx"]`` shows which instructions the dot became and whose
    ``metadata.shared`` is the shared memory a launch needs. CI compiles every kernel config this way.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    source = ASTSource(JITFunction(k.fn), {**signature, **{name: "constexpr" for name in constexprs}}, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
