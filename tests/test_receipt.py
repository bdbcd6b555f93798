"""Receipt rendering and JSON: inf-safe, every section present, ratios right."""

from __future__ import annotations

import json

from slimc.pipeline import PassReport
from slimc.receipt import Receipt


def _stats(params, nodes, macs, hist):
    return {"params": params, "weight_bytes": 4 * params, "bytes_on_disk": 4 * params + 1000, "macs": macs,
            "nodes": nodes, "op_histogram": hist, "macs_unresolved_nodes": 0, "macs_sizes": {"batch": 1, "seq": 128}}


def _receipt():
    return Receipt(
        source="m.onnx", task="classifier",
        passes=[PassReport("cleanup", True, "13 -> 8 nodes", {"nodes_before": 13}, [("node x", "no rule")])],
        before=_stats(2_000_000, 13, 4_000_000_000, {"Identity": 2, "Conv": 1}),
        after=_stats(1_000_000, 8, 1_000_000_000, {"Conv": 1}),
        fidelity={"data": "eval.npz: 6 samples", "synthetic": False, "batches": 2,
                  "metrics": {"sqnr_db": float("inf"), "cosine": 1.0, "top1_agreement": 1.0}},
        verification=[{"pass": "cleanup", "result": "exact"}],
        latency={"before": {"median_ms": 10.0, "p10_ms": 9.0, "p90_ms": 11.0, "runs": 20},
                 "after": {"median_ms": 4.0, "p10_ms": 3.9, "p90_ms": 4.2, "runs": 20},
                 "speedup": 2.5, "feed": "1x3x8x8", "machine": "test cpu"},
        notes=["a note"], version="0.1.0",
    )


def test_render_has_every_section():
    text = str(_receipt())
    for needle in ("2.00x smaller", "4.00x smaller", "2.50x faster", "Identity 2->0", "held-out data: eval.npz",
                   "inf (identical)", "left alone: node x: no rule", "verification:", "a note", "test cpu"):
        assert needle in text, needle


def test_slower_result_is_shouted():
    r = _receipt()
    r.latency["speedup"] = 0.8
    assert "0.80x SLOWER" in str(r)


def test_json_is_strict_and_round_trips(tmp_path):
    r = _receipt()
    r.save(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert data["fidelity"]["metrics"]["sqnr_db"] == "inf"
    assert data["passes"][0]["left_alone"] == [{"what": "node x", "why": "no rule"}]
    assert data["latency"]["speedup"] == 2.5 and r.speedup == 2.5


def test_overlapping_spreads_are_not_called_a_speedup():
    r = _receipt()
    r.latency["after"] = {"median_ms": 9.3, "p10_ms": 8.9, "p90_ms": 10.5, "runs": 20}
    r.latency["speedup"] = 10.0 / 9.3
    assert "no measurable change (1.08x" in str(r)


def test_growth_is_called_larger_not_smaller():
    r = _receipt()
    r.after = _stats(2_020_000, 13, 4_000_000_000, {"Conv": 1})
    text = str(r)
    assert "1.01x larger" in text and "0.99x smaller" not in text


def test_target_and_backend_lines_say_identical_not_none():
    r = _receipt()
    exact = {"max_abs_error": 0.0, "cosine": 1.0, "sqnr_db": None, "exact": True}
    r.target = {"target": "ort-mobile", "runtime": "onnxruntime", "files": [{"name": "out.ort", "bytes": 10}],
                "fidelity_vs_onnx": exact, "fidelity_vs_input": exact}
    text = str(r)
    assert "sqnr_db=None" not in text and text.count("sqnr_db=inf (identical)") == 2


def test_one_batch_is_singular():
    from slimc.receipt import _backend_lines

    backend = {"lowering": {"kernels": {}, "nodes": 3, "trainable_parameters": 1, "buffers": 0, "left_generic": {}},
               "kernel_impl": "torch", "agreement_with_onnxruntime": {"batches": 1, "max_abs_diff": 0.0, "relative_l2": 0.0,
                                                                     "criterion": "c"}}
    assert "(1 batch)" in "\n".join(_backend_lines(backend))
