"""The search space of `slimc search`: one compression level per residual block, built by the passes.

The blocks are `layerskip`'s residual blocks (`slimc.passes.skip.blocks`: attention + MLP of a
transformer layer, a ResNet block). Each block ``i`` gets a level ``g_i`` from an ordered list,
from mild to strong:

    0 = dense,  1..K = prune(ratio = r_k) of the block's FFN neurons and attention heads,
    K+1 = the block removed (layerskip; never for the first/last ``protect`` blocks).

A genome ``(g_0, ..., g_{B-1})`` becomes a real graph through the passes themselves:
``layerskip(units=[blocks at K+1])`` and then ``prune(ratio=0, ratios_by_group={pattern: r})``
with one pattern per initializer of each pruned block (`Prune.ratios_by_group`), so each block's
groups lose their own ratio. With ``importance=magnitude`` a block's pruned weights do not depend
on the other blocks' levels, which is what makes per-block costs additive (`CostModel`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from slimc.errors import BudgetError
from slimc.onnx_io import copy_model
from slimc.pipeline import Pass, PassContext

METHODS = ("prune", "layerskip")
PRUNE_LEVELS = (0.125, 0.25, 0.375, 0.5)


@dataclasses.dataclass(frozen=True)
class Block:
    """One residual block: its label, index among the blocks, and the initializers only it uses."""

    index: int
    label: str
    initializers: tuple[str, ...]
    skippable: bool


@dataclasses.dataclass(frozen=True)
class Space:
    """Blocks and the levels each may take (see the module docstring)."""

    blocks: tuple[Block, ...]
    prune_levels: tuple[float, ...]
    methods: tuple[str, ...]

    @property
    def skip_level(self) -> int | None:
        return len(self.prune_levels) + 1 if "layerskip" in self.methods else None

    def max_level(self, i: int) -> int:
        return self.skip_level if self.skip_level is not None and self.blocks[i].skippable else len(self.prune_levels)

    def describe(self, level: int) -> str:
        if level == 0:
            return "dense"
        if level == self.skip_level:
            return "skip"
        return f"prune {self.prune_levels[level - 1]:g}"

    def passes(self, genome: tuple[int, ...]) -> list[Pass]:
        """The pass pipeline that builds ``genome`` (what the receipt of the chosen model shows)."""
        from slimc.passes.prune.prune_pass import Prune
        from slimc.passes.skip.layerskip import LayerSkip

        skipped = [i for i, g in enumerate(genome) if g == self.skip_level]
        ratios = {_literal(name): self.prune_levels[g - 1] for i, g in enumerate(genome)
                  if 0 < g <= len(self.prune_levels) for name in self.blocks[i].initializers}
        out: list[Pass] = []
        if skipped:
            out.append(LayerSkip(units=skipped, measure_latency=False))
        if ratios:
            out.append(Prune(ratio=0.0, ratios_by_group=ratios, allow_noop=True))
        return out

    def build(self, model: ir.Model, genome: tuple[int, ...]) -> ir.Model:
        """A copy of ``model`` with ``genome`` applied by the passes (``model`` is not changed)."""
        work = copy_model(model)
        ctx = PassContext()
        for pass_ in self.passes(genome):
            pass_.apply(work, ctx)
        return work


def discover(model: ir.Model, methods: tuple[str, ...] = METHODS, prune_levels: tuple[float, ...] = PRUNE_LEVELS,
             protect: int = 1) -> Space:
    """The blocks of ``model`` and their levels; refuses a model without residual blocks."""
    from slimc.passes.skip import blocks as skip_blocks

    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise BudgetError(f"search space {','.join(methods) or '(empty)'}: use one or more of {', '.join(METHODS)} "
                          "(int8/int4/sparsify per block are not searched yet).")
    if "prune" not in methods:
        prune_levels = ()
    work = copy_model(model)
    ir_common.TopologicalSortPass()(work)
    ir_common.NameFixPass()(work)  # as layerskip analyses it: the same units in the same order
    units = skip_blocks.analyse(work).units("block")
    if not units:
        raise BudgetError("the model has no residual blocks (x + f(x)) to allocate levels to: slimc search works per "
                          "block; use slimc --passes prune/int8 with one ratio instead.")
    owners: dict[str, set[int]] = {}
    for i, unit in enumerate(units):
        for node in unit.nodes:
            for v in node.inputs:
                if v is not None and v.name and v.name in work.graph.initializers:
                    owners.setdefault(v.name, set()).add(i)
    found = []
    for i, unit in enumerate(units):
        own = tuple(sorted(name for name, who in owners.items() if who == {i}))
        skippable = protect <= i < len(units) - protect
        found.append(Block(i, unit.label, own, skippable))
    return Space(tuple(found), tuple(prune_levels), tuple(methods))


def _literal(name: str) -> str:
    """A glob pattern that matches ``name`` only (fnmatch's special characters escaped)."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def as_json(space: Space) -> dict[str, Any]:
    return {"methods": list(space.methods), "prune_levels": list(space.prune_levels),
            "blocks": [{"index": b.index, "label": b.label, "skippable": b.skippable, "initializers": len(b.initializers)}
                       for b in space.blocks]}
