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

Graph outputs survive every step, in the main graph and in every ``If``/``Loop``/``Scan`` body:
after each step every output is again a distinct value with its original name, produced inside
its own graph. The library steps do not promise that (identity elimination turns
``a, b = x, Identity(x)`` into ``x, x`` and renames ``x``; a body returning the same value twice,
or an outer-scope value, runs wrong in ONNX Runtime), so an output a step merged, renamed or
pulled out of its graph gets ``Identity`` back.
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
    runs_after_fuse = True  # generic graph steps; fused contrib ops are nodes like any other
    description = "exact simplification: fold constants, drop identities, dead nodes, duplicate subexpressions and unused or duplicate initializers"

    def __post_init__(self) -> None:
        super().__init__()
        if self.fold_size_limit < 0:
            raise PassConfigError("cleanup: fold_size_limit must be >= 0 (elements of a folded tensor).")

    def _steps(self) -> list[tuple[str, object]]:
        steps: list[tuple[str, object]] = []
        if self.fold_constants:
            steps.append(("constant folding", self._fold))
        steps.append(("identity elimination", _eliminate_identities))
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
            interface = _interfaces(model)
            step(model)
            _restore_interfaces(model, interface)
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


def _eliminate_identities(model: ir.Model) -> None:
    """``y = Identity(x)`` removed, ``y``'s uses read ``x``; where ``y`` is a graph output, only when
    ``x`` is made by a node of the same graph and is no output itself (``x`` then takes ``y``'s name).

    onnx_ir's IdentityEliminationPass also merges two outputs into one value and hands a body's
    output to an outer-scope value (and raises when two branches do it): those Identities stay.
    """
    for graph in _graphs(model):
        for node in list(graph):
            if node.op_type != "Identity" or node.domain != "" or len(node.inputs) != 1 or len(node.outputs) != 1:
                continue
            x, y = node.inputs[0], node.outputs[0]
            if x is None:
                continue
            if y.is_graph_output():
                if x.producer() is None or x.producer().graph is not graph or x.is_graph_output():
                    continue
                x.shape = x.shape or y.shape
                x.type = x.type or y.type
                name = y.name
                y.replace_all_uses_with(x, replace_graph_outputs=True)
                x.name = name
            else:
                y.replace_all_uses_with(x)
            graph.remove(node, safe=True)


def _graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph, the model's functions' graphs and every subgraph in them (bodies of
    If/Loop/Scan, nested), outermost first."""
    graphs = [model.graph, *(f.graph for f in model.functions.values())]
    for top in list(graphs):
        for node in ir.traversal.RecursiveGraphIterator(top):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    graphs.append(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    graphs.extend(attr.value)
    return graphs


def _interfaces(model: ir.Model) -> dict[int, list[str | None]]:
    """Each graph's output names, by graph identity."""
    return {id(g): [v.name for v in g.outputs] for g in _graphs(model)}


def _restore_interfaces(model: ir.Model, names: dict[int, list[str | None]]) -> None:
    """Give every output of every graph back its own value: distinct, named as before, made in its graph."""
    for graph in _graphs(model):
        wanted = names.get(id(graph), [v.name for v in graph.outputs])
        seen: set[int] = set()
        for i, value in enumerate(list(graph.outputs)):
            name = wanted[i] if i < len(wanted) else value.name
            if value.name == name and id(value) not in seen and value.graph is graph:
                seen.add(id(value))
                continue
            copy = ir.Value(name=None, type=value.type, shape=value.shape)
            graph.append(ir.Node("", "Identity", inputs=[value], outputs=[copy]))
            _free_name(graph, name)
            copy.name = name
            graph.outputs[i] = copy
            seen.add(id(copy))


def _free_name(graph: ir.Graph, name: str | None) -> None:
    """Rename a value of ``graph`` that holds ``name`` (not an output) so an output can take it back."""
    if name is None:
        return
    taken = [v for v in (*graph.inputs, *(o for n in graph for o in n.outputs)) if v.name == name]
    for k, value in enumerate(v for v in taken if not v.is_graph_output() and not v.is_graph_input()):
        value.name = f"{name}__cleanup{k}"


def _sequence(*steps):
    def run(model: ir.Model) -> None:
        for step in steps:
            step(model)

    return run
