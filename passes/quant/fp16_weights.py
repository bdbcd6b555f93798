"""float16 weights made one at a time: the `fp16` pass never holds the model's weights in one proto.

ONNX Runtime's converter works on an `onnx.ModelProto` with every weight inside it: the whole model
loaded, serialized (a second copy), converted (a float16 copy) and deserialized (another). Of the
weights it needs nothing but their names, types and shapes: it decides which float32 initializers
become float16 (those read by a node it converts) and converts their bytes. So the converter gets a
*weightless* proto (`weightless`): every main-graph initializer of ``MIN_BYTES`` or more is a
placeholder reference to external data (type and shape, no bytes), which it retypes to float16
without reading. `restore` then puts the weights back into the converted model: unchanged ones as
they were (memory-mapped ones stay mapped), retyped ones as `float16_tensor`: a lazy tensor that
converts its float32 source when read (saving the stage file reads it once and maps the result),
in chunks, with the converter's own rounding rule (`convert_np_to_float16`), so the bytes are the
converter's. The source's memory-mapped pages are released after each conversion.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

PLACEHOLDER = "slimc-fp16-weightless"  # the external-data location of a placeholder (never read)
MIN_BYTES = 4096  # smaller initializers stay in the proto (the converter handles them itself)
CHUNK_ELEMENTS = 1 << 22  # float32 elements converted at once (the rule makes several temporaries)


@contextlib.contextmanager
def weightless(model: ir.Model) -> Iterator[dict[str, ir.TensorProtocol]]:
    """While the block runs, the main graph's initializers of ``MIN_BYTES`` or more are placeholders
    (`PLACEHOLDER` external references of the same type and shape). Yields {name: the real tensor}."""
    swapped: dict[str, tuple[ir.Value, ir.TensorProtocol]] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < MIN_BYTES:
            continue
        value.const_value = ir.ExternalTensor(PLACEHOLDER, 0, tensor.nbytes, tensor.dtype, shape=ir.Shape(tensor.shape),
                                              name=tensor.name or name, base_dir="")
        swapped[name] = (value, tensor)
    try:
        yield {name: tensor for name, (_, tensor) in swapped.items()}
    finally:
        for value, tensor in swapped.values():
            value.const_value = tensor


def is_placeholder(tensor: ir.TensorProtocol) -> bool:
    return isinstance(tensor, ir.ExternalTensor) and tensor.location == PLACEHOLDER


@contextlib.contextmanager
def shapes_from_dims() -> Iterator[None]:
    """ORT's converter takes a converted initializer's shape from its data (`numpy_helper.to_array`),
    which a placeholder has not: while the block runs it takes the shape from the tensor's dims."""
    from onnx import helper
    from onnxruntime.transformers import float16

    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def to_float16(array: np.ndarray) -> np.ndarray:
    """The converter's float32 -> float16 rule (`convert_np_to_float16`: sign and finiteness kept,
    tiny values raised to the smallest subnormal, large ones clipped to 65504), applied in chunks of
    ``CHUNK_ELEMENTS`` (the rule is elementwise, so the bytes are the same as in one piece)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    flat = array.reshape(-1)
    out = np.empty(flat.shape, np.float16)
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        out[start:start + CHUNK_ELEMENTS] = convert_np_to_float16(flat[start:start + CHUNK_ELEMENTS])
    return out.reshape(array.shape)


def float16_tensor(source: ir.TensorProtocol) -> ir.TensorProtocol:
    """``source`` (float32) as float16. A memory-mapped source gives a lazy tensor, converted when read
    (its pages released afterwards); an in-memory one is converted now (its float32 array can go)."""
    from slimc.backends.onnxruntime import release_mapped_pages

    if not isinstance(source, ir.ExternalTensor):
        return ir.Tensor(to_float16(source.numpy()), dtype=ir.DataType.FLOAT16, name=source.name)

    def convert() -> ir.Tensor:
        array = source.numpy()
        try:
            return ir.Tensor(to_float16(array), dtype=ir.DataType.FLOAT16, name=source.name)
        finally:
            release_mapped_pages([array])  # read once; the file keeps them

    return ir.LazyTensor(convert, dtype=ir.DataType.FLOAT16, shape=ir.Shape(source.shape), name=source.name)


def restore(converted: ir.Model, weights: dict[str, ir.TensorProtocol]) -> None:
    """Put the real weights into ``converted`` (made from a `weightless` proto): a placeholder the
    converter left as it was gets its tensor back; one it retyped float32 -> float16 gets
    `float16_tensor`. Any other change to a placeholder is a converter this module does not know."""
    for name, source in weights.items():
        value = converted.graph.initializers.get(name)
        if value is None:
            continue  # the converter removed it (unused)
        placeholder = value.const_value
        if not is_placeholder(placeholder):
            raise RuntimeError(f"fp16: the converter replaced initializer {name!r}'s data; expected a placeholder")
        if placeholder.dtype == source.dtype:
            value.const_value = source
        elif source.dtype == ir.DataType.FLOAT and placeholder.dtype == ir.DataType.FLOAT16:
            value.const_value = float16_tensor(source)
        else:
            raise RuntimeError(f"fp16: the converter retyped initializer {name!r} from {source.dtype} to "
                               f"{placeholder.dtype}; only float32 -> float16 is expected")
