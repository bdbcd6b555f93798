"""Types and ranks of values after ONNX Runtime's ``com.microsoft`` ops.

ONNX's shape inference does not know ORT's contrib ops (the fused Attention, SkipLayerNormalization,
FastGelu... that ORT's transformer optimizer writes), so every value after one is left untyped.
Libraries that need each value's type (ORT's quantizer) or rank (slimc's calibration) then fail
deep inside. ONNX Runtime's own symbolic shape inference knows those ops: `ort_symbolic` runs it.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("slimc")


def ort_symbolic(proto: Any) -> Any | None:
    """``proto`` with ``value_info`` from ONNX Runtime's symbolic shape inference, or None where it
    fails (a model it cannot follow, or one over 2 GB: it works on one in-memory proto)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception as exc:  # noqa: BLE001 - the callers keep ONNX's types and say what stays unknown
        log.info("ONNX Runtime's symbolic shape inference failed (%s: %s)", type(exc).__name__, str(exc)[:200])
        return None
