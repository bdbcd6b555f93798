"""The `fuse` pass: rewrite recognised subgraphs to ONNX Runtime's fused contrib ops.

Patterns (each matched by structure, every condition checked; `norms`, `rotary` and `gqa` document
them): RMSNorm -> ``SimplifiedLayerNormalization``, residual Add + RMSNorm ->
``SkipSimplifiedLayerNormalization``, rotary embedding (``rotate_half``) -> ``RotaryEmbedding``,
attention over a KV cache -> ``GroupQueryAttention``. Every candidate that is not proven is left
alone and listed in the report with the condition that failed: a candidate RMSNorm is a
``ReduceMean``, a candidate rotation a ``Neg``, a candidate attention a ``Softmax``.

The result runs only on ONNX Runtime (the ops are its contrib ops), so it is the last step of a
pipeline: passes that need the unfused graph (prune, layerskip, sparsify, smoothquant, int8,
int4, fp16) refuse to follow it (`slimc.pass_spec` checks the order), and export targets other
than ONNX Runtime's refuse the fused ops. The pass is exact: the fused ops compute the same
float32 sums; verification compares the outputs with the unfused model's.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401 - TopologicalSortPass

from slimc.errors import PassConfigError
from slimc.onnx_io import copy_model
from slimc.passes.fuse import gqa, norms, pack, rotary, selfcheck
from slimc.passes.fuse.match import NoMatch
from slimc.passes.quant import common
from slimc.pipeline import Pass, PassContext, PassReport

MS_DOMAIN = "com.microsoft"
PATTERNS = ("rmsnorm", "skip_rmsnorm", "rotary", "gqa", "pack")
# The ops this pass writes (refused by non-ORT targets, and by passes that need the unfused form).
FUSED_OPS = frozenset({"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
                       "GroupQueryAttention"})


@dataclasses.dataclass
class Fuse(Pass):
    """Rewrite RMSNorm, residual Add + RMSNorm, rotary embeddings and cached attention to ONNX Runtime's fused ops.

    Options:
        patterns: which rewrites to make, any of `rmsnorm` (SimplifiedLayerNormalization),
            `skip_rmsnorm` (SkipSimplifiedLayerNormalization, needs `rmsnorm`), `rotary`
            (RotaryEmbedding), `gqa` (GroupQueryAttention for attention over the KV cache), `pack`
            (projections of one activation, such as q/k/v or gate/up, as one MatMul or MatMulNBits
            and a Split); none = all.
    """

    patterns: list[str] | None = None

    name = "fuse"
    exact = True
    runs_after_fuse = True
    description = ("rewrite RMSNorm, residual Add + RMSNorm, rotary embedding and KV-cache attention to ONNX Runtime's "
                   "fused contrib ops (ORT only)")

    def __post_init__(self) -> None:
        super().__init__()
        chosen = list(PATTERNS) if self.patterns is None else list(self.patterns)
        unknown = [p for p in chosen if p not in PATTERNS]
        if unknown or not chosen:
            raise PassConfigError(f"fuse: patterns={self.patterns!r}: choose from {', '.join(PATTERNS)} (none = all).")
        if "skip_rmsnorm" in chosen and "rmsnorm" not in chosen:
            raise PassConfigError("fuse: skip_rmsnorm fuses the residual Add into a fused RMSNorm; add rmsnorm to patterns.")
        self.patterns = chosen

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        start = time.perf_counter()
        self.exact = True
        work = copy_model(model)
        graph = work.graph
        counts: Counter = Counter()
        left: list[tuple[str, str]] = []
        replaced: list[ir.Node] = []
        if "rmsnorm" in self.patterns:
            replaced += self._norms(graph, counts, left)
        if "rotary" in self.patterns:
            replaced += self._rotations(graph, counts, left)
        attentions = self._attentions(graph, counts, left) if "gqa" in self.patterns else []
        replaced += [n for att in attentions for n in att.nodes]
        removed = _remove(graph, replaced) if replaced else 0
        if "pack" in self.patterns:  # last: the other matchers follow q/k/v back to their MatMuls
            groups = pack.find(graph)
            for group in groups:
                pack.rewrite(graph, group, graph.opset_imports.get("", 17))
            if groups:
                counts["packed MatMul"] = sum(1 for g in groups if g.kind == "MatMul")
                counts["packed MatMulNBits"] = sum(1 for g in groups if g.kind == "MatMulNBits")
                removed += _remove(graph, [n for g in groups for n in g.nodes])
                replaced += [n for g in groups for n in g.nodes]
        if not replaced:
            return PassReport(name=self.name, modified=False, seconds=time.perf_counter() - start, left_alone=left,
                              summary=f"nothing fused: no pattern proven ({len(left)} candidate(s) left alone)",
                              details={"fused": {}, "left_alone": len(left)})
        # why the past/present buffers cannot be shared (None: they can), when attention was fused
        unshared = gqa.past_lengths_from_mask(graph, [n for n in graph if n.op_type == "GroupQueryAttention"]) \
            if attentions else "no attention fused"
        if any(n.domain == MS_DOMAIN for n in graph):
            graph.opset_imports.setdefault(MS_DOMAIN, 1)
        ir.passes.common.TopologicalSortPass()(work)
        checked = selfcheck.check(model, work, ctx)
        self.exact = checked is None  # the pipeline compares exactly only where int8 activation rounding is absent
        common.replace_in_place(model, work)
        fused = {k: v for k, v in counts.items() if v}
        summary = ", ".join(f"{n} {op}" for op, n in fused.items()) + f" ({removed} nodes removed)"
        if left:
            summary += f"; {len(left)} candidate(s) left alone (see left_alone)"
        if checked:
            summary += f"; {checked}"
        return PassReport(name=self.name, modified=True, summary=summary, seconds=time.perf_counter() - start,
                          details={"fused": fused, "nodes_removed": removed, "left_alone": len(left), "exactness": checked,
                                   **({"past_buffer": unshared or "shareable"} if attentions else {})},
                          left_alone=left)

    def _norms(self, graph: ir.Graph, counts: Counter, left: list) -> list[ir.Node]:
        replaced = []
        for mean in [n for n in graph if n.op_type == "ReduceMean" and n.domain in ("", "ai.onnx")]:
            try:
                norm = norms.match_rmsnorm(mean)
            except NoMatch as exc:
                left.append((f"{mean.name or 'ReduceMean'} (ReduceMean)", f"not an RMSNorm: {exc}"))
                continue
            add = norms.residual(norm) if "skip_rmsnorm" in self.patterns else None
            if add is not None and add in replaced:
                add = None  # one Add feeds one skip norm
            replaced += norms.rewrite(graph, norm, add)
            counts["SkipSimplifiedLayerNormalization" if add is not None else "SimplifiedLayerNormalization"] += 1
        return replaced

    def _attentions(self, graph: ir.Graph, counts: Counter, left: list) -> list[gqa.Attention]:
        done, shared = [], gqa.Shared(graph)
        for softmax in [n for n in graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]:
            try:
                if gqa.attention_mask(graph) is None:
                    raise NoMatch("the graph has no 2-D attention_mask input to size the cache from")
                att = gqa.match_attention(softmax)
            except NoMatch as exc:
                left.append((f"{softmax.name or 'Softmax'} (Softmax)", f"not a cached attention: {exc}"))
                continue
            gqa.rewrite(graph, att, shared)
            done.append(att)
            counts["GroupQueryAttention"] += 1
        return done

    def _rotations(self, graph: ir.Graph, counts: Counter, left: list) -> list[ir.Node]:
        replaced, caches = [], rotary.Caches(graph)
        for neg in [n for n in graph if n.op_type == "Neg" and n.domain in ("", "ai.onnx")]:
            try:
                rot = rotary.match_rotation(neg)
            except NoMatch as exc:
                left.append((f"{neg.name or 'Neg'} (Neg)", f"not a rotary embedding: {exc}"))
                continue
            replaced += rotary.rewrite(graph, rot, caches)
            counts["RotaryEmbedding"] += 1
        return replaced


def _remove(graph: ir.Graph, replaced: list[ir.Node]) -> int:
    """Remove the replaced nodes, then whatever they alone kept alive upstream (shared cos/sin, ...)."""
    unique = list({id(n): n for n in replaced}.values())
    # the producers upstream, taken before removal (a safe remove detaches the inputs)
    frontier = [v.producer() for n in unique for v in n.inputs if v is not None and v.producer() is not None]
    graph.remove(unique, safe=True)
    removed = len(unique)
    while frontier:
        node = frontier.pop()
        if node.graph is not graph or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        frontier += [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
        graph.remove(node, safe=True)
        removed += 1
    for name in [k for k, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        del graph.initializers[name]
    return removed
