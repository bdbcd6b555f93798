"""The `layerskip` pass: remove whole residual blocks, or their attention / MLP sub-layers.

A residual network computes ``x -> tail(x + f(x))`` unit after unit; removing a unit makes
every use of its output a use of its input, and its weights and nodes disappear. The pass

1. finds the residual units of any graph from its dataflow (`slimc.passes.skip.blocks`: pre-LN
   and post-LN transformers, ResNets, ConvNeXt, MobileNetV2, ...), at the granularity ``unit``:
   ``block`` (attention + MLP sub-layers of one layer; a ResNet basic/bottleneck block),
   ``attention`` or ``mlp`` (one sub-layer). What it finds but cannot skip it reports: blocks
   with a projection/downsample shortcut, shape-changing ones, those whose work is also used
   elsewhere, long skips around other blocks;
2. protects the first ``protect_first`` and last ``protect_last`` units (in graph order: the
   first layers build the representation, the last ones map it to the outputs, and both are
   usually the least redundant: ShortGPT, Gromov et al.);
3. scores every unit (`slimc.passes.skip.score`) by its Block Influence ``1 - cos(x, out)`` on
   the calibration set (``score=influence``), and for ``score=loss`` then chooses greedily by the
   measured loss (perplexity for causal LMs, else the output error vs the unmodified model) among
   the ``shortlist`` lowest-influence units (default ``2 x count + 2``);
4. rewires the stream (in graph order, so adjacent units chain back to the first input), removes
   a removed attention sub-layer's KV-cache inputs and outputs with it (`slimc.passes.skip.cache`), removes
   the dead nodes and initializers, and measures the ORT latency before and after.

What skipping means per tail: pre-LN ``y = x + f(x)`` -> ``x`` (exact when ``f = 0``); post-LN
(BERT) ``y = LN(x + f(x))`` -> ``x`` (the sub-layer's LayerNorm goes with it); ResNet
``y = Relu(x + f(x))`` -> ``x``, exact when ``f = 0`` and ``x >= 0``, which holds because ``x`` is
the output of a previous Relu (or of a max-pool of one).

The pass works on a copy and replaces the model only when everything succeeded.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal, Optional

import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from slimc.analysis import count_params, percent_fewer
from slimc.data import first_batches
from slimc.errors import DataError, PassConfigError
from slimc.model import infer_input_specs, infer_task
from slimc.onnx_io import copy_model
from slimc.passes.quant import common
from slimc.passes.skip import blocks, cache, score
from slimc.pipeline import Pass, PassContext, PassReport

UNITS = ("block", "attention", "mlp")
SCORES = ("influence", "loss")


@dataclasses.dataclass
class LayerSkip(Pass):
    """Remove the residual blocks (or attention / MLP sub-layers) that change the stream least.

    Options:
        count: how many units to remove (give `count` or `ratio`).
        ratio: fraction of the units found to remove, rounded (give `count` or `ratio`).
        units: the units to remove, as indices in graph order (0 = the first unit found), instead of
            `count`/`ratio`: no scoring, no calibration data, `protect_first`/`protect_last` not
            applied (`slimc search` chooses the blocks itself and passes them here).
        unit: `block` (a whole layer), `attention` or `mlp` (one sub-layer of a layer).
        score: `influence` (Block Influence, one calibration run) or `loss` (greedy by measured
            loss, costlier and better).
        protect_first: the first N units in graph order are never removed.
        protect_last: the last N units in graph order are never removed.
        shortlist: `score=loss`: how many lowest-influence candidates the greedy search tries
            (none: 2 × count + 2).
        calibration_batches: calibration batches for the influence statistics.
        loss_batches: `score=loss`: calibration batches each greedy evaluation runs (none: all).
        measure_latency: time the model before and after on ONNX Runtime CPU inside the pass.
    """

    count: Optional[int] = None
    ratio: Optional[float] = None
    units: Optional[list[int]] = None
    unit: Literal["block", "attention", "mlp"] = "block"
    score: Literal["influence", "loss"] = "influence"
    protect_first: int = 1
    protect_last: int = 1
    shortlist: Optional[int] = None
    calibration_batches: int = 8
    loss_batches: Optional[int] = None
    measure_latency: bool = True

    name = "layerskip"
    exact = False
    description = "remove whole residual blocks or attention/MLP sub-layers, by Block Influence or greedy loss"

    def __post_init__(self) -> None:
        super().__init__()
        if sum(x is not None for x in (self.count, self.ratio, self.units)) != 1:
            raise PassConfigError(
                "layerskip: give exactly one of count= (how many units to remove, e.g. layerskip(count=4)), "
                "ratio= (a fraction of the units found, e.g. layerskip(ratio=0.2)) or units= (which ones, by index "
                "in graph order, e.g. layerskip(units=[3, 5]))."
            )
        if self.units is not None and (not self.units or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                             for i in self.units) or len(set(self.units)) != len(self.units)):
            raise PassConfigError(f"layerskip: units={self.units} must be distinct whole numbers >= 0 (indices of the "
                                  "units in graph order), at least one.")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1):
            raise PassConfigError(f"layerskip: count={self.count} must be a whole number >= 1, e.g. count=4.")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise PassConfigError(f"layerskip: ratio={self.ratio} is out of range; use a fraction in (0, 1), e.g. ratio=0.2.")
        if self.unit not in UNITS:
            raise PassConfigError(
                f"layerskip: unit={self.unit!r} is unknown; use unit=block (a whole layer), unit=attention or unit=mlp "
                "(one sub-layer of each layer)."
            )
        if self.score not in SCORES:
            raise PassConfigError(
                f"layerskip: score={self.score!r} is unknown; use score=influence (Block Influence, one calibration "
                "run) or score=loss (greedy by the measured loss, costlier, usually better)."
            )
        for option in ("protect_first", "protect_last"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PassConfigError(f"layerskip: {option}={value} must be a whole number >= 0 (0 protects nothing).")
        if self.shortlist is not None:
            if self.score != "loss":
                raise PassConfigError("layerskip: shortlist= only applies to score=loss (the candidates the greedy search tries).")
            if self.shortlist < 1:
                raise PassConfigError(f"layerskip: shortlist={self.shortlist} must be >= 1 (a large value tries every unit).")
        if self.calibration_batches < 1:
            raise PassConfigError("layerskip: calibration_batches must be >= 1.")
        if self.loss_batches is not None:
            if self.score != "loss":
                raise PassConfigError("layerskip: loss_batches= only applies to score=loss (the batches each greedy step evaluates).")
            if not 1 <= self.loss_batches <= self.calibration_batches:
                raise PassConfigError(f"layerskip: loss_batches={self.loss_batches} must be in 1..calibration_batches "
                                      f"({self.calibration_batches}); fewer batches make the greedy search cheaper.")

    # ------------------------------------------------------------ the pass

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        start = time.perf_counter()
        if self.units is not None:
            return self._remove_listed(model, ctx, start)
        if ctx.calibration is None or len(ctx.calibration) == 0:
            raise DataError(
                f"layerskip: score={self.score} needs calibration data (how much each block changes its input on "
                "real inputs). Pass calibration= to slimc.compile() or --calib on the command line."
            )
        work = copy_model(model)
        ir_common.TopologicalSortPass()(work)
        ir_common.NameFixPass()(work)
        analysis = blocks.analyse(work)
        units = analysis.units(self.unit)
        left = list(analysis.left_alone)
        details = {"unit": self.unit, "score": self.score, "units_found": len(units), "residuals_found": analysis.kinds}
        if not units:
            found = ", ".join(f"{n} {k}" for k, n in analysis.kinds.items()) or "none"
            return PassReport(name=self.name, modified=False, left_alone=left, details=details,
                              summary=f"no {self.unit} units to skip (residual sub-layers found: {found})",
                              seconds=time.perf_counter() - start)
        protected = self._protected(units)
        left += [(f"{self.unit} {u.label}", why) for u, why in protected.items()]
        removable = [u for u in units if u not in protected]
        n = self.count if self.count is not None else int(math.floor(self.ratio * len(units) + 0.5))
        if n > len(removable):
            raise PassConfigError(
                f"layerskip: {self._asked()} asks to remove {n} {self.unit} units, but only {len(removable)} of the "
                f"{len(units)} found can be removed ({len(protected)} protected by protect_first={self.protect_first}, "
                f"protect_last={self.protect_last}). Use count<={len(removable)}, or lower protect_first/protect_last."
            )
        if n == 0:
            return PassReport(name=self.name, modified=False, left_alone=left, details=details,
                              summary=f"ratio={self.ratio} of {len(units)} {self.unit} units rounds to 0: nothing removed",
                              seconds=time.perf_counter() - start)

        calib = ctx.calibration
        batches = first_batches(calib, self.calibration_batches)
        specs = ctx.loaded.inputs if ctx.loaded is not None else infer_input_specs(work)
        mask = next((s.name for s in specs if s.kind == "attention_mask"), None)
        bi = score.influence(work, units, batches, mask=mask)
        ranked = sorted(removable, key=lambda u: (bi[u], units.index(u)))
        greedy = None
        if self.score == "influence":
            chosen = ranked[:n]
        else:
            task = ctx.loaded.task if ctx.loaded is not None else infer_task(work, specs)
            tokens = next((s.name for s in specs if s.kind == "tokens"), None) if task == "causal-lm" else None
            shortlist = ranked[: self.shortlist or 2 * n + 2]
            k = self.loss_batches or len(batches)
            loss_set = first_batches(batches, k)
            greedy = score.greedy(work, shortlist, n, loss_set, tokens=tokens, mask=mask)
            chosen = greedy.order

        params0, _ = count_params(work)
        nodes0 = len(work.graph)
        outputs = rewire(work, chosen)
        params1, _ = count_params(work)
        latency = self._latency(model, work, ctx)
        common.replace_in_place(model, work)

        details.update(self._details(units, chosen, protected, bi, greedy, len(batches)))
        details.update(params_before=params0, params_after=params1, nodes_before=nodes0, nodes_after=len(model.graph),
                       outputs_renamed=outputs, latency=latency, notes=_notes(chosen), kv_cache_removed=removed_cache(chosen))
        labels = ", ".join(u.label for u in chosen)
        summary = (f"removed {n} of {len(units)} {self.unit} units by {self.score} ({labels}); params {params0:,} -> "
                   f"{params1:,} ({percent_fewer(params0, params1)})")
        if details["kv_cache_removed"]:
            summary += ("; KV cache entries removed with their layers (past_key_values.N.* inputs, present.N.* "
                        f"outputs): N = {', '.join(map(str, details['kv_cache_removed']))}")
        if latency:
            summary += f"; latency {latency['before_ms']:.2f} -> {latency['after_ms']:.2f} ms ({latency['speedup']:.2f}x)"
        return PassReport(name=self.name, modified=True, summary=summary, details=details, left_alone=left,
                          seconds=time.perf_counter() - start)

    def _remove_listed(self, model: ir.Model, ctx: PassContext, start: float) -> PassReport:
        """``units=[...]``: remove exactly those units (indices in graph order), unscored."""
        work = copy_model(model)
        ir_common.TopologicalSortPass()(work)
        ir_common.NameFixPass()(work)
        analysis = blocks.analyse(work)
        units = analysis.units(self.unit)
        bad = [i for i in self.units if i >= len(units)]
        if bad:
            raise PassConfigError(f"layerskip: units={self.units} names index(es) {bad}, but the model has {len(units)} "
                                  f"{self.unit} units (indices 0..{len(units) - 1}); see the report of layerskip(count=1).")
        chosen = [units[i] for i in sorted(self.units)]
        params0, _ = count_params(work)
        nodes0 = len(work.graph)
        outputs = rewire(work, chosen)
        params1, _ = count_params(work)
        latency = self._latency(model, work, ctx)
        common.replace_in_place(model, work)
        details = {"unit": self.unit, "score": "listed", "units_found": len(units), "residuals_found": analysis.kinds,
                   "removed": [{"label": u.label, "parts": u.describe(), "index": units.index(u)} for u in chosen],
                   "params_before": params0, "params_after": params1, "nodes_before": nodes0,
                   "nodes_after": len(model.graph), "outputs_renamed": outputs, "latency": latency,
                   "notes": _notes(chosen), "kv_cache_removed": removed_cache(chosen)}
        summary = (f"removed {len(chosen)} of {len(units)} {self.unit} units as listed ({', '.join(u.label for u in chosen)}); "
                   f"params {params0:,} -> {params1:,} ({percent_fewer(params0, params1)})")
        if latency:
            summary += f"; latency {latency['before_ms']:.2f} -> {latency['after_ms']:.2f} ms ({latency['speedup']:.2f}x)"
        return PassReport(name=self.name, modified=True, summary=summary, details=details,
                          left_alone=list(analysis.left_alone), seconds=time.perf_counter() - start)

    def _asked(self) -> str:
        return f"count={self.count}" if self.count is not None else f"ratio={self.ratio}"

    def _protected(self, units: list[blocks.Unit]) -> dict[blocks.Unit, str]:
        out = {}
        for u in units[: self.protect_first]:
            out[u] = f"protected: among the first {self.protect_first} (protect_first={self.protect_first})"
        for u in units[len(units) - self.protect_last:] if self.protect_last else []:
            out.setdefault(u, f"protected: among the last {self.protect_last} (protect_last={self.protect_last})")
        return out

    def _latency(self, before: ir.Model, after: ir.Model, ctx: PassContext) -> dict | None:
        if not self.measure_latency:
            return None
        from slimc.backends.onnxruntime import machine_description

        feed = common.latency_feed(ctx, before)
        times = common.measure({"before": before, "after": after}, feed, ctx.threads)
        shape = "x".join(str(d) for d in next(iter(feed.values())).shape) if feed else "scalar"
        return {"before_ms": times["before"], "after_ms": times["after"], "speedup": times["before"] / times["after"],
                "feed": shape, "machine": machine_description(ctx.threads)}

    def _details(self, units, chosen, protected, bi, greedy, n_batches) -> dict:
        def row(u: blocks.Unit) -> dict:
            item = {"label": u.label, "parts": u.describe(), "input": u.x.name, "output": u.out.name,
                    "influence": round(bi[u], 6)}
            if greedy is not None and greedy.steps and u.label in greedy.steps[0]["losses"]:
                item["loss_alone"] = greedy.steps[0]["losses"][u.label]
            return item

        removed = []
        for u in chosen:
            item = row(u)
            if greedy is not None:
                item["loss_after"] = greedy.loss_of(u)
            removed.append(item)
        candidates = [{**row(u), "protected": u in protected, "removed": u in chosen} for u in units]
        out = {"removed": removed, "candidates": candidates, "calibration_batches": n_batches}
        if greedy is not None:
            out["loss"] = {"metric": greedy.metric, "baseline": greedy.baseline, "batches": min(self.loss_batches or n_batches, n_batches),
                           "evaluations": sum(len(s["losses"]) for s in greedy.steps) + 1,
                           "shortlist": list(greedy.steps[0]["losses"]),
                           "shortlist_size": len(greedy.steps[0]["losses"]), "steps": greedy.steps}
        return out


def rewire(model: ir.Model, units: list[blocks.Unit]) -> list[str]:
    """Remove ``units``: every use of a unit's output reads its input, then dead code goes.

    Units are taken in graph order and each input is resolved through the units removed before
    it, so a run of adjacent units maps back to the first one's input. A graph output keeps its
    name (an Identity carries the input under it); returns the names of such outputs.
    """
    graph = model.graph
    order = {n: i for i, n in enumerate(graph)}
    replaced: dict[ir.Value, ir.Value] = {}

    def resolve(v: ir.Value) -> ir.Value:
        while v in replaced:
            v = replaced[v]
        return v

    renamed = []
    for u in sorted(units, key=lambda u: order[u.parts[-1].add]):
        x, out = resolve(u.x), u.out
        if out.is_graph_output():
            name = out.name
            out.name = f"{name}__skipped"
            node = ir.Node("", "Identity", [x], name=f"layerskip_{name}", num_outputs=1)
            new = node.outputs[0]
            new.name, new.type, new.shape = name, out.type, out.shape
            graph.append(node)
            for i, value in enumerate(list(graph.outputs)):
                if value is out:
                    graph.outputs[i] = new
            renamed.append(name)
        ir.convenience.replace_all_uses_with(out, x)
        replaced[out] = x
    cached = removed_cache(units)
    cache.drop_layers(graph, cached)  # before dead-code removal: graph outputs keep their producers
    ir_common.RemoveUnusedNodesPass()(model)
    cache.drop_inputs(graph, cached)
    return renamed


def removed_cache(units: list[blocks.Unit]) -> list[int]:
    """The KV-cache layers whose entries go with ``units``."""
    return sorted({i for u in units for p in u.parts for i in p.cache})


def _notes(chosen: list[blocks.Unit]) -> list[str]:
    tails = {n.op_type for u in chosen for p in u.parts for n in p.tail}
    notes = []
    if tails & blocks.ACTIVATIONS:
        notes.append("units ending in an activation (ResNet: y = Relu(x + f(x))) are skipped as y = x: exact when "
                     "f = 0 and x >= 0, which holds where x is itself a Relu (or max-pool of a Relu) output")
    if tails - blocks.ACTIVATIONS:
        notes.append("post-norm units (y = LayerNorm(x + f(x)), BERT) are skipped as y = x: their LayerNorm goes "
                     "with them")
    return notes
