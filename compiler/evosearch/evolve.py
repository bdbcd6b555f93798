"""EvoPress-style evolutionary search over per-block levels, under a budget.

Costs. The uniform allocations ``U_k`` (every block at level ``k``) and ``S`` (every skippable
block removed) are built and measured first. A block's saving at level ``k`` is the uniform
saving shared by weight: ``s_i(k) = (C_0 - C(U_k)) * w_i / sum_j w_j`` with ``w_i`` the block's
own parameters (skip: over the skippable blocks), so a genome's predicted cost is
``C_0 - sum_i s_i(g_i)`` for params, bytes and MACs. Latency is predicted by a least-squares line
``t = a + b * MACs`` through the measured latencies of ``C_0``, the ``U_k`` and ``S``; predicted
speed-up ``t_0 / t``. Built candidates get their exact params/bytes/MACs; finalists are timed.

Search (a (1 + lambda) evolution with level-switch mutations, as EvoPress):

1. start from the mildest uniform level, raising random blocks one level until the budget holds;
2. each generation makes ``offspring`` children of the parent: 1-3 switches each moving one block
   up a level and another down (the total level stays), plus a relaxation that moves one block
   down when the budget still holds; children outside the predicted budget are redrawn;
3. multi-fidelity selection: all children on ``low_batches`` calibration batches, the best
   ``survivors`` on all ``batches``, and the fittest of them and the parent becomes the parent.

Everything random comes from one ``numpy.random.default_rng(seed)``: a seed gives the same search.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from slimc.errors import BudgetError
from slimc.evosearch.budget import Budget
from slimc.evosearch.space import Space

COST_MEASURES = ("params", "size", "macs")


@dataclasses.dataclass
class CostModel:
    """Predicted costs of a genome (see the module docstring)."""

    space: Space
    reference: dict[str, float]  # the input model: params, size, macs, latency_ms
    savings: dict[str, np.ndarray]  # measure -> [block, level] saving
    latency_fit: tuple[float, float]  # (a, b): t = a + b * MACs, in ms

    def predict(self, genome: tuple[int, ...]) -> dict[str, float]:
        out = {m: self.reference[m] - float(sum(self.savings[m][i, g] for i, g in enumerate(genome))) for m in COST_MEASURES}
        out["speedup"] = self.speedup(out["macs"])
        return out

    def speedup(self, macs: float) -> float:
        a, b = self.latency_fit
        return self.reference["latency_ms"] / max(a + b * macs, 1e-9)

    def fits(self, values: dict[str, float], budget: Budget) -> bool:
        return all(b.holds(values[b.measure], self.reference) for b in budget.bounds)


def cost_model(space: Space, reference: dict[str, float], uniform: dict[int, dict[str, float]],
               weights: np.ndarray) -> CostModel:
    """``uniform[level]``: measured costs (params, size, macs, latency_ms) of the uniform genome at ``level``."""
    n_levels = 1 + len(space.prune_levels) + (1 if space.skip_level is not None else 0)
    skippable = np.array([b.skippable for b in space.blocks], bool)
    savings = {}
    for m in COST_MEASURES:
        table = np.zeros((len(space.blocks), n_levels))
        for level, costs in uniform.items():
            share = weights * (skippable if level == space.skip_level else 1)
            total = share.sum()
            if total > 0:
                table[:, level] = (reference[m] - costs[m]) * share / total
        savings[m] = table
    points = [(reference["macs"], reference["latency_ms"])] + [(c["macs"], c["latency_ms"]) for c in uniform.values()]
    x, y = np.array(points, float).T
    b, a = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(np.mean(y)))
    return CostModel(space, reference, savings, (float(a), float(b)))


@dataclasses.dataclass
class Settings:
    generations: int = 20
    offspring: int = 8
    survivors: int = 2
    low_batches: int = 1
    batches: int = 4
    seed: int = 0


class Evolution:
    """The search loop; ``evaluate(jobs)`` returns fitness rows for ``[(genome, n_batches)]``."""

    def __init__(self, model: CostModel, budget: Budget, settings: Settings,
                 evaluate: Callable[[list[tuple[tuple[int, ...], int]]], list[dict[str, Any]]]):
        self.model, self.budget, self.settings, self._evaluate = model, budget, settings, evaluate
        self.space = model.space
        self.rng = np.random.default_rng(settings.seed)
        self.log: list[dict[str, Any]] = []
        self.full: dict[tuple[int, ...], dict[str, Any]] = {}  # genome -> row on all batches

    def feasible(self, genome: tuple[int, ...]) -> bool:
        return self.model.fits(self.model.predict(genome), self.budget)

    def start(self) -> tuple[int, ...]:
        """The mildest uniform genome, then random blocks one level up until the budget holds."""
        tops = [self.space.max_level(i) for i in range(len(self.space.blocks))]
        if not self.feasible(tuple(tops)):
            predicted = self.model.predict(tuple(tops))
            raise BudgetError(f"budget {self.budget} cannot be met in this search space: even the strongest allocation "
                              f"(every block at its last level) predicts {_fmt(predicted)}. Relax the budget, or add "
                              "methods/levels to --space.")
        genome = [0] * len(tops)
        while not self.feasible(tuple(genome)):
            level = min(g for i, g in enumerate(genome) if g < tops[i])
            candidates = [i for i, g in enumerate(genome) if g == level and g < tops[i]]
            genome[int(self.rng.choice(candidates))] += 1
        return tuple(genome)

    def mutate(self, parent: tuple[int, ...]) -> tuple[int, ...] | None:
        tops = [self.space.max_level(i) for i in range(len(parent))]
        for _ in range(50):
            child = list(parent)
            for _ in range(int(self.rng.integers(1, 4))):
                up = [i for i, g in enumerate(child) if g < tops[i]]
                down = [i for i, g in enumerate(child) if g > 0]
                if not up or not down:
                    break
                i, j = int(self.rng.choice(up)), int(self.rng.choice(down))
                if i != j:
                    child[i] += 1
                    child[j] -= 1
            down = [i for i, g in enumerate(child) if g > 0]
            if down and self.rng.random() < 0.5:  # use slack the budget leaves
                k = int(self.rng.choice(down))
                child[k] -= 1
                if not self.feasible(tuple(child)):
                    child[k] += 1
            if tuple(child) != parent and self.feasible(tuple(child)):
                return tuple(child)
        return None

    def _run(self, genomes: list[tuple[int, ...]], n: int, generation: int, stage: str) -> list[dict[str, Any]]:
        rows = self._evaluate([(g, n) for g in genomes])
        for g, row in zip(genomes, rows):
            row.update(generation=generation, stage=stage, predicted=self.model.predict(g))
            row["exact_fits"] = all(b.holds(row[b.measure], self.model.reference) for b in self.budget.bounds
                                    if b.measure in COST_MEASURES)
            self.log.append(row)
            if n >= self.settings.batches:
                self.full[g] = row
        return rows

    def run(self, on_generation: Callable[[int, dict[str, Any]], None] | None = None) -> tuple[int, ...]:
        s = self.settings
        parent = self.start()
        best = self._run([parent], s.batches, 0, "start")[0]
        if not best["exact_fits"]:
            raise BudgetError(f"budget {self.budget}: the starting allocation misses it once built ({_fmt(best)}); "
                              "the cost prediction is off for this model. Relax the budget a little.")
        for gen in range(1, s.generations + 1):
            children = list(dict.fromkeys(c for c in (self.mutate(parent) for _ in range(s.offspring)) if c is not None))
            if children:
                if s.low_batches < s.batches:  # the cheap selection first, the survivors on all batches
                    low = self._run(children, s.low_batches, gen, "low")
                    ranked = [c for _, c in sorted(((r["fitness"], i), c) for i, (c, r) in enumerate(zip(children, low))
                                                   if r["exact_fits"])][: s.survivors]
                    finalists = [c for c in ranked if c not in self.full]
                    if finalists:
                        self._run(finalists, s.batches, gen, "full")
                else:  # one fidelity: every child on all batches
                    fresh = [c for c in children if c not in self.full]
                    if fresh:
                        self._run(fresh, s.batches, gen, "full")
                    ranked = children
                for c in ranked:
                    row = self.full.get(c)
                    if row is not None and row["exact_fits"] and row["fitness"] < best["fitness"]:
                        parent, best = c, row
            if on_generation is not None:
                on_generation(gen, best)
        return parent


def pareto(rows: list[dict[str, Any]], key: str = "speedup") -> list[dict[str, Any]]:
    """Rows not dominated in (lower fitness, higher predicted ``key``), sorted by ``key``."""
    front = []
    for r in sorted(rows, key=lambda r: (-r["predicted"][key], r["fitness"])):
        if not front or r["fitness"] < front[-1]["fitness"]:
            front.append(r)
    return sorted(front, key=lambda r: r["predicted"][key])


def _fmt(values: dict[str, Any]) -> str:
    parts = []
    for m in ("speedup", "params", "size", "macs"):
        if m in values and values[m] is not None and not (isinstance(values[m], float) and math.isnan(values[m])):
            parts.append(f"{m} {values[m]:.3g}" if m == "speedup" else f"{m} {values[m]:,.0f}")
    return ", ".join(parts)
