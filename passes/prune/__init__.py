"""Structured pruning: the dependency-graph engine (`graph`, `rules`, `atoms`, `apply`) and the `prune` pass."""

from slimc.passes.prune.graph import DependencyGraph, Group

__all__ = ["DependencyGraph", "Group"]
