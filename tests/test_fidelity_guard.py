"""The fidelity guard (issue 16, item 6): collapse thresholds per task warn loudly in the receipt
and the CLI; ``max_loss`` / ``--max-loss`` refuses a result that misses its bound (exit 2, nothing
written); malformed bounds are typed errors raised before any slow step."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_models import tiny_cnn

import slimc
from slimc.errors import FidelityGuardError, OptionError
from slimc.fidelity_guard import Bound, MaxLoss, check, parse_max_loss, resolve
from slimc.pipeline import Pass, PassReport
from slimc.tools.cli import main


# ---------------------------------------------------------------- max_loss syntax


@pytest.mark.parametrize("spec, expected", [
    (None, None),
    (0.05, MaxLoss(loss=0.05)),
    ("0.05", MaxLoss(loss=0.05)),
    (0, MaxLoss(loss=0.0)),
    ("embedding_cosine>=0.98", MaxLoss(bounds=(Bound("embedding_cosine", ">=", 0.98),))),
    (" top1 => 0.9 , kl<=0.05", MaxLoss(bounds=(Bound("top1", ">=", 0.9), Bound("kl", "<=", 0.05)))),
    ("ppl_ratio<=1.2", MaxLoss(bounds=(Bound("ppl_ratio", "<=", 1.2),))),
])
def test_max_loss_forms(spec, expected):
    assert parse_max_loss(spec) == expected


@pytest.mark.parametrize("spec, message", [
    (-0.1, "finite number >= 0"),
    ("nan", "finite number >= 0"),
    (math.inf, "finite number >= 0"),
    (True, "must be a number"),
    ([0.1], "must be a number"),
    (" , ", "max_loss is empty"),
    ("cosine<=0.9", "cosine is better higher, so bound it with >="),
    ("ppl_ratio>=1.2", "ppl_ratio is better lower, so bound it with <="),
    ("cosine>0.9", "use >= or <="),
    ("accuracy>=0.9", "unknown metric 'accuracy'"),
    ("cosine>=high", "'high' is not a number"),
    ("cosine>=inf", "must be a finite number"),
    ("cosine 0.9", "cannot read"),
])
def test_bad_max_loss_is_an_option_error(spec, message):
    with pytest.raises(OptionError, match=None) as info:
        parse_max_loss(spec)
    assert message in str(info.value)


@pytest.mark.parametrize("task, bound", [
    ("encoder", Bound("embedding_cosine", ">=", 0.95)),
    ("image-classifier", Bound("top1_agreement", ">=", 0.95)),
    ("classifier", Bound("top1_agreement", ">=", 0.95)),
    ("causal-lm", Bound("perplexity_ratio", "<=", 1.05)),
    ("generic", Bound("cosine", ">=", 0.95)),
])
def test_a_scalar_loss_bounds_the_task_main_metric(task, bound):
    (got,) = resolve(parse_max_loss(0.05), task)
    assert (got.metric, got.op) == (bound.metric, bound.op) and got.value == pytest.approx(bound.value)


def test_aliases_resolve_per_task_and_foreign_metrics_are_refused():
    assert resolve(parse_max_loss("top1>=0.9"), "causal-lm") == (Bound("next_token_top1_agreement", ">=", 0.9),)
    assert resolve(parse_max_loss("top1>=0.9,sqnr>=20"), "image-classifier") == (
        Bound("top1_agreement", ">=", 0.9), Bound("sqnr_db", ">=", 20.0))
    with pytest.raises(OptionError, match="a encoder model is not measured by perplexity_ratio"):
        resolve(parse_max_loss("ppl_ratio<=1.2"), "encoder")


# ---------------------------------------------------------------- thresholds on measured metrics


def _fid(**metrics):
    return {"data": "held.npz", "synthetic": False, "metrics": metrics}


@pytest.mark.parametrize("task, metrics, status", [
    ("encoder", {"embedding_cosine": 0.63, "sqnr_db": 3.0}, "collapsed"),
    ("encoder", {"embedding_cosine": 0.95}, "ok"),
    ("image-classifier", {"top1_agreement": 0.0}, "collapsed"),
    ("classifier", {"top1_agreement": 0.9}, "ok"),
    ("causal-lm", {"perplexity_ratio": 3.1, "next_token_top1_agreement": 0.9}, "collapsed"),
    ("causal-lm", {"perplexity_ratio": 1.01, "next_token_top1_agreement": 0.2}, "collapsed"),
    ("causal-lm", {"perplexity_ratio": 1.2, "next_token_top1_agreement": 0.8}, "ok"),
    ("causal-lm", {"sqnr_db": 4.0}, "collapsed"),  # no perplexity measured: the generic threshold
    ("generic", {"sqnr_db": 9.9}, "collapsed"),
    ("generic", {"sqnr_db": None, "exact": True}, "ok"),  # identical outputs
    ("generic", {"sqnr_db": None, "exact": False}, "not measured"),
])
def test_collapse_thresholds_per_task(task, metrics, status):
    guard = check(_fid(**metrics), task)
    assert guard["status"] == status
    assert bool(guard["warnings"]) == (status == "collapsed")
    if status == "collapsed":
        assert guard["warnings"][0].startswith("FIDELITY COLLAPSED") and "held.npz" in guard["warnings"][0]


def test_max_loss_refuses_a_miss_and_an_unmeasured_metric():
    bounds = resolve(parse_max_loss("embedding_cosine>=0.98"), "encoder")
    assert check(_fid(embedding_cosine=0.99), "encoder", bounds)["checks"][-1]["ok"] is True
    with pytest.raises(FidelityGuardError, match=r"embedding_cosine = 0.97, needs >= 0.98 \(measured on held.npz\)"):
        check(_fid(embedding_cosine=0.97), "encoder", bounds)
    with pytest.raises(FidelityGuardError, match="embedding_cosine = not measured"):
        check(_fid(sqnr_db=30.0), "encoder", bounds)


# ---------------------------------------------------------------- end to end


@dataclasses.dataclass
class _ScrambleHead(Pass):
    """A lossy test pass that reverses the classifier head's rows: the top-1 class changes (a collapse)."""

    name = "scramble"
    exact = False

    def apply(self, model: ir.Model, ctx) -> PassReport:
        for name in ("fc.w", "fc.b"):
            value = model.graph.initializers[name]
            value.const_value = ir.tensor(-value.const_value.numpy(), name=name)
        return PassReport(self.name, True, "negated the head")


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    onnx.save(tiny_cnn(junk=False), path)
    return path


def test_a_collapse_warns_in_the_receipt(cnn_path):
    result = slimc.compile(cnn_path, [_ScrambleHead()], measure_latency=False)
    receipt = result.receipt
    assert receipt.fidelity_guard["status"] == "collapsed"
    assert receipt.warnings and "top1_agreement" in receipt.warnings[0]
    assert str(receipt).splitlines()[2].startswith("  !!! WARNING: FIDELITY COLLAPSED")
    saved = receipt.to_json()
    assert saved["warnings"] == receipt.warnings and saved["fidelity_guard"]["checks"][0]["ok"] is False


def test_max_loss_refuses_the_collapsed_result(cnn_path):
    with pytest.raises(FidelityGuardError, match="top1_agreement = 0, needs >= 0.9"):
        slimc.compile(cnn_path, [_ScrambleHead()], measure_latency=False, max_loss=0.1)
    ok = slimc.compile(cnn_path, "cleanup", measure_latency=False, max_loss="top1>=1,sqnr_db>=100")
    assert ok.receipt.fidelity_guard["status"] == "ok" and not ok.receipt.warnings


def test_a_bad_max_loss_fails_before_loading_the_model(tmp_path):
    with pytest.raises(OptionError, match="better higher"):
        slimc.compile(tmp_path / "missing.onnx", "cleanup", max_loss="cosine<=0.9")
    with pytest.raises(OptionError, match="not measured by embedding_cosine"):  # the task is known after loading
        slimc.compile(_cnn_ir(), "cleanup", max_loss="embedding_cosine>=0.9")


def _cnn_ir():
    return ir.serde.deserialize_model(tiny_cnn(junk=False))


@pytest.fixture(scope="module")
def resnet_file(zoo_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("resnet") / "resnet.onnx"
    ir.save(zoo_model("resnet").loaded.model, path)
    return path


def test_cli_warns_on_a_collapsed_zoo_model(resnet_file, tmp_path, capsys):
    out, receipt = tmp_path / "out.onnx", tmp_path / "r.json"
    rc = main([str(resnet_file), "--passes", "prune(ratio=0.9)", "-o", str(out), "--receipt", str(receipt),
               "--no-latency", "-q"])
    err = capsys.readouterr().err
    assert rc == 0 and out.exists()
    assert "slimc: warning: FIDELITY COLLAPSED: top1_agreement" in err
    saved = json.loads(receipt.read_text())
    assert saved["fidelity_guard"]["status"] == "collapsed" and saved["warnings"]


def test_cli_max_loss_refuses_and_writes_nothing(resnet_file, tmp_path, capsys):
    out, receipt = tmp_path / "out.onnx", tmp_path / "r.json"
    rc = main([str(resnet_file), "--passes", "prune(ratio=0.9)", "-o", str(out), "--receipt", str(receipt),
               "--no-latency", "--max-loss", "0.2"])
    err = capsys.readouterr().err
    assert rc == 2 and "fails max_loss: top1_agreement" in err and "Traceback" not in err
    assert not out.exists() and not receipt.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_zoo_results_within_bounds_pass(zoo_model):
    bert = zoo_model("bert")
    result = slimc.compile(bert.loaded, "int8(force=true)", measure_latency=False, max_loss="embedding_cosine>=0.99,sqnr_db>=30")
    assert result.receipt.fidelity_guard["status"] == "ok"
    assert [c["ok"] for c in result.receipt.fidelity_guard["checks"]] == [True, True, True]
    with pytest.raises(FidelityGuardError, match="sqnr_db"):
        slimc.compile(bert.loaded, "prune(ratio=0.3)", measure_latency=False, max_loss="sqnr_db>=80")


def test_bad_max_loss_on_the_command_line_exits_2_before_loading(tmp_path, capsys):
    assert main([str(tmp_path / "missing.onnx"), "--max-loss", "ppl_ratio>=2"]) == 2
    assert "better lower" in capsys.readouterr().err
