"""`cleanup`: exact graph simplification, step by step, each step counted.

Steps (all numerically exact up to float rounding of folded constant subgraphs):

1. constant folding (onnxscript's folder): a node whose inputs are all constants is replaced
   by its output, computed once; shape arithmetic on static dims folds too.
2. identity elimination: ``y = Identity(x)`` is removed and ``y``'s uses read ``x``.
3. common subexpression elimination: two nodes with the same op, attributes and inputs are
   merged.
4. dead code: nodes whose outputs nothing reads, unused initializers, unused functions
   and opset imports are removed.
5. duplicate initializers: byte-identical weights are stored once.
6. topological sort.

What it leaves alone: graph inputs and outputs (the interface never changes), subgraph-carrying
ops' bodies beyond what onnx_ir's passes handle, constants larger than the folding limits
(folding them would grow the file).
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
import onnx_ir.passes.common as common

from slimc.errors import PassConfigError
from slimc.pipeline import Pass, PassContext, PassReport

log = logging.getLogger("slimc")


def _counts(model: ir.Model) -> tuple[int, int, int]:
    inits = model.graph.initializers.values()
    nbytes = sum(v.const_value.nbytes for v in inits if v.const_value is not None)
    return len(model.graph), len(model.graph.initializers), nbytes


@dataclasses.dataclass
class Cleanup(Pass):
    """Remove dead code, identities, duplicate subexpressions and weights; fold constants.

    Options:
        fold_constants: evaluate nodes whose inputs are all constants (onnxscript's folder).
        cse: merge nodes with the same op, attributes and inputs (common subexpression elimination).
        dedupe_initializers: store byte-identical weights once.
        fold_size_limit: largest folded tensor, in elements; bigger constants stay computed, to keep
            files small.
    """

    fold_constants: bool = True
    cse: bool = True
    dedupe_initializers: bool = True
    fold_size_limit: int = 1 << 20

    name = "cleanup"
    exact = True
    description = "exact simplification: fold constants, drop identities, dead nodes, duplicate subexpressions and unused or duplicate initializers"

    def __post_init__(self) -> None:
        super().__init__()
        if self.fold_size_limit < 0:
            raise PassConfigError("cleanup: fold_size_limit must be >= 0 (elements of a folded tensor).")

    def _steps(self) -> list[tuple[str, object]]:
        steps: list[tuple[str, object]] = []
        if self.fold_constants:
            steps.append(("constant folding", self._fold))
        steps.append(("identity elimination", common.IdentityEliminationPass()))
        if self.cse:
            steps.append(("common subexpressions", common.CommonSubexpressionEliminationPass()))
        steps.append(("dead code", common.RemoveUnusedNodesPass()))
        steps.append(("unused functions/opsets", _sequence(common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass())))
        if self.dedupe_initializers:
            steps.append(("duplicate initializers", common.DeduplicateInitializersPass()))
            # Deduplication can leave the duplicates' producers (none) but orphan nothing else;
            # a second dead-code sweep catches initializers orphaned by folding.
            steps.append(("dead code (after dedupe)", common.RemoveUnusedNodesPass()))
        steps.append(("topological sort", common.TopologicalSortPass()))
        return steps

    def _fold(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.optimizer import fold_constants

        result = fold_constants(model, output_size_limit=self.fold_size_limit)
        return ir.passes.PassResult(model, modified=bool(getattr(result, "modified", True)))

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        nodes0, inits0, bytes0 = _counts(model)
        per_step = {}
        for label, step in self._steps():
            before_nodes, before_inits, _ = _counts(model)
            step(model)
            after_nodes, after_inits, _ = _counts(model)
            per_step[label] = {"nodes_removed": before_nodes - after_nodes, "initializers_removed": before_inits - after_inits}
            log.debug("cleanup %s: %s", label, per_step[label])
        nodes1, inits1, bytes1 = _counts(model)
        removed = nodes0 - nodes1
        summary = (
            f"{nodes0} -> {nodes1} nodes ({removed:+d} removed), {inits0} -> {inits1} initializers, "
            f"{(bytes0 - bytes1) / 1e6:.2f} MB of weights freed"
        ).replace("(+", "(")
        return PassReport(
            name=self.name,
            modified=(nodes0, inits0, bytes0) != (nodes1, inits1, bytes1) or removed != 0,
            summary=summary,
            details={
                "nodes_before": nodes0,
                "nodes_after": nodes1,
                "initializers_before": inits0,
                "initializers_after": inits1,
                "weight_bytes_freed": bytes0 - bytes1,
                "steps": per_step,
            },
        )


def _sequence(*steps):
    def run(model: ir.Model) -> None:
        for step in steps:
            step(model)

    return run
