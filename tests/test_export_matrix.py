"""Every pass and target on ONNX files other exporters make: it works, or it refuses with a typed, clear reason.

The corpus is `exports.py` (the zoo through dynamo with eager and SDPA attention, unoptimised,
the TorchScript exporter, ONNX Runtime's fused graph, files without shapes, an ``If`` model, and
files PyPI packages ship). A cell is one `slimc.tools.export_matrix.run_cell`. What each cell must
do is written down here, so any change shows up as a failure:

* `REFUSALS`: (variant glob, column glob) -> a substring of the reason the refusal must give;
* `PENDING`: cells that fail today and that another branch fixes: ``xfail(strict=False)``, so
  they pass the moment the fix lands and the lead can delete the entry;
* every other cell must work (compile, save, the saved file loads in ORT). A refusal there is a
  regression, and anything but a `SlimcError` (or a `PassFailedError` wrapping a crash) fails.

The default run takes a seeded sample of cells on a few cheap variants (`SAMPLE`); the whole
matrix is ``-m slow``. ``python -m slimc.tools.export_matrix`` writes it as a table.
"""

from __future__ import annotations

import fnmatch
import random

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import exports  # noqa: E402

from slimc.tools import export_matrix  # noqa: E402

# Refusals the matrix expects, first match wins. Each says what the user must do instead.
REFUSALS: dict[tuple[str, str], str] = {
    # pnnx cannot map SDPA's mask (IsNaN, Where) or the embeddings' Gather of run-time positions to ncnn layers.
    **{(f"{arch}/*", "target:ncnn"): "pnnx" for arch in ("bert", "gpt2", "llama")},
    **{(f"vit/{kind}", "target:ncnn"): "pnnx" for kind in ("dynamo-sdpa", "dynamo-noopt", "no-shapes", "ort-fused")},
    ("control-flow/*", "target:ncnn"): "pnnx",  # pnnx takes no 0-d input
    ("control-flow/*", "target:executorch"): "If: no torch lowering",
    # Shapes read from tensors' values are data-dependent for torch.export.
    ("paddle/ocr-det", "target:executorch"): "lowering failed",
    **{(f"{arch}/torchscript", "target:executorch"): "lowering failed"
       for arch in ("bert", "gpt2", "llama", "vit", "mobilenet_v2")},
    ("mobilenet_v2/dynamo-noopt", "target:executorch"): "lowering failed",
    # ResNet's zoo config has one block per stage; layerskip protects the first.
    ("resnet/dynamo", "layerskip"): "protected by protect_first",
    ("resnet/dynamo-noopt", "layerskip"): "protected by protect_first",
    # ORT's fused Attention has no pruning rule: nothing of the requested kind to prune (exit 2, reasons given).
    ("bert/ort-fused", "prune"): "nothing to prune",
    # The TorchScript MobileNetV2 pads with Pad parameters computed at run time: its Conv channel counts are unknown.
    ("mobilenet_v2/torchscript", "prune"): "nothing to prune",
    # Models whose inputs slimc cannot invent: the recogniser needs 48-pixel-high text lines (224x224 breaks a
    # Concat: --static-shapes x=1x3x48x320 or --eval), Silero an audio window of its own length (--eval).
    ("paddle/ocr-rec", "*"): "synthetic inputs",
    ("silero/*", "*"): "synthetic inputs",
    # The If node has no pruning rule: both branches' MatMuls block (exit 2 with the reasons).
    ("control-flow/*", "prune"): "nothing to prune",
    # ORT's fused ops: pnnx's ONNX Runtime has no com.microsoft domain; ExecuTorch has no lowering for them.
    ("*/ort-fused", "target:executorch"): "no torch lowering",
}
# Cells that fail today, each fixed on another branch (the reason names it). None at present.
PENDING: dict[tuple[str, str], str] = {}


def _lookup(table: dict[tuple[str, str], str], variant: str, column: str) -> str | None:
    for (v, c), text in table.items():
        if fnmatch.fnmatchcase(variant, v) and fnmatch.fnmatchcase(column, c):
            return text
    return None


def check_cell(outcome: export_matrix.Outcome) -> None:
    """Assert what the tables above say about this cell (xfail for a pending one)."""
    where = f"{outcome.variant} x {outcome.column}"
    if outcome.error_type == "MissingExtraError":
        pytest.skip(f"{where}: {outcome.reason}")
    pending = _lookup(PENDING, outcome.variant, outcome.column)
    if pending is not None and outcome.status != "ok":
        pytest.xfail(f"{pending}: {outcome.status}: {outcome.reason[:200]}")
    assert outcome.status != "FAILED", (
        f"{where} crashed with {outcome.error_type} at {outcome.where}: {outcome.reason}. "
        "Raise a SlimcError that says what to do instead.")
    expected = _lookup(REFUSALS, outcome.variant, outcome.column)
    if expected is None:
        assert outcome.status == "ok", f"{where} regressed from ok to {outcome.error_type}: {outcome.reason}"
        return
    assert outcome.status == "refused", f"{where} was expected to refuse ({expected!r}) but {outcome.status}"
    assert expected in outcome.reason, f"{where} refused for another reason than {expected!r}: {outcome.reason}"
    assert len(outcome.reason) > 30, f"{where}: the reason is too short to act on: {outcome.reason!r}"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The export corpus, each file exported at most once per session."""
    return exports.Corpus(tmp_path_factory.mktemp("corpus"))


def _cells(variants: list[str], cols: list[str]) -> list[tuple[str, str]]:
    return [(v, c) for v in variants for c in cols]


def _sample() -> list[tuple[str, str]]:
    """Seeded: two zoo exports (seconds each) and the small files that need no export, three columns each."""
    rng = random.Random(15)
    variants = rng.sample(exports.zoo_variant_names(), 2) + ["control-flow/if", "paddle/ocr-cls", "silero/vad"]
    cols = export_matrix.columns(export_matrix.TARGET_NAMES)
    return [(v, c) for v in variants for c in rng.sample(cols, 3)]


SAMPLE = _sample()
ALL = _cells(exports.all_variant_names(), export_matrix.columns(export_matrix.TARGET_NAMES))


def _run(corpus, variant_name: str, column: str, tmp_path) -> export_matrix.Outcome:
    variant = corpus.get(variant_name)
    if variant.path is None:
        if isinstance(variant.error, str) and "not installed" in variant.error:
            pytest.skip(variant.error)
        pytest.fail(f"{variant_name} could not be exported: {variant.error}")
    if column.startswith("target:") and column.split(":", 1)[1] not in export_matrix.installed_targets():
        pytest.skip(f"target {column} is not installed")
    return export_matrix.run_cell(variant_name, variant.path, column, tmp_path)


@pytest.mark.parametrize(("variant", "column"), SAMPLE, ids=[f"{v}-{c}" for v, c in SAMPLE])
def test_matrix_sample(corpus, variant, column, tmp_path):
    check_cell(_run(corpus, variant, column, tmp_path))


@pytest.mark.exhaustive
@pytest.mark.slow
@pytest.mark.parametrize(("variant", "column"), ALL, ids=[f"{v}-{c}" for v, c in ALL])
def test_matrix_full(corpus, variant, column, tmp_path):
    check_cell(_run(corpus, variant, column, tmp_path))


def test_every_zoo_architecture_has_each_exporter_variant(corpus):
    """The corpus itself: each architecture exports with every exporter it is listed for, as real files."""
    import onnx

    names = exports.zoo_variant_names()
    assert {n.split("/")[0] for n in names} == set(exports.ARCHS)
    for arch in ("bert", "resnet"):  # one transformer, one CNN: the others are exported by the slow matrix
        for kind in exports.kinds_for(arch):
            variant = corpus.get(f"{arch}/{kind}")
            assert variant.path is not None, f"{variant.name}: {variant.error}"
            model = onnx.load(variant.path)
            ops = {(n.domain or "", n.op_type) for n in model.graph.node}
            if kind == "no-shapes":
                assert not model.graph.value_info
            if kind == "ort-fused":
                assert ("com.microsoft", "Attention") in ops and ("com.microsoft", "SkipLayerNormalization") in ops
            if kind == "dynamo-sdpa":  # the run-time reshape of issue 15: Shape feeding the graph
                assert ("", "Shape") in ops


def test_if_model_runs_both_branches(tmp_path):
    """The control-flow model really branches on its scalar input."""
    import onnx

    from slimc.backends.onnxruntime import create_session

    path = tmp_path / "if.onnx"
    onnx.save(exports.if_model(), path)
    session = create_session(path)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    then = session.run(None, {"x": x, "mode": np.array(1, np.int64)})[0]
    other = session.run(None, {"x": x, "mode": np.array(0, np.int64)})[0]
    assert then.shape == other.shape == (3, 8)
    assert not np.allclose(then, other)


def test_static_shapes_may_pin_a_scalar_input(tmp_path):
    """Regression: pinning every input, a 0-d one included, crashed with IndexError (batch axis of a scalar)."""
    import onnx

    import slimc
    from slimc.export import ExportOptions

    assert ExportOptions("onnx", static_shapes={"x": (1, 16), "mode": ()}).batch_size == 1
    assert ExportOptions("onnx", static_shapes={"mode": ()}).batch_size is None
    path = tmp_path / "if.onnx"
    onnx.save(exports.if_model(), path)
    result = slimc.compile(str(path), "cleanup", target="onnx", static_shapes={"x": (1, 16), "mode": ()},
                           measure_latency=False)
    result.save(tmp_path / "out.onnx")
    pinned = onnx.load(tmp_path / "out.onnx").graph.input
    assert [d.dim_value for d in pinned[0].type.tensor_type.shape.dim] == [1, 16]


def test_wrapped_crashes_count_as_failures():
    """A PassFailedError that only wraps a Python exception is not a clear refusal."""
    assert export_matrix.wrapped_crash("pass 'int8' (first pass) failed: IndexError: too many indices") == "IndexError"
    assert export_matrix.wrapped_crash("pass 'prune' produced an invalid model: ORT failed: x") is None
    with pytest.raises(AssertionError, match="crashed"):
        check_cell(export_matrix.Outcome("bert/dynamo-eager", "cleanup", "FAILED", "boom", error_type="KeyError"))
    with pytest.raises(AssertionError, match="regressed"):
        check_cell(export_matrix.Outcome("bert/dynamo-eager", "cleanup", "refused", "a reason", error_type="DataError"))


def test_openvino_runs_a_model_with_a_scalar_input(tmp_path):
    """Regression: the OpenVINO runner fed a 0-d input as shape [1] (ascontiguousarray), and the CPU plugin refused."""
    pytest.importorskip("openvino")
    import onnx

    import slimc

    path = tmp_path / "if.onnx"
    onnx.save(exports.if_model(), path)
    result = slimc.compile(str(path), "cleanup", target="openvino", measure_latency=False)
    assert result.exported is not None and result.exported.target == "openvino"
    assert result.receipt.target is not None


def test_target_runners_read_outputs_and_errors_of_other_converters():
    """Regressions from the matrix: Paddle's OCR recogniser through ncnn (output dims left symbolic) crashed
    with "cannot reshape array of size 6625 into shape (0,6625)"; OpenVINO's run-time errors were reported
    by their first line, a source location ("Exception from src/inference/...cpp:224:")."""
    from slimc.backends.targets.ncnn_target import _reshaped
    from slimc.backends.targets.openvino_target import _run_message

    assert _reshaped(np.zeros((40, 6625)), [0, 6625]).shape == (40, 6625)
    assert _reshaped(np.zeros((2, 3, 4)), [2, 12]).shape == (2, 12)
    assert _reshaped(np.zeros((2, 3)), [0, 0]).shape == (2, 3)  # ambiguous: ncnn's own shape
    error = RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:224:\n"
                         "Check 'is_dynamic' failed at src/plugins/intel_cpu/src/infer_request.cpp:669:\n"
                         "The input tensor size is not equal to the model input type: got [1] expecting [].\n")
    assert _run_message(error) == "The input tensor size is not equal to the model input type: got [1] expecting []."
