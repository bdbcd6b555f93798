"""Residual-stream analysis for `layerskip`: every ``x -> tail(x + f(x))`` unit of a graph.

Found from the dataflow of the main graph alone, for any architecture (names are never matched;
torch.export's module-path metadata only *labels* what was found). Definitions:

- a value is *dynamic* if it depends on a graph input, *static* otherwise (weights, constants);
- ``b`` *value-depends* on ``a`` if a path ``a -> b`` exists that does not pass through
  ``Shape``/``Size`` (those read only ``a``'s shape);
- a *weighted op* is a contraction (MatMul, Gemm, Conv, MatMulNBits, ...) with a static input of
  rank >= 2: a layer with weights.

1. **Residual Add**: ``Add(x, y)``, both inputs float and dynamic, ``y`` value-depends on ``x``,
   and the branch ``f`` (the nodes that value-depend on ``x`` and that ``y`` depends on) holds a
   weighted op (so GELU's internal ``x + c x^3`` is not a block). ``x`` must have the sum's shape.
2. **Non-identity shortcut**: ``Add(a, b)`` where neither input depends on the other but both
   value-depend on a common float value (the *fork*, the latest such) and the path from the fork
   to each input holds a weighted op: a ResNet projection/downsample block. Left alone, with the
   reason: skipping it would drop the projection (and usually change the shape).
3. **Tail**: what carries the sum to the next block: nothing in pre-norm transformers (the sum is
   the stream), ``LayerNorm`` in post-norm ones (BERT), ``Relu`` in ResNets. From the sum, nodes
   are added in graph order while each reads only the region, constants or integer (shape)
   values and is no contraction; every point where the region has a single value leaving it,
   of the sum's shape, is a possible unit output. The output is the one that is the input of
   another residual or the fork of a projection block; at the end of a chain, the one whose tail
   has the op types of the previous unit's tail (so GPT-2's final ``ln_f`` stays out of its last
   block while BERT's last post-LN stays in); with neither, the longest tail of activations only.
4. **Kind**: *attention* if ``f`` holds an attention op or a MatMul/Einsum of two activations
   (``Q Kᵀ``), else *conv* if it holds a Conv, else *mlp*.
5. Left alone: a residual whose branch holds another residual's Add (a long skip around
   blocks), and one whose branch values are also used outside the unit or are graph outputs:
   removing it would not remove its work, or would change the interface. A KV-cache layer's
   ``present`` outputs are the exception: they go with the branch, with their past inputs
   (`slimc.passes.skip.cache`).
6. **Blocks**: units chain when one's input is the previous one's output; along a chain, a block
   is a run of attention sub-layers and the mlp sub-layers after it (pre-LN: attention + MLP;
   post-LN: the same, each with its LayerNorm); a conv unit, or an mlp without attention before
   it, is a block of its own.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable

import onnx_ir as ir

from slimc.passes.skip.cache import branch_cache

CONTRACTIONS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulNBits", "MatMulInteger", "ConvInteger",
    "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "FusedMatMul",
    "FusedConv", "FusedGemm",
})
CONVS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv"})
ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                           "PackedMultiHeadAttention", "QAttention", "SparseAttention", "DecoderMaskedMultiHeadAttention"})
CONTROL = frozenset({"If", "Loop", "Scan"})
SHAPE_ONLY = frozenset({"Shape", "Size"})
ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Gelu", "FastGelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu",
                         "Softplus", "HardSwish", "HardSigmoid", "Mish", "Clip", "ThresholdedRelu"})
MAX_TAIL = 24  # nodes a tail may hold (a decomposed LayerNorm has about 10)


@dataclasses.dataclass(eq=False)
class Residual:
    """One residual sub-layer ``out = tail(x + f(x))``; ``branch`` holds f's nodes in graph order."""

    add: ir.Node
    x: ir.Value
    branch: list[ir.Node]
    kind: str  # "attention" | "mlp" | "conv"
    scope: tuple[str, ...]  # common module path of the branch's weighted nodes ('' parts trimmed)
    closings: list[tuple[ir.Value, list[ir.Node]]]  # possible (output, tail) pairs, the sum first
    out: ir.Value | None = None
    tail: list[ir.Node] = dataclasses.field(default_factory=list)
    cache: list[int] = dataclasses.field(default_factory=list)  # KV-cache layers whose present outputs it makes

    @property
    def sum(self) -> ir.Value:
        return self.add.outputs[0]

    @property
    def nodes(self) -> list[ir.Node]:
        return [*self.branch, self.add, *self.tail]


@dataclasses.dataclass(eq=False)
class Unit:
    """What `layerskip` scores and removes: one sub-layer, or a block of chained sub-layers."""

    kind: str  # "block" | "attention" | "mlp" | "conv"
    parts: list[Residual]
    label: str = ""

    @property
    def x(self) -> ir.Value:
        return self.parts[0].x

    @property
    def out(self) -> ir.Value:
        return self.parts[-1].out

    @property
    def nodes(self) -> list[ir.Node]:
        return [n for p in self.parts for n in p.nodes]

    @property
    def channel_axis(self) -> int:
        """1 for NCHW feature maps (a Conv in the branch), else the last axis (hidden size)."""
        rank = len(self.x.shape) if self.x.shape is not None else 0
        return 1 if rank >= 3 and any(p.kind == "conv" for p in self.parts) else -1

    def describe(self) -> str:
        return " + ".join(p.kind for p in self.parts)


@dataclasses.dataclass
class Analysis:
    residuals: list[Residual]  # candidates, in graph order
    left_alone: list[tuple[str, str]]
    kinds: dict[str, int]  # residuals found per kind

    def units(self, granularity: str) -> list[Unit]:
        """The units of ``granularity`` ("block", "attention", "mlp"), labelled, in graph order.

        A block is labelled with its module path (``model.layers.3``) when the export recorded one,
        else ``block <k>``; a sub-layer with its block's label and kind (``model.layers.3/mlp``).
        """
        blocks = [Unit("block", g) for g in _blocks(_chains(self.residuals))]
        seen: dict[str, int] = {}
        names: dict[Residual, str] = {}
        for k, block in enumerate(blocks):
            scope = _common([p.scope for p in block.parts])
            base = scope[-1] if scope else f"block {k}"
            seen[base] = seen.get(base, 0) + 1
            block.label = base if seen[base] == 1 else f"{base} #{seen[base]}"
            for p in block.parts:
                names[p] = block.label if len(block.parts) == 1 else f"{block.label}/{p.kind}"
        if granularity == "block":
            return blocks
        return [Unit(r.kind, [r], names[r]) for r in self.residuals if r.kind == granularity]


def analyse(model: ir.Model) -> Analysis:
    """Find the residual units of ``model``'s main graph (which must be topologically sorted)."""
    return _Analyser(model).run()


class _Analyser:
    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self.nodes = list(self.graph)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.dynamic: set[ir.Value] = set(self.graph.inputs)
        for node in self.nodes:
            if any(v is not None and v in self.dynamic for v in node.inputs):
                self.dynamic.update(node.outputs)

    # ------------------------------------------------------------ dataflow helpers

    def _pos(self, value: ir.Value) -> int:
        producer = value.producer()
        return self.order.get(producer, -1) if producer is not None else -1

    def _upstream(self, value: ir.Value, floor: int = -1) -> set[ir.Node]:
        """Nodes after position ``floor`` that ``value`` depends on (Shape/Size kept, not crossed)."""
        seen: set[ir.Node] = set()
        stack = [value.producer()]
        while stack:
            node = stack.pop()
            if node is None or node in seen or self.order.get(node, -1) <= floor:
                continue
            seen.add(node)
            if node.op_type not in SHAPE_ONLY:
                stack.extend(v.producer() for v in node.inputs if v is not None and v in self.dynamic)
        return seen

    def _between(self, x: ir.Value, upstream: set[ir.Node]) -> tuple[list[ir.Node], set[ir.Value]]:
        """The nodes of ``upstream`` that value-depend on ``x`` (graph order), and the values they make."""
        reached, out = {x}, []
        for node in sorted(upstream, key=self.order.__getitem__):
            if node.op_type not in SHAPE_ONLY and any(v is not None and v in reached for v in node.inputs):
                out.append(node)
                reached.update(node.outputs)
        return out, reached

    def _weighted(self, node: ir.Node) -> bool:
        return node.op_type in CONTRACTIONS and any(
            v is not None and v not in self.dynamic and v.shape is not None and len(v.shape) >= 2 for v in node.inputs)

    def _float_dynamic(self, v: ir.Value | None) -> bool:
        return v is not None and v in self.dynamic and v.dtype is not None and v.dtype.is_floating_point()

    # ------------------------------------------------------------ the analysis

    def run(self) -> Analysis:
        found, left, forks = [], [], set()
        for add in self.nodes:
            if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
                continue
            a, b = add.inputs
            if not (self._float_dynamic(a) and self._float_dynamic(b)):
                continue
            r = self._residual(add, a, b) or self._residual(add, b, a)
            if r is not None:
                found.append(r)
                continue
            shortcut = self._shortcut(add, a, b)
            if shortcut is not None:
                forks.add(shortcut[0])
                left.append(shortcut[1])
        # An Add can look like x + f(x) when x is a side input of earlier blocks (layer 2's scores
        # + the attention mask, which layer 1 read). Smallest branches first: a candidate whose
        # branch holds accepted residuals is one (a long skip) only if x reaches the first of
        # them through its skip input.
        accepted: dict[ir.Node, Residual] = {}
        for r in sorted(found, key=lambda r: len(r.branch)):
            inner = [accepted[n] for n in r.branch if n in accepted]
            if not inner or self._depends(r.x, inner[0].x):
                accepted[r.add] = r
        residuals = []
        for r in found:
            if r.add not in accepted:
                continue
            inner = [n for n in r.branch if n in accepted]
            if not _same_shape(r.x, r.sum):
                left.append((f"{r.kind} sub-layer {_label(r)}", f"shape-changing: input {_shape(r.x)} but sum "
                             f"{_shape(r.sum)} (the Add broadcasts), so the output cannot be replaced by the input"))
            elif inner:
                left.append((f"{r.kind} sub-layer {_label(r)}", f"its branch holds {len(inner)} other residual "
                             "block(s) (a long skip connection around blocks); the inner blocks are the units"))
            else:
                residuals.append(r)
        self._choose_tails(residuals, forks)
        kept = []
        for r in residuals:
            why = self._unsafe(r)
            if why:
                left.append((f"{r.kind} sub-layer {_label(r)}", why))
            else:
                kept.append(r)
        kinds: dict[str, int] = {}
        for r in kept:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        return Analysis(kept, left, kinds)

    def _depends(self, a: ir.Value, b: ir.Value) -> bool:
        """Whether ``b`` is ``a`` or value-depends on it."""
        return a is b or any(a in n.inputs for n in self._upstream(b, self._pos(a)) if n.op_type not in SHAPE_ONLY)

    def _residual(self, add: ir.Node, x: ir.Value, y: ir.Value) -> Residual | None:
        """``add`` as ``x + f(x)`` with ``y = f(x)`` (step 1), else None."""
        upstream = self._upstream(y, self._pos(x))
        if not any(x in n.inputs for n in upstream if n.op_type not in SHAPE_ONLY):
            return None
        branch, reached = self._between(x, upstream)
        weighted = [n for n in branch if self._weighted(n)]
        if not weighted:
            return None
        kind = "mlp"
        for n in branch:
            if n.op_type in ATTENTION_OPS or (n.op_type in ("MatMul", "Einsum")
                                              and sum(1 for v in n.inputs if v is not None and v in reached) >= 2):
                kind = "attention"
                break
        else:
            if any(n.op_type in CONVS for n in branch):
                kind = "conv"
        return Residual(add, x, branch, kind, _common([_scopes(n) for n in weighted]), [])

    def _shortcut(self, add: ir.Node, a: ir.Value, b: ir.Value) -> tuple[ir.Value, tuple[str, str]] | None:
        """A residual whose shortcut is not the identity (projection): (fork, (what, why)), else None."""
        up_a, up_b = self._upstream(a), self._upstream(b)
        common = [n for n in up_a & up_b if n.op_type not in SHAPE_ONLY]
        forks = [v for n in common for v in n.outputs
                 if self._float_dynamic(v) and v.shape is not None and len(v.shape) >= 2]
        if not forks:
            return None
        fork = max(forks, key=self._pos)
        floor = self._pos(fork)
        side_a, _ = self._between(fork, {n for n in up_a if self.order[n] > floor})
        side_b, _ = self._between(fork, {n for n in up_b if self.order[n] > floor})
        wa, wb = [n for n in side_a if self._weighted(n)], [n for n in side_b if self._weighted(n)]
        if not (wa and wb):
            return None
        shortcut, branch = (wa, wb) if len(wa) <= len(wb) else (wb, wa)
        scope = _common([_scopes(n) for n in branch + shortcut])
        name = scope[-1] if scope else f"at {add.name or 'Add'}"
        ops = ", ".join(sorted({n.op_type for n in shortcut}))
        change = (f"; it changes the shape {_shape(fork)} -> {_shape(add.outputs[0])}"
                  if not _same_shape(fork, add.outputs[0]) else "")
        return fork, (f"residual block {name}", f"its shortcut is not the identity ({ops} on the skip path: a "
                      f"projection/downsample shortcut){change}; skipping it would drop that projection")

    def _addable(self, node: ir.Node, region: set[ir.Value]) -> bool:
        if node.op_type in CONTRACTIONS or node.op_type in ATTENTION_OPS or node.op_type in CONTROL or not node.outputs:
            return False
        return all(v is None or v in region or v not in self.dynamic or not (v.dtype and v.dtype.is_floating_point())
                   for v in node.inputs)

    def _closings(self, s: ir.Value) -> list[tuple[ir.Value, list[ir.Node]]]:
        """(value, tail nodes) for every point where a tail grown from ``s`` can end (step 3)."""
        found: list[tuple[ir.Value, list[ir.Node]]] = [(s, [])]
        region: list[ir.Node] = []
        inside: set[ir.Node] = set()
        values = {s}
        last = len(self.nodes)  # a use inside a subgraph sorts last and ends the tail
        pending = [(self.order.get(n, last), id(n), n) for n, _ in s.uses()]
        heapq.heapify(pending)
        while pending and len(region) < MAX_TAIL and not s.is_graph_output():
            _, _, node = heapq.heappop(pending)
            if node in inside:
                continue
            if node not in self.order or not self._addable(node, values):
                break
            region.append(node)
            inside.add(node)
            values.update(node.outputs)
            for v in node.outputs:
                for user, _ in v.uses():
                    heapq.heappush(pending, (self.order.get(user, last), id(user), user))
            open_ = [v for v in values if v.is_graph_output() or any(u not in inside for u, _ in v.uses())]
            if len(open_) == 1 and open_[0] is not s and _same_shape(open_[0], s):
                found.append((open_[0], list(region)))
        return found

    def _choose_tails(self, residuals: list[Residual], forks: set[ir.Value]) -> None:
        anchors = {r.x for r in residuals} | forks
        by_out: dict[ir.Value, Residual] = {}
        for r in residuals:
            r.closings = self._closings(r.sum)
            choice = next((c for c in r.closings if c[0] in anchors), None)
            if choice is None:
                prev = by_out.get(r.x)
                if prev is not None:
                    signature = [n.op_type for n in prev.tail]
                    choice = next((c for c in r.closings if [n.op_type for n in c[1]] == signature), r.closings[0])
                else:
                    plain = [c for c in r.closings if all(n.op_type in ACTIVATIONS for n in c[1])]
                    choice = plain[-1]
            r.out, r.tail = choice
            by_out[r.out] = r

    def _unsafe(self, r: Residual) -> str:
        """Why removing ``r`` would not remove its work or would change the interface ('' when fine)."""
        inside = set(r.nodes)
        outputs = [v for node in r.nodes for v in node.outputs if v is not r.out and v.is_graph_output()]
        if outputs:  # present.{i}.key/value go with the sub-layer, with their past inputs (skip/cache.py)
            r.cache, why = branch_cache(self.graph, outputs, inside)
            if why:
                return why
        for node in r.nodes:
            for v in node.outputs:
                if v is r.out:
                    continue
                users = [u for u, _ in v.uses() if u not in inside]
                if users:
                    return (f"its value {v.name!r} is also used outside the block (by {users[0].name or users[0].op_type}), "
                            "so removing the block would not remove its work")
        return ""


# ---------------------------------------------------------------- chains and blocks


def _chains(residuals: list[Residual]) -> list[list[Residual]]:
    """Maximal runs of residuals where each one's input is the previous one's output."""
    by_x: dict[ir.Value, list[Residual]] = {}
    for r in residuals:
        by_x.setdefault(r.x, []).append(r)
    following = {r: by_x[r.out][0] for r in residuals if len(by_x.get(r.out, [])) == 1}
    has_prev = set(following.values())
    chains = []
    for r in residuals:
        if r in has_prev:
            continue
        chain = [r]
        while chain[-1] in following:
            chain.append(following[chain[-1]])
        chains.append(chain)
    return chains


def _blocks(chains: Iterable[list[Residual]]) -> list[list[Residual]]:
    """Group each chain into blocks: attention sub-layer(s) and the mlp sub-layer(s) after them."""
    blocks = []
    for chain in chains:
        group: list[Residual] = []
        for r in chain:
            if r.kind == "attention":
                if group and group[-1].kind != "attention":
                    blocks.append(group)
                    group = []
                group.append(r)
            elif r.kind == "mlp" and group and group[0].kind == "attention":
                group.append(r)
            else:
                if group:
                    blocks.append(group)
                group = [r]
        if group:
            blocks.append(group)
    return blocks


# ---------------------------------------------------------------- small helpers


def _scopes(node: ir.Node) -> tuple[str, ...]:
    """torch.export's module path of a node, outermost first (empty without the metadata)."""
    text = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not text:
        return ()
    parts = [p.strip(" '\"") for p in text.strip("[]").split(",")]
    return tuple(p for p in parts[:-1] if p)  # the last scope is the FX node itself


def _common(scopes: list[tuple[str, ...]]) -> tuple[str, ...]:
    if not scopes or any(not s for s in scopes):
        return ()
    prefix = scopes[0]
    for s in scopes[1:]:
        k = 0
        while k < min(len(prefix), len(s)) and prefix[k] == s[k]:
            k += 1
        prefix = prefix[:k]
    return prefix


def _label(r: Residual) -> str:
    return r.scope[-1] if r.scope else f"at {r.add.name or 'Add'}"


def _shape(v: ir.Value) -> str:
    return str(v.shape) if v.shape is not None else "[?]"


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    """Whether two values provably have the same shape (unknown dims never match)."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    for p, q in zip(a.shape, b.shape):
        if isinstance(p, ir.SymbolicDim) or isinstance(q, ir.SymbolicDim):
            if not (isinstance(p, ir.SymbolicDim) and isinstance(q, ir.SymbolicDim)) or p.value is None or p.value != q.value:
                return False
        elif p != q:
            return False
    return True
