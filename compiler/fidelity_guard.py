"""The fidelity guard: after the passes, the result's measured fidelity is checked twice.

1. **Collapse thresholds**, always: per task, on the task's own metrics (see `slimc.evaluate`
   for the definitions). A result that misses one no longer behaves like its input;
   the compile still succeeds, but the receipt carries a ``warnings`` entry and the CLI prints
   a warning (even with ``-q``):

   ===================  ===============================  ==========================
   task                 metric                           collapsed when
   ===================  ===============================  ==========================
   encoder              ``embedding_cosine``             ``< 0.9``
   classifier,          ``top1_agreement``               ``< 0.5``
   image-classifier
   causal-lm            ``perplexity_ratio``,            ``> 2.0``,
                        ``next_token_top1_agreement``    ``< 0.5``
   generic (or the      ``sqnr_db`` of the main output   ``< 10`` dB
   task metric could
   not be measured)
   ===================  ===============================  ==========================

2. **max_loss**, when the caller sets one: a bound the result must meet or it is refused with
   `FidelityGuardError` (the CLI exits 2, nothing is written). Two forms:

   - a number ``L >= 0``: the loss on the task's main metric, ``1 − metric`` for similarities
     (``embedding_cosine``, ``top1_agreement``, the main output's ``cosine`` for generic models)
     and ``perplexity_ratio − 1`` for causal LMs. ``max_loss=0.05`` on an encoder means
     ``embedding_cosine >= 0.95``;
   - bounds ``"metric>=value"`` / ``"metric<=value"``, comma-separated, all of which must hold:
     ``"embedding_cosine>=0.98"``, ``"top1>=0.9,kl<=0.05"``, ``"ppl_ratio<=1.2"``, ``"sqnr_db>=20"``.
     A metric where higher is better takes ``>=``, one where lower is better ``<=``.

Either way a result whose outputs turned NaN/inf where the input model's are finite is refused
(`VerificationError`): no bound or threshold can vouch for it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from slimc.errors import FidelityGuardError, OptionError, VerificationError

HIGHER = ("cosine", "cosine_min", "sqnr_db", "top1_agreement", "next_token_top1_agreement",
          "embedding_cosine", "embedding_cosine_min")
LOWER = ("max_abs_error", "mean_abs_error", "kl_divergence", "perplexity_ratio")
GENERIC = ("cosine", "cosine_min", "sqnr_db", "max_abs_error", "mean_abs_error")
TASK_METRICS = {
    "classifier": ("top1_agreement", "kl_divergence"),
    "image-classifier": ("top1_agreement", "kl_divergence"),
    "causal-lm": ("perplexity_ratio", "next_token_top1_agreement", "kl_divergence"),
    "encoder": ("embedding_cosine", "embedding_cosine_min"),
    "generic": (),
}
ALIASES = {"top1": None, "ppl_ratio": "perplexity_ratio", "sqnr": "sqnr_db", "kl": "kl_divergence"}  # top1: by task
MAIN_METRIC = {"classifier": "top1_agreement", "image-classifier": "top1_agreement", "causal-lm": "perplexity_ratio",
               "encoder": "embedding_cosine", "generic": "cosine"}
_BOUND = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|=>|=<|>|<|==|=)\s*([^\s]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Bound:
    """``metric op value``; ``op`` is ``>=`` or ``<=``."""

    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def holds(self, measured: float) -> bool:
        return measured >= self.value if self.op == ">=" else measured <= self.value


COLLAPSE = {  # task -> the bounds a result must meet not to count as collapsed (all of them)
    "classifier": (Bound("top1_agreement", ">=", 0.5),),
    "image-classifier": (Bound("top1_agreement", ">=", 0.5),),
    "causal-lm": (Bound("perplexity_ratio", "<=", 2.0), Bound("next_token_top1_agreement", ">=", 0.5)),
    "encoder": (Bound("embedding_cosine", ">=", 0.9),),
    "generic": (Bound("sqnr_db", ">=", 10.0),),
}


@dataclasses.dataclass(frozen=True)
class MaxLoss:
    """A parsed ``max_loss``: a task-relative scalar, or explicit bounds (metric names maybe aliases)."""

    loss: float | None = None
    bounds: tuple[Bound, ...] = ()


def parse_max_loss(spec: Any) -> MaxLoss | None:
    """``None``, a number, or a string (a number or ``"metric>=v,metric<=v"``) -> `MaxLoss`; bad values raise `OptionError`."""
    if spec is None:
        return None
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise OptionError(f"max_loss must be a number (e.g. 0.05) or bounds like 'cosine>=0.98'; got {spec!r}.")
    if isinstance(spec, str):
        try:
            spec = float(spec)
        except ValueError:
            return MaxLoss(bounds=tuple(_parse_bound(part, spec) for part in _parts(spec)))
    if not math.isfinite(spec) or spec < 0:
        raise OptionError(f"max_loss={spec!r}: a loss is a finite number >= 0 (0.05 allows 5% loss on the task's "
                          "main metric).")
    return MaxLoss(loss=float(spec))


def _parts(spec: str) -> list[str]:
    parts = [p for p in spec.split(",") if p.strip()]
    if not parts:
        raise OptionError("max_loss is empty: give a number (e.g. 0.05) or bounds like 'cosine>=0.98'.")
    return parts


def _parse_bound(part: str, spec: str) -> Bound:
    match = _BOUND.match(part)
    if match is None:
        raise OptionError(f"max_loss {spec!r}: cannot read {part.strip()!r}; write metric>=value or metric<=value, "
                          "e.g. 'embedding_cosine>=0.98' or 'ppl_ratio<=1.2', or a plain number such as 0.05.")
    name, op, raw = match.groups()
    op = {"=>": ">=", "=<": "<="}.get(op, op)
    if op not in (">=", "<="):
        raise OptionError(f"max_loss {spec!r}: use >= or <= in {part.strip()!r} (a bound includes its value).")
    name = name.lower()
    if name not in HIGHER + LOWER + tuple(ALIASES):
        raise OptionError(f"max_loss {spec!r}: unknown metric {name!r}; known: "
                          f"{', '.join(HIGHER + LOWER)} (aliases: {', '.join(ALIASES)}).")
    try:
        value = float(raw)
    except ValueError:
        raise OptionError(f"max_loss {spec!r}: {raw!r} is not a number.") from None
    if not math.isfinite(value):
        raise OptionError(f"max_loss {spec!r}: the bound must be a finite number, got {raw!r}.")
    canonical = ALIASES.get(name) or name
    want = "<=" if canonical in LOWER else ">="  # the 'top1' alias is a similarity: higher is better
    if op != want:
        better = "lower" if want == "<=" else "higher"
        raise OptionError(f"max_loss {spec!r}: {name} is better {better}, so bound it with {want} "
                          f"(e.g. {name}{want}{raw}).")
    return Bound(name, op, value)


def resolve(max_loss: MaxLoss | None, task: str) -> tuple[Bound, ...]:
    """The bounds on concrete metrics of ``task``; a metric this task does not measure is an `OptionError`."""
    if max_loss is None:
        return ()
    if max_loss.loss is not None:
        metric = MAIN_METRIC[task]
        if metric == "perplexity_ratio":
            return (Bound(metric, "<=", 1.0 + max_loss.loss),)
        return (Bound(metric, ">=", 1.0 - max_loss.loss),)
    available = GENERIC + TASK_METRICS[task]
    bounds = []
    for bound in max_loss.bounds:
        metric = ALIASES.get(bound.metric) or bound.metric
        if bound.metric == "top1":
            metric = "next_token_top1_agreement" if task == "causal-lm" else "top1_agreement"
        if metric not in available:
            raise OptionError(f"max_loss bound {bound}: a {task} model is not measured by {metric}; "
                              f"its metrics are {', '.join(available)}.")
        bounds.append(Bound(metric, bound.op, bound.value))
    return tuple(bounds)


def _measured(metrics: dict[str, Any], metric: str) -> float | None:
    if metric == "sqnr_db" and metrics.get("sqnr_db") is None and metrics.get("exact"):
        return math.inf  # identical outputs: evaluate() writes None because JSON has no inf
    value = metrics.get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _check(metrics: dict[str, Any], bound: Bound, source: str) -> dict[str, Any]:
    value = _measured(metrics, bound.metric)
    return {"metric": bound.metric, "bound": f"{bound.op} {bound.value:g}", "value": value, "source": source,
            "ok": None if value is None else bound.holds(value)}


def _collapse_checks(metrics: dict[str, Any], task: str) -> list[dict[str, Any]]:
    checks = [_check(metrics, bound, f"collapse threshold ({task})") for bound in COLLAPSE[task]]
    if all(c["value"] is None for c in checks) and task != "generic":  # e.g. no perplexity without token ids
        checks = [_check(metrics, bound, f"collapse threshold (generic: no {task} metric measured)")
                  for bound in COLLAPSE["generic"]]
    return checks


def _describe(check: dict[str, Any]) -> str:
    value = "not measured" if check["value"] is None else f"{check['value']:.4g}"
    return f"{check['metric']} = {value}, needs {check['bound']}"


def check(fidelity: dict[str, Any], task: str, bounds: tuple[Bound, ...] = ()) -> dict[str, Any]:
    """The receipt's ``fidelity_guard`` entry for the measured ``fidelity`` (`slimc.api` ``_fidelity``).

    Raises `VerificationError` when the result turned finite outputs into NaN/inf, and
    `FidelityGuardError` when a ``max_loss`` bound fails or cannot be measured.
    """
    metrics = fidelity.get("metrics", {})
    on = f"on {'synthetic inputs' if fidelity.get('synthetic') else fidelity.get('data', 'the evaluation data')}"
    broken = metrics.get("nonfinite_introduced")
    if broken:
        raise VerificationError(
            f"the compiled model gives NaN or inf on {broken} output values {on} where the input model is finite. "
            "Nothing was written; use milder pass options, or report it if they were reasonable.")
    collapse = _collapse_checks(metrics, task)
    limits = [_check(metrics, b, "max_loss") for b in bounds]
    failed = [c for c in limits if c["ok"] is not True]
    if failed:
        raise FidelityGuardError(
            "the result fails max_loss: " + "; ".join(map(_describe, failed)) + f" (measured {on}). Nothing was "
            "written. Use milder passes (a lower prune ratio, int8 instead of int4) or loosen --max-loss / max_loss=.")
    collapsed = [c for c in collapse if c["ok"] is False]
    warnings = [
        f"FIDELITY COLLAPSED: {'; '.join(map(_describe, collapsed))} ({collapsed[0]['source']}), measured {on}. The "
        "result no longer behaves like the input model: use milder passes, or set --max-loss to refuse such results."
    ] if collapsed else []
    status = "collapsed" if collapsed else "ok" if any(c["ok"] for c in collapse) else "not measured"
    return {"status": status, "checks": collapse + limits, "warnings": warnings}
