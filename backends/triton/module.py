"""The torch backend's module: run, check against ONNX Runtime, time, save as ``.pt2``, export to ONNX.

`to_torch` lowers a model (an IR, a `LoadedModel`, or a `CompileResult`) to a `torch.fx.GraphModule`:
positional inputs in the ONNX graph's order (or keywords with the same names, non-identifier
characters replaced by ``_``), a tuple of outputs; ``module.input_names`` / ``output_names`` hold
the ONNX names and ``module.onnx_names`` maps each parameter/buffer to its initializer.

It is an ordinary ``nn.Module``: float weights are parameters (fine-tune it), `torch.compile` it,
`export_program` / `save` it for ``torch.export``, `to_onnx` it. Quantized and sparse matmuls are
``torch.ops.slimc.*`` custom ops: a saved ``.pt2`` loads with `load` (which registers them first).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from slimc import workdir
from slimc.backends.triton.lower import LoweringReport, lower
from slimc.errors import BackendError, OutputPathError, first_line

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "MatMulNBits",
                 "ConvInteger"}
# Agreement with ONNX Runtime on the same IR. Exact graphs: the exactness criterion of the passes
# (slimc.verify). Quantized graphs: relative L2 error, since one rounding step that flips by an ulp
# moves an output by a quantization step; int4 is looser because ONNX Runtime's MatMulNBits
# (accuracy_level=4) also quantizes the activations to int8, which slimc's kernel does not.
QUANT_REL_TOL = 2e-2
FP16_REL_TOL = 1e-2


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_torch(model: Any, *, device: str | None = None, kernels: bool = True, pt2e: bool = False) -> torch.fx.GraphModule:
    """``model`` (an ``onnx_ir.Model``, `LoadedModel` or `CompileResult`) as a `torch.fx.GraphModule`
    (``pt2e``: ready for the ``decomposed("pt2e")`` export form, see `lower`)."""
    ir_model = getattr(model, "model", model)
    if not isinstance(ir_model, ir.Model):
        raise BackendError(f"to_torch takes slimc's IR, a LoadedModel or a CompileResult, not {type(model).__name__}")
    gm, report = lower(ir_model, kernels=kernels, pt2e=pt2e)
    gm.lowering = report
    return gm.to(device or default_device())


def feed(gm: torch.fx.GraphModule, batch: dict[str, Any], device: str | torch.device | None = None) -> list[torch.Tensor]:
    """The batch's arrays as tensors in the module's input order, dtypes as the ONNX graph declares."""
    device = device or next((t.device for t in list(gm.parameters()) + list(gm.buffers())), "cpu")
    dtypes = getattr(gm, "input_dtypes", {})
    args = []
    for name in gm.input_names:
        if name not in batch:
            raise BackendError(f"the module needs input '{name}' but the data has only {', '.join(batch)}")
        t = torch.as_tensor(np.asarray(batch[name])) if not isinstance(batch[name], torch.Tensor) else batch[name]
        args.append(t.to(device=device, dtype=dtypes.get(name, t.dtype)))
    return args


def run(gm: torch.fx.GraphModule, batch: dict[str, Any]) -> list[np.ndarray]:
    """One batch through the module (no gradients), outputs as numpy arrays in ONNX output order."""
    with torch.no_grad():
        try:
            out = gm(*feed(gm, batch))
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"the torch module failed to run: {type(exc).__name__}: {first_line(exc, 500)}") from None
    return [o.detach().float().cpu().numpy() if o.dtype in (torch.bfloat16,) else o.detach().cpu().numpy() for o in out]


def tolerance_kind(model: ir.Model) -> str:
    ops = {n.op_type for n in model.graph}
    if ops & QUANTIZED_OPS:
        return "quantized"
    if any(v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values()):
        return "fp16"
    return "exact"


def relative_l2(reference: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """The worst ``||got - ref|| / ||ref||`` over every float output of every batch."""
    rel = 0.0
    for ref_batch, got_batch in zip(reference, got, strict=True):
        for ref, out in zip(ref_batch, got_batch, strict=True):
            if ref.shape != out.shape:
                raise BackendError(f"the torch module's output has shape {out.shape}, ONNX Runtime's {ref.shape}")
            if np.issubdtype(ref.dtype, np.floating):
                r, o = ref.astype(np.float64), out.astype(np.float64)
                rel = max(rel, float(np.linalg.norm(r - o) / max(np.linalg.norm(r), 1e-30)))
    return rel


def agreement(reference: list[list[np.ndarray]], got: list[list[np.ndarray]], names: list[str], kind: str,
              quantization_error: float = 0.0) -> dict[str, Any]:
    """How closely the module's outputs follow ONNX Runtime's on the same batches, and whether that passes.

    ``quantization_error``: the relative L2 error of the quantized model in ORT against the model
    before its quantizing pass. Rounding ties that an ulp of difference upstream flips by one step are part of it: on
    models with large activation outliers (SmolLM2: one int8 step of a per-tensor scale is ~1.0)
    two correct int8 implementations differ by a sizeable fraction of the quantization error
    itself, so a quantized graph passes within ``max(QUANT_REL_TOL, quantization_error)``.
    """
    from slimc.verify import outputs_match

    rel = relative_l2(reference, got)
    diff = outputs_match(reference, got, names)
    if kind == "exact":
        ok, rule = diff.ok, "exact (slimc's exactness tolerance)"
    else:
        tol = max(QUANT_REL_TOL, quantization_error) if kind == "quantized" else FP16_REL_TOL
        # Or within the exact tolerance: outputs near zero (a degenerate random model) have no useful relative error.
        ok = diff.ok or (rel <= tol and np.isfinite(diff.max_abs))
        rule = (f"{kind}: relative L2 error <= {tol:.3g}" + (" (the quantization error itself, vs the model before quantization)"
                if kind == "quantized" and tol > QUANT_REL_TOL else "") + " or within the exact tolerance")
    return {"max_abs_diff": diff.max_abs, "relative_l2": rel, "batches": len(reference), "criterion": rule, "ok": bool(ok),
            "worst_output": diff.output}


def dynamic_shapes(gm: torch.fx.GraphModule, model: ir.Model | None) -> dict[str, dict[int, Any]] | None:
    """``torch.export`` dynamic dims: every symbolic dim of ``model``'s inputs (``Dim.DYNAMIC``: export
    infers the relations); None without a model (all static)."""
    if model is None:
        return None
    spec = {}
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    for name, value in zip(placeholders, [v for v in model.graph.inputs if v.const_value is None]):
        dims = {i: torch.export.Dim.DYNAMIC for i, d in enumerate(value.shape or ()) if not isinstance(d, int)}
        spec[name] = dims or None
    return spec


def export_program(gm: torch.fx.GraphModule, batch: dict[str, Any], model: ir.Model | None = None, *, dynamic: bool = True):
    """A ``torch.export.ExportedProgram`` of the module, traced on ``batch``; symbolic ONNX dims stay dynamic."""
    args = tuple(feed(gm, batch))
    try:
        return torch.export.export(gm, args, dynamic_shapes=dynamic_shapes(gm, model) if dynamic else None, strict=False)
    except Exception as exc:
        raise BackendError(f"torch.export failed on the lowered module: {type(exc).__name__}: {first_line(exc, 800)}") from None


def save(program, path: str | os.PathLike) -> Path:
    """``torch.export.save`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    import warnings

    from slimc.onnx_io import atomic_output

    with atomic_output(path, ".pt2") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.export.save warns about its own weight grouping
        torch.export.save(program, str(tmp))
    return Path(path)


def load(path: str | os.PathLike):
    """A ``.pt2`` written by slimc: the kernels' custom ops are registered, then the archive is read
    as every ``.pt2`` is (`slimc.frontends.pt2.read_program`: no pickles, no code from the file)."""
    import slimc.kernels  # noqa: F401 - registers torch.ops.slimc.*
    from slimc.frontends.pt2 import read_program

    return read_program(Path(path))


@contextlib.contextmanager
def decomposed(style: str = "reference"):
    """Within this context the kernels run as plain PyTorch ops instead of ``torch.ops.slimc.*``: what
    exporters that do not know slimc's ops trace. ``"reference"``: their reference math (for ONNX);
    ``"pt2e"``: static int8 as ``quantized_decomposed`` quantize/dequantize around float linear/conv,
    the pattern PyTorch's PT2E quantization produces and ExecuTorch's XNNPACK partitioner delegates."""
    from slimc import kernels

    previous = kernels.DECOMPOSE
    kernels.DECOMPOSE = style
    try:
        yield
    finally:
        kernels.DECOMPOSE = previous


def to_onnx(gm: torch.fx.GraphModule, batch: dict[str, Any], path: str | os.PathLike, model: ir.Model | None = None,
            *, opset: int = 18) -> Path:
    """Export the module (fine-tuned or not) back to ONNX with ``torch.onnx.export`` (dynamo).

    Quantized and sparse matmuls are exported as their reference math on the stored integer or
    compressed weights (the storage stays small; the ops are standard ONNX), not as the original
    QDQ/MatMulNBits nodes.
    """
    from slimc.frontends.torch_module import quiet_exporter
    from slimc.onnx_io import atomic_output

    args = tuple(feed(gm.cpu(), batch, "cpu"))
    try:
        with atomic_output(path, ".onnx") as tmp, decomposed(), quiet_exporter():
            program = torch.onnx.export(gm, args, dynamo=True, dynamic_shapes=dynamic_shapes(gm, model),
                                        opset_version=opset, input_names=list(gm.input_names),
                                        output_names=list(gm.output_names), external_data=False, optimize=False)
            program.save(str(tmp))
    except (OutputPathError, BackendError):
        raise
    except Exception as exc:
        raise BackendError(f"exporting the torch module to ONNX failed: {type(exc).__name__}: {first_line(exc, 800)}") from None
    return Path(path)


def describe_device(device: str) -> tuple[str, str]:
    """(device description, how the kernels run there) for the receipt."""
    from slimc.kernels import _triton

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        impl = "Triton kernels (compiled for CUDA)" if _triton.available() else \
            "PyTorch references (triton is not installed: pip install triton)"
        return f"{name}, torch {torch.__version__}", impl
    import platform

    from slimc.backends.onnxruntime import cpu_info

    cpu = cpu_info().get("model name") or platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} eager, {torch.get_num_threads()} threads",
            "PyTorch references on the CPU (Triton kernels run on CUDA GPUs; they are tested here under the "
            "Triton interpreter)")


def build(model: ir.Model, *, ort_run, baseline_run, baseline_model: ir.Model, evalset, task: str, inputs,
          measure_latency: bool, device: str | None = None, unquantized_run=None,
          max_output_bytes: int | None = None) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """Lower ``model``, check it against ONNX Runtime on the evaluation batches, measure fidelity and latency.

    ``ort_run``: ONNX Runtime running the same ``model``; ``baseline_run``: the input model in ORT;
    ``unquantized_run``: the model just before its quantizing pass (the quantization error is
    measured against it). A disagreement beyond the tolerance is a slimc bug and raises.
    ``max_output_bytes``: the sub-batch budget the ONNX Runtime fidelity was measured with; the
    module's fidelity is measured on the same sub-batches (see `_fidelity`).
    """
    from slimc import progress

    device = device or default_device()
    with progress.step("lowering to torch.fx (backend triton)"):
        gm = to_torch(model, device=device)
    names = list(gm.output_names)
    batches = list(evalset)
    with progress.step("checking the torch module against ONNX Runtime"):
        got = [run(gm, b) for b in batches]
        deployed = [ort_run(b) for b in batches]
        with _exact_nbits_reference(model) as exact_run:
            ref = [exact_run(b) for b in batches] if exact_run is not None else deployed
        kind = tolerance_kind(model)
        base, qerr = None, 0.0  # base: the input model's outputs, kept when they are needed twice
        if kind == "quantized":
            if unquantized_run is None:
                base = [baseline_run(b) for b in batches]
            qerr = relative_l2(base if base is not None else [unquantized_run(b) for b in batches], deployed)
        agree = agreement(ref, got, names, kind, qerr)
        agree["reference"] = "ONNX Runtime on the same model"
        if kind == "quantized":
            agree["quantization_error_relative_l2"] = qerr
        if exact_run is not None:
            agree["reference"] += (" with MatMulNBits at accuracy_level=0 (the op's definition; at the deployed "
                                   "accuracy_level=4 ORT also quantizes activations to int8)")
            agree["relative_l2_vs_deployed_ort"] = relative_l2(deployed, got)
    if not agree["ok"]:
        raise BackendError(
            f"the lowered torch module disagrees with ONNX Runtime on output '{agree['worst_output']}' (max abs diff "
            f"{agree['max_abs_diff']:.3g}, relative L2 {agree['relative_l2']:.3g}; criterion {agree['criterion']}). "
            "This is a bug in slimc's torch lowering; please report it with the model.")
    fidelity = _fidelity(gm, batches, got, base, baseline_run, task, names, inputs, max_output_bytes)
    machine, impl = describe_device(device)
    report = {"backend": "triton", "device": machine, "kernel_impl": impl, "lowering": gm.lowering.to_json(),
              "agreement_with_onnxruntime": agree, "fidelity": fidelity,
              "latency": _latency(gm, baseline_model, batches[0], device, machine) if measure_latency else None}
    return gm, report


def _fidelity(gm, batches, got, base, baseline_run, task, names, inputs, max_output_bytes) -> dict[str, Any]:
    """The module's task metrics against the input model, on the rows ONNX Runtime's were measured on.

    Rows are not always independent: dynamic int8 (DynamicQuantizeLinear, and its lowering) takes
    one scale over the whole activation tensor, so a batch of 4 rows is quantized more coarsely
    than 4 runs of one row. `compile` measures ORT's fidelity in sub-batches of rows
    (``max_output_bytes``); the module is measured on exactly those sub-batches (the same
    `evaluate` split, driven by the same reference), or the two figures differ by how the rows
    were grouped, not by the lowering. Without a budget the outputs computed for the agreement
    check are reused.
    """
    from slimc import evaluate

    if max_output_bytes is not None:
        return evaluate.evaluate(baseline_run, lambda part: run(gm, part), batches, task, output_names=names,
                                 inputs=inputs, max_output_bytes=max_output_bytes)
    index = {id(b): i for i, b in enumerate(batches)}
    reference_run = (lambda b: base[index[id(b)]]) if base is not None else baseline_run
    return evaluate.evaluate(reference_run, lambda b: got[index[id(b)]], batches, task, output_names=names,
                             inputs=inputs)


@contextlib.contextmanager
def _exact_nbits_reference(model: ir.Model):
    """ORT running ``model`` with every MatMulNBits at accuracy_level=0, or None when none has another level.

    At accuracy_level=4 ORT quantizes the activations of MatMulNBits to int8 (a second, deliberate
    approximation); the lowering computes what the op defines, so it is checked against that.
    """
    nodes = [n for n in model.graph if n.op_type == "MatMulNBits" and "accuracy_level" in n.attributes
             and n.attributes["accuracy_level"].value != 0]
    if not nodes:
        yield None
        return
    from slimc.backends import onnxruntime as ort_backend
    from slimc.onnx_io import copy_model, save_onnx

    exact = copy_model(model)
    for node in exact.graph:
        if node.op_type == "MatMulNBits":
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
    with workdir.new("nbits") as tmp:
        save_onnx(exact, Path(tmp) / "exact.onnx")
        session = ort_backend.create_session(Path(tmp) / "exact.onnx")
        yield lambda batch: ort_backend.run(session, batch)


def _latency(gm, baseline_model: ir.Model, batch, device: str, machine: str) -> dict[str, Any]:
    """Torch eager, one sample: the input model lowered the same way against the result, interleaved."""
    from slimc.backends.timing import comparison, interleaved

    single = {k: v[:1] for k, v in batch.items()}
    try:
        base = to_torch(baseline_model, device=device)
        modules = {"before": base, "after": gm}
        feeds = {k: feed(m, single) for k, m in modules.items()}
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

        def call(m, f):
            with torch.no_grad():
                m(*f)
            sync()

        stats = interleaved({k: (lambda m=m, f=feeds[k]: call(m, f)) for k, m in modules.items()},
                            desc="measuring torch latency")
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {first_line(exc, 300)}"}
    return comparison(stats, single, machine)


__all__ = ["LoweringReport", "agreement", "decomposed", "export_program", "feed", "load", "lower", "run", "save",
           "to_onnx", "to_torch"]
