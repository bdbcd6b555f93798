"""PyTorch front end: ``nn.Module`` / ``ExportedProgram`` -> ONNX IR via torch.export.

The module is traced with ``torch.export`` and lowered with the dynamo ONNX exporter
(``torch.onnx.export(..., dynamo=True, optimize=True)``), whose result is already an
`onnx_ir.Model`. Dynamic by default: axis 0 of every tensor input is ``batch``; axis 1 of
integer inputs of rank >= 2 (token ids, masks, positions) is ``seq``. torch.export
specialises dims whose example size is 1, so such example inputs are tiled to 2 first.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from typing import Any

from slimc import progress
from slimc.errors import ExportError
from slimc.model import LoadedModel, infer_input_specs, infer_task


def is_torch_module(obj: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(obj, (torch.nn.Module, torch.export.ExportedProgram))


def _normalise(module, example_inputs, input_names) -> tuple[tuple, dict[str, Any]]:
    """(positional args, keyword args) with names for every tensor input."""
    import torch

    if example_inputs is None:
        raise ExportError("an nn.Module needs example_inputs (a tensor, a tuple of tensors, or a dict of keyword tensors).")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    args = tuple(example_inputs)
    if input_names is None:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        input_names = [p.name for p in params[: len(args)]]
        if len(input_names) < len(args):
            input_names = [f"input_{i}" for i in range(len(args))]
    if len(input_names) != len(args):
        raise ExportError(f"{len(input_names)} input names for {len(args)} example inputs.")
    # Keyword form gives the ONNX inputs the forward's parameter names.
    return (), dict(zip(input_names, args))


def _dynamic_shapes(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Dim specs per input and example inputs tiled so no dynamic dim has size 1."""
    import torch
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("seq")
    shapes, tiled = {}, {}
    for name, value in kwargs.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            shapes[name], tiled[name] = None, value
            continue
        dims = {0: batch}
        if not value.is_floating_point() and value.dim() >= 2:
            dims[1] = seq
        repeats = [2 if (axis in dims and value.shape[axis] == 1) else 1 for axis in range(value.dim())]
        shapes[name], tiled[name] = dims, value.repeat(*repeats)
    return shapes, tiled


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress and warns about optional packages; keep that for -v."""
    if progress.verbosity() >= progress.VERBOSE:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    import warnings

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export(module, example_inputs=None, *, input_names=None, output_names=None, dynamic=True, label="model"):
    """Export to an `onnx_ir.Model`. Raises `ExportError` with the cause's first line."""
    import torch

    is_program = isinstance(module, torch.export.ExportedProgram)
    kwargs_args: dict[str, Any] = {}
    shapes = None
    if not is_program:
        module = module.eval()
        _, kwargs_args = _normalise(module, example_inputs, input_names)
        if dynamic:
            shapes, kwargs_args = _dynamic_shapes(kwargs_args)
    try:
        with progress.step(f"exporting {label} to ONNX (torch.export)"), _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module, (), kwargs=kwargs_args or None, dynamo=True, optimize=True, verbose=False,
                dynamic_shapes=shapes, output_names=output_names, report=False,
            )
    except Exception as exc:  # torch raises many types; the user needs the first line and a hint
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        raise ExportError(
            f"exporting {label} to ONNX failed: {type(exc).__name__}: {first}. If the failure is about dynamic "
            "shapes, retry with dynamic=False (--static); if an op is unsupported, export the ONNX yourself and "
            "pass the .onnx file."
        ) from exc
    return program.model


def _output_names(module, kwargs) -> list[str] | None:
    """Names of the outputs from a dry run: dict keys, else output / output_N."""
    import torch

    with torch.no_grad():
        out = module(**kwargs)
    if isinstance(out, dict):
        return [str(k) for k in out]
    if isinstance(out, (tuple, list)):
        return [f"output_{i}" for i in range(len(out))]
    return ["output"]


def load_module(module, example_inputs, *, input_names=None, dynamic=True, task=None, label=None) -> LoadedModel:
    """Export ``module`` and describe it; the task is guessed from the exported graph."""
    import torch

    label = label or type(module).__name__
    output_names = None
    if isinstance(module, torch.nn.Module):
        _, kwargs = _normalise(module.eval(), example_inputs, input_names)
        try:
            output_names = _output_names(module, kwargs)
        except Exception as exc:
            raise ExportError(f"{label} fails on its example inputs: {type(exc).__name__}: {exc}") from None
    model = export(module, example_inputs, input_names=input_names, output_names=output_names, dynamic=dynamic, label=label)
    inputs = infer_input_specs(model)
    return LoadedModel(
        model=model, inputs=inputs, task=task or infer_task(model, inputs), source=f"{label} (PyTorch module, torch.export)",
    )
