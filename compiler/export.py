"""Export to a deployment target, verified by running the artifact in the target's own runtime.

Read top to bottom (`export`)::

    prepared = prepare(model, opset, static_shapes)     # ONNX the target converts from (checked, ORT)
    target.require(); target.unsupported(prepared)      # missing extra / ops it cannot hold: error now
    files    = target.convert(prepared)                 # into the work folder, never the output path
    runner   = target.load(files)                       # the target runtime on this CPU
    fidelity = artifact vs prepared ONNX (ORT)          # what the conversion cost
             + artifact vs the input model (ORT)        # what the whole compile cost
    latency  = input model and result, both converted to the target, timed in its runtime

`prepare` is shared by every target: **static shapes** pin graph inputs (``input_ids=1x128``),
infer every shape and fold what became constant (a mobile runtime plans memory once); the
**opset** is converted with ONNX's version converter. Only `CompileResult.save` writes to the
user's path, atomically, after all of this succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from slimc import progress
from slimc.backends import targets as registry
from slimc.backends.targets import TargetError
from slimc.errors import DataError, OutputPathError, SlimcError, first_line
from slimc.onnx_io import copy_model, from_proto

MIN_OPSET = 11  # below this ORT and most converters lack the ops of modern exports


@dataclasses.dataclass
class ExportOptions:
    """``--target``, ``--opset``, ``--static-shapes``; `parse_static_shapes` reads the CLI form."""

    target: str = "onnx"
    opset: int | None = None
    static_shapes: dict[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        self.target = str(self.target).strip().lower()
        if self.target not in registry.TARGETS:
            registry.get(self.target)  # raises: not available yet (with the reason), or unknown
        if self.opset is not None:
            latest = onnx.defs.onnx_opset_version()
            if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= latest:
                raise TargetError(f"opset={self.opset} is out of range: use {MIN_OPSET}..{latest} (this onnx package's "
                                  "newest), e.g. --opset 17.")
        if isinstance(self.static_shapes, str):
            self.static_shapes = parse_static_shapes(self.static_shapes)

    @property
    def changes_onnx(self) -> bool:
        return self.opset is not None or bool(self.static_shapes)

    @property
    def batch_size(self) -> int | None:
        """The batch axis the pinned shapes fix (axis 0 of every pinned input), None when free.

        A pinned 0-d input (a scalar configuration value) has no batch axis and fixes nothing.
        """
        batches = [dims[0] for dims in (self.static_shapes or {}).values() if len(dims)]
        return min(batches) if batches else None


def parse_static_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """``"input_ids=1x128,attention_mask=1x128"`` -> {name: (1, 128), ...}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in filter(None, (p.strip() for p in re.split(r"[,;]", text or ""))):
        name, sep, dims = item.partition("=")
        parts = dims.strip().lower().split("x")
        if not sep or not name.strip() or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise TargetError(f"--static-shapes: {item!r} is not NAME=DxDx...; e.g. --static-shapes "
                              "pixel_values=1x3x224x224 or input_ids=1x128,attention_mask=1x128.")
        shapes[name.strip()] = tuple(int(p) for p in parts)
    if not shapes:
        raise TargetError("--static-shapes is empty; give NAME=DxDx... for each input to pin.")
    return shapes


# ---------------------------------------------------------------- preparing the ONNX


def prepare(model: ir.Model, options: ExportOptions) -> ir.Model:
    """A copy of ``model`` with the static shapes pinned (and folded) and the opset converted."""
    out = copy_model(model)
    if options.static_shapes:
        out = _pin(out, options.static_shapes)
    if options.opset is not None:
        out = _convert_opset(out, options.opset)
    return out


def check_shapes(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every pinned input exists, has the pinned rank, and agrees with the dims the model fixes."""
    inputs = {v.name: v for v in model.graph.inputs}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise TargetError(f"--static-shapes names {', '.join(unknown)}, which the model does not take; its inputs are "
                          f"{', '.join(f'{n} {v.shape}' for n, v in inputs.items())}.")
    for name, dims in shapes.items():
        value = inputs[name]
        current = list(value.shape) if value.shape is not None else [None] * len(dims)
        if len(current) != len(dims):
            raise TargetError(f"--static-shapes {name}={'x'.join(map(str, dims))} has rank {len(dims)}, but input "
                              f"{name!r} has shape {value.shape} (rank {len(current)}).")
        for axis, (old, new) in enumerate(zip(current, dims)):
            if isinstance(old, int) and old != new:
                raise TargetError(f"--static-shapes {name}: axis {axis} is fixed at {old} in the model, not {new}.")


def _pin(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> ir.Model:
    from slimc.passes.cleanup import Cleanup
    from slimc.pipeline import PassContext

    check_shapes(model, shapes)
    inputs = {v.name: v for v in model.graph.inputs}
    for name, dims in shapes.items():
        inputs[name].shape = ir.Shape(list(dims))
    # Every value's shape follows; Shape/Size of pinned values fold into constants.
    proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model), data_prop=True)
    inferred = from_proto(proto, like=model)  # external weights stay on disk
    Cleanup(cse=False, dedupe_initializers=False).apply(inferred, PassContext())
    return inferred


def _convert_opset(model: ir.Model, opset: int) -> ir.Model:
    from onnx import version_converter

    current = model.opset_imports.get("", None)
    if current == opset:
        return model
    proto = ir.serde.serialize_model(model)
    try:
        converted = version_converter.convert_version(proto, opset)
    except Exception as exc:  # the converter raises RuntimeError / ConvertError with the adapter that failed
        raise TargetError(f"--opset {opset}: ONNX's version converter cannot take this model from opset {current} to "
                          f"{opset}: {first_line(exc, 400)}. Try an opset closer to {current}.") from None
    _repair_reductions(converted.graph, opset)
    try:
        onnx.checker.check_model(converted, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise TargetError(f"--opset {opset}: the converted model is not valid ONNX ({first_line(exc, 400)}); ONNX's "
                          f"version converter does not handle this model. Try an opset closer to {current}.") from None
    return from_proto(converted, like=model)


# Reductions that took ``axes`` as an input and gained ``noop_with_empty_axes`` in opset 18 (ReduceSum: 13).
_REDUCE_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare"}


def _repair_reductions(graph: onnx.GraphProto, opset: int) -> None:
    """ONNX's down-converter (18 -> 17) moves ``axes`` back into an attribute but keeps the
    ``noop_with_empty_axes`` attribute, which opset 17 does not have. With axes present (or the
    default 0) the attribute changes nothing and is dropped; a no-op reduction cannot be written."""
    for node in graph.node:
        if node.op_type not in _REDUCE_18 or opset >= 18 or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: a for a in node.attribute}
        noop = attrs.get("noop_with_empty_axes")
        if noop is None:
            continue
        if noop.i and "axes" not in attrs and len(node.input) < 2:
            raise TargetError(f"--opset {opset}: node {node.name!r} ({node.op_type}) is a no-op reduction "
                              "(noop_with_empty_axes=1 without axes), which opsets before 18 cannot express.")
        node.attribute.remove(noop)


# ---------------------------------------------------------------- exporting and verifying


@dataclasses.dataclass
class Exported:
    """The artifact in the work folder and what its verification measured (``report`` goes in the receipt)."""

    target: str
    files: list[Path]
    report: dict[str, Any]


def export(
    prepared_path: Path,
    baseline_path: Path | None,
    options: ExportOptions,
    workdir: Path,
    *,
    evalset: Sequence[dict[str, np.ndarray]],
    task: str,
    inputs: Any,
    reference_runs: tuple[Any, Any],
    output_names: list[str],
    threads: int | None = None,
    measure_latency: bool = True,
    stem: str = "model",
    loaded: Any = None,
) -> Exported:
    """Convert ``prepared_path`` for ``options.target``, load it in the target runtime and verify it.

    ``reference_runs``: (run the prepared ONNX in ORT, run the input model in ORT), each
    ``batch -> outputs``. ``baseline_path``: the input model prepared the same way, converted
    too for a latency ratio in the target runtime (None: no ratio). ``loaded``: the `LoadedModel`,
    for targets that write more than the graph (genai: the tokenizer and the model's config).
    """
    from slimc.evaluate import Fidelity

    target = registry.get(options.target)
    target.require()
    target.use_source(loaded)
    proto = onnx.load(str(prepared_path), load_external_data=False)
    bad = target.unsupported(proto)
    if bad:
        raise TargetError(registry.describe_unsupported(target.name, bad))
    out_dir = workdir / f"target-{target.name}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    conversion, end_to_end = Fidelity(task, output_names, inputs), Fidelity(task, output_names, inputs)
    run_prepared, run_input = reference_runs
    with _runtime_errors(target.name):
        with progress.step(f"converting for {target.name}"):
            files = target.convert(prepared_path, out_dir, stem)
        with progress.step(f"loading in the {target.name} runtime"):
            runner = target.load(files, threads, proto)
        run_artifact = registry.chunked(runner.run, options.batch_size)
        for batch in progress.bar(evalset, f"verifying in {runner.runtime}", total=len(evalset), unit="batch"):
            got = run_artifact(batch)
            expected = run_prepared(batch)
            if [np.shape(g) for g in got] != [np.shape(e) for e in expected]:
                raise TargetError(f"target {target.name!r}: the artifact's outputs have shapes {[np.shape(g) for g in got]}, "
                                  f"the model's {[np.shape(e) for e in expected]}: the conversion changed the interface.")
            conversion.update(expected, got, batch)
            end_to_end.update(run_input(batch), got, batch)
    report = {
        "target": target.name, "runtime": runner.runtime,
        "files": [{"name": f.name, "bytes": f.stat().st_size} for f in files],
        "bytes": sum(f.stat().st_size for f in files),
        "fidelity_vs_onnx": conversion.result(), "fidelity_vs_input": end_to_end.result(),
        "static_shapes": {k: list(v) for k, v in (options.static_shapes or {}).items()} or None,
        "opset": options.opset,
        "notes": target.notes(proto),
    }
    if measure_latency:  # the artifact is verified: a timing that fails is reported, never raised
        try:
            with _runtime_errors(target.name):
                report["latency"] = _latency(target, runner, baseline_path, out_dir, evalset, options, threads, inputs)
        except SlimcError as exc:
            report["latency"] = {"error": first_line(exc)}
    return Exported(target.name, files, report)


@contextlib.contextmanager
def _runtime_errors(target: str):
    """A converter's or runtime's own exception becomes a `TargetError` with its first line (no traceback)."""
    try:
        yield
    except SlimcError:
        raise
    except Exception as exc:  # noqa: BLE001 - every runtime raises its own types
        raise TargetError(f"target {target!r}: {type(exc).__name__}: {first_line(exc, 600)}") from None


def _latency(target, runner, baseline_path, out_dir: Path, evalset, options: ExportOptions, threads,
             inputs=None) -> dict[str, Any]:
    from slimc.backends.onnxruntime import machine_description
    from slimc.backends.timing import comparison, interleaved, latency_feed

    batch = next(iter(evalset))
    single = latency_feed(batch, inputs, options.batch_size)
    calls, runners = {"after": runner.bind(single)}, {"after": runner}
    if baseline_path is not None:
        base_dir = out_dir / "baseline"
        base_dir.mkdir()
        try:
            base = target.load(target.convert(baseline_path, base_dir, "baseline"), threads,
                               onnx.load(str(baseline_path), load_external_data=False))
            calls, runners = {"before": base.bind(single), **calls}, {"before": base, **runners}
        except TargetError as exc:
            return {"error": f"the input model does not convert for {target.name}: {exc}"}
    stats = interleaved(calls, desc=f"latency in {runner.runtime}")
    result = comparison(stats, single, machine_description(threads).split(", onnxruntime")[0] + f", {runner.runtime}")
    if runner.decode is not None:  # a generating runtime: what a user of it waits for
        with progress.step(f"timing decoding in {runner.runtime}"):
            result["decode"] = registry.decode_latency(runners, np.asarray(single["input_ids"])[0])
    return result


def check_batch_fits(batch: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]] | None) -> None:
    """Pinned non-batch dims must match the data; the batch axis is split by the runners."""
    for name, dims in (shapes or {}).items():
        if name in batch and tuple(np.shape(batch[name])[1:]) != tuple(dims[1:]):
            hint = (f"--seq-len {dims[1]} for text" if len(dims) == 2 else
                    "evaluation data of that size (image folders are resized to the model's input size)")
            raise DataError(f"--static-shapes pins {name} to {'x'.join(map(str, dims))}, but the evaluation data gives "
                            f"{'x'.join(map(str, np.shape(batch[name])))}; make them agree: {hint}.")


def save_artifact(files: Sequence[Path], path: Path, suffix: str, protect: Sequence[Path] = ()) -> list[Path]:
    """Copy the artifact's files beside ``path`` (renamed to its stem), then move them in place together.

    Runtimes find companions by name (``model.xml`` next to ``model.bin``), so they cannot get
    unique names: instead the old main file is removed first and the new one renamed in last,
    under the folder lock. A kill in between leaves no main file, never a main file beside
    another run's companions. A companion that is a file of the input model (``protect``) is refused.
    """
    import os

    from slimc import atomic
    from slimc.onnx_io import check_output_path

    path = Path(path)
    stem = path.name[: -len(suffix)]
    main_stem = files[0].name[: -len(suffix)] if files[0].name.endswith(suffix) else files[0].stem
    names = [stem + f.name[len(main_stem):] for f in files]
    for name in names[1:]:
        check_output_path(path.parent / name, tuple(protect), suffix=Path(name).suffix)
    tmpdir = None
    try:
        tmpdir = atomic.partial_dir(path.parent)
        for f, name in zip(files, names):
            shutil.copyfile(f, tmpdir / name)
        atomic.follow_umask(*(tmpdir / name for name in names))
        written = []
        with atomic.folder_lock(path.parent):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            for name in names[1:] + names[:1]:  # the main file last: it appears only when the rest is there
                os.replace(tmpdir / name, path.parent / name)
                written.append(path.parent / name)
        return written[-1:] + written[:-1]
    except OSError as exc:
        raise OutputPathError(f"could not write {path}: {exc.strerror or exc}") from None
    finally:
        if tmpdir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmpdir)


def check_folder_output(path: Path, protect: Sequence[Path] = ()) -> None:
    """``-o DIR`` of a folder target: a new folder, an empty one, or a genai folder (it holds
    ``genai_config.json``), replaced whole; never the input's folder, one inside it, or one that holds an input file."""
    from slimc.onnx_io import check_output_path

    path = Path(path)
    check_output_path(path, tuple(protect), suffix=path.suffix)
    resolved = path.resolve()
    for src in protect:
        if resolved in Path(src).resolve().parents:
            raise OutputPathError(f"output folder {path} holds the input model's file {src}; replacing it would delete "
                                  "the input. Choose another output folder.")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"output {path} is a file; the genai target writes a folder. Choose a folder path.")
    if path.is_dir() and any(path.iterdir()) and not (path / "genai_config.json").is_file():
        raise OutputPathError(f"output folder {path} is not empty and is not a folder slimc wrote (no genai_config.json); "
                              "slimc replaces an output folder whole, so choose a new or empty folder.")


def save_folder(files: Sequence[Path], path: Path, protect: Sequence[Path] = ()) -> list[Path]:
    """Copy the artifact's files into a partial folder beside ``path``, then swap it in for ``path``.

    Under the folder lock the old folder (if any) is renamed aside and the new one renamed in, so
    ``path`` is at every moment either the old folder whole, absent, or the new one whole.
    """
    import os

    from slimc import atomic

    path = Path(path)
    check_folder_output(path, protect)
    tmpdir = old = None
    try:
        tmpdir = atomic.partial_dir(path.parent)
        for f in files:
            shutil.copyfile(f, tmpdir / f.name)
        atomic.follow_umask(*(tmpdir / f.name for f in files))
        os.chmod(tmpdir, 0o777 & ~atomic.umask())
        with atomic.folder_lock(path.parent):
            if path.exists():
                old = atomic.partial_dir(path.parent)
                os.replace(path, old / path.name)
            os.replace(tmpdir, path)
            tmpdir = None
        return [path / f.name for f in files]
    except OSError as exc:
        raise OutputPathError(f"could not write {path}: {exc.strerror or exc}") from None
    finally:
        for leftover in (tmpdir, old):
            if leftover is not None:
                with contextlib.suppress(OSError):
                    shutil.rmtree(leftover)
