"""What a front end hands to the compiler: the IR plus what we know about the model's inputs.

`LoadedModel` carries the `onnx_ir.Model` together with facts the IR does not hold: the task
(so the receipt picks the right fidelity metric), a tokenizer or image preprocessing (so
``--calib``/``--eval`` files can be turned into input tensors) and where the model came from
(so an output path over the input can be refused).

`InputSpec` describes one graph input well enough to synthesise valid values for it:
token ids must stay below the vocabulary size, masks are ones, images are floats. The past
key/values of a KV-cache graph (`slimc.kvcache`) are ``past_key_values`` inputs whose length axis
defaults to 0: slimc's own feeds are full forwards.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimc import input_rules, kvcache

# Input kinds. "tokens" need `high` (vocabulary size); the others have fixed value rules.
INPUT_KINDS = ("tokens", "attention_mask", "token_type_ids", "position_ids", "past_key_values", "image", "float", "int",
               "bool", "string")
TASKS = ("causal-lm", "encoder", "image-classifier", "classifier", "generic")

# Sizes used for dynamic dims when slimc has to invent inputs (synthetic data, MAC counts): the batch
# axis, a token input's sequence axis, and any other dim the graph leaves open ("dim").
DEFAULT_DIM_SIZES = {"batch": 2, "seq": 16, "dim": 16}


@dataclasses.dataclass
class InputSpec:
    """One graph input. ``shape`` holds ints for static dims and names (or None) for dynamic ones.

    ``batch_axis`` indexes samples (None: not batched, passed whole; see `slimc.input_rules`);
    ``dim_defaults`` sizes dynamic axes the model sizes itself (image height/width from metadata),
    ``dim_source`` says where they came from; ``values`` are the values a configuration input may
    take (synthetic data uses the first); ``needs_data`` says why no value can be invented for it.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    kind: str = "float"
    high: int | None = None  # exclusive upper bound of valid token ids / indices
    batch_axis: int | None = 0
    dim_defaults: dict[int, int] = dataclasses.field(default_factory=dict)
    dim_source: str = ""
    values: tuple[Any, ...] | None = None
    needs_data: str | None = None

    def concrete_shape(self, sizes: dict[str, int] | None = None) -> tuple[int, ...]:
        """Shape with dynamic dims replaced: by ``dim_defaults``, a named dim by ``sizes[name]``,
        the batch axis by ``sizes["batch"]``, a token input's axis 1 by ``sizes["seq"]``, any other
        by ``sizes["dim"]`` (defaults in `DEFAULT_DIM_SIZES`)."""
        sizes = {**DEFAULT_DIM_SIZES, **(sizes or {})}
        out = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int):
                out.append(d)
            elif i in self.dim_defaults:
                out.append(self.dim_defaults[i])
            elif d is not None and d in sizes:
                out.append(sizes[d])
            elif i == self.batch_axis:
                out.append(sizes["batch"])
            elif i == 1 and self.kind in ("tokens", "attention_mask", "token_type_ids", "position_ids"):
                out.append(sizes["seq"])
            else:
                out.append(sizes["dim"])
        return tuple(out)


@dataclasses.dataclass
class LoadedModel:
    """A model in slimc's IR plus the facts front ends know about it."""

    model: ir.Model
    inputs: list[InputSpec]
    task: str = "generic"
    source: str = ""  # human-readable origin, e.g. "all-MiniLM-L6-v2 (Hugging Face folder)"
    source_paths: tuple[Path, ...] = ()  # files read; an output path among them is refused
    tokenizer: Any = None  # a transformers tokenizer, when the model takes text
    image_preprocess: dict[str, Any] | None = None  # {"size": (h, w), "mean": [...], "std": [...]}
    notes: list[str] = dataclasses.field(default_factory=list)  # caveats for the receipt
    generation: Any = None  # slimc.kvcache.GenerationInfo of a causal LM: eos/bos/pad ids, context length

    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]


_MASK = re.compile(r"(attention_)?mask", re.I)
_TOKEN_TYPES = re.compile(r"token_type|segment", re.I)
_POSITIONS = re.compile(r"position", re.I)


# Ops that move token ids around without changing their values.
_ID_PRESERVING = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Cast", "Transpose")


def _embedding_rows(value: ir.Value, depth: int = 4) -> int | None:
    """If ``value`` indexes an embedding table, return its row count.

    Follows ops that keep ids intact (GPT-2 flattens ``input_ids`` with a Reshape before the
    Gather) up to ``depth`` steps.
    """
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1 and node.inputs[0] is not None:
            table = node.inputs[0]
            if table.const_value is not None and table.shape is not None:
                rows = table.shape[node.attributes.get_int("axis", 0)]
                if isinstance(rows, int):
                    return rows
        elif node.op_type in _ID_PRESERVING and index == 0 and depth > 0:
            rows = _embedding_rows(node.outputs[0], depth - 1)
            if rows is not None:
                return rows
    return None


def _dims(value: ir.Value) -> tuple[int | str | None, ...]:
    # A negative dim value is not ONNX; converters write -1 for "dynamic" (slimc.normalize fixes the graph).
    def one(d):
        if isinstance(d, int):
            return d if d >= 0 else None
        name = d.value if isinstance(d, ir.SymbolicDim) else None
        return None if name in input_rules.ANONYMOUS_DIMS else name

    return tuple(one(d) for d in (value.shape or ()))


def _kind(value: ir.Value, dtype: np.dtype, rank: int) -> tuple[str, int | None]:
    name = value.name or ""
    if kvcache.is_cache_input(name):
        return "past_key_values", None
    if dtype == np.bool_:
        return "bool", None
    if np.issubdtype(dtype, np.integer):
        if _MASK.search(name):
            return "attention_mask", None
        if _TOKEN_TYPES.search(name):
            return "token_type_ids", _embedding_rows(value)
        if _POSITIONS.search(name):
            return "position_ids", None
        high = _embedding_rows(value)
        if high is not None:
            return "tokens", high
        return "int", input_rules.onehot_depth(value)
    if dtype == np.dtype(object):
        return "string", None
    return ("image" if rank == 4 else "float"), None


def infer_input_specs(model: ir.Model) -> list[InputSpec]:
    """Describe every graph input from its name, dtype, shape, consumers and the model's metadata.

    Integer inputs that index an embedding table are token ids bounded by its row count;
    names decide masks, token types and positions; 4-D floats are images. Batch axes, image
    sizes and value rules follow `slimc.input_rules`.
    """
    specs = []
    for value in model.graph.inputs:
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = _dims(value)
        kind, high = _kind(value, dtype, len(shape))
        spec = InputSpec(name=value.name or "", dtype=dtype, shape=shape, kind=kind, high=high)
        if kind == "past_key_values" and len(shape) == 4 and not isinstance(shape[2], int):
            spec.dim_defaults = {2: 0}
        specs.append(_value_rules(spec, value))
    for spec, axis in zip(specs, input_rules.batch_axes([s.shape for s in specs])):
        spec.batch_axis = axis
    stated = input_rules.metadata_image_size(model)
    size_images(specs, stated[0] if stated else None, f"from metadata {stated[1]}" if stated else "")
    return specs


def _value_rules(spec: InputSpec, value: ir.Value) -> InputSpec:
    """The values synthetic data may take for ``spec`` (`slimc.input_rules`), or why none can be invented."""
    if spec.kind == "string":
        spec.needs_data = "it is a string tensor, and slimc cannot invent plausible text for it"
    elif spec.kind in ("int", "float", "bool"):
        use = input_rules.parameter_use(value, np.issubdtype(spec.dtype, np.integer))
        spec.needs_data = f"it sets {use}, which random values would break" if use else None
    if spec.kind == "int" and (values := input_rules.compared_constants(value)):
        spec.values, spec.needs_data = values, None
    elif spec.kind == "int" and not spec.shape and spec.high is None and spec.needs_data is None:
        spec.needs_data = ("it is a 0-d integer, a setting such as a sample rate or a step count, and the graph "
                           "does not show which values it accepts")
    return spec


def size_images(specs: list[InputSpec], size: tuple[int, int] | None, source: str) -> None:
    """Height/width of 4-D image inputs the graph leaves dynamic: ``size`` (the model states it, ``source``
    says where), else `input_rules.DEFAULT_IMAGE_SIZE`."""
    for spec in specs:
        if spec.kind != "image":
            continue
        axes = input_rules.image_axes(spec.shape)
        if all(isinstance(spec.shape[a], int) for a in axes):
            continue
        if size is not None:
            (h, w) = size
        else:
            h = w = input_rules.DEFAULT_IMAGE_SIZE
            source = "by default (the model states no image size)"
        spec.dim_defaults = {a: n for a, n in zip(axes, (h, w)) if not isinstance(spec.shape[a], int)}
        spec.dim_source = f"height x width {h}x{w} {source}"


def pin_sizes(specs: list[InputSpec], shapes: dict[str, tuple[int, ...]]) -> None:
    """Size synthetic inputs as ``--static-shapes`` pins them (all axes but the batch axis, which is split)."""
    for spec in specs:
        dims = shapes.get(spec.name)
        if dims is None or len(dims) != len(spec.shape):
            continue
        spec.dim_defaults = {a: int(n) for a, n in enumerate(dims) if a != spec.batch_axis}
        spec.dim_source = "from --static-shapes " + "x".join(map(str, dims))


def infer_task(model: ir.Model, inputs: list[InputSpec]) -> str:
    """Guess the task of a bare graph from its first output, so the receipt picks fitting metrics.

    2-D float output ``[batch, classes]``: a classifier (image-classifier with an image input).
    Token inputs and a 3-D output: a causal LM when the last dim equals the vocabulary (the
    embedding table's rows), else an encoder. Anything else: generic (generic metrics only).
    """
    if not model.graph.outputs:
        return "generic"
    out = model.graph.outputs[0]
    rank = len(out.shape) if out.shape is not None else None
    floating = out.dtype is not None and out.dtype.is_floating_point()
    tokens = [s for s in inputs if s.kind == "tokens"]
    if floating and rank == 2:
        return "image-classifier" if any(s.kind == "image" for s in inputs) else "classifier"
    if floating and rank == 3 and tokens:
        last = out.shape[-1]
        return "causal-lm" if isinstance(last, int) and last == tokens[0].high else "encoder"
    return "generic"
