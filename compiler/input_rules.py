"""What a graph says about its own inputs beyond dtype and shape, for data slimc must split or invent.

`slimc.model.infer_input_specs` names each input's kind; the rules here add what batching and
synthetic data need, read only from the graph and its metadata:

- **Batch axis** (`batch_axis`): the axis that indexes samples. The model's batch dim is a
  symbolic dim whose name says batch (``batch``, ``batch_size``, ``N``...), else the name most
  inputs use on axis 0. An input holding that name batches along it (``state [2, batch, 128]``:
  axis 1); else a dynamic axis 0 is the batch; else, when other inputs have a dynamic batch, an
  input whose only dynamic dim is unnamed batches along it (``state [2, ?, 128]``), and an input
  with no dynamic dim is not batched (passed whole, like a 0-d input). A model whose every input
  fixes axis 0 has a static batch (axis 0).
- **Image size** of a 4-D image input with dynamic height/width, in this order: the size the model
  states in its metadata (``imgsz``, ``image_size``, ``img_size``, ``input_size``: one number or
  ``[h, w]``; YOLO exports write ``imgsz``), else `DEFAULT_IMAGE_SIZE` (224, the usual size of
  ImageNet-trained CNNs). ``--static-shapes`` overrides both (`pin_sizes`).
- **Values**: an integer input compared with constants (``Equal``: a sample rate choosing an ``If``
  branch; ``Greater``/``Less``/...: a threshold such as ``mode > 0``) takes one of those constants; an integer input that indexes a constant table
  (``Gather``) or feeds ``OneHot`` stays below the table's rows or the depth. An input that sets a
  shape, size, axis or count (``Reshape``'s shape, ``Resize``'s scales, ``Slice``'s steps...), any
  other 0-d integer (a setting whose valid values the graph does not show) and a string input
  cannot be invented: synthetic data refuses them with a `DataError` that asks for data.
"""

from __future__ import annotations

import ast
import collections
import re
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

DEFAULT_IMAGE_SIZE = 224
# Dim names that mean "unknown", not a dim shared between inputs (paddle2onnx writes "?" for every one).
ANONYMOUS_DIMS = ("?", "")
IMAGE_SIZE_KEYS = ("imgsz", "image_size", "img_size", "input_size")
_BATCH_NAME = re.compile(r"batch|^(n|b|bs|num_samples)$", re.I)

# (op, input index) -> what the input sets. Values there must be exact, so they cannot be random.
PARAMETER_SLOTS = {
    ("Reshape", 1): "the target shape", ("Expand", 1): "the target shape", ("Tile", 1): "the repeats",
    ("ConstantOfShape", 0): "the output shape", ("Range", 0): "the start", ("Range", 1): "the limit",
    ("Range", 2): "the step", ("Resize", 1): "the roi", ("Resize", 2): "the scales", ("Resize", 3): "the sizes",
    ("Upsample", 1): "the scales", ("Slice", 1): "the starts", ("Slice", 2): "the ends", ("Slice", 3): "the axes",
    ("Slice", 4): "the steps", ("Split", 1): "the split sizes", ("OneHot", 1): "the depth", ("TopK", 1): "k",
    ("Pad", 1): "the pads", ("Pad", 3): "the axes", ("Squeeze", 1): "the axes", ("Unsqueeze", 1): "the axes",
    ("CumSum", 1): "the axis", ("Trilu", 1): "k", ("NonMaxSuppression", 2): "the max output boxes",
    ("NonMaxSuppression", 3): "the IoU threshold", ("NonMaxSuppression", 4): "the score threshold",
    ("Loop", 0): "the trip count", ("ReduceSum", 1): "the axes", ("ReduceMean", 1): "the axes",
    ("ReduceMax", 1): "the axes", ("ReduceMin", 1): "the axes", ("ReduceProd", 1): "the axes",
    ("CenterCropPad", 1): "the crop shape", ("AffineGrid", 1): "the output size", ("Col2Im", 1): "the image shape",
    ("Col2Im", 2): "the block shape", ("DFT", 1): "the DFT length", ("STFT", 2): "the window",
    ("MaxUnpool", 2): "the output shape",
}
# Integer division by a random integer can divide by zero.
INTEGER_PARAMETER_SLOTS = {("Div", 1): "the divisor", ("Mod", 1): "the divisor"}
_PASS_THROUGH = ("Cast", "Identity")


def _is_dynamic(d) -> bool:
    return not isinstance(d, int)


def batch_symbol(shapes: Sequence[tuple]) -> str | None:
    """The symbolic dim naming the batch: a name that says batch, else the commonest axis-0 name."""
    names = [d for shape in shapes for d in shape if isinstance(d, str)]
    said = next((n for n in names if _BATCH_NAME.search(n)), None)
    if said is not None:
        return said
    first = collections.Counter(s[0] for s in shapes if s and isinstance(s[0], str))
    return first.most_common(1)[0][0] if first else None


def batch_axes(shapes: Sequence[tuple]) -> list[int | None]:
    """Each input's batch axis (None: not batched), by the rule in the module docstring."""
    symbol = batch_symbol(shapes)
    axes: list[int | None] = []
    for shape in shapes:
        if not shape:
            axes.append(None)
        elif symbol is not None and symbol in shape:
            axes.append(shape.index(symbol))
        elif _is_dynamic(shape[0]):
            axes.append(0)
        else:
            axes.append(-1)  # axis 0 is static: decided once every input's batch axis is known
    dynamic_batch = any(a is not None and a >= 0 for a in axes)
    for i, shape in enumerate(shapes):
        if axes[i] != -1:
            continue
        unnamed = [k for k, d in enumerate(shape) if d is None]
        if dynamic_batch and len(unnamed) == 1 and not any(isinstance(d, str) for d in shape):
            axes[i] = unnamed[0]
        elif dynamic_batch and not any(_is_dynamic(d) for d in shape):
            axes[i] = None
        else:
            axes[i] = 0
    return axes


def image_axes(shape: tuple) -> tuple[int, int]:
    """(height, width) axes of a 4-D image: NHWC when the last dim is 1 or 3 and dim 1 is not, else NCHW."""
    last = isinstance(shape[3], int) and shape[3] in (1, 3) and not (isinstance(shape[1], int) and shape[1] in (1, 3))
    return (1, 2) if last else (2, 3)


def metadata_image_size(model: ir.Model) -> tuple[tuple[int, int], str] | None:
    """((h, w), key) from the model's metadata, or None when it states no usable size."""
    props = model.metadata_props or {}
    for key in IMAGE_SIZE_KEYS:
        if key in props:
            size = _parse_size(props[key])
            if size is not None:
                return size, key
    return None


def _parse_size(text: str) -> tuple[int, int] | None:
    """``"[320, 320]"``, ``"(480, 640)"``, ``"224"``, ``"224x224"`` -> (h, w)."""
    try:
        value = ast.literal_eval(text.strip().replace("x", ","))
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, int):
        value = (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = (value[0], value[0])
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def _uses(value: ir.Value, depth: int = 2):
    """(node, input index) of every consumer, looking through Cast/Identity ``depth`` steps."""
    for node, index in value.uses():
        if node.op_type in _PASS_THROUGH and depth > 0 and node.outputs:
            yield from _uses(node.outputs[0], depth - 1)
        else:
            yield node, index


def _constant_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


_COMPARISONS = ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual")


def compared_constants(value: ir.Value) -> tuple[int, ...]:
    """The constants an integer input is compared with (``Equal``: a mode or a sample rate; ``Greater``,
    ``Less``...: a threshold, itself a value the graph handles, like ``mode > 0`` taking 0)."""
    found: list[int] = []
    for node, index in _uses(value):
        if node.op_type not in _COMPARISONS:
            continue
        other = _constant_array(node.inputs[1 - index])
        if other is not None and np.issubdtype(other.dtype, np.integer):
            found += [int(v) for v in other.ravel() if int(v) not in found]
    return tuple(found)


def parameter_use(value: ir.Value, integer: bool) -> str | None:
    """``"the target shape of Reshape node r"`` when the input sets a parameter that cannot be invented."""
    for node, index in _uses(value):
        what = PARAMETER_SLOTS.get((node.op_type, index)) or (
            INTEGER_PARAMETER_SLOTS.get((node.op_type, index)) if integer else None)
        if what is not None:
            return f"{what} of " + (f"{node.op_type} node {node.name!r}" if node.name else f"a {node.op_type} node")
    return None


def onehot_depth(value: ir.Value) -> int | None:
    """The constant depth of a ``OneHot`` the input indexes into."""
    for node, index in _uses(value):
        if node.op_type == "OneHot" and index == 0:
            depth = _constant_array(node.inputs[1])
            if depth is not None and depth.size == 1:
                return int(depth.ravel()[0])
    return None
