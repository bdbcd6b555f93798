"""What `slimc.compile` measures after the passes, and how a failed run on synthetic inputs is explained.

Every measurement here runs on a result whose passes are already verified: a measurement that fails
is reported in the receipt as not measured (``{"error": reason}``), never allowed to lose that result.
Latency is timed on what the model accepts (`slimc.backends.timing.latency_feed`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from slimc.backends import onnxruntime as ort_backend
from slimc.errors import BackendError, DataError, SlimcError, first_line

log = logging.getLogger("slimc")


def measured(what: str, measure) -> dict[str, Any]:
    """``measure()``, or ``{"error": reason}`` when it fails: a measurement never loses a verified result."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - any failure to measure is reported, not raised
        reason = first_line(exc) if isinstance(exc, SlimcError) else f"{type(exc).__name__}: {first_line(exc)}"
        log.warning("%s not measured: %s", what, reason)
        return {"error": reason}


def latency(baseline, current, batch: dict[str, np.ndarray], inputs, threads, weight_bytes: int) -> dict[str, Any]:
    """Both models timed on one sample of a verified batch (`latency_feed`), each in a session of its own
    (`ort_backend.measure_latency_files`: the stage sessions share weights without prepacking, which is not
    how the models would be deployed); the whole batch when the cut feed does not run (axis 0 was not a
    batch axis after all). Above ``LEAN_BYTES`` of weights the sessions are timed one at a time."""
    from slimc.backends.timing import comparison, latency_feed

    paths = {"before": baseline.path, "after": current.path}
    # the stages' shared weights (their sessions may be suspended meanwhile, `Stage.suspend`)
    shared = [*(getattr(baseline, "shared", None) or {}).values(), *(getattr(current, "shared", None) or {}).values(),
              *getattr(baseline.session, "slimc_arrays", []), *getattr(current.session, "slimc_arrays", [])]

    def timed(feed):
        return ort_backend.measure_latency_files(paths, feed, threads, weight_bytes=weight_bytes, mapped=shared)

    single = latency_feed(batch, inputs, current.batch_size)
    try:
        stats = timed(single)
    except Exception as exc:  # noqa: BLE001 - the whole batch ran in verification: time that instead
        if all(np.shape(single[k]) == np.shape(batch[k]) for k in batch):
            raise
        log.info("latency on one sample failed (%s); timing the whole verification batch", exc)
        single = dict(batch)
        stats = timed(single)
    result = comparison(stats, single, ort_backend.machine_description(threads))
    if weight_bytes >= ort_backend.LEAN_BYTES:
        result["one_at_a_time"] = True
    return result


def fidelity(baseline, current, evalset, loaded, budget: int | None = None) -> dict[str, Any]:
    """Task metrics of ``current`` against ``baseline`` over the evaluation data, in sub-batches of at
    most ``budget`` output bytes (`slimc.subbatch`)."""
    from slimc import evaluate

    names = current.common_outputs(baseline)  # paired by name: a pass may drop KV-cache outputs
    metrics = evaluate.evaluate(
        baseline.run_outputs(names),
        current.run_outputs(names),
        evalset,
        loaded.task,
        output_names=names,
        inputs=loaded.inputs,
        max_output_bytes=budget,
    )
    return {"data": evalset.source, "synthetic": bool(evalset.synthetic), "batches": len(evalset), "metrics": metrics}


def synthetic_failure(exc: BackendError, inputs, evalset) -> DataError:
    """The input model fails on the random inputs slimc made: say so, name the inputs, ask for data."""
    message = str(exc)
    named = [s.name for s in inputs if s.name and re.search(rf"\b{re.escape(s.name)}\b", message)]
    # Inputs that steer shapes rather than carry data: integers, booleans, scalars and short vectors
    # (Resize scales/sizes, Reshape shapes, Slice steps, OneHot depth, divisors, axes).
    params = [s.name for s in inputs if s.kind in ("int", "bool") or len(s.shape) <= 1]
    suspects = named or params or [s.name for s in inputs]
    return DataError(
        f"the input model fails on the synthetic inputs slimc made for it (random values, no --eval data given): "
        f"{message}. Random values do not fit input(s) {', '.join(map(repr, suspects))} (shapes, scales, sizes, "
        f"indices, counts or divisors need real values; slimc fed {evalset.source}). Pass real inputs: --eval "
        "(evaluation=) with a .npz of arrays keyed by input name, and --calib (calibration=) for int8/int4/prune "
        "(see docs/data.md); --static-shapes also sizes the synthetic inputs."
    )
