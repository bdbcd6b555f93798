"""Budgets of `slimc search`: ``"speedup>=1.5,size<=60MB"`` parsed into bounds a candidate must meet.

Measures:

- ``speedup``: ONNX Runtime latency of the input model / that of the candidate (``>=``), measured in
  one run on the same machine for the finalists; during the search it is predicted from MACs
  (`slimc.evosearch.space.CostModel`);
- ``size``: bytes of weights (``<=``), with ``KB``/``MB``/``GB`` (powers of 1000) or ``KiB``/``MiB``/``GiB``;
- ``params``: weight elements (``<=``), with ``K``/``M``/``B`` suffixes;
- ``macs``: multiply-accumulates per sample at the calibration shapes (``<=``), ``K``/``M``/``G`` suffixes.

Each upper bound may also be a fraction of the input model with ``x`` (``size<=0.5x``: half the
input's weight bytes). Several bounds are joined with commas; all must hold.
"""

from __future__ import annotations

import dataclasses
import re

from slimc.errors import BudgetError

MEASURES = {"speedup": ">=", "size": "<=", "params": "<=", "macs": "<="}
UNITS = {
    "size": {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30},
    "params": {"": 1, "k": 1e3, "m": 1e6, "b": 1e9},
    "macs": {"": 1, "k": 1e3, "m": 1e6, "g": 1e9},
    "speedup": {"": 1, "x": 1},
}
_BOUND = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<|=)\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Bound:
    """One bound: ``measure`` (speedup, size, params, macs) ``op`` ``value``; ``relative``: a fraction
    of the input model's figure (``size<=0.5x``)."""

    measure: str
    op: str
    value: float
    relative: bool = False

    def limit(self, reference: dict[str, float]) -> float:
        """The absolute limit, given the input model's figures (``reference[measure]``)."""
        return self.value * reference[self.measure] if self.relative else self.value

    def holds(self, value: float, reference: dict[str, float], slack: float = 0.0) -> bool:
        limit = self.limit(reference)
        return value >= limit * (1 - slack) if self.op == ">=" else value <= limit * (1 + slack)

    def __str__(self) -> str:
        return f"{self.measure}{self.op}{self.value:g}{'x' if self.relative else ''}"


@dataclasses.dataclass(frozen=True)
class Budget:
    """All bounds of a budget; ``str()`` writes it back in the CLI's form."""

    bounds: tuple[Bound, ...]

    def get(self, measure: str) -> Bound | None:
        return next((b for b in self.bounds if b.measure == measure), None)

    def __str__(self) -> str:
        return ",".join(map(str, self.bounds))


def parse_budget(text: str | Budget) -> Budget:
    """``"speedup>=1.5,size<=60MB"`` -> `Budget`; a malformed bound raises `BudgetError` saying why."""
    if isinstance(text, Budget):
        return text
    if not isinstance(text, str) or not text.strip():
        raise BudgetError("a search needs a budget, e.g. --budget 'speedup>=1.5' or 'size<=60MB,params<=0.7x' "
                          f"(measures: {', '.join(MEASURES)}).")
    bounds, seen = [], set()
    for part in text.split(","):
        bounds.append(_bound(part, text))
        if bounds[-1].measure in seen:
            raise BudgetError(f"budget '{text}': {bounds[-1].measure} is bounded twice; give each measure once.")
        seen.add(bounds[-1].measure)
    return Budget(tuple(bounds))


def _bound(part: str, text: str) -> Bound:
    match = _BOUND.match(part)
    if not match:
        raise BudgetError(f"budget '{text}': cannot read '{part.strip()}'; write MEASURE>=VALUE or MEASURE<=VALUE, e.g. "
                          "speedup>=1.5, size<=60MB, params<=100M, macs<=0.5x.")
    measure, op, number, unit = match.group(1).lower(), match.group(2), float(match.group(3)), match.group(4).lower()
    if measure not in MEASURES:
        raise BudgetError(f"budget '{text}': unknown measure '{measure}'; use {', '.join(MEASURES)}.")
    want = MEASURES[measure]
    if op.rstrip("=") != want[0] or op == "=":
        raise BudgetError(f"budget '{text}': {measure} takes a {'lower' if want == '>=' else 'upper'} bound: write "
                          f"{measure}{want}{number:g}{unit}.")
    relative = unit == "x" and measure != "speedup"
    if not relative and unit not in UNITS[measure]:
        raise BudgetError(f"budget '{text}': unknown unit '{unit}' for {measure}; use "
                          f"{', '.join(u or '(none)' for u in UNITS[measure])}" + ("" if measure == "speedup" else
                                                                                  " or x (a fraction of the input model)") + ".")
    value = number if relative else number * UNITS[measure][unit]
    if measure == "speedup" and value <= 1.0:
        raise BudgetError(f"budget '{text}': speedup>={number:g} asks for nothing; the input model already has 1.0x. "
                          "Give a target above 1, e.g. speedup>=1.5.")
    if measure != "speedup" and (value <= 0 or (relative and value >= 1.0)):
        raise BudgetError(f"budget '{text}': {measure}<={number:g}{unit} cannot be met or asks for nothing; "
                          + ("give a fraction below 1, e.g. 0.6x." if relative else "give a positive limit."))
    return Bound(measure, want, value, relative)
