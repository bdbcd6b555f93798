"""slimc: a compiler for model compression.

    import slimc
    result = slimc.compile(model, passes=["cleanup"], example_inputs=x, evaluation=data)
    result.save("out.onnx"); print(result.receipt)

Heavy modules (onnxruntime, torch) load on first use, so ``import slimc`` and the CLI start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from slimc.errors import (
    BackendError,
    BudgetError,
    DataError,
    ExportError,
    FidelityGuardError,
    LatencyGuardError,
    MissingExtraError,
    ModelLoadError,
    NoKVCacheError,
    OptionError,
    OutputPathError,
    PassConfigError,
    PassFailedError,
    SlimcError,
    TargetError,
    UnsafeModelError,
    VerificationError,
)

__version__ = "0.1.0"

_LAZY = {
    "compile": "slimc.api",
    "CompileResult": "slimc.api",
    "load": "slimc.frontends",
    "Pass": "slimc.pipeline",
    "PassReport": "slimc.pipeline",
    "PassContext": "slimc.pipeline",
    "Receipt": "slimc.receipt",
    "parse_pipeline": "slimc.pass_spec",
    "generate_text": "slimc.textgen",
    "open_generator": "slimc.textgen",
    "SamplingConfig": "slimc.generate",
    "GenerationStats": "slimc.generate",
    "GenerationResult": "slimc.textgen",
    "search": "slimc.evosearch.api",
    "SearchResult": "slimc.evosearch.api",
}

__all__ = [
    "BackendError", "BudgetError", "DataError", "ExportError", "FidelityGuardError", "LatencyGuardError", "MissingExtraError",
    "ModelLoadError", "NoKVCacheError", "OptionError", "OutputPathError", "PassConfigError", "PassFailedError", "SlimcError", "TargetError", "UnsafeModelError", "VerificationError", "__version__", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimc' has no attribute '{name}'")
