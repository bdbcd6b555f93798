"""Verification after every pass: full ONNX checker, loads in ORT, exact passes stay exact, and
no pass (lossy ones included) turns finite outputs into NaN or inf.

``outputs_match`` is the exactness criterion for passes that declare ``exact = True``: every
output element satisfies ``|got - ref| <= atol + rtol * max|ref|`` (a tolerance relative to
the output's scale, since fp32 reassociation in a rewritten graph moves values by a few ulps
of the largest magnitude, not of each element). Integer, boolean and string outputs must be
equal element for element.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from slimc import contrib_schemas
from slimc.errors import VerificationError, first_line

EXACT_RTOL = 1e-4
EXACT_ATOL = 1e-5


def check_model_file(path: str | Path, *, full: bool = True) -> None:
    """Run `onnx.checker` on the saved file (path-based, so models over 2 GB work)."""
    contrib_schemas.register()  # ORT's default-domain fused ops (SimplifiedLayerNormalization)
    try:
        onnx.checker.check_model(str(path), full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(f"ONNX checker: {first_line(exc, 500)}") from None
    except Exception as exc:  # the checker raises assorted C++ errors for malformed graphs
        raise VerificationError(f"ONNX checker failed: {first_line(exc, 500)}") from None


@dataclasses.dataclass
class OutputDiff:
    """The worst deviation between two runs, over every output of every batch."""

    max_abs: float
    max_scaled: float  # max_abs / (atol + rtol * max|ref|); <= 1 means within tolerance
    output: str

    @property
    def ok(self) -> bool:
        return self.max_scaled <= 1.0


def _numeric(dtype: np.dtype) -> bool:
    return dtype == np.bool_ or np.issubdtype(dtype, np.number)


def outputs_match(
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    names: list[str],
    *,
    rtol: float = EXACT_RTOL,
    atol: float = EXACT_ATOL,
) -> OutputDiff:
    """Compare batch-by-batch outputs; shapes must be identical."""
    worst = OutputDiff(0.0, 0.0, names[0] if names else "")
    for ref_batch, got_batch in zip(reference, candidate, strict=True):
        for name, ref, got in zip(names, ref_batch, got_batch, strict=True):
            if ref.shape != got.shape:
                raise VerificationError(f"output '{name}' changed shape from {ref.shape} to {got.shape}")
            if not _numeric(ref.dtype) or not _numeric(got.dtype):  # strings: equal or not
                same = ref.dtype == got.dtype and bool(np.array_equal(ref, got))
                diff, scaled = (0.0, 0.0) if same else (float("inf"), float("inf"))
            elif ref.dtype == np.bool_ or np.issubdtype(ref.dtype, np.integer):
                diff = float(np.max(ref != got)) if ref.size else 0.0
                scaled = diff * 1e9
            else:
                ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
                if not np.array_equal(np.isfinite(ref64), np.isfinite(got64)):
                    return OutputDiff(float("inf"), float("inf"), name)
                finite = np.isfinite(ref64)
                diff = float(np.max(np.abs(ref64 - got64)[finite])) if finite.any() else 0.0
                scale = float(np.max(np.abs(ref64[finite]))) if finite.any() else 0.0
                scaled = diff / (atol + rtol * scale)
            if scaled > worst.max_scaled:
                worst = OutputDiff(diff, scaled, name)
    return worst


@dataclasses.dataclass
class NonFinite:
    """Where a candidate run gives NaN/inf although the reference run is finite."""

    output: str
    count: int  # elements over all batches
    total: int  # elements of that output over all batches


def runs_match(
    run_reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    run_candidate: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    batches: list[dict[str, np.ndarray]],
    names: list[str],
    *,
    max_output_bytes: int | None = None,
    rtol: float = EXACT_RTOL,
    atol: float = EXACT_ATOL,
) -> OutputDiff:
    """`outputs_match` of two models run side by side on ``batches``, without keeping their outputs.

    With ``max_output_bytes`` each batch is run in sub-batches of rows (`slimc.subbatch.RowBudget`);
    the tolerance still scales with max|ref| over the whole batch, so the verdict is the same.
    """
    diff, _ = compare_runs(run_reference, run_candidate, batches, names, max_output_bytes=max_output_bytes,
                           rtol=rtol, atol=atol)
    return diff


def compare_runs(
    run_reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    run_candidate: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    batches: list[dict[str, np.ndarray]],
    names: list[str],
    *,
    max_output_bytes: int | None = None,
    exact: bool = True,
    rtol: float = EXACT_RTOL,
    atol: float = EXACT_ATOL,
) -> tuple[OutputDiff | None, NonFinite | None]:
    """Run both models side by side once: the exactness verdict (`runs_match`; None unless ``exact``)
    and the first output the candidate made NaN/inf where the reference is finite (`NonFinite`; the model's own NaN/inf are not counted)."""
    from slimc.subbatch import RowBudget

    rows, worst = RowBudget(max_output_bytes), OutputDiff(0.0, 0.0, names[0] if names else "")
    broken: dict[str, list[int]] = {}
    for batch in batches:
        diffs: dict[str, list[float]] = {}  # output -> [max |ref - got|, max |ref|, exact-compared output]
        for part in rows.split(batch):
            ref = run_reference(part)
            rows.observe(ref, part)
            got = run_candidate(part)
            for name, r, g in zip(names, ref, got, strict=True):
                if r.shape == g.shape and np.issubdtype(g.dtype, np.floating):
                    seen = broken.setdefault(name, [0, 0])
                    seen[0] += int(np.count_nonzero(~np.isfinite(g) & np.isfinite(r)))
                    seen[1] += g.size
                if not exact or (worst.max_scaled == float("inf")):
                    continue
                part_diff = _part_diff(name, r, g)
                if part_diff is None:
                    worst = OutputDiff(float("inf"), float("inf"), name)
                    continue
                acc = diffs.setdefault(name, [0.0, 0.0, part_diff[2]])
                acc[0], acc[1] = max(acc[0], part_diff[0]), max(acc[1], part_diff[1])
        for name, (diff, scale, discrete) in diffs.items():
            scaled = diff * 1e9 if discrete else diff / (atol + rtol * scale)
            if scaled > worst.max_scaled:
                worst = OutputDiff(diff, scaled, name)
    bad = next((NonFinite(n, c, t) for n, (c, t) in broken.items() if c), None)
    return (worst if exact else None), bad


def _part_diff(name: str, ref: np.ndarray, got: np.ndarray) -> tuple[float, float, bool] | None:
    """(max |ref - got|, max |ref|, integer?) over finite elements; None when the NaN/inf pattern differs.
    Float64 work in chunks of ``slimc.evaluate.CHUNK_ELEMENTS`` (one sub-batch of LM logits is 100s of MB)."""
    from slimc.evaluate import CHUNK_ELEMENTS

    if ref.shape != got.shape:
        raise VerificationError(f"output '{name}' changed shape from {ref.shape} to {got.shape}")
    if ref.dtype.kind not in "fc":  # integer, boolean and string outputs are compared exactly
        return (float(np.any(ref != got)) if ref.size else 0.0), 0.0, True
    diff = scale = 0.0
    flat_ref, flat_got = ref.reshape(-1), got.reshape(-1)
    for start in range(0, flat_ref.size, CHUNK_ELEMENTS):
        ref64 = flat_ref[start:start + CHUNK_ELEMENTS].astype(np.float64)
        got64 = flat_got[start:start + CHUNK_ELEMENTS].astype(np.float64)
        finite = np.isfinite(ref64)
        if not np.array_equal(finite, np.isfinite(got64)):
            return None
        if finite.any():
            diff = max(diff, float(np.max(np.abs(ref64 - got64)[finite])))
            scale = max(scale, float(np.max(np.abs(ref64[finite]))))
    return diff, scale, False
