"""What a front end hands to the compiler: the IR plus what we know about the model's inputs.

`LoadedModel` carries the `onnx_ir.Model` together with facts the IR does not hold: the task
(so the receipt picks the right fidelity metric), a tokenizer or image preprocessing (so
``--calib``/``--eval`` files can be turned into input tensors) and where the model came from
(so an output path over the input can be refused).

`InputSpec` describes one graph input well enough to synthesise valid values for it:
token ids must stay below the vocabulary size, masks are ones, images are floats.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

# Input kinds. "tokens" need `high` (vocabulary size); the others have fixed value rules.
INPUT_KINDS = ("tokens", "attention_mask", "token_type_ids", "position_ids", "image", "float", "int", "bool")
TASKS = ("causal-lm", "encoder", "image-classifier", "classifier", "generic")

# Sizes used for symbolic dims when slimc has to invent inputs (synthetic data, MAC counts).
DEFAULT_DIM_SIZES = {"batch": 2, "seq": 16}


@dataclasses.dataclass
class InputSpec:
    """One graph input. ``shape`` holds ints for static dims and names for symbolic ones."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    kind: str = "float"
    high: int | None = None  # exclusive upper bound of valid token ids

    def concrete_shape(self, sizes: dict[str, int] | None = None) -> tuple[int, ...]:
        """Shape with symbolic dims replaced: by ``sizes[name]``, else batch=2 / seq=16 / 1."""
        sizes = {**DEFAULT_DIM_SIZES, **(sizes or {})}
        out = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int):
                out.append(d)
            elif d is not None and d in sizes:
                out.append(sizes[d])
            elif i == 0:
                out.append(sizes["batch"])
            elif i == 1 and self.kind in ("tokens", "attention_mask", "token_type_ids", "position_ids"):
                out.append(sizes["seq"])
            else:
                out.append(1)
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

    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]


_MASK = re.compile(r"(attention_)?mask", re.I)
_TOKEN_TYPES = re.compile(r"token_type|segment", re.I)
_POSITIONS = re.compile(r"position", re.I)


# Ops that move token ids around without changing their values.
_ID_PRESERVING = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand")


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


def infer_input_specs(model: ir.Model) -> list[InputSpec]:
    """Describe every graph input from its name, dtype, shape and consumers.

    Integer inputs that index an embedding table are token ids bounded by its row count;
    names decide masks, token types and positions; 4-D floats are images.
    """
    specs = []
    for value in model.graph.inputs:
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = tuple(
            d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
            for d in (value.shape or ())
        )
        name = value.name or ""
        kind, high = "float", None
        if dtype == np.bool_:
            kind = "bool"
        elif np.issubdtype(dtype, np.integer):
            if _MASK.search(name):
                kind = "attention_mask"
            elif _TOKEN_TYPES.search(name):
                kind, high = "token_type_ids", _embedding_rows(value)
            elif _POSITIONS.search(name):
                kind = "position_ids"
            else:
                high = _embedding_rows(value)
                kind = "tokens" if high is not None else "int"
        elif len(shape) == 4:
            kind = "image"
        specs.append(InputSpec(name=name, dtype=dtype, shape=shape, kind=kind, high=high))
    return specs


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
