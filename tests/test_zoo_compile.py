"""compile(cleanup) on every zoo model: verified exact through ORT, receipt numbers consistent."""

from __future__ import annotations

import pytest
from zoo import ZOO

import slimc


@pytest.mark.parametrize("name", sorted(ZOO))
def test_cleanup_is_exact_on_zoo(zoo_model, name, tmp_path):
    loaded = zoo_model(name).loaded
    nodes = len(loaded.model.graph)
    result = slimc.compile(loaded, "cleanup", measure_latency=False)
    r = result.receipt
    (report,) = r.passes
    # The pass removes what it says it removes, and the receipt recounts the same numbers.
    assert r.before["nodes"] - r.after["nodes"] == report.details["nodes_before"] - report.details["nodes_after"]
    assert r.after["macs"] == r.before["macs"] > 0
    assert r.after["macs_unresolved_nodes"] == 0
    assert r.after["params"] <= r.before["params"]
    assert "exact" in r.verification[-1]["result"]
    assert r.fidelity["metrics"]["cosine"] > 0.999999
    result.save(tmp_path / f"{name}.onnx")
    assert (tmp_path / f"{name}.onnx").stat().st_size > 0
    assert len(loaded.model.graph) == nodes  # the caller's model is untouched
