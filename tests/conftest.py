"""Shared fixtures: the tiny transformers zoo exported once per session, and an isolated cache.

Exporting a zoo model takes 3-13 s on a 2-core CPU, so ``zoo_model(name)`` exports each one
at most once per test session and hands every test the same `ZooExport`. Tests that change
the IR must copy it first (``copy.deepcopy(z.loaded.model)``) or they leak into later tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest


@dataclasses.dataclass(frozen=True)
class ZooExport:
    """A zoo model, the example inputs it was exported with, its expected task, and the export."""

    name: str
    module: Any  # the torch nn.Module (eval mode, random weights)
    example: dict[str, Any]  # name -> torch.Tensor, batch 2 (x seq 16 for token models)
    task: str
    loaded: Any  # slimc.model.LoadedModel


@pytest.fixture(scope="session", autouse=True)
def _isolated_export_cache(tmp_path_factory):
    """Hugging Face exports made by tests go to a temporary folder, never ~/.cache/slimc."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SLIMC_CACHE_DIR", str(tmp_path_factory.mktemp("slimc-exports")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def zoo_model() -> Callable[[str], ZooExport]:
    """Factory fixture: ``zoo_model("llama")`` -> `ZooExport`, exported once per session."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import zoo

    from slimc import frontends

    exports: dict[str, ZooExport] = {}

    def get(name: str) -> ZooExport:
        if name not in exports:
            module, example, task = zoo.ZOO[name]()
            # causal LMs without a KV cache: these tests target the passes' graph logic on the plain form;
            # tests/test_kv_export.py covers the cache form (the default for transformers causal LMs)
            exports[name] = ZooExport(name, module, example, task, frontends.load(module, example, kv_cache=False))
        return exports[name]

    return get
