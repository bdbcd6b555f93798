"""The dependency graph: slots (value, axis) of a model coupled by op rules into groups.

`DependencyGraph(model)` walks the graph once. Each static axis of each value gets an atom
(`atoms.Atoms`); each node's rule (`rules.RULES`) unifies the atoms of the slots it couples,
records the constants that carry a size (`ShapeSite`) and the weights that contract a channel
(`Contraction`), and blocks what it cannot map. `groups()` turns the leaves of the result into
`Group`s: the units `prune` selects channels of, each with its kind, the initializers it
slices, and, when blocked, every reason.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from slimc.passes.prune.atoms import PROD, Atoms, Conflict
from slimc.passes.prune.shapes import Shapes, static

HARD = None  # a blocker with no kind can never be overridden
STRUCTURAL = "structural"  # not a channel at all (kernel and spatial axes): never listed as a group


@dataclasses.dataclass
class Contraction:
    """A weight that contracts a channel axis of an activation: the channel's *consumer*."""

    node: ir.Node
    weight: ir.Value  # initializer
    weight_axis: int  # the contracted axis of the weight
    act: ir.Value  # the activation whose channels are contracted
    act_axis: int
    out_axis: int  # the weight's output-channel axis (for compensation), -1 if none


@dataclasses.dataclass
class ShapeSite:
    """An input or attribute holding a size or offset that must follow pruning."""

    node: ir.Node
    kind: str  # "shape" (Reshape/Expand target), "slice", "split", "group", "gather"
    data: dict


@dataclasses.dataclass
class Group:
    """A set of coupled channels pruned together: one leaf atom and every slot it reaches."""

    id: int
    atom: int
    size: int
    kind: str  # channels | ffn | heads | kv_heads | head_dim | hidden | other
    name: str
    weights: list[tuple[ir.Value, int]]  # (initializer, axis) sliced by this group
    contractions: list[Contraction]
    blocked: list[tuple[str, str | None]]  # (reason, overridable-by-kind or None)

    def is_blocked(self, allow: frozenset[str] = frozenset()) -> bool:
        # "cache": a KV cache's head axis, which follows the group (cache.py), never blocks
        return any(kind is HARD or (kind not in allow and kind != "cache") for _, kind in self.blocked)

    def describe(self) -> dict:
        """A JSON-ready row for ``slimc inspect --groups`` and reports."""
        soft = sorted({k for _, k in self.blocked if k is not HARD and k != "cache"})  # a KV cache follows its group
        needs = " + ".join("change_interface=true" if k == "interface" else f"target={k}" for k in soft)
        status = "blocked" if self.hard_blocked else ("prunable" if not soft else f"prunable with {needs}")
        return {
            "id": self.id, "kind": self.kind, "size": self.size, "name": self.name, "status": status,
            "reasons": [r for r, _ in self.blocked],
            "initializers": [f"{v.name}[axis {axis}]" + (f" ({module_path(u[0].node)})" if (u := list(v.uses())) else "")
                             for v, axis in self.weights],
            "consumers": sorted({c.node.name or c.node.op_type for c in self.contractions}),
        }

    @property
    def hard_blocked(self) -> bool:
        return any(kind is HARD for _, kind in self.blocked)

    @property
    def initializer_names(self) -> list[str]:
        return sorted({v.name for v, _ in self.weights if v.name})

    def matches(self, patterns: list[str]) -> bool:
        names = [self.name, *self.initializer_names, *(c.node.name or "" for c in self.contractions)]
        return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def module_path(node: ir.Node) -> str:
    """The PyTorch module a node came from (torch.export metadata), or the node's name."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        parts = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
        if len(parts) >= 2 and parts[-2]:
            return parts[-2]  # the innermost module; the last scope is the FX node itself
    return node.name or node.op_type


def _use_ops(value: ir.Value, depth: int = 4) -> set[str]:
    """Op types that use ``value``, looking through layout-only ops (unoptimised exports feed a
    Linear's weight through ``Transpose`` to its MatMul)."""
    ops = set()
    for use in value.uses():
        if use.node.op_type in ("Transpose", "Identity") and depth:
            ops |= _use_ops(use.node.outputs[0], depth - 1)
        else:
            ops.add(use.node.op_type)
    return ops


def unshare_constants(graph: ir.Graph) -> dict[ir.Value, ir.Value]:
    """Give every use of a shared 1-D float initializer its own value (the tensor is not copied).

    Exporters merge byte-identical constants: two zero biases or unit norm scales merged into
    one initializer must not tie the channels of two unrelated layers. Shared weights of rank
    2 and more are real ties (tied embeddings) and keep coupling their uses. Returns
    {clone: original}; `DependencyGraph.reshare` merges the clones that are still identical
    after pruning (tied embeddings stay tied).
    """
    clones: dict[ir.Value, ir.Value] = {}
    for value in list(graph.initializers.values()):
        uses = list(value.uses())
        if len(uses) < 2 or value.is_graph_input() or value.is_graph_output() or value.dtype is None:
            continue
        if not value.dtype.is_floating_point() or value.const_value is None or value.const_value.size < 2:
            continue
        if len(value.const_value.shape) != 1:
            continue
        for k, (node, index) in enumerate(uses[1:], 1):
            name = f"{value.name}__use{k}"
            while name in graph.initializers:
                name += "_"
            clone = ir.Value(name=name, shape=value.shape, type=value.type, const_value=value.const_value)
            graph.register_initializer(clone)
            node.replace_input_with(index, clone)
            clones[clone] = value
    return clones


class DependencyGraph:
    """Slots, couplings, shape sites and contractions of one model.

    With ``keep_interface=False`` graph inputs and outputs block only softly (kind
    ``interface``): a pass may then change their sizes, and says so.
    """

    def __init__(self, model: ir.Model, *, keep_interface: bool = True):
        # the complete table: importing layout_rules registers its rules next to rules.py's
        from slimc.passes.prune.layout_rules import RULES, block_node
        from slimc.passes.prune.cache import block_interface
        from slimc.passes.prune.symbolic import guard_mixed

        self.model = model
        self.graph = model.graph
        self.atoms = Atoms()
        self.slots: dict[ir.Value, list[int | None] | None] = {}
        self.blockers: list[tuple[int, str, str | None]] = []
        self.sites: list[ShapeSite] = []
        self.contractions: list[Contraction] = []
        self.unsupported: dict[str, int] = defaultdict(int)
        self._arrays: dict[ir.Value, np.ndarray] = {}
        self.clones = unshare_constants(self.graph)
        # shapes are inferred here, not read: files from other exporters declare few or none
        self.shapes = Shapes(self.graph, model.opset_imports.get("", 18))
        self.mixed: dict[ir.Value, dict[int, list]] = {}  # dynamic axes with static atoms folded in (symbolic.py)
        self.node: ir.Node | None = None  # the node whose rule runs (names the reason of a block)
        self.deferred: list = []  # target proofs run after every rule (layout_rules)
        for node in self.graph:
            self.node = node
            rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if rule is None:
                self.unsupported[f"{node.domain + '::' if node.domain else ''}{node.op_type}"] += 1
                block_node(self, node, f"{node.op_type} has no pruning rule")
                continue
            try:
                rule(self, node)
            except Conflict as exc:
                block_node(self, node, f"{node.op_type} couples incompatible index maps ({exc})")
            guard_mixed(self, node)
        # targets are proven once every coupling is known: an entry may read a slot that a later
        # node ties to the axis it sizes (a zero bias sized by Shape(W)[0] before W's Conv)
        for check in self.deferred:
            check()
        self.node = None
        # graph inputs/outputs block; a KV cache's head axis follows its group when proven (cache.py)
        block_interface(self, HARD if keep_interface else "interface")

    # ------------------------------------------------------------ slots

    def axes(self, value: ir.Value | None) -> list[int | None] | None:
        """One atom per axis of ``value`` (None for dynamic axes); None if the rank is unknown."""
        if value is None:
            return None
        if value not in self.slots:
            dims = self.shapes.dims(value)
            self.slots[value] = None if dims is None else [
                None if static(d) is None else self.atoms.new(static(d)) for d in dims
            ]
        return self.slots[value]

    def tie(self, a: int | None, b: int | None) -> None:
        """Couple two slots. A static axis whose counterpart has no proven size (a dynamic or
        unknown dim) cannot be coupled, so pruning it would leave the other side unchanged: it
        is blocked instead (soundness: an unproven correspondence is never ignored)."""
        if a is not None and b is not None:
            self.atoms.union(a, b)
            return
        for atom in (a, b):
            if atom is not None and self.atoms.size(atom) > 1:
                where = self.node.name or self.node.op_type if self.node is not None else "?"
                self.block(atom, f"its counterpart axis at {where} has no proven size")

    def block(self, atom: int | None, reason: str, kind: str | None = HARD) -> None:
        if atom is not None:
            self.blockers.append((atom, reason, kind))

    def block_value(self, value: ir.Value | None, reason: str, kind: str | None = HARD) -> None:
        for atom in self.axes(value) or []:
            self.block(atom, reason, kind)
        for factors in (self.mixed.get(value) or {}).values() if value is not None else ():
            for _, atom in factors:
                self.block(atom, reason, kind)

    def array(self, value: ir.Value) -> np.ndarray:
        """A constant's data as numpy, converted once per analysis (protobuf-backed tensors
        copy on every ``numpy()`` call)."""
        cached = self._arrays.get(value)
        if cached is None:
            cached = self._arrays[value] = np.asarray(value.const_value.numpy())
        return cached

    def reshare(self) -> int:
        """Point every clone that still equals its original back at it; returns how many."""
        merged = 0
        for clone, original in self.clones.items():
            a, b = clone.const_value, original.const_value
            if a is None or b is None or clone.graph is None:
                continue
            if a is not b and (tuple(a.shape) != tuple(b.shape) or not np.array_equal(self.array(clone), self.array(original))):
                continue
            clone.replace_all_uses_with(original)
            self.graph.initializers.pop(clone.name, None)
            merged += 1
        return merged

    def forget(self, value: ir.Value) -> None:
        """Drop the cached array of a constant whose data was replaced."""
        self._arrays.pop(value, None)

    def is_weight(self, value: ir.Value | None) -> bool:
        return value is not None and value.const_value is not None and value.dtype is not None and value.dtype.is_floating_point()

    # ------------------------------------------------------------ groups

    def groups(self) -> list[Group]:
        atoms = self.atoms
        reasons: dict[int, list[tuple[str, str | None]]] = defaultdict(list)
        for atom, reason, kind in self.blockers:
            for leaf in atoms.leaves(atom):
                if (reason, kind) not in reasons[leaf]:
                    reasons[leaf].append((reason, kind))
        weights: dict[int, list[tuple[ir.Value, int]]] = defaultdict(list)
        for value, axes in self.slots.items():
            if not self.is_weight(value) or not axes:
                continue
            for axis, atom in enumerate(axes):
                if atom is not None and atoms.size(atom) > 1:
                    for leaf in atoms.leaves(atom):
                        weights[leaf].append((value, axis))
        consumers: dict[int, list[Contraction]] = defaultdict(list)
        for c in self.contractions:
            atom = self.slots[c.weight][c.weight_axis]
            for leaf in atoms.leaves(atom):
                consumers[leaf].append(c)
        outer, inner, nested = self._product_roles()
        index = {v: i for i, v in enumerate(self.slots)}
        groups = []
        for leaf in sorted(weights, key=lambda a: min(index[v] for v, _ in weights[a])):
            if atoms.size(leaf) < 2 or any(kind == STRUCTURAL for _, kind in reasons[leaf]):
                continue
            kind = self._kind(leaf, weights[leaf], reasons[leaf], outer, inner, nested)
            name = self._name(weights[leaf], consumers[leaf])
            groups.append(Group(len(groups), leaf, atoms.size(leaf), kind, name, weights[leaf], consumers[leaf], reasons[leaf]))
        return groups

    def _product_roles(self) -> tuple[set[int], set[int], set[int]]:
        """Leaves that lead a product (heads), end one (head dims), or lead another leader (GQA)."""
        outer, inner, nested = set(), set(), set()
        for axes in self.slots.values():
            for atom in axes or []:
                if atom is None or (self.atoms.struct(atom) or ("",))[0] != PROD:
                    continue
                flat = self.atoms.flat_product([atom])
                leaves = [self.atoms.leaves(a) for a in flat]
                outer.update(x for ls in leaves[:-1] for x in ls)
                inner.update(leaves[-1])
                for ls in leaves[:-2]:
                    nested.update(ls)
        return outer, inner - outer, nested

    def _kind(self, leaf, weights, reasons, outer, inner, nested) -> str:
        ops = {op for v, _ in weights for op in _use_ops(v)}
        if any(kind == "hidden" for _, kind in reasons):
            return "hidden"
        if ops & {"Conv", "ConvTranspose"}:
            return "channels"
        if leaf in nested:
            return "kv_heads"
        if leaf in outer:
            return "heads"
        if leaf in inner:
            return "head_dim"
        if ops & {"MatMul", "Gemm"}:
            return "ffn"
        return "other"

    def _name(self, weights, consumers: list[Contraction]) -> str:
        nodes = [c.node for c in consumers] or [u.node for v, _ in weights for u in v.uses()]
        paths = [module_path(n).split(".") for n in nodes]
        common = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        if len(paths) == 1 and len(common) > 1:
            common = common[:-1]  # the layer's module, not the single Linear inside it
        return ".".join(common) or (weights[0][0].name or "?")

    # ------------------------------------------------------------ helpers for apply / scoring

    def mask(self, atom: int | None, plan: dict[int, np.ndarray]) -> np.ndarray | None:
        return None if atom is None else self.atoms.keep_mask(atom, plan)

    def new_size(self, atom: int | None, plan: dict[int, np.ndarray]) -> int | None:
        m = self.mask(atom, plan)
        return None if m is None else int(m.sum())
