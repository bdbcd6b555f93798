"""The student and the teacher of `distill` as torch modules, and the way back into the IR.

- `probes`: intermediate targets, the outputs of the residual blocks `layerskip`'s analysis finds
  (`slimc.passes.skip.blocks`), kept where the teacher has a value of the same name and shape.
- `lower_pair`: both graphs lowered through `slimc.backends.triton.lower` with the probes as extra
  outputs; the student with ``trainable=True`` (int8 weights as float parameters behind fake
  quantization with a straight-through gradient).
- `Trainable`: which parameters train (``all``, ``norms_biases``, ``lora``), their sparsity masks
  (a weight with at least `MASK_MIN_ZEROS` exact zeros keeps them: ``w <- w * m`` after every step)
  and LoRA adapters ``W + B A`` (``B = 0`` at the start, merged before the write-back).
- `write_back`: trained values into the initializers; an int8 weight is re-quantized onto its own
  scale and zero point, ``q = clamp(round(w / s) + z)``, which is exactly what the fake
  quantization computed in training. `Invariants` checks structure, masks and grids afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from slimc.errors import PassFailedError

MASK_MIN_ZEROS = 0.1  # fraction of exact zeros from which a weight is taken to be sparse (its zeros stay)
QDQ = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    found = {v.name: v for v in graph.inputs}
    for node in graph:
        found.update({o.name: o for o in node.outputs if o is not None and o.name})
    return found


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a.shape, b.shape))


def probes(student: ir.Model, teacher: ir.Model) -> tuple[list[str], list[tuple[str, str]]]:
    """Names of block outputs both graphs hold with the same shape (graph outputs excluded)."""
    from slimc.passes.skip import blocks

    try:
        units = blocks.analyse(student).units("block")
    except Exception as exc:  # noqa: BLE001 - an analysis failure only costs the intermediate targets
        return [], [("intermediate targets", f"the residual-block analysis failed ({type(exc).__name__}: {exc})")]
    ours, theirs = _values(student.graph), _values(teacher.graph)
    outputs = {v.name for v in student.graph.outputs}
    names, left = [], []
    for unit in units:
        value = unit.out
        if value is None or value.name in outputs:
            continue
        other = theirs.get(value.name)
        if other is None or not _same_shape(ours[value.name], other) or value.dtype != other.dtype:
            left.append((f"block output {value.name}", "the teacher has no value of that name and shape"))
            continue
        names.append(value.name)
    return names, left


def lower_with(model: ir.Model, extra: list[str], trainable: bool):
    """Lower ``model`` with the values ``extra`` appended as outputs (removed again afterwards)."""
    from slimc.backends.triton.lower import lower

    found = _values(model.graph)
    added = [found[n] for n in extra]
    model.graph.outputs.extend(added)
    try:
        gm, _ = lower(model, kernels=trainable, trainable=trainable)
    finally:
        for _ in added:
            model.graph.outputs.pop()
    return gm


def _qdq_parameters(graph: ir.Graph) -> set[str]:
    """Initializers that are quantization scales or zero points: the grids, never trained."""
    names = set()
    for node in graph:
        if node.op_type in QDQ or node.op_type in ("MatMulInteger", "MatMulNBits"):
            names.update(v.name for v in list(node.inputs)[1:] if v is not None)
        if node.op_type == "MatMulInteger" and (scale := _dynamic_scale_value(node)) is not None:
            names.add(scale.name)  # ORT's dynamic int8: x_scale * w_scale after the integer matmul
    return names


def _matmul_weights(graph: ir.Graph) -> set[str]:
    names = set()
    for node in graph:
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger") and len(node.inputs) > 1 and node.inputs[1] is not None:
            names.add(node.inputs[1].name)
        if node.op_type == "DequantizeLinear" and node.inputs[0] is not None:
            names.add(node.inputs[0].name)  # the weight of a QDQ matmul or conv
    return names


@dataclasses.dataclass
class Trainable:
    """The parameters that train, with masks and LoRA adapters; ``frozen`` says what stays and why."""

    gm: Any
    names: dict[str, str]  # root attribute -> ONNX initializer it writes back to
    masks: dict[str, torch.Tensor]
    lora: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter, float]]
    frozen: list[tuple[str, str]]

    def parameters(self) -> list[torch.nn.Parameter]:
        if self.lora:
            return [p for a, b, _ in self.lora.values() for p in (a, b)]
        return [_get(self.gm, attr) for attr in self.names]

    def apply_masks(self) -> None:
        with torch.no_grad():
            for attr, mask in self.masks.items():
                _get(self.gm, attr).mul_(mask)

    def merged(self, attr: str) -> torch.Tensor:
        """The parameter's trained value (LoRA merged: ``W + scale * (B A)``), masked."""
        with torch.no_grad():
            value = _get(self.gm, attr).detach().clone()
            if attr in self.lora:
                a, b, scale = self.lora[attr]
                value += scale * (b @ a)
            if attr in self.masks:
                value *= self.masks[attr]
            return value


def _get(gm, attr: str):
    module = gm
    *path, leaf = attr.split(".")
    for part in path:
        module = getattr(module, part)
    return getattr(module, leaf)


def select(gm, model: ir.Model, params: str, rank: int, seed: int) -> Trainable:
    """Decide what trains in the lowered student ``gm`` (see the module docstring)."""
    inits = model.graph.initializers
    grids, matmuls = _qdq_parameters(model.graph), _matmul_weights(model.graph)
    quantized = getattr(gm, "quantized", {})
    names, frozen, masks = {}, [], {}
    for attr, param in gm.named_parameters():
        onnx = quantized[attr]["onnx"] if attr in quantized else gm.onnx_names.get(attr)
        if onnx not in inits:
            frozen.append((onnx or attr, "a constant of the graph, not an initializer"))
        elif onnx in grids and attr not in quantized:
            frozen.append((onnx, "a quantization scale or zero point: the grid stays"))
        elif params == "norms_biases" and param.dim() != 1:
            continue
        elif params == "lora" and (param.dim() != 2 or onnx not in matmuls):
            continue
        else:
            names[attr] = onnx
    for attr, param in gm.named_parameters():
        param.requires_grad_(attr in names and params != "lora")
    for attr in names:
        value = _get(gm, attr).detach()
        if value.dim() >= 2 and (zeros := float((value == 0).float().mean())) >= MASK_MIN_ZEROS:
            masks[attr] = (value != 0).to(value.dtype)
    lora = _add_lora(gm, names, rank, seed) if params == "lora" else {}
    return Trainable(gm, names, masks, lora, frozen)


class _LoRA(torch.nn.Module):
    def __init__(self, a: torch.nn.Parameter, b: torch.nn.Parameter, scale: float):
        super().__init__()
        self.a, self.b, self.scale = a, b, scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.b @ self.a)


def _add_lora(gm, names: dict[str, str], rank: int, seed: int) -> dict[str, tuple]:
    """``W [K, N] + B [K, r] A [r, N]``: B starts at zero, so the student starts as the compressed model."""
    from torch.nn.utils import parametrize

    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for attr in names:
        w = _get(gm, attr)
        k, n = w.shape
        r = min(rank, k, n)
        a = torch.nn.Parameter(torch.randn(r, n, generator=gen, dtype=w.dtype) / np.sqrt(n))
        b = torch.nn.Parameter(torch.zeros(k, r, dtype=w.dtype))
        *path, leaf = attr.split(".")
        owner = _get(gm, ".".join(path)) if path else gm
        parametrize.register_parametrization(owner, leaf, _LoRA(a, b, 1.0))
        adapters[attr] = (a, b, 1.0)
    return adapters


def unparametrize(train: Trainable) -> None:
    """Drop the LoRA parametrizations (the values are merged by `Trainable.merged` first)."""
    from torch.nn.utils import parametrize

    for attr in train.lora:
        *path, leaf = attr.split(".")
        owner = _get(train.gm, ".".join(path)) if path else train.gm
        parametrize.remove_parametrizations(owner, leaf, leave_parametrized=False)


def _requantize(value: torch.Tensor, original: np.ndarray, info: dict[str, Any], graph: ir.Graph,
                scale_of: dict[str, tuple]) -> np.ndarray:
    from slimc.backends.triton import ops

    scale, zero = scale_of[info["onnx"]]
    z = torch.from_numpy(np.array(zero)) if zero is not None else torch.zeros((), dtype=torch.int8)
    q = ops.QuantizeLinear(value, torch.from_numpy(np.array(scale)), z, axis=info.get("axis", 1),
                           block_size=info.get("block_size", 0))
    return q.numpy().astype(original.dtype).reshape(original.shape)


def _grids(graph: ir.Graph) -> dict[str, tuple]:
    """Integer weight -> (scale, zero point) arrays, from its DequantizeLinear or MatMulInteger + Mul."""
    found: dict[str, tuple] = {}
    for node in graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            zp = node.inputs[2] if len(node.inputs) > 2 else None
            found[node.inputs[0].name] = (node.inputs[1].const_value.numpy(),
                                          zp.const_value.numpy() if zp is not None and zp.const_value is not None else None)
        if node.op_type == "MatMulInteger" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
            scale = _dynamic_scale(node)
            if scale is not None:
                found[node.inputs[1].name] = (scale, np.zeros(scale.shape, np.int8))
    return found


def _dynamic_scale_value(mmi: ir.Node) -> ir.Value | None:
    """The weight scale of ``MatMulInteger -> Cast -> Mul(x_scale * w_scale)`` (ORT's dynamic int8)."""
    for cast, _ in mmi.outputs[0].uses():
        if cast.op_type != "Cast":
            continue
        for mul, _ in cast.outputs[0].uses():
            for scale_value in mul.inputs:
                smul = scale_value.producer() if scale_value is not None else None
                if mul.op_type == "Mul" and smul is not None and smul.op_type == "Mul":
                    for v in smul.inputs:
                        if v is not None and v.const_value is not None:
                            return v
    return None


def _dynamic_scale(mmi: ir.Node) -> np.ndarray | None:
    value = _dynamic_scale_value(mmi)
    return None if value is None else value.const_value.numpy().reshape(-1).astype(np.float32)


def write_back(train: Trainable, model: ir.Model) -> list[str]:
    """Trained values into ``model``'s initializers (dtype and shape kept); returns the names written."""
    from slimc.passes.prune.apply import set_constant

    quantized = getattr(train.gm, "quantized", {})
    grids = _grids(model.graph) if quantized else {}
    written = []
    for attr, onnx in train.names.items():
        value = model.graph.initializers[onnx]
        original = value.const_value.numpy()
        trained = train.merged(attr)
        if attr in quantized:
            array = _requantize(trained, original, quantized[attr], model.graph, grids)
        else:
            array = trained.numpy().astype(original.dtype).reshape(original.shape)
        set_constant(value, np.ascontiguousarray(array))
        written.append(onnx)
    return written


@dataclasses.dataclass
class Invariants:
    """What `distill` must not change: nodes and their wiring, initializer names/dtypes/shapes, the
    bytes of every initializer it does not train (grids included), and the zeros of masked weights."""

    nodes: list[tuple]
    initializers: dict[str, tuple]
    digests: dict[str, str]
    zeros: dict[str, np.ndarray]

    @classmethod
    def of(cls, model: ir.Model, trained: set[str], masked: set[str]) -> Invariants:
        nodes = [(n.op_type, tuple(v.name if v is not None else "" for v in n.inputs),
                  tuple(o.name for o in n.outputs)) for n in model.graph]
        inits, digests, zeros = {}, {}, {}
        for name, value in model.graph.initializers.items():
            array = value.const_value.numpy() if value.const_value is not None else None
            inits[name] = (str(value.dtype), tuple(value.shape) if value.shape is not None else None)
            if array is None:
                continue
            if name not in trained:
                digests[name] = hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()
            elif name in masked:
                zeros[name] = _zero_points(array, value)
        return cls(nodes, inits, digests, zeros)

    def check(self, model: ir.Model, trained: set[str]) -> None:
        after = Invariants.of(model, trained, set(self.zeros))
        problems = []
        if after.nodes != self.nodes:
            problems.append("the graph's nodes changed")
        if after.initializers != self.initializers:
            problems.append("initializer names, dtypes or shapes changed")
        changed = [n for n, d in self.digests.items() if after.digests.get(n) != d]
        if changed:
            problems.append(f"untrained initializers changed: {', '.join(changed[:5])}")
        for name, zeros in self.zeros.items():
            if not np.array_equal(after.zeros[name] | zeros, after.zeros[name]):
                problems.append(f"the sparsity mask of {name} changed")
        if problems:
            raise PassFailedError("distill broke its invariants: " + "; ".join(problems) + ". This is a bug; please report it.")


def _zero_points(array: np.ndarray, value: ir.Value) -> np.ndarray:
    """Where a weight is zero (its code equals the zero point for an integer weight)."""
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.int8:
        return np.zeros(array.shape, bool)  # masks are kept on float and symmetric int8 weights only
    return array == 0
