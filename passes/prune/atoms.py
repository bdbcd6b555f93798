"""Index spaces of tensor axes as unified *atoms*: the index maps of the dependency graph.

Every static axis of every value (a *slot*) is described by an atom: an index space of a
known size. Op rules couple slots by unifying their atoms, and an atom may carry a structure:

- ``prod [a, b, ...]``: the space is the row-major product of its children (``Reshape`` of
  ``H*D`` into ``(H, D)``: index ``h*D + d``), so heads are removed as blocks and per-head
  dims uniformly in every head;
- ``sum [a, b, ...]``: the space is the concatenation of its children (``Concat``, ``Split``,
  ``Slice`` offsets; the two halves of a rotary head dimension).

Unification is union-find with structural unification of the roots, as in type inference:
unifying ``[768]`` with ``prod [12, 64]`` gives the 768-atom that structure everywhere it
occurs. Leaves (roots without structure) are the units that pruning selects indices of; a
plan ``{leaf: keep mask}`` determines the kept indices of every slot through `keep_mask`.

Maps that cannot be expressed (a Reshape that cuts across a product at a non-dividing
boundary, a Slice through a product) raise `Conflict`; the caller blocks the atoms involved.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

PROD, SUM = "prod", "sum"


class Conflict(Exception):
    """Two index maps disagree; the atoms involved cannot be pruned consistently."""


class Atoms:
    """Union-find over index spaces with product / sum structure at the roots."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._struct: dict[int, tuple[str, list[int]]] = {}

    def new(self, size: int) -> int:
        self._parent.append(len(self._parent))
        self._size.append(int(size))
        return len(self._parent) - 1

    def __len__(self) -> int:
        return len(self._parent)

    def find(self, a: int) -> int:
        root = a
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[a] != root:
            self._parent[a], a = root, self._parent[a]
        return root

    def size(self, a: int) -> int:
        return self._size[self.find(a)]

    def struct(self, a: int) -> tuple[str, list[int]] | None:
        return self._struct.get(self.find(a))

    # ------------------------------------------------------------ unification

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self._size[ra] != self._size[rb]:
            raise Conflict(f"sizes {self._size[ra]} and {self._size[rb]} are coupled")
        sa, sb = self._struct.pop(ra, None), self._struct.pop(rb, None)
        self._parent[rb] = ra
        if sa is None or sb is None:
            if sa or sb:
                self._struct[ra] = sa or sb  # type: ignore[assignment]
            return ra
        self._struct[ra] = sa
        if sa[0] == PROD and sb[0] == PROD:
            self.unify_products(sa[1], sb[1])
        elif sa[0] == SUM and sb[0] == SUM:
            self._unify_sums(sa[1], sb[1])
        else:
            raise Conflict("a concatenated axis is coupled to a reshaped (product) axis")
        return self.find(ra)

    def _unify_sums(self, xs: list[int], ys: list[int]) -> None:
        if [self.size(x) for x in xs] == [self.size(y) for y in ys]:
            for x, y in zip(xs, ys):
                self.union(x, y)
            return
        # Different cut points: refine both to the union of the cuts where the pieces are leaves.
        cuts = sorted(set(np.cumsum([self.size(x) for x in xs])[:-1]) | set(np.cumsum([self.size(y) for y in ys])[:-1]))
        fx, fy = self._sum_refined(xs, cuts), self._sum_refined(ys, cuts)
        for x, y in zip(fx, fy):
            self.union(x, y)

    def _sum_refined(self, kids: list[int], cuts: list[int]) -> list[int]:
        out, offset = [], 0
        for kid in kids:
            n = self.size(kid)
            inner = [c - offset for c in cuts if offset < c < offset + n]
            out.extend(self.cut(kid, inner) if inner else [kid])
            offset += n
        return out

    def flat_product(self, atoms: Iterable[int]) -> list[int]:
        """Leaves of nested products, row-major; size-1 atoms are dropped (they carry nothing)."""
        out: list[int] = []
        for a in atoms:
            s = self.struct(a)
            if s is not None and s[0] == PROD:
                out.extend(self.flat_product(s[1]))
            elif self.size(a) != 1:
                out.append(self.find(a))
        return out

    def unify_products(self, xs: list[int], ys: list[int]) -> None:
        """Unify two row-major products of the same total size, splitting leaves where needed."""
        a, b = self.flat_product(xs), self.flat_product(ys)
        i = j = 0
        while i < len(a) and j < len(b):
            x, y = self.find(a[i]), self.find(b[j])
            nx, ny = self._size[x], self._size[y]
            if nx == ny:
                self.union(x, y)
                i, j = i + 1, j + 1
            elif nx > ny and nx % ny == 0 and x not in self._struct:
                a[i : i + 1] = self.split(x, [ny, nx // ny])
            elif ny > nx and ny % nx == 0 and y not in self._struct:
                b[j : j + 1] = self.split(y, [nx, ny // nx])
            else:
                raise Conflict(f"axes of sizes {nx} and {ny} do not factor into each other")
        if i < len(a) or j < len(b):
            raise Conflict("products of different sizes")

    def split(self, a: int, sizes: list[int]) -> list[int]:
        """Give leaf ``a`` the structure ``prod [sizes]`` and return the new children."""
        r = self.find(a)
        if r in self._struct:
            raise Conflict("axis is already structured")
        kids = [self.new(n) for n in sizes]
        self._struct[r] = (PROD, kids)
        return kids

    def make_sum(self, a: int, parts: list[int]) -> None:
        """Unify ``a`` with the concatenation of ``parts``."""
        node = self.new(sum(self.size(p) for p in parts))
        self._struct[node] = (SUM, list(parts))
        self.union(a, node)

    def cut(self, a: int, offsets: list[int]) -> list[int]:
        """Ensure ``a`` is a sum with boundaries at ``offsets``; return the pieces in order."""
        r = self.find(a)
        n = self._size[r]
        bounds = [0, *sorted(set(o for o in offsets if 0 < o < n)), n]
        if len(bounds) == 2:
            return [r]
        s = self._struct.get(r)
        if s is None:
            kids = [self.new(hi - lo) for lo, hi in zip(bounds, bounds[1:])]
            self._struct[r] = (SUM, kids)
            return kids
        if s[0] != SUM:
            raise Conflict("a slice or split cuts through a reshaped (product) axis")
        return self._sum_refined(s[1], bounds[1:-1])

    def pieces(self, a: int, start: int, stop: int) -> list[int]:
        """The children of ``a`` covering ``[start, stop)`` after cutting there."""
        kids = self.cut(a, [start, stop])
        out, offset = [], 0
        for kid in kids:
            n = self.size(kid)
            if offset >= start and offset + n <= stop:
                out.append(kid)
            offset += n
        return out

    # ------------------------------------------------------------ queries

    def leaves(self, a: int) -> list[int]:
        """All leaf roots under ``a`` (itself if it is a leaf)."""
        r = self.find(a)
        s = self._struct.get(r)
        if s is None:
            return [r]
        out: list[int] = []
        for kid in s[1]:
            out.extend(x for x in self.leaves(kid) if x not in out)
        return out

    def keep_mask(self, a: int, plan: dict[int, np.ndarray]) -> np.ndarray | None:
        """Boolean keep mask over the indices of ``a`` under ``plan`` (None: everything kept)."""
        r = self.find(a)
        if r in plan:
            return plan[r]
        s = self._struct.get(r)
        if s is None:
            return None
        masks = [self.keep_mask(k, plan) for k in s[1]]
        if all(m is None for m in masks):
            return None
        full = [np.ones(self.size(k), bool) if m is None else m for k, m in zip(s[1], masks)]
        if s[0] == SUM:
            return np.concatenate(full)
        out = full[0]
        for m in full[1:]:
            out = np.logical_and.outer(out, m).reshape(-1)
        return out

    def coords(self, a: int, leaf: int) -> np.ndarray | None:
        """For every index of ``a``, its coordinate in ``leaf`` (-1 where ``leaf`` is absent)."""
        r, leaf = self.find(a), self.find(leaf)
        if r == leaf:
            return np.arange(self._size[r])
        s = self._struct.get(r)
        if s is None:
            return None
        parts = [self.coords(k, leaf) for k in s[1]]
        if all(p is None for p in parts):
            return None
        if s[0] == SUM:
            return np.concatenate([np.full(self.size(k), -1) if p is None else p for k, p in zip(s[1], parts)])
        out = np.full(1, -1)
        for k, p in zip(s[1], parts):
            n = self.size(k)
            p = np.full(n, -1) if p is None else p
            out = np.maximum(out[:, None], p[None, :]).reshape(-1)
        return out
