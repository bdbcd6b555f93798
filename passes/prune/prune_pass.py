"""The `prune` pass: dependency-grouped structured pruning of any ONNX graph.

1. Build the `DependencyGraph` and its groups (`graph`, `rules`).
2. Choose the groups the target names (``auto``: conv channels, FFN neurons and attention
   heads; ``kv_heads``, ``head_dim`` and ``hidden`` only when asked), minus blocked and ignored
   ones; every group left alone is reported with its reason.
3. Score channels (`importance`): magnitude, Wanda, FLAP or random; activation-aware methods
   stream the calibration set through an instrumented copy of the graph.
4. Select per group (``scope=uniform``: the ratio of each group) or across groups
   (``scope=global``: one threshold on normalised scores), then round kept sizes to
   ``round_to``.
5. Compensate the consumers (``bias`` / ``least_squares``), apply the plan (`apply`), and
   share identical initializers again.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal, Optional

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from slimc.analysis import count_params, percent_fewer
from slimc.errors import DataError, NothingToDoError, PassConfigError
from slimc.passes.prune import importance
from slimc.backends.onnxruntime import release_model_pages
from slimc.passes.prune.apply import apply_plan
from slimc.passes.prune.cache import CACHE
from slimc.passes.prune.cache import changes as cache_changes
from slimc.passes.prune.compensate import compensate as run_compensation
from slimc.passes.prune.graph import DependencyGraph, Group
from slimc.pipeline import Pass, PassContext, PassReport

Target = Literal["auto", "channels", "heads", "kv_heads", "ffn", "hidden", "head_dim"]
AUTO = ("channels", "ffn", "heads")
CATEGORY = {"heads": "attention", "kv_heads": "attention", "head_dim": "attention", "ffn": "mlp",
            "channels": "channels", "hidden": "hidden"}
SOFT = {"hidden": "hidden", "head_dim": "head_dim"}  # targets that accept a soft blocker of that kind


@dataclasses.dataclass
class Prune(Pass):
    """Remove channels, FFN neurons, attention heads or KV groups, keeping the graph consistent.

    Options:
        ratio: fraction of each group's channels to remove, in [0, 1).
        target: which groups: `auto` = `channels` (conv) + `ffn` (MLP neurons) + `heads` (attention
            heads; with GQA, query heads per KV group); `kv_heads` (whole GQA groups: a KV head and
            its query heads); `head_dim` (value head dims; q/k dims only if asked, approximate);
            `hidden` (the residual width, approximate).
        importance: `magnitude`: group L2 over every weight the group slices (data-free); `wanda`:
            |W|·‖X‖ at the consumers; `flap`: Var(X)·‖W_col‖² at the consumers; `random`: seeded
            baseline. `wanda` and `flap` need calibration data.
        scope: `uniform`: every group loses `ratio`; `global`: one threshold over mean-normalised
            scores of all chosen groups (the same total), at least one channel kept per group.
        ratios_by_kind: per-kind ratios overriding `ratio`, e.g. `{attention: 0.2, mlp: 0.4}`;
            kinds: attention, mlp, channels, hidden.
        ratios_by_group: per-group ratios overriding `ratios_by_kind` and `ratio`: glob pattern ->
            ratio, matched like `ignore` (group name, initializer or consumer node); the first
            pattern that matches a group wins, e.g. `{'model.layers.3.*': 0.5}`. `slimc search`
            writes one pattern per initializer of a block to give each block its own ratio.
        round_to: kept sizes of channel/FFN/hidden groups become multiples of N (e.g. 8 for CNNs on
            CPUs, 64 for GPU kernels); heads are counted in heads.
        ignore: glob patterns; a group whose module path, initializer or consumer node matches is
            left alone.
        compensate: `bias`: consumer bias += W_removed · mean(X_removed) (FLAP); `least_squares`:
            refit the consumer's kept weights and bias from XᵀX (MatMul/Gemm consumers; Conv
            consumers get `bias`). Needs calibration data.
        calibration_batches: calibration batches streamed for the statistics.
        change_interface: allow groups that reach graph inputs/outputs (e.g. the hidden width of
            `last_hidden_state`); the report names the inputs/outputs whose size changed.
        allow_noop: accept a model where nothing of the requested kind can be pruned (it is then
            reported in left_alone with the reasons); without it such a run is an error (exit 2).
    """

    ratio: float = 0.3
    target: Target = "auto"
    importance: Literal["magnitude", "wanda", "flap", "random"] = "magnitude"
    scope: Literal["uniform", "global"] = "uniform"
    ratios_by_kind: Optional[dict[str, float]] = None
    ratios_by_group: Optional[dict[str, float]] = None
    round_to: int = 1
    ignore: Optional[list[str]] = None
    compensate: Literal["none", "bias", "least_squares"] = "none"
    calibration_batches: int = 32
    change_interface: bool = False
    allow_noop: bool = False

    name = "prune"
    exact = False
    description = "structured pruning over the dependency graph: channels, FFN neurons, heads, GQA groups"

    def __post_init__(self) -> None:
        super().__init__()
        ratios = {"ratio": self.ratio, **{f"ratios_by_kind[{k}]": v for k, v in (self.ratios_by_kind or {}).items()},
                  **{f"ratios_by_group[{k}]": v for k, v in (self.ratios_by_group or {}).items()}}
        for label, r in ratios.items():
            if not 0.0 <= r < 1.0:
                raise PassConfigError(f"prune: {label}={r} is out of range; use a fraction in [0, 1), e.g. ratio=0.3 removes 30%.")
        unknown = set(self.ratios_by_kind or {}) - set(CATEGORY.values())
        if unknown:
            raise PassConfigError(f"prune: ratios_by_kind has unknown kind(s) {sorted(unknown)}; use {sorted(set(CATEGORY.values()))}.")
        if self.round_to < 1:
            raise PassConfigError("prune: round_to must be >= 1 (kept sizes become multiples of it).")
        if self.calibration_batches < 1:
            raise PassConfigError("prune: calibration_batches must be >= 1.")

    # ------------------------------------------------------------ selection

    def _targets(self) -> tuple[str, ...]:
        return AUTO if self.target == "auto" else (self.target,)

    def eligible(self, groups: list[Group]) -> tuple[list[Group], list[tuple[str, str]]]:
        targets = self._targets()
        allow = (frozenset(SOFT[t] for t in targets if t in SOFT) | {CACHE}
                 | ({"interface"} if self.change_interface else set()))
        chosen, left = [], []
        for grp in groups:
            label = f"{grp.kind} group {grp.name} ({grp.size})"
            if grp.kind not in targets:
                continue
            if grp.is_blocked(allow):
                why = "; ".join(r for r, k in grp.blocked if k is None or k not in allow)
                left.append((label, f"blocked: {why}"))
            elif self.ignore and grp.matches(self.ignore):
                left.append((label, "matches ignore="))
            elif self._ratio(grp) > 0:
                chosen.append(grp)
        return chosen, left

    def _ratio(self, grp: Group) -> float:
        for pattern, ratio in (self.ratios_by_group or {}).items():
            if grp.matches([pattern]):
                return ratio
        return (self.ratios_by_kind or {}).get(CATEGORY.get(grp.kind, ""), self.ratio)

    def _rounded(self, grp: Group, keep: int) -> int:
        if grp.kind in ("heads", "kv_heads") or self.round_to == 1 or grp.size <= self.round_to:
            return keep
        return min(grp.size, max(self.round_to, int(math.ceil(keep / self.round_to)) * self.round_to))

    def select(self, groups: list[Group], scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """{leaf atom: keep mask} for the chosen groups."""
        keep_n = {}
        if self.scope == "uniform":
            for grp in groups:
                keep_n[grp.id] = max(1, grp.size - int(round(grp.size * self._ratio(grp))))
        else:
            total = sum(int(round(grp.size * self._ratio(grp))) for grp in groups)
            pool = sorted((float(s), grp.id) for grp in groups for s in scores[grp.id] / max(float(np.mean(scores[grp.id])), 1e-30))
            remaining = {grp.id: grp.size for grp in groups}
            for _, gid in pool:
                if total <= 0:
                    break
                if remaining[gid] > 1:
                    remaining[gid] -= 1
                    total -= 1
            keep_n = remaining
        plan = {}
        for grp in groups:
            n = self._rounded(grp, keep_n[grp.id])
            if n >= grp.size:
                continue
            mask = np.zeros(grp.size, bool)
            mask[np.argsort(-scores[grp.id], kind="stable")[:n]] = True
            plan[grp.atom] = mask
        return plan

    def _asked(self) -> bool:
        return self.ratio > 0 or any(r > 0 for r in (*(self.ratios_by_kind or {}).values(),
                                                    *(self.ratios_by_group or {}).values()))

    def _nothing(self, groups: list[Group], left: list[tuple[str, str]]) -> str:
        """Why nothing of the requested kind can be pruned, for the error or the report."""
        targets = self._targets()
        if not any(grp.kind in targets for grp in groups):
            found = sorted({grp.kind for grp in groups})
            return (f"the model has no {' / '.join(targets)} group (groups found: {', '.join(found) or 'none'}"
                    + ("; a model whose attention has a single KV head has none" if "kv_heads" in targets else "") + ")")
        reasons = "; ".join(f"{what}: {why}" for what, why in left[:5])
        more = f"; and {len(left) - 5} more" if len(left) > 5 else ""
        return f"every {' / '.join(targets)} group is left alone ({reasons}{more})"

    # ------------------------------------------------------------ the pass

    def _statistics(self, model: ir.Model, groups: list[Group], ctx: PassContext) -> dict:
        if self.importance in ("magnitude", "random") and self.compensate == "none":
            return {}
        if ctx.calibration is None:
            needs = f"importance={self.importance}" if self.importance not in ("magnitude", "random") else f"compensate={self.compensate}"
            raise DataError(
                f"prune: {needs} needs calibration data (activation statistics). Pass calibration= to "
                "slimc.compile() or --calib on the command line, or use importance=magnitude, compensate=none."
            )
        from slimc.calibrate import collect

        requests = importance.stat_requests(groups, gram=self.compensate == "least_squares")
        return collect(model, sorted(requests, key=lambda r: (r.value, r.axis)), ctx.calibration.head(self.calibration_batches), desc="prune statistics")

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        start = time.perf_counter()
        params0, _ = count_params(model)
        g = DependencyGraph(model, keep_interface=not self.change_interface)
        groups = g.groups()
        chosen, left = self.eligible(groups)
        stats = self._statistics(model, chosen, ctx) if chosen else {}
        rng = np.random.default_rng(ctx.seed)
        scores = {grp.id: importance.scores(g, grp, self.importance, stats, rng) for grp in chosen}
        plan = self.select(chosen, scores)
        left += [(f"{grp.kind} group {grp.name} ({grp.size})", f"ratio {self._ratio(grp)} removes no index of {grp.size}")
                 for grp in chosen if grp.atom not in plan]
        if not plan and self._asked():
            g.reshare()  # the analysis split shared constants; give the model back as it came
            why = self._nothing(groups, left)
            if not self.allow_noop:
                raise NothingToDoError(f"prune: nothing to prune for target={self.target}: {why}. Pass allow_noop=true to "
                                       "accept the unchanged model, or see `slimc inspect --groups` for every group and its reasons.")
            left.append(("prune", f"nothing pruned: {why}"))
        compensated, comp_left = (0, [])
        if plan and self.compensate != "none":
            compensated, comp_left = run_compensation(g, plan, stats, self.compensate)
        cache = cache_changes(g, plan)  # read before the plan rewrites the shapes
        if plan:
            release_model_pages(model)  # read for the scores; apply_plan reads each weight again, one at a time
            apply_plan(g, plan)
        g.reshare()
        common.RemoveUnusedNodesPass()(model)
        common.DeduplicateInitializersPass()(model)
        params1, _ = count_params(model)
        pruned = [
            {"group": grp.name, "kind": grp.kind, "before": grp.size, "after": int(plan[grp.atom].sum()),
             "initializers": len(grp.weights)}
            for grp in chosen if grp.atom in plan
        ]
        by_kind: dict[str, list[int]] = {}
        for p in pruned:
            by_kind.setdefault(p["kind"], [0, 0])
            by_kind[p["kind"]][0] += p["before"]
            by_kind[p["kind"]][1] += p["after"]
        kinds = ", ".join(f"{k} {a}->{b}" for k, (a, b) in by_kind.items()) or "nothing"
        summary = (f"{len(pruned)} of {len(groups)} groups pruned ({kinds}); params {params0:,} -> {params1:,}"
                   f" ({percent_fewer(params0, params1)}); importance={self.importance}")
        if compensated:
            summary += f", {compensated} consumers compensated ({self.compensate})"
        if self.change_interface and plan:
            changed = [v.name for v in (*model.graph.inputs, *model.graph.outputs)
                       if any(g.mask(a, plan) is not None for a in (g.slots.get(v) or []))]
            if changed:
                summary += f"; interface changed: {', '.join(changed)}"
        if cache:
            summary += "; KV cache interface changed (kv_heads): " + ", ".join(
                f"layer {c['layer']} {c['kv_heads_before']}->{c['kv_heads_after']}" for c in cache)
        return PassReport(
            name=self.name, modified=bool(plan), summary=summary,
            details={"groups_total": len(groups), "groups_pruned": pruned, "params_before": params0, "params_after": params1,
                     "unsupported_ops": dict(g.unsupported), "compensated": compensated, "kv_cache_changed": cache},
            left_alone=left + comp_left, seconds=time.perf_counter() - start,
        )
