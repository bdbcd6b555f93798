"""PyTorch front end: an ``nn.Module`` (with example inputs) or an ``ExportedProgram`` -> IR.

The module is traced with ``torch.export`` (non-strict, eval mode) and the program is
translated by ``torch.onnx.export(program, dynamo=True)``, whose ``.model`` is already an
``onnx_ir.Model``, slimc's IR: nothing is serialised in between. The graph is then optimised
as ``optimize=True`` would, minus one rewrite rule whose cost is quadratic in graph size
(`optimize_graph`). Output names come from the forward's return value: dict / ``ModelOutput``
keys (``logits``, ``last_hidden_state``), else ``output_0``, ``output_1``...

Dynamic shapes: by default dim 0 of every tensor input is the batch, and dim 1 of every
integer/bool input of rank >= 2 (token ids, attention masks, token types) is the sequence.
They are declared ``Dim.AUTO`` so a model that pins a dim (e.g. ``x.view(2, -1)``) still
exports, statically there; that is reported in ``LoadedModel.notes`` rather than failing.
``torch.export`` names symbols ``s0``, ``s72``...; afterwards they are renamed ``batch`` /
``seq`` in the IR (every input's batch symbol gets the same name, as do the sequence symbols,
so ONNX sees ``input_ids`` and ``attention_mask`` share one length).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from slimc import progress
from slimc.errors import ExportError, ModelLoadError, first_line
from slimc.model import LoadedModel, infer_input_specs, infer_task

log = logging.getLogger("slimc")

BATCH, SEQ = "batch", "seq"


def is_torch_module(obj: Any) -> bool:
    """True for an ``nn.Module`` or ``ExportedProgram``; never imports torch itself."""
    torch = sys.modules.get("torch")
    if torch is None:  # nobody imported torch, so obj cannot be a torch object
        return False
    return isinstance(obj, (torch.nn.Module, torch.export.ExportedProgram))


def load_module(
    module: Any,
    example_inputs: Any = None,
    *,
    input_names: list[str] | None = None,
    dynamic: bool = True,
    output_names: list[str] | None = None,
    task: str | None = None,
    source: str | None = None,
    label: str | None = None,
) -> LoadedModel:
    """Export ``module`` to the IR and describe its inputs.

    ``example_inputs``: a tensor, a tuple/list of tensors (positional) or a dict name ->
    tensor (keyword arguments). Not needed for an ``ExportedProgram``, whose own dynamic
    dims are kept. ``output_names`` / ``task`` / ``source`` / ``label`` (the name used in
    progress lines and errors) let callers that know the model (the Hugging Face front end)
    override the guesses made here.
    """
    import torch

    name = label or type(module).__name__
    notes: list[str] = []
    if isinstance(module, torch.export.ExportedProgram):
        program = module
    else:
        args, kwargs = _split_example_inputs(module, example_inputs, input_names)
        program = export_program(module, args, kwargs, dynamic=dynamic, label=name)
    if output_names is None:
        output_names = _output_names(program)
    model = program_to_ir(program, input_names=input_names, output_names=output_names, name=name)
    renamed = name_dynamic_dims(model)
    if dynamic and not isinstance(module, torch.export.ExportedProgram):
        notes += _specialised_dims_notes(model, renamed)
    specs = infer_input_specs(model)
    return LoadedModel(
        model=model,
        inputs=specs,
        task=task or infer_task(model, specs),
        source=source or f"{name} (PyTorch module)",
        notes=notes,
    )


def _split_example_inputs(module, example_inputs, input_names) -> tuple[tuple, dict]:
    """Normalise example inputs to (args, kwargs) for ``torch.export``."""
    import torch

    if example_inputs is None:
        raise ModelLoadError(
            f"exporting a {type(module).__name__} needs example inputs: pass example_inputs= a tensor, "
            "a tuple of tensors, or a dict of input name -> tensor with the shapes the model expects."
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise ModelLoadError(
            f"example_inputs must be a tensor, a tuple/list of tensors or a dict of tensors, "
            f"not {type(example_inputs).__name__}."
        )
    if input_names is not None and len(input_names) != len(args) + len(kwargs):
        raise ModelLoadError(
            f"input_names has {len(input_names)} names but there are {len(args) + len(kwargs)} example inputs; "
            "give one name per input."
        )
    return args, kwargs


def dynamic_shapes_for(args: tuple, kwargs: dict) -> tuple | dict:
    """``torch.export`` dynamic_shapes: batch on dim 0, sequence on dim 1 of integer inputs."""
    from torch.export import Dim

    def axes(value):
        if not hasattr(value, "dim") or value.dim() == 0:
            return None
        spec = {0: Dim.AUTO}
        if value.dim() >= 2 and not value.is_floating_point() and not value.is_complex():
            spec[1] = Dim.AUTO
        return spec

    if kwargs:  # keyword inputs: dynamic_shapes is keyed by argument name
        return {key: axes(value) for key, value in kwargs.items()}
    return tuple(axes(value) for value in args)


def _widen(value, spec):
    """Repeat a size-1 dynamic dim to size 2.

    ``torch.export`` specialises dims of size 0 and 1 (they behave specially in
    broadcasting), so an example batch of one would silently freeze the batch size.
    """
    import torch

    if not isinstance(value, torch.Tensor) or not spec:
        return value
    for dim in spec:
        if value.shape[dim] == 1:
            value = torch.cat([value, value], dim=dim)
    return value


def export_program(module, args: tuple, kwargs: dict, *, dynamic: bool = True, label: str | None = None,
                   shapes: Any = None):
    """``torch.export.export`` the module in eval mode, with typed errors. ``shapes``: the caller's own
    ``dynamic_shapes`` (its example already avoids sizes 0 and 1), else `dynamic_shapes_for` when ``dynamic``."""
    import torch

    label = label or type(module).__name__
    dynamic_shapes = shapes if shapes is not None else (dynamic_shapes_for(args, kwargs) if dynamic else None)
    if dynamic_shapes is not None and shapes is None:
        if kwargs:
            kwargs = {k: _widen(v, dynamic_shapes[k]) for k, v in kwargs.items()}
        else:
            args = tuple(_widen(v, s) for v, s in zip(args, dynamic_shapes))
    was_training = module.training
    module.eval()  # dropout and batch-norm statistics must be frozen for inference
    try:
        with progress.step(f"tracing {label} with torch.export"), quiet_exporter():
            return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch raises many unrelated types here
        raise ExportError(_export_failure(label, "torch.export", exc, dynamic)) from exc
    finally:
        module.train(was_training)


def program_to_ir(program, *, input_names=None, output_names=None, name: str = "model") -> ir.Model:
    """Translate an ``ExportedProgram`` to an ``onnx_ir.Model`` (torch.onnx, optimised)."""
    import torch

    n_outputs = len(program.graph_signature.user_outputs)
    if output_names is not None and len(output_names) != n_outputs:
        output_names = None  # a mismatch would make torch.onnx fail; keep its names instead
    try:
        with progress.step(f"exporting {name} to ONNX"), quiet_exporter():
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                optimize=False,  # optimize_graph below: torch's optimize=True minus one slow rule
                verbose=False,
                input_names=input_names,
                output_names=output_names,
            )
            optimize_graph(onnx_program.model)
    except Exception as exc:
        raise ExportError(_export_failure(name, "torch.onnx", exc, dynamic=False)) from exc
    model = onnx_program.model
    model.graph.name = model.graph.name or name
    _fix_numeric_symbols(model)
    return model


def optimize_graph(model: ir.Model) -> None:
    """What ``torch.onnx.export(optimize=True)`` runs, without onnxscript's SlicesSplit rule.

    SlicesSplit matches *pairs* of Slice nodes anywhere in the graph, so its cost grows with
    the square of the graph size: for SmolLM2 (30 layers) it took ~80 s of a ~130 s export,
    to turn RoPE's two half-slices into one Split, which no slimc pass needs. The pipeline
    mirrors ``onnxscript.optimizer.optimize_ir`` (inline, fold constants + rewrite until
    stable, remove unused, lift constants, dedupe, CSE, fix names) and then the same
    ``onnx_fusions.fuse`` torch runs. If onnxscript's rule table moves, fall back to its
    full optimizer rather than skip optimisation.
    """
    import onnx_ir.passes.common as common
    import onnxscript.optimizer
    import onnxscript.rewriter
    import onnxscript.rewriter.onnx_fusions

    default_rules = getattr(onnxscript.rewriter, "_DEFAULT_REWRITE_RULES", None)
    if default_rules is None:
        onnxscript.optimizer.optimize_ir(model)
    else:
        rules = [rule for rule in default_rules if getattr(rule, "name", None) != "SlicesSplit"]
        ir.passes.Sequential(
            common.InlinePass(),
            ir.passes.PassManager(
                [
                    _FoldConstants(),
                    onnxscript.rewriter.RewritePass(rules),
                    common.RemoveUnusedNodesPass(),
                    common.RemoveUnusedFunctionsPass(),
                    common.RemoveUnusedOpsetsPass(),
                ],
                steps=2,
                early_stop=True,
            ),
            common.RemoveUnusedNodesPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common.LiftSubgraphInitializersToMainGraphPass(),
            common.DeduplicateInitializersPass(),
            common.CommonSubexpressionEliminationPass(),
            common.OutputFixPass(),
            common.NameFixPass(),
        )(model)
    onnxscript.rewriter.onnx_fusions.fuse(model)


class _FoldConstants(ir.passes.InPlacePass):
    """onnxscript's public ``fold_constants`` as a pass, with ONNX shape inference on."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnxscript.optimizer

        result = onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True)
        return ir.passes.PassResult(model, bool(result.modified))


def _fix_numeric_symbols(model: ir.Model) -> None:
    """Turn symbolic dims named like a number ("2") into static dims.

    When ``torch.export`` specialises a dim that was marked dynamic, torch.onnx still writes it
    as a symbol whose name is the size; ONNX Runtime would then accept any size there.
    """
    for value in _all_values(model):
        shape = value.shape
        if shape is None or not any(_numeric_symbol(d) for d in shape):
            continue
        value.shape = ir.Shape([int(d.value) if _numeric_symbol(d) else d for d in shape])


def _numeric_symbol(dim) -> bool:
    return isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str) and dim.value.isdigit()


def _export_failure(name: str, stage: str, exc: Exception, dynamic: bool) -> str:
    first = first_line(exc)
    if stage == "torch.onnx":
        hint = (
            "the traced graph uses an op torch.onnx cannot translate; run with --verbose for the full "
            "report, or replace that op in the model (a custom op needs an ONNX translation)."
        )
    elif "data-dependent" in str(exc) or "GuardOnDataDependent" in type(exc).__name__:
        hint = (
            "the model branches on tensor values (Python `if` on a tensor, .item(), nonzero); rewrite that "
            "part with torch.where / torch.cond, or pass inputs that avoid the branch."
        )
    elif dynamic:
        hint = "if the model cannot take a variable batch/sequence length, retry with dynamic=False (--static)."
    else:
        hint = "check that example_inputs match what forward() expects (names, shapes, dtypes)."
    return f"could not export {name} ({stage}): {first}. Hint: {hint}"


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence torch.export / torch.onnx chatter (warnings, logs, prints) unless verbose.

    The exporter warns about missing torchvision ops, deprecated pytree APIs and axis names
    on every call, and on a failed trace prints the whole graph to stderr; none of it is
    actionable for slimc users, whose error says what failed. What was printed goes to the
    debug log when the step fails.
    """
    if progress.verbosity() >= progress.VERBOSE:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript", "transformers")]
    levels = [lg.level for lg in loggers]
    captured = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        log.debug("exporter output before the failure:\n%s", captured.getvalue()[-20000:])
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _output_names(program) -> list[str]:
    """Names for the program's outputs from its pytree: dict/ModelOutput keys, else output_<i>."""
    import torch.utils._pytree as pytree

    spec = program.call_spec.out_spec
    if spec is None:
        return []
    try:
        tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        paths = [path for path, _ in pytree.tree_flatten_with_path(tree)[0]]
    except Exception:  # an exotic output container; fall back to positions
        return [f"output_{i}" for i in range(spec.num_leaves)]
    names: list[str] = []
    for i, path in enumerate(paths):
        parts = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", "")))) for key in path]
        name = "_".join(p for p in parts if p) if any(not p.isdigit() for p in parts) else f"output_{i}"
        names.append(name if name not in names else f"{name}_{i}")
    return names


def name_dynamic_dims(model: ir.Model) -> set[tuple[str, int]]:
    """Rename the exporter's symbols on graph inputs to ``batch`` / ``seq``; return dims renamed.

    A symbol is renamed only when its position says what it is (dim 0; dim 1 of an integer or
    bool input of rank >= 2), and a symbol claimed by both roles keeps its own name: renaming
    it would claim an equality the model does not have.
    """
    roles: dict[str, set[str]] = {}
    where: dict[str, list[tuple[str, int]]] = {}
    for value in model.graph.inputs:
        shape = value.shape or ()
        for dim, role in _dim_roles(value):
            sym = shape[dim]
            if isinstance(sym, ir.SymbolicDim) and isinstance(sym.value, str):
                roles.setdefault(sym.value, set()).add(role)
                where.setdefault(sym.value, []).append((value.name, dim))
    mapping = {sym: next(iter(r)) for sym, r in roles.items() if len(r) == 1 and sym not in (BATCH, SEQ)}
    if mapping:
        _rename_symbols(model, mapping)
    return {pos for sym in mapping for pos in where[sym]}


def _dim_roles(value: ir.Value) -> list[tuple[int, str]]:
    shape = value.shape or ()
    roles = [(0, BATCH)] if len(shape) >= 1 else []
    dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
    if len(shape) >= 2 and (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        roles.append((1, SEQ))
    return roles


def _rename_symbols(model: ir.Model, mapping: dict[str, str]) -> None:
    """Rename symbols in every value's shape, including expressions such as ``s53 + 1``."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
    for value in _all_values(model):
        shape = value.shape
        if shape is None or not any(isinstance(d, ir.SymbolicDim) and isinstance(d.value, str) for d in shape):
            continue
        dims = [
            ir.SymbolicDim(pattern.sub(lambda m: mapping[m.group(1)], d.value))
            if isinstance(d, ir.SymbolicDim) and isinstance(d.value, str) else d
            for d in shape
        ]
        value.shape = ir.Shape(dims)


def _all_values(model: ir.Model) -> list[ir.Value]:
    values = list(model.graph.inputs) + list(model.graph.outputs)
    return values + [out for node in ir.traversal.RecursiveGraphIterator(model.graph) for out in node.outputs]


def _specialised_dims_notes(model: ir.Model, renamed: set[tuple[str, int]]) -> list[str]:
    notes = []
    for value in model.graph.inputs:
        shape = value.shape or ()
        for dim, role in _dim_roles(value):
            if (value.name, dim) not in renamed and isinstance(shape[dim], int):
                notes.append(
                    f"input {value.name!r} dim {dim} ({role}) was exported static ({shape[dim]}): "
                    "the model fixes that size."
                )
    return notes
