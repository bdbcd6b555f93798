"""Side-by-side benchmark: slimc's quantization against ONNX Runtime's and NNCF's on the same models.

Run::

    python -m slimc.tools.bench_quant [--models bert-base,resnet50,minilm,efficientnet,smollm2]
                                      [--tools slimc,ort-dynamic,ort-static,nncf] [--slimc-spec int8]
                                      [--repeats 20] [--threads N] [--out results.json] [--markdown table.md]

Full runs belong in ``benchmarks/quant/``. The peers are bench-only dependencies (``pip install
nncf``; ONNX Runtime's quantizer ships with onnxruntime); a missing one is a recorded error.

Models (each exported once by slimc's front ends; every tool starts from that same fp32 export):

- ``bert-base`` / ``resnet50``: `slimc.tools.bench_prune`'s builders (transformers configs,
  seeded random weights), calibrated on synthetic batches of one seed and evaluated on synthetic
  batches of another. Random weights make task metrics meaningless: SQNR only;
- ``minilm``: all-MiniLM-L6-v2 (real weights), calibration on the Lee news corpus, evaluation on
  held-out Wikipedia text (windows of 128 tokens), embedding cosine;
- ``efficientnet``: EfficientNet-Lite0 (real ImageNet weights), calibration and evaluation on the
  two disjoint sets of scikit-image photos (crops and flips), top-1 agreement;
- ``smollm2``: SmolLM2-135M, calibration Lee, perplexity ratio on Wikipedia; latency at a
  128-token prompt (prefill) and at a 1-token input (the export has no KV cache, so the decode
  step is the model run on one token).

Tools, each from the saved fp32 export and the same calibration batches:

- ``slimc``: ``slimc.compile(model, passes=[spec], calibration=..., evaluation=...)`` with
  ``--slimc-spec`` (default ``int8``); its pass reports go into the JSON;
- ``ort-dynamic``: ``quantize_dynamic`` (weights QInt8, per-tensor: its defaults);
- ``ort-static``: ``quant_pre_process`` (if it fails, recorded, then without it) and
  ``quantize_static``: QDQ, per-channel, U8 activations / S8 weights, MinMax calibration;
- ``nncf``: ``nncf.quantize`` (preset MIXED with ``model_type=TRANSFORMER`` for transformers,
  PERFORMANCE otherwise; ``subset_size`` = all calibration batches); if its SmoothQuant step
  fails, recorded, then again with SmoothQuant off.

Measured per model: ONNX Runtime CPU latency at batch 1 of the fp32 model and every quantized
one, all sessions of one model in one interleaved `measure_latency` call per feed (speedup =
fp32 median / tool median); fidelity against the fp32 model with `slimc.evaluate.evaluate` on
the held-out evaluation data (never the calibration batches); file size. A tool that fails at
any step leaves ``{"error": "..."}`` in its cell; the run goes on. Timings are reported, never
asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = ("slimc", "ort-dynamic", "ort-static", "nncf")
Batch = dict[str, np.ndarray]
REFERENCE_CACHE_BYTES = 1 << 30  # fp32 outputs kept for reuse across tools' fidelity runs


@dataclasses.dataclass
class Case:
    """One benchmark model: how to load it, its data, its latency feeds and what the table notes.

    ``data`` returns ``(calibration, evaluation)`` datasets from disjoint sources (or seeds);
    ``feeds`` returns ``{label: batch-1 input}``, each measured separately.
    """

    name: str
    load: Callable[[], Any]  # -> slimc.model.LoadedModel
    data: Callable[[Any], tuple[Any, Any]]  # loaded -> (calibration, evaluation) slimc.data.Dataset
    feeds: Callable[[Any, Any], dict[str, Batch]]  # (loaded, evaluation) -> {label: batch}
    transformer: bool
    synthetic: bool = False  # random weights and synthetic data: SQNR is the only meaningful metric
    notes: list[str] = dataclasses.field(default_factory=list)


def _shapes(batch: Batch) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in batch.items())


def _first_sample(batch: Batch) -> Batch:
    return {k: np.ascontiguousarray(v[:1]) for k, v in batch.items()}


def random_case(base, transformer: bool, calib_batches: int = 8, eval_batches: int = 8, batch_size: int = 4) -> Case:
    """A `slimc.tools.bench_prune.Case` (random weights) with synthetic data of seeds 0 (calibration)
    and 1 (evaluation), ``batch_size`` samples per batch; its own example input is the feed."""
    from slimc import data, frontends

    feed = base.feed()
    seq = next((v.shape[1] for v in feed.values() if v.ndim == 2), None)
    sizes = {"batch": batch_size, **({"seq": seq} if seq else {})}

    def load():
        return frontends.load(base.build(), base.example)

    def datasets(loaded):
        return (data.synthetic(loaded.inputs, calib_batches, seed=0, sizes=sizes),
                data.synthetic(loaded.inputs, eval_batches, seed=1, sizes=sizes))

    label = "x".join(map(str, next(iter(feed.values())).shape))
    return Case(base.name, load, datasets, lambda loaded, evaluation: {label: feed}, transformer,
                synthetic=True, notes=["random weights, synthetic data: SQNR only"])


def bert_base(calib_batches: int = 8, eval_batches: int = 8, seq: int = 128) -> Case:
    """BERT-base, random weights (bench_prune's builder), batch 1 x ``seq`` tokens."""
    from slimc.tools.bench_prune import bert_case

    return random_case(bert_case(seq=seq), True, calib_batches, eval_batches)


def resnet50(calib_batches: int = 8, eval_batches: int = 8) -> Case:
    """ResNet-50, random weights (bench_prune's builder), 1x3x224x224."""
    from slimc.tools.bench_prune import resnet_case

    return random_case(resnet_case(), False, calib_batches, eval_batches)


def _text_data(folder: Path, calib_batches: int, eval_batches: int, seq: int):
    from slimc import data, datasets

    def load(loaded):
        lee, wiki = datasets.text_files(folder)
        return (data.load(lee, loaded, seq_len=seq, batch_size=4, max_batches=calib_batches, role="calibration"),
                data.load(wiki, loaded, seq_len=seq, batch_size=4, max_batches=eval_batches, role="evaluation"))

    return load


def minilm(folder: Path = Path("slimc-data"), calib_batches: int = 8, eval_batches: int = 8, seq: int = 128) -> Case:
    """all-MiniLM-L6-v2: Lee news calibration, Wikipedia evaluation, embedding cosine."""
    from slimc import frontends
    from slimc.tools import models

    return Case("minilm", lambda: frontends.load(models.minilm_path()), _text_data(folder, calib_batches, eval_batches, seq),
                lambda loaded, evaluation: {f"1x{seq}": _first_sample(evaluation[0])}, True,
                notes=["calibration: Lee news corpus; evaluation: held-out Wikipedia (windows of 128 tokens)"])


def efficientnet(calib_batches: int = 4, eval_batches: int = 4, batch_size: int = 8) -> Case:
    """EfficientNet-Lite0 (real weights): calibration and evaluation on disjoint photo sets."""
    from slimc import data, datasets, frontends
    from slimc.tools import models

    def load():
        import torch

        return frontends.load(models.efficientnet_lite0(), torch.randn(1, 3, 224, 224))

    def photos(loaded):
        calib = datasets.photo_dataset(224, n=calib_batches * batch_size, seed=1, split="calibration")
        evaluation = datasets.photo_dataset(224, n=eval_batches * batch_size, seed=0, split="evaluation")
        return (data.load(calib, loaded, batch_size=batch_size, role="calibration"),
                data.load(evaluation, loaded, batch_size=batch_size, role="evaluation"))

    return Case("efficientnet", load, photos, lambda loaded, evaluation: {"1x3x224x224": _first_sample(evaluation[0])},
                False, notes=["calibration and evaluation: disjoint scikit-image photo sets, crops and flips"])


def smollm2(folder: Path = Path("slimc-data"), calib_batches: int = 8, eval_batches: int = 8, seq: int = 128) -> Case:
    """SmolLM2-135M: perplexity ratio on Wikipedia; latency at prefill (``seq`` tokens) and decode (1)."""
    from slimc import frontends
    from slimc.tools import models

    def feeds(loaded, evaluation):
        prompt = _first_sample(evaluation[0])
        step = {k: np.ascontiguousarray(v[:, :1]) if v.ndim == 2 else v for k, v in prompt.items()}
        return {f"prefill {seq}": prompt, "decode 1": step}

    return Case("smollm2", lambda: frontends.load(models.smollm2_gguf()), _text_data(folder, calib_batches, eval_batches, seq),
                feeds, True, notes=[
                    "calibration: Lee news corpus; evaluation: held-out Wikipedia (windows of 128 tokens)",
                    "the export has no KV cache: 'decode 1' is the model run on one token, not a cached decode step",
                ])


CASES: dict[str, Callable[..., Case]] = {
    "bert-base": bert_base, "resnet50": resnet50, "minilm": minilm, "efficientnet": efficientnet, "smollm2": smollm2,
}


def make_case(name: str, folder: Path, calib_batches: int, eval_batches: int) -> Case:
    """``CASES[name]`` with the data folder (text models) and batch counts."""
    builder = CASES[name]
    if name in ("minilm", "smollm2"):
        return builder(folder, calib_batches, eval_batches)
    return builder(calib_batches, eval_batches)


# ---------------------------------------------------------------- the tools


def _error(exc: BaseException) -> str:
    """``Type: first line of the message``, plus where it was raised outside slimc's own typed
    errors (``(at nncf/.../file.py:123 in function)``) so a peer's failure can be reported upstream."""
    from slimc.errors import SlimcError, first_line

    text = f"{type(exc).__name__}: {first_line(exc, 500)}"
    trace = [] if isinstance(exc, SlimcError) else _trace(exc, 1)
    return text + (f" (at {trace[0]})" if trace else "")


def _trace(exc: BaseException, depth: int = 8) -> list[str]:
    """The innermost ``depth`` frames of the exception, innermost first, as ``path:line in function``
    (paths from site-packages on)."""
    import traceback

    out = []
    for frame in reversed(traceback.extract_tb(exc.__traceback__)[-depth:]):
        path = frame.filename.replace("\\", "/")
        path = path.split("site-packages/", 1)[-1] if "site-packages/" in path else Path(path).name
        out.append(f"{path}:{frame.lineno} in {frame.name}")
    return out


def _large(path: Path) -> bool:
    from slimc.onnx_io import EXTERNAL_DATA_THRESHOLD

    return _bytes_on_disk(path) > EXTERNAL_DATA_THRESHOLD


def _bytes_on_disk(path: Path) -> int:
    """The model file plus its external data files (named after it)."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def _load_ir(path: Path):
    from slimc.onnx_io import load_onnx

    return load_onnx(path)


def quantize_slimc(loaded, source: Path, calib, evaluation, work: Path, *, spec: str, transformer: bool,
                   threads: int | None = None):
    """``slimc.compile`` with ``spec``; the pass reports and the compile's own checks go into the cell."""
    import slimc

    start = time.perf_counter()
    result = slimc.compile(loaded, passes=spec, calibration=calib, evaluation=evaluation, measure_latency=False,
                           threads=threads)  # its passes' own latency checks use the benchmark's threads
    receipt = result.receipt
    info = {"config": spec, "pass_seconds": sum(report.seconds for report in receipt.passes),
            "compile_seconds": time.perf_counter() - start, "passes": [report.to_json() for report in receipt.passes],
            "verification": receipt.verification, "receipt_fidelity": receipt.fidelity.get("metrics")}
    return result.model, info


def quantize_ort_dynamic(loaded, source: Path, calib, evaluation, work: Path, *, spec: str, transformer: bool,
                   threads: int | None = None):
    """ONNX Runtime's ``quantize_dynamic`` with its defaults: QInt8 weights, per-tensor."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "quantized.onnx"
    quantize_dynamic(source, out, weight_type=QuantType.QInt8, per_channel=False, use_external_data_format=_large(source))
    return _load_ir(out), {"config": "quantize_dynamic: weights QInt8, per-tensor"}


def _calibration_reader(batches: list[Batch]):
    """An ONNX Runtime `CalibrationDataReader` over ``batches`` (its base class is imported here,
    so onnxruntime.quantization loads only when this tool runs)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(batches)

        def get_next(self):
            return next(self._batches, None)

        def rewind(self):
            self._batches = iter(batches)

    return Reader()


@contextlib.contextmanager
def _working_folder(folder: Path) -> Iterator[None]:
    """Run a library call with ``folder`` as the current folder, so stray files land there."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def quantize_ort_static(loaded, source: Path, calib, evaluation, work: Path, *, spec: str, transformer: bool,
                   threads: int | None = None):
    """``quant_pre_process`` (recorded if it fails, then skipped) and ``quantize_static``: QDQ,
    per-channel, U8 activations / S8 weights, MinMax on the calibration batches."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    info: dict[str, Any] = {"config": "quantize_static: QDQ, per-channel, U8S8, MinMax"}
    source, work = source.resolve(), work.resolve()  # absolute: pre-processing runs inside ``work``
    large = _large(source)
    prepared = work / "preprocessed.onnx"
    try:
        with _working_folder(work):  # its symbolic shape inference dumps files into the current folder on failure
            quant_pre_process(source, prepared, save_as_external_data=large)
        info["pre_process"] = "ok"
        model_input = prepared
    except Exception as exc:  # e.g. symbolic shape inference on dynamo exports
        info["pre_process"] = f"failed, quantized without it: {_error(exc)}"
        model_input = source
    out = work / "quantized.onnx"
    quantize_static(model_input, out, _calibration_reader(list(calib)), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large)
    return _load_ir(out), info


def _nncf():
    try:
        import nncf
    except ImportError:
        raise RuntimeError("NNCF is not installed, a bench-only dependency: pip install nncf") from None
    return nncf


def nncf_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("nncf")
    except metadata.PackageNotFoundError:
        return None


def quantize_nncf(loaded, source: Path, calib, evaluation, work: Path, *, spec: str, transformer: bool,
                   threads: int | None = None):
    """``nncf.quantize`` on the ONNX model: preset MIXED + ``ModelType.TRANSFORMER`` for
    transformers, PERFORMANCE otherwise, statistics from all calibration batches. If NNCF's
    SmoothQuant step (on for transformers) fails, that is recorded and the model is quantized
    again with SmoothQuant off (``smooth_quant_alphas.matmul = -1``)."""
    import onnx
    import onnx_ir as ir

    nncf = _nncf()
    preset = nncf.QuantizationPreset.MIXED if transformer else nncf.QuantizationPreset.PERFORMANCE
    options: dict[str, Any] = {"preset": preset, "subset_size": len(calib)}
    if transformer:
        options["model_type"] = nncf.ModelType.TRANSFORMER
    config = f"nncf.quantize: preset {preset.value}" + (", model_type TRANSFORMER" if transformer else "")
    info: dict[str, Any] = {"config": config + f", subset_size {len(calib)}"}
    model = onnx.load(str(source))
    try:
        quantized = nncf.quantize(model, nncf.Dataset(list(calib)), **options)
    except Exception as exc:
        if not (transformer and any("smooth_quant" in frame for frame in _trace(exc, 50))):
            raise
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

        info["smooth_quant"] = f"failed, quantized without it: {_error(exc)}"
        info["smooth_quant_traceback"] = _trace(exc)
        options["advanced_parameters"] = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
        quantized = nncf.quantize(onnx.load(str(source)), nncf.Dataset(list(calib)), **options)  # a fresh copy
    return ir.serde.deserialize_model(quantized), info


QUANTIZERS: dict[str, Callable[..., tuple[Any, dict[str, Any]]]] = {
    "slimc": quantize_slimc, "ort-dynamic": quantize_ort_dynamic, "ort-static": quantize_ort_static, "nncf": quantize_nncf,
}


# ---------------------------------------------------------------- measuring


class _Reference:
    """The fp32 session's outputs per evaluation batch, computed once and reused for every tool
    while they fit in ``limit`` bytes (evaluate() walks the batches in order)."""

    def __init__(self, session, limit: int = REFERENCE_CACHE_BYTES):
        self.session, self.limit, self.used = session, limit, 0
        self.cache: dict[int, list[np.ndarray]] = {}
        self.index = 0

    def rewind(self) -> None:
        self.index = 0

    def __call__(self, batch: Batch) -> list[np.ndarray]:
        from slimc.backends import onnxruntime as ort_backend

        index, self.index = self.index, self.index + 1
        if index in self.cache:
            return self.cache[index]
        outputs = ort_backend.run(self.session, batch)
        size = sum(o.nbytes for o in outputs)
        if self.used + size <= self.limit:
            self.cache[index] = outputs
            self.used += size
        return outputs


def _fidelity(reference: _Reference, session, evaluation, loaded) -> dict[str, Any]:
    from slimc import evaluate
    from slimc.backends import onnxruntime as ort_backend

    reference.rewind()
    return evaluate.evaluate(reference, lambda b: ort_backend.run(session, b), evaluation, loaded.task,
                             output_names=[o.name for o in session.get_outputs()], inputs=loaded.inputs)


def columns(tools: Sequence[str], specs: str | Sequence[str]) -> list[tuple[str, str, str]]:
    """(column name, tool, slimc spec) per table column: one slimc column per spec."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    out = []
    for tool in tools:
        if tool == "slimc":
            out += [("slimc" if len(specs) == 1 else f"slimc {spec}", tool, spec) for spec in specs]
        else:
            out.append((tool, tool, specs[0]))
    return out


def bench_model(case: Case, tools: Sequence[str], spec: str | Sequence[str] = "int8", repeats: int = 20,
                threads: int | None = None, workdir: str | Path | None = None) -> dict[str, Any]:
    """fp32 and each tool's quantized model for one case: latency per feed, speedup, fidelity, size.

    ``spec`` may list several slimc pass specs; each becomes its own column ("slimc SPEC")."""
    from slimc.backends import onnxruntime as ort_backend
    from slimc.onnx_io import save_onnx

    loaded = case.load()
    calib, evaluation = case.data(loaded)
    feeds = case.feeds(loaded, evaluation)
    item: dict[str, Any] = {
        "model": case.name, "source": loaded.source, "task": loaded.task, "synthetic": case.synthetic,
        "transformer": case.transformer, "calibration": calib.source, "evaluation": evaluation.source,
        "feeds": {label: _shapes(feed) for label, feed in feeds.items()}, "notes": list(case.notes),
    }
    with tempfile.TemporaryDirectory(prefix="bench-quant-", dir=workdir) as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        paths = {"fp32": models / "fp32.onnx"}
        save_onnx(loaded.model, paths["fp32"])
        cells: dict[str, dict[str, Any]] = {"fp32": {"config": "fp32 export"}}
        cols = columns(tools, spec)
        for index, (name, tool, col_spec) in enumerate(cols):
            work = Path(tmp) / f"{index:02d}-{tool}"
            work.mkdir()
            start = time.perf_counter()
            try:
                model, info = QUANTIZERS[tool](loaded, paths["fp32"], calib, evaluation, work,
                                               spec=col_spec, transformer=case.transformer, threads=threads)
                seconds = time.perf_counter() - start
                paths[name] = models / f"{index:02d}-{tool}.onnx"
                save_onnx(model, paths[name])
                del model
                cells[name] = {**info, "quantize_seconds": seconds}
            except Exception as exc:  # record and go on: one tool failing must not hide the others
                cells[name] = {"error": _error(exc), "traceback": _trace(exc),
                               "quantize_seconds": time.perf_counter() - start}
                paths.pop(name, None)
        for name, path in paths.items():
            cells[name]["size_bytes"] = _bytes_on_disk(path)

        sessions = {}
        for name, path in paths.items():
            try:
                sessions[name] = ort_backend.create_session(path, threads)
            except Exception as exc:
                cells[name]["error"] = f"session: {_error(exc)}"
        if "fp32" not in sessions:
            raise RuntimeError(f"{case.name}: ONNX Runtime cannot load the fp32 export: {cells['fp32']['error']}")
        _measure(cells, sessions, feeds, repeats)

        reference = _Reference(sessions["fp32"])
        for name, _, _ in cols:
            if name in sessions and "error" not in cells[name]:
                try:
                    cells[name]["fidelity"] = _fidelity(reference, sessions[name], evaluation, loaded)
                except Exception as exc:
                    cells[name]["fidelity"] = {"error": _error(exc)}
        del sessions, reference
    item["results"] = cells
    return item


def _measure(cells: dict[str, dict[str, Any]], sessions: dict, feeds: dict[str, Batch], repeats: int) -> None:
    """Latency of every session on each feed in one interleaved call; sessions that cannot run a
    feed get an error there instead. Speedups are fp32 median / tool median."""
    from slimc.backends import onnxruntime as ort_backend

    for cell in cells.values():
        if "error" not in cell:
            cell["latency"], cell["speedup"] = {}, {}
    for label, feed in feeds.items():
        runnable = {}
        for name, session in sessions.items():
            if "error" in cells[name]:
                continue
            try:
                ort_backend.run(session, feed)
                runnable[name] = session
            except Exception as exc:
                cells[name]["latency"][label] = {"error": _error(exc)}
        if "fp32" not in runnable:
            continue
        stats = ort_backend.measure_latency(runnable, feed, repeats=repeats, rounds=min(5, repeats), budget_s=1e6)
        base = stats["fp32"].median_ms
        for name, value in stats.items():
            cells[name]["latency"][label] = value.to_json()
            if name != "fp32":
                cells[name]["speedup"][label] = base / value.median_ms


def versions() -> dict[str, str | None]:
    """Versions of slimc and of every library whose work is compared."""
    from importlib import metadata

    from slimc import __version__

    out: dict[str, str | None] = {"slimc": __version__}
    for package in ("onnxruntime", "nncf", "onnx", "torch", "transformers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def run(cases: list[Case], tools: Sequence[str] = TOOLS, spec: str | Sequence[str] = "int8", repeats: int = 20,
        threads: int | None = None) -> dict[str, Any]:
    """The whole benchmark: one `bench_model` per case (a model that cannot be loaded or measured
    is recorded with its error), plus the machine and versions."""
    from slimc.backends.onnxruntime import machine_description

    if repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {repeats}")
    unknown = [t for t in tools if t not in QUANTIZERS]
    if unknown:
        raise SystemExit(f"unknown tool(s) {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    results = []
    load_before = _load_average()
    for case in cases:
        print(f"bench_quant: {case.name}", file=sys.stderr, flush=True)
        try:
            results.append(bench_model(case, tools, spec, repeats, threads))
        except Exception as exc:
            results.append({"model": case.name, "error": _error(exc), "notes": list(case.notes)})
    return {"spec": spec if isinstance(spec, str) else "; ".join(spec), "tools": [c[0] for c in columns(tools, spec)],
            "repeats": repeats, "threads": threads,
            "machine": machine_description(threads), "load_average": {"start": load_before, "end": _load_average()},
            "versions": versions(), "models": results}


def _load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: a busy machine's timings are not comparable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------- output


def fidelity_text(metrics: dict[str, Any] | None, task: str, synthetic: bool) -> str:
    """The table's fidelity cell: the task metric (SQNR alone on random models), SQNR beside it."""
    if not metrics:
        return "-"
    if "error" in metrics:
        return f"error: {metrics['error']}"
    sqnr = "exact" if metrics.get("exact") else (
        f"SQNR {metrics['sqnr_db']:.1f} dB" if metrics.get("sqnr_db") is not None else "SQNR -")
    if synthetic:
        return sqnr
    key, label, fmt = {
        "causal-lm": ("perplexity_ratio", "ppl ratio", ".4f"), "encoder": ("embedding_cosine", "emb. cosine", ".4f"),
        "image-classifier": ("top1_agreement", "top-1 agreement", ".3f"),
        "classifier": ("top1_agreement", "top-1 agreement", ".3f"),
    }.get(task, (None, None, None))
    if key is None or metrics.get(key) is None:
        return sqnr
    return f"{label} {format(metrics[key], fmt)} ({sqnr})"


def _cell_notes(cell: dict[str, Any]) -> str:
    parts = [cell.get("config", "")]
    if cell.get("pre_process", "ok") != "ok":
        parts.append(f"quant_pre_process {cell['pre_process']}")
    if "smooth_quant" in cell:
        parts.append(f"NNCF SmoothQuant {cell['smooth_quant']}")
    if cell.get("pass_seconds") is not None:  # slimc: its passes' time; the compile also verifies and evaluates
        parts.append(f"passes {cell['pass_seconds']:.1f} s (compile {cell['compile_seconds']:.1f} s)")
    elif cell.get("quantize_seconds") is not None:
        parts.append(f"quantized in {cell['quantize_seconds']:.1f} s")
    return "; ".join(p for p in parts if p).replace("|", "\\|")


def markdown(report: dict[str, Any]) -> str:
    """A Markdown table of every model x feed x (fp32, tools), with the notes, machine and versions."""
    v = report["versions"]
    lines = [
        f"INT8 quantization: slimc `{report['spec']}` vs ONNX Runtime {v.get('onnxruntime')} quantize_dynamic / "
        f"quantize_static and NNCF {v.get('nncf') or '(not installed)'}",
        "",
        "| model | feed | tool | latency ms | speedup vs fp32 | fidelity metric | size MB | notes |",
        "|---|---|---|---:|---:|---|---:|---|",
    ]
    for item in report["models"]:
        if "error" in item:
            lines.append(f"| {item['model']} | - | - | - | - | - | - | error: {item['error']} |")
            continue
        for label in item["feeds"]:
            for name in ("fp32", *report["tools"]):
                cell = item["results"][name]
                size = f"{cell['size_bytes'] / 1e6:.1f}" if "size_bytes" in cell else "-"
                if "error" in cell:
                    text = cell["error"].replace("|", "\\|")
                    lines.append(f"| {item['model']} | {label} | {name} | - | - | - | {size} | error: {text} |")
                    continue
                latency = cell["latency"].get(label, {})
                ms = f"{latency['median_ms']:.2f}" if "median_ms" in latency else f"error: {latency.get('error', '-')}"
                speedup = cell["speedup"].get(label) if name != "fp32" else 1.0
                fid = "reference" if name == "fp32" else fidelity_text(cell.get("fidelity"), item["task"], item["synthetic"])
                notes = "; ".join(item["notes"]) if name == "fp32" else _cell_notes(cell)
                lines.append(f"| {item['model']} | {label} | {name} | {ms} | {'-' if speedup is None else f'{speedup:.2f}'} "
                             f"| {fid.replace('|', chr(92) + '|')} | {size} | {notes} |")
    lines += ["", "Notes:", ""]
    for item in report["models"]:
        if "error" in item:
            continue
        feeds = "; ".join(f"{label}: {shapes}" for label, shapes in item["feeds"].items())
        lines.append(f"- **{item['model']}** ({item['task']}, {item['source']}). Feeds: {feeds}. "
                     f"Calibration: {item['calibration']}. Evaluation: {item['evaluation']}.")
    versions_text = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    lines += [
        "",
        f"Latency: ONNX Runtime CPU, batch 1, all sessions of one model and feed measured interleaved in one call "
        f"(same session options, warm-up, alternating rounds), median of {max(3, report['repeats'])} runs; "
        "speedup = fp32 median / tool median. Fidelity: against the fp32 model on the held-out evaluation data, "
        "never the calibration batches. Size: the saved .onnx (and external data).",
        "",
        f"Machine: {report['machine']}. Versions: {versions_text}.",
    ]
    load = report.get("load_average") or {}
    if load.get("start") and load.get("end"):
        lines[-1] += (f" Load average (1/5/15 min) at start {'/'.join(map(str, load['start']))}, "
                      f"at end {'/'.join(map(str, load['end']))}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from slimc.tools import comma_names

    parser = argparse.ArgumentParser(prog="python -m slimc.tools.bench_quant", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from: {', '.join(TOOLS)}")
    parser.add_argument("--slimc-spec", action="append", default=None,
                        help="slimc's pass spec (default int8), e.g. 'smoothquant,int8'; repeat for more slimc columns")
    parser.add_argument("--repeats", type=int, default=20, help="timed ORT runs per model and feed (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    parser.add_argument("--calib-batches", type=int, default=8, help="calibration batches (default 8)")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out evaluation batches (default 8)")
    parser.add_argument("--data", type=Path, default=Path("slimc-data"), help="folder for the text files")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown table here")
    args = parser.parse_args(argv)
    models = comma_names(args.models, CASES, "model(s)", parser)
    tools = comma_names(args.tools, TOOLS, "tool(s)", parser)
    for path in (args.out, args.markdown):
        if path is not None and not path.parent.is_dir():
            parser.error(f"{path}: folder {path.parent} does not exist")
    if args.calib_batches < 1 or args.eval_batches < 1:
        parser.error("--calib-batches and --eval-batches must be at least 1")
    cases = [make_case(n, args.data, args.calib_batches, args.eval_batches) for n in models]
    report = run(cases, tools, args.slimc_spec or ["int8"], args.repeats, args.threads)
    from slimc.tools import write_results

    write_results(report, markdown(report), args.out, args.markdown)
    return 0



if __name__ == "__main__":
    sys.exit(main())
