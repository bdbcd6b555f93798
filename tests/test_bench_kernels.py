"""The GPU benchmark tools in their CPU smoke mode: they run end to end and write their files.
(Their numbers only mean something on a GPU; see docs/backends/triton.md.)"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")


def test_bench_kernels_smoke(tmp_path):
    from slimc.tools import bench_kernels

    assert bench_kernels.main(["--smoke", "--out", str(tmp_path / "k.json"), "--markdown", str(tmp_path / "k.md")]) == 0
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"w8a8", "w4a16", "sparse24"}
    assert all(r["rel_error_vs_reference"] < 1e-5 for r in rows)  # the kernels compute what their twins do
    assert all(r["goal_met"] is None for r in rows)  # no goal is judged on CPU timings
    assert "| kernel |" in (tmp_path / "k.md").read_text()


@pytest.mark.slow
def test_bench_triton_e2e_smoke(tmp_path):
    from slimc.tools import bench_triton_e2e

    assert bench_triton_e2e.main(["--smoke", "--repeats", "2", "--out", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"float", "int8", "int4"}
    assert {r["mode"] for r in rows} == {"eager", "torch.compile"}
