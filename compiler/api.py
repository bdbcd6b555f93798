"""`slimc.compile()`: load -> passes in order (each verified) -> measure -> receipt.

Read top to bottom, this is the whole compiler::

    loaded   = frontends.load(model)                 # any front end -> onnx_ir IR
    pipeline = parse_pipeline(passes)                # names/options -> Pass objects
    baseline = stage(input model)                    # saved, checked, loaded in ORT
    for each pass: apply -> stage -> verify          # checker, ORT, no new NaN, exactness if declared
    receipt  = stats + latency + fidelity            # measured in this run; the fidelity guard warns
                                                     # on a collapse, refuses a miss of max_loss
    target   = export(prepared, target)              # optional: opset, static shapes, an edge
                                                     # runtime's artifact, run in that runtime
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimc import __version__, measure, progress
from slimc import workdir as workdirs
from slimc.analysis import model_stats
from slimc.backends import onnxruntime as ort_backend
from slimc.errors import BackendError, PassFailedError, SlimcError, VerificationError
from slimc.model import LoadedModel
from slimc.onnx_io import check_output_path, copy_model, map_saved_weights, save_onnx, tensor_bytes
from slimc.pass_spec import parse_pipeline
from slimc.pipeline import Pass, PassContext, PassReport
from slimc.receipt import Receipt
from slimc.subbatch import run_all
from slimc.verify import check_model_file, compare_runs

log = logging.getLogger("slimc")
VERIFY_BATCHES = 2
# Weights from which a stage file keeps external data even when the model had none (see `_stage`).
STAGE_EXTERNAL_BYTES = 64 << 20


@dataclasses.dataclass
class Stage:
    """One model state saved to the work folder and loaded in ORT (sharing the IR's weight arrays)."""

    label: str
    path: Path
    session: Any
    full_check: bool = True  # False when only the basic checker passed (inputs only)
    batch_size: int | None = None  # a batch axis pinned by --static-shapes: batches are split to fit
    threads: int | None = None
    shared: dict[str, np.ndarray] | None = None  # the arrays the session uses in place (`create_session`)

    def suspend(self) -> bool:
        """Drop the session, to be rebuilt by `resume` from the stage file: what it holds of its own
        (a quantized model's prepacked weights, the float32 copies ORT makes of float16 weights) goes."""
        if self.session is None:
            return False
        ort_backend.release_mapped_pages(getattr(self.session, "slimc_arrays", []))
        self.session = None
        ort_backend.return_freed_memory()
        return True

    def resume(self) -> None:
        """The session `suspend` dropped, built again from the stage file (same options, same shared arrays)."""
        if self.session is None:
            self.session = ort_backend.create_session(self.path, self.threads, shared=self.shared)

    def run(self, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        from slimc.backends.targets import chunked

        from slimc.backends import pages

        shared = getattr(self.session, "slimc_arrays", [])
        if sum(a.nbytes for a in shared) < STAGE_EXTERNAL_BYTES:
            return chunked(lambda b: ort_backend.run(self.session, b), self.batch_size)(batch)
        # large weights shared with the IR: their pages are released while the session reads them (every
        # 20 ms, `slimc.backends.pages`) and after the run, so this model's weights are never resident whole
        # next to the other model's session (read back from the page cache as needed)
        with pages.released(shared):
            return chunked(lambda b: ort_backend.run(self.session, b), self.batch_size)(batch)

    def run_outputs(self, names: list[str]):
        """``run`` that returns only the outputs ``names``, in that order: compared models may differ in
        outputs (layerskip removes a layer's KV-cache outputs with the layer), they are paired by name."""
        order = [o.name for o in self.session.get_outputs()]
        if order == list(names):
            return self.run
        index = [order.index(n) for n in names]
        return lambda batch: (lambda outs: [outs[i] for i in index])(self.run(batch))

    def common_outputs(self, other: Stage) -> list[str]:
        """This model's output names that ``other`` has too, in this model's order."""
        theirs = {o.name for o in other.session.get_outputs()}
        return [o.name for o in self.session.get_outputs() if o.name in theirs]

    @property
    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))


@dataclasses.dataclass
class CompileResult:
    """The compiled model, its receipt, and ``save()``."""

    model: ir.Model
    receipt: Receipt
    loaded: LoadedModel
    exported: Any = None  # slimc.export.Exported, when a target other than plain ONNX was asked for
    module: Any = None  # backend="triton": the torch.fx.GraphModule (trainable; Triton kernels on CUDA)
    _workdir: Any = dataclasses.field(repr=False, default=None)
    _example: Any = dataclasses.field(repr=False, default=None)  # a batch to trace the .pt2 with
    _program: Any = dataclasses.field(repr=False, default=None)
    _generator: Any = dataclasses.field(repr=False, default=None)  # (threads, TextGenerator) of generate()
    _external_input: bool = False  # the input's weights were in external data files: so are the result's

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Write the model (or the target's artifact, with its companion files) atomically; refuses
        to overwrite the input. ONNX weights go to external data above ~1.8 GB, and when the input's
        were in external data (streamed, never serialized into one protobuf). With the triton
        backend a ``.pt2`` path gets the torch module as a ``torch.export`` program (load it with
        `slimc.backends.triton.module.load`); a ``.onnx`` path still gets the compressed ONNX."""
        from slimc.backends import targets

        if self.module is not None and str(path).endswith(".pt2"):
            from slimc.backends.triton import module as torch_backend

            check_output_path(Path(path), self.loaded.source_paths, suffix=".pt2")
            if self._program is None:
                self._program = torch_backend.export_program(self.module, self._example, self.model)
            return [torch_backend.save(self._program, path)]
        if self.exported is None or self.exported.target == "onnx":
            check_output_path(Path(path), self.loaded.source_paths)
            return save_onnx(self.model, path, protect=self.loaded.source_paths,
                             external_data=True if self._external_input else None)
        target = targets.get(self.exported.target)
        from slimc.export import save_artifact, save_folder

        if target.folder:
            written = save_folder(self.exported.files, Path(path), protect=self.loaded.source_paths)
        else:
            check_output_path(Path(path), self.loaded.source_paths, suffix=target.suffix)
            written = save_artifact(self.exported.files, Path(path), target.suffix, protect=self.loaded.source_paths)
        if self.receipt.target is not None:  # the receipt names the files as written, not as in the work folder
            self.receipt.target["files"] = [{"name": p.name, "bytes": p.stat().st_size} for p in written]
        return written

    def generate(self, prompt: str | list[str], *, chat: bool = False, on_text=None, threads: int | None = None,
                 tokenizer: Any = None, **options: Any):
        """Generate text with the compressed model (a causal LM with the KV cache; see docs/generate.md):
        returns a `slimc.textgen.GenerationResult` (``.text``, ``.tokens``, ``.stats``). ``options``:
        ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``eos_token_ids``. The session
        is built on the first call and kept for the next. ``tokenizer``: a folder or tokenizer object,
        for a model loaded without one (an ``.onnx`` file)."""
        from slimc.errors import ModelLoadError
        from slimc.textgen import load_tokenizer, stage_model

        if tokenizer is not None:
            self.loaded.tokenizer = load_tokenizer(Path(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
            self._generator = None
        if self._generator is None or self._generator[0] != threads:
            if self.loaded.tokenizer is None:
                raise ModelLoadError("this model has no tokenizer to turn a prompt into ids: pass tokenizer=FOLDER "
                                     "(where its tokenizer was saved), or compile it from a folder that holds one.")
            folder = self.loaded.source_paths[0] if self.loaded.source_paths else None
            folder = folder if folder is not None and Path(folder).is_dir() else None
            work = Path(workdirs.new("generate").name) if self._workdir is None else Path(self._workdir.name)
            self._generator = (threads, stage_model(self.model, work, self.loaded.tokenizer, folder, threads,
                                                    generation=getattr(self.loaded, "generation", None)))
        return self._generator[1].generate(prompt, chat=chat, on_text=on_text, **options)


def compile(  # noqa: A001 - the public verb of a compiler
    model: Any,
    passes: str | list | tuple = ("cleanup",),
    *,
    example_inputs: Any = None,
    calibration: Any = None,
    evaluation: Any = None,
    input_names: list[str] | None = None,
    dynamic: bool = True,
    verify: bool = True,
    measure_latency: bool = True,
    threads: int | None = None,
    seq_len: int = 128,
    seed: int = 0,
    target: str | None = None,
    opset: int | None = None,
    static_shapes: dict[str, Any] | str | None = None,
    backend: str = "onnxruntime",
    device: str | None = None,
    max_loss: float | str | None = None,
    kv_cache: bool | None = None,
) -> CompileResult:
    """Compress ``model`` with ``passes`` and return the result with its receipt.

    ``model``: an ``.onnx`` path, Hugging Face folder, ``.gguf`` or ``.pt2`` file, an
    ``nn.Module`` (with ``example_inputs``), or an ``onnx_ir.Model`` (copied, never modified).
    ``calibration`` / ``evaluation``: a text file, image folder, ``.npz``, or in-memory
    tensors (see `slimc.data.load`). Without ``evaluation`` fidelity is measured on synthetic
    inputs and the receipt says so.

    ``target`` (``onnx``, ``ort-mobile``, ``openvino``, ``ncnn``, ``tflite``, ``executorch``, ``genai``): also
    convert the result for that runtime, run it there on the evaluation data and time it
    (`slimc.export`); ``result.save`` then writes the artifact. ``opset`` converts the ONNX
    opset; ``static_shapes`` (``{"input_ids": (1, 128)}`` or ``"input_ids=1x128"``) pins inputs.

    ``max_loss`` (a number, or bounds such as ``"embedding_cosine>=0.98"``; see
    `slimc.fidelity_guard`): refuse the result with `FidelityGuardError` when its measured fidelity
    fails the bound. Without it, a collapsed fidelity only adds a warning to the receipt.

    ``kv_cache``: export a causal LM (Hugging Face folder, GGUF, transformers module) with past/present
    key-value inputs and outputs (`slimc.kvcache`); None (the default) means yes unless ``dynamic=False``.
    Every feed slimc makes gives such a graph an empty past, so the receipt measures the full forward.
    """
    from slimc import data, fidelity_guard, frontends
    from slimc.export import ExportOptions

    pipeline = parse_pipeline(passes)  # fail fast on a bad spec, before any slow export
    _check_options(threads, seq_len)
    loss_spec = fidelity_guard.parse_max_loss(max_loss)
    _check_backend(backend, target)
    wants_export = target is not None or opset is not None or static_shapes is not None
    options = ExportOptions(target or "onnx", opset, _shapes(static_shapes)) if wants_export else None
    loaded = frontends.load(_copy_if_ir(model), example_inputs, input_names=input_names, dynamic=dynamic,
                            kv_cache=kv_cache)
    if options is not None and options.static_shapes:
        from slimc.export import check_shapes
        from slimc.model import pin_sizes

        check_shapes(loaded.model, options.static_shapes)  # before any (slow) pass
        pin_sizes(loaded.inputs, options.static_shapes)  # synthetic inputs take the pinned sizes
    bounds = fidelity_guard.resolve(loss_spec, loaded.task)  # a metric the task lacks fails before any pass
    calib = data.load(calibration, loaded, seq_len=seq_len, role="calibration") if calibration is not None else None
    evalset = _evaluation_set(evaluation, loaded, seq_len, seed)
    verify_batches = [batch for _, batch in zip(range(VERIFY_BATCHES), evalset)]

    workdir = workdirs.new("run")
    work = Path(workdir.name)
    budget = _output_budget(loaded)
    weight_bytes = tensor_bytes(loaded.model)
    external_input = _has_external_data(loaded.model)
    baseline = _stage("input", loaded.model, work / "00-input.onnx", threads, full_check=True)
    try:
        run_all(baseline.run, verify_batches, budget)
    except BackendError as exc:
        if not evalset.synthetic:
            raise
        raise measure.synthetic_failure(exc, loaded.inputs, evalset) from None
    full_check = baseline.full_check
    before = {**model_stats(loaded.model, verify_batches[0]), "bytes_on_disk": baseline.bytes_on_disk}
    verification = [{"pass": "input", "result": "full ONNX checker, loads in ORT" if full_check else
                     "fails the full ONNX checker (strict shape inference); later passes are held to the basic checker"}]

    ctx = PassContext(loaded=loaded, calibration=calib, seed=seed, target=options.target if options else None,
                      threads=threads)
    current, reports = baseline, []
    # the stage a quantizing pass started from (its error is measured against it): kept only for the triton
    # backend, so that other runs release each intermediate session (and its weights) when the next one is made
    before_quantizer = baseline
    teacher_stage = None  # the input of the first lossy pass, for passes that distill toward it
    wants_teacher = any(getattr(p, "needs_teacher", False) for p in pipeline)
    for index, pass_ in enumerate(pipeline, start=1):
        # the weights the stage sessions touched leave this process's resident set while the pass works on
        # its own views of them (a copied model maps the files again); they are read back when next run
        ort_backend.release_mapped_pages([*baseline.session.slimc_arrays, *current.session.slimc_arrays])
        if wants_teacher and teacher_stage is None and not pass_.exact and not getattr(pass_, "needs_teacher", False):
            teacher_stage = current
        fidelity_before = _teacher_context(pass_, ctx, teacher_stage, reports, baseline, current, evalset, loaded, budget)
        report = _run_pass(pass_, loaded.model, ctx, [p.name for p in pipeline[: index - 1]])
        ctx.teacher = None  # its weights go with it
        ort_backend.return_freed_memory()  # the pass's scratch (protos, candidate sessions) back to the system
        # and the shared weights it read (a quantizer's reference runs) leave the resident set again
        ort_backend.release_mapped_pages([*baseline.session.slimc_arrays, *current.session.slimc_arrays])
        reports.append(report)
        path = work / f"{index:02d}-{pass_.name}.onnx"
        if pass_.name in QUANTIZERS and backend == "triton":
            before_quantizer = current
        current, result = _verified_stage(pass_, loaded.model, path, current, verify_batches, threads, full_check,
                                          verify, reports, budget)
        verification.append({"pass": pass_.name, "result": result})
        if fidelity_before is not None:  # the receipt shows what the pass recovered, on the evaluation data
            report.details["fidelity_before"] = fidelity_before
            report.details["fidelity_after"] = measure.measured(
                "fidelity", lambda: measure.fidelity(baseline, current, evalset, loaded, budget))

    if options is not None and options.changes_onnx:
        current = _prepared_stage(loaded, options, work / f"{len(pipeline) + 1:02d}-export.onnx", verify_batches,
                                  threads, full_check and verify)
        verification.append({"pass": "export (" + _describe(options) + ")", "result": "full ONNX checker, loads in ORT"})

    # the input's weights, read by the last verification, leave the resident set until the measurements read them
    ort_backend.release_mapped_pages([*baseline.session.slimc_arrays, *current.session.slimc_arrays])
    after = {**model_stats(loaded.model, verify_batches[0]), "bytes_on_disk": current.bytes_on_disk}
    # The passes succeeded and are verified: from here on a measurement that fails is reported as
    # not measured in the receipt, never allowed to lose the result.
    # large models: the stage sessions (a quantized model's prepacked weights, ORT's float32 copies of
    # float16 weights) are not kept next to the latency sessions, each of which packs a copy of its
    # model's weights; they are rebuilt from the stage files afterwards
    suspended = [s for s in {id(s): s for s in (baseline, current)}.values()
                 if measure_latency and weight_bytes >= ort_backend.LEAN_BYTES and s.suspend()]
    latency = measure.measured("latency", lambda: measure.latency(baseline, current, verify_batches[0], loaded.inputs,
                                                                  threads, weight_bytes)) if measure_latency else None
    for stage in suspended:
        stage.resume()
    decode = measure.measured("decode speed", lambda: _decode(baseline, current, verify_batches[0], loaded, seq_len, threads,
                                                               weight_bytes)) if measure_latency and _generates(current) else None
    fidelity = measure.measured("fidelity", lambda: measure.fidelity(baseline, current, evalset, loaded, budget))
    guard = fidelity_guard.check(fidelity, loaded.task, bounds)  # refuses before the (slow) export
    for warning in guard["warnings"]:
        log.warning("warning: %s", warning)
    exported = None
    if options is not None and options.target != "onnx":
        exported = _export(options, baseline, current, work, evalset, loaded, threads, measure_latency)
    module = backend_report = None
    if backend == "triton":
        from slimc.backends.triton import module as torch_backend
        from slimc.onnx_io import load_onnx

        module, backend_report = torch_backend.build(
            loaded.model, ort_run=current.run, baseline_run=baseline.run,
            unquantized_run=None if before_quantizer is baseline else before_quantizer.run,
            baseline_model=load_onnx(baseline.path),
            evalset=evalset, task=loaded.task, inputs=loaded.inputs, measure_latency=measure_latency, device=device,
            max_output_bytes=budget)
    receipt = Receipt(
        source=loaded.source, task=loaded.task, passes=reports, before=before, after=after, fidelity=fidelity,
        verification=verification, latency=latency, notes=_notes(loaded, calib, evalset), version=__version__,
        target=exported.report if exported is not None else None, backend=backend_report,
        fidelity_guard=guard, warnings=list(guard["warnings"]), decode=decode,
    )
    result = CompileResult(model=loaded.model, receipt=receipt, loaded=loaded, exported=exported, module=module,
                           _workdir=workdir, _example=verify_batches[0], _external_input=external_input)
    weakref.finalize(result, workdir.cleanup)
    # The sessions go now, and the pages of the weights they shared leave the resident set: replaced
    # tensors sit in reference cycles of the IR until a garbage collection would unmap them.
    for stage in {id(s): s for s in (baseline, current, before_quantizer)}.values():
        ort_backend.release_mapped_pages(getattr(stage.session, "slimc_arrays", []))
        stage.session = None
    ort_backend.return_freed_memory()
    return result


BACKENDS = ("onnxruntime", "triton")
QUANTIZERS = ("int8", "int4", "fp16")


def _generates(stage: Stage) -> bool:
    """Whether the staged model has the KV-cache interface (`slimc.kvcache`): its decode speed is measured."""
    from slimc.textgen import spec_from_session

    return spec_from_session(stage.session) is not None


def _decode(baseline: Stage, current: Stage, batch, loaded: LoadedModel, seq_len: int, threads, weight_bytes) -> dict:
    """The receipt's decode figures (`slimc.measure_decode`): time to first token, decode tokens/s."""
    from slimc.measure_decode import decode

    vocab = next((s.high for s in loaded.inputs if s.name == "input_ids" and s.kind == "tokens"), None)
    folder = next((p for p in loaded.source_paths[:1] if Path(p).is_dir()), None)
    mapped = [*getattr(baseline.session, "slimc_arrays", []), *getattr(current.session, "slimc_arrays", [])]
    return decode({"before": baseline.path, "after": current.path}, batch, seq_len, vocab=vocab, folder=folder,
                  threads=threads, weight_bytes=weight_bytes, mapped=mapped)


def _check_options(threads: Any, seq_len: Any) -> None:
    from slimc.errors import OptionError

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise OptionError(f"threads={threads!r}: give a whole number >= 1, or omit it to use all cores.")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise OptionError(f"seq_len={seq_len!r}: give a whole number of tokens >= 1 (the default is 128).")


def _check_backend(backend: str, target: str | None) -> None:
    from slimc.errors import MissingExtraError, TargetError

    if backend not in BACKENDS:
        raise TargetError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}.")
    if backend != "triton":
        return
    if target not in (None, "onnx"):
        raise TargetError(f"--target {target} converts the ONNX result for another runtime; with --backend triton the "
                          "artifact is a torch.export .pt2. Run the two separately.")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingExtraError("the triton backend needs PyTorch: scripts/install.sh (or pip install 'slimc[torch]'), "
                                "plus 'pip install triton' for the GPU kernels.") from None


def _shapes(static_shapes: Any) -> Any:
    """A mapping's dims as int tuples; the CLI's ``"x=1x3x8x8"`` form is parsed by `ExportOptions`."""
    if isinstance(static_shapes, dict):
        return {k: tuple(int(d) for d in v) for k, v in static_shapes.items()} or None
    return static_shapes


def _describe(options) -> str:
    parts = [f"opset {options.opset}"] if options.opset is not None else []
    parts += [f"{k}={'x'.join(map(str, v))}" for k, v in (options.static_shapes or {}).items()]
    return ", ".join(parts)


def _prepared_stage(loaded: LoadedModel, options, path: Path, verify_batches, threads, full_check) -> Stage:
    """The result with the export options applied (opset, static shapes), saved, checked and run."""
    from slimc.export import check_batch_fits, prepare

    for batch in verify_batches:  # the first evaluation batches: the rest have the same shape
        check_batch_fits(batch, options.static_shapes)
    with progress.step("preparing the export (" + _describe(options) + ")"):
        loaded.model = prepare(loaded.model, options)
    stage = _stage("export", loaded.model, path, threads, full_check=full_check)
    stage.batch_size = options.batch_size
    run_all(stage.run, verify_batches, None)  # whole batches: a pinned batch axis splits them itself
    return stage


def _export(options, baseline: Stage, current: Stage, work: Path, evalset, loaded: LoadedModel, threads, measure_latency):
    from slimc.export import export, prepare
    from slimc.onnx_io import load_onnx

    baseline_path = baseline.path
    if options.changes_onnx and measure_latency:  # the input model, prepared the same way, for the ratio
        baseline_path = work / "00-input-prepared.onnx"
        try:
            save_onnx(prepare(load_onnx(baseline.path), options), baseline_path)
        except Exception as exc:  # noqa: BLE001 - only the latency ratio needs it: time the result alone
            log.warning("the input model could not be prepared for a latency ratio: %s", exc)
            baseline_path = None
    names = [o.name for o in current.session.get_outputs()]
    # the input model's outputs paired by name (layerskip drops a removed layer's KV-cache outputs)
    run_input = baseline.run_outputs(names) if names == current.common_outputs(baseline) else baseline.run
    return export(current.path, baseline_path if measure_latency else None, options, work, evalset=evalset,
                  task=loaded.task, inputs=loaded.inputs, reference_runs=(current.run, run_input),
                  output_names=names, threads=threads, measure_latency=measure_latency, loaded=loaded)


def _copy_if_ir(model: Any) -> Any:
    # The caller's objects must not change: passes work in place on our own copy.
    if isinstance(model, ir.Model):
        return copy_model(model)
    if isinstance(model, LoadedModel):
        return dataclasses.replace(model, model=copy_model(model.model), inputs=[dataclasses.replace(s) for s in model.inputs])
    return model


def _evaluation_set(evaluation: Any, loaded: LoadedModel, seq_len: int, seed: int):
    from slimc import data

    if evaluation is not None:
        return data.load(evaluation, loaded, seq_len=seq_len, role="evaluation")
    # A different seed from any calibration default: synthetic eval data is still held out.
    return data.synthetic(loaded.inputs, n_batches=4, seed=seed + 1000, sizes={"seq": min(seq_len, 64)})


def _stage(label: str, model: ir.Model, path: Path, threads, *, full_check: bool) -> Stage:
    """Save ``model``, check it and load it in ORT, the session sharing the IR's weight arrays."""
    passed_full = full_check
    with progress.step(f"saving and checking {label}"):
        # external data for memory-mapped or large weights (streamed, no proto copy); the weights a pass
        # made in memory then become maps of the file written (freed from the heap, pages releasable)
        external = _has_external_data(model) or tensor_bytes(model) >= STAGE_EXTERNAL_BYTES
        save_onnx(model, path, external_data=True if external else None)
        if external and map_saved_weights(model, path, min_bytes=ort_backend.SHARE_MIN_BYTES):
            # the pass's arrays are maps of the file now: their heap memory goes back to the system (glibc
            # keeps freed blocks below its mmap threshold resident otherwise)
            ort_backend.return_freed_memory()
        if full_check:
            try:
                check_model_file(path, full=True)
            except VerificationError as exc:
                if label != "input":
                    raise
                log.warning("the input model fails the full ONNX checker (%s); using the basic checker", exc)
                check_model_file(path, full=False)
                passed_full = False
        else:
            check_model_file(path, full=False)
        # float models: verification and fidelity sessions use the IR's arrays in place (no copy per session)
        shared = ort_backend.shareable_initializers(model) if ort_backend.shares_weights(model) else None
        session = ort_backend.create_session(path, threads, shared=shared)
    return Stage(label=label, path=path, session=session, full_check=passed_full, threads=threads, shared=shared)


def _output_budget(loaded: LoadedModel) -> int | None:
    """Output bytes per run before a batch is split into sub-batches of rows (an LM's [batch, seq, vocab]
    logits); None for inputs with a fixed batch size, which cannot take fewer rows."""
    from slimc.subbatch import OUTPUT_BUDGET_BYTES

    dynamic = all(not s.shape or not isinstance(s.shape[0], int) for s in loaded.inputs)
    return OUTPUT_BUDGET_BYTES if dynamic else None


def _has_external_data(model: ir.Model) -> bool:
    """Whether any initializer is read from an external data file (the work copy then keeps external data:
    ONNX Runtime memory-maps it, and the checker refuses the absolute paths an inline copy would carry)."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _teacher_context(pass_: Pass, ctx: PassContext, teacher_stage: Stage | None, reports: list[PassReport], baseline: Stage,
                     current: Stage, evalset, loaded: LoadedModel, budget) -> dict | None:
    """Give a distilling pass its teacher (the first lossy pass's input, read from its stage file) and the
    reports so far; returns the fidelity before it (None when the pass needs no teacher or has none)."""
    from slimc.onnx_io import load_onnx

    ctx.previous = list(reports)
    if not getattr(pass_, "needs_teacher", False) or teacher_stage is None:
        return None
    ctx.teacher, ctx.teacher_label = load_onnx(teacher_stage.path), teacher_stage.label
    return measure.measured("fidelity", lambda: measure.fidelity(baseline, current, evalset, loaded, budget))


def _run_pass(pass_: Pass, model: ir.Model, ctx: PassContext, before: list[str]) -> PassReport:
    start = time.perf_counter()
    try:
        with progress.step(f"pass {pass_.name}"):
            report = pass_.apply(model, ctx)
    except SlimcError:
        raise
    except Exception as exc:
        after = f" (after {', '.join(before)})" if before else " (first pass)"
        raise PassFailedError(f"pass '{pass_.name}'{after} failed: {type(exc).__name__}: {exc}") from exc
    report.seconds = time.perf_counter() - start
    return report


def _verified_stage(pass_, model, path, previous: Stage, batches, threads, full_check, verify, reports,
                    budget) -> tuple[Stage, str]:
    where = f"pass '{pass_.name}'" + (f" (after {', '.join(r.name for r in reports[:-1])})" if len(reports) > 1 else "")
    try:
        stage = _stage(pass_.name, model, path, threads, full_check=full_check and verify)
    except SlimcError as exc:
        raise PassFailedError(f"{where} produced an invalid model: {exc}") from None
    checker = "full ONNX checker" if full_check and verify else "basic ONNX checker"
    names = stage.common_outputs(previous)
    exact = pass_.exact and verify
    # Both models side by side in sub-batches (no batch's outputs kept). NaN/inf is always checked, lossy
    # passes and verify=False included: a model that answers NaN is never a compression result worth writing.
    try:
        diff, bad = compare_runs(previous.run_outputs(names), stage.run_outputs(names), batches, names,
                                 max_output_bytes=budget, exact=exact)
    except SlimcError as exc:
        raise PassFailedError(f"{where} produced an invalid model: {exc}") from None
    if bad is not None:
        raise PassFailedError(
            f"{where} made output '{bad.output}' NaN or inf on {bad.count} of {bad.total} values where the model "
            "before it was finite (on the first evaluation batches). Nothing was written; try milder options, "
            "or report it if the options were reasonable."
        )
    if not exact:
        return stage, f"{checker}, loads in ORT" + ("" if pass_.exact else " (lossy pass: fidelity in the receipt)")
    if not diff.ok:
        raise PassFailedError(
            f"{where} declares itself exact but changed output '{diff.output}' by {diff.max_abs:.3g} "
            f"({diff.max_scaled:.1f}x the tolerance). This is a bug in the pass; please report it."
        )
    on = f"{len(batches)} batch" + ("es" if len(batches) != 1 else "")
    return stage, f"{checker}, loads in ORT, exact (max abs diff {diff.max_abs:.2g} on {on})"


def _notes(loaded: LoadedModel, calib, evalset) -> list[str]:
    notes = list(loaded.notes)
    if evalset.synthetic:
        notes.append("fidelity was measured on synthetic inputs: pass evaluation data (--eval) for a real measure")
    if calib is not None and not evalset.synthetic and calib.source == evalset.source:
        notes.append("calibration and evaluation data are the same source: fidelity is not held-out")
    return notes
