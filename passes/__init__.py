"""The pass registry: CLI name -> pass class, imported lazily so the CLI starts fast.

Adding a pass: write ``passes/<name>.py`` with a `slimc.pipeline.Pass` dataclass subclass and
add one line here.
"""

from __future__ import annotations

import importlib

from slimc.errors import PassConfigError

# name -> "module:Class"
REGISTRY: dict[str, str] = {
    "cleanup": "slimc.passes.cleanup:Cleanup",
    "prune": "slimc.passes.prune.prune_pass:Prune",
    "int8": "slimc.passes.quant.int8:Int8",
    "smoothquant": "slimc.passes.quant.smoothquant:SmoothQuant",
    "int4": "slimc.passes.quant.int4:Int4",
    "fp16": "slimc.passes.quant.fp16:Fp16",
    "sparsify": "slimc.passes.sparse.sparsify:Sparsify",
    "layerskip": "slimc.passes.skip.layerskip:LayerSkip",
    "fuse": "slimc.passes.fuse.fuse_pass:Fuse",
    "distill": "slimc.passes.distill.distill_pass:Distill",
}


def names() -> list[str]:
    return sorted(REGISTRY)


def get(name: str) -> type:
    """The pass class registered as ``name``; unknown names list the valid ones."""
    target = REGISTRY.get(name)
    if target is None:
        raise PassConfigError(f"unknown pass '{name}'. Available passes: {', '.join(names())}.")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
