"""ONNX Runtime's quantizers on models whose weights stay on disk (memory-mapped, never in a proto).

ORT's quantization library works on an `onnx.ModelProto`, and its own helpers load every
external weight into it: `load_model_with_shape_infer` (`onnx.load` with external data) and
`save_and_reload_model_with_shape_infer` (a deep copy, saved and loaded back whole) run in the
quantizers' constructors and the calibrator's. On a model of W weight bytes that is several
full copies at once (measured: peak RSS 6.7x W for dynamic int8).

Here the quantizers get a *weightless* proto instead: the float model is written once to the
pass's work folder with its weights in an external data file (streamed from the IR, memory-
mapped arrays included), and the proto keeps only references to it. Within `mapped_reads`,

- ``onnx.numpy_helper.to_array`` of an external tensor returns a copy-on-write memory map of
  its bytes in that file (the quantizers read each weight once, tensor by tensor, and drop it);
- ORT's shape-inference helpers infer shapes from files in the work folder and load the result
  without its external data.

The arithmetic is ORT's own, on the same float values: the quantized model is the one ORT
builds from the in-memory proto (tests/test_quant_mapped.py compares them). `to_ir` turns a
result back into the IR, unchanged float weights becoming the input model's own tensors again
(the work folder is removed when the pass ends).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import external_data_helper

_counter = itertools.count()


def write_float(model: ir.Model, path: Path) -> onnx.ModelProto:
    """Write ``model`` to ``path`` with every weight in ``<name>.data`` beside it (streamed), and
    return the weightless proto: its tensors refer to that file, relative to ``path``'s folder."""
    from slimc.backends.onnxruntime import release_mapped_pages, shareable_initializers

    # small tensors (shapes, axes: ORT reads these at load for shape inference) stay inline, as onnx saves them
    ir.save(model, path, external_data=path.name + ".data", size_threshold_bytes=1024)
    release_mapped_pages(shareable_initializers(model).values())  # read while writing; the file keeps them
    return onnx.load(str(path), load_external_data=False)


def infer_shapes(proto: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """``proto`` with inferred shapes and ORT's "already inferred" mark, as ORT's
    `load_model_with_shape_infer` makes it, without loading external weights: weights inline in
    ``proto`` (already quantized ones) stay inline, external ones stay references."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    n = next(_counter)
    src, out, data = folder / f"infer-{n}.onnx", folder / f"infer-{n}-inferred.onnx", f"infer-{n}.onnx.data"
    work = copy.deepcopy(proto)  # saving with external data moves the inline weights out of the proto
    onnx.save_model(work, str(src), save_as_external_data=True, location=data, size_threshold=1024)
    del work
    try:
        onnx.shape_inference.infer_shapes_path(str(src), str(out))
        inferred = onnx.load(str(out), load_external_data=False)
        for tensor in external_data_helper._get_all_tensors(inferred):
            if external_data_helper.uses_external_data(tensor) and _location(tensor) == data:
                external_data_helper.load_external_data_for_tensor(tensor, str(folder))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
    finally:
        for p in (src, out, folder / data):
            p.unlink(missing_ok=True)
    add_infer_metadata(inferred)
    return inferred


def _location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def read_mapped(tensor: onnx.TensorProto, folder: Path) -> np.ndarray:
    """The array of an external tensor whose data lies in ``folder``: a copy-on-write memory map
    for plain numeric types (pages read on use, dropped with the array), else read in full."""
    info = {e.key: e.value for e in tensor.external_data}
    path = folder / info["location"]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    dims = tuple(tensor.dims)
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    plain = dtype.kind in "fiub" and tensor.data_type not in _PACKED
    if plain and count and int(info.get("length", count * dtype.itemsize)) == count * dtype.itemsize:
        return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="c", offset=int(info.get("offset", 0)), shape=dims)
    loaded = onnx.TensorProto()
    loaded.CopyFrom(tensor)
    external_data_helper.load_external_data_for_tensor(loaded, str(folder))
    loaded.data_location = onnx.TensorProto.DEFAULT
    return _ORIGINAL_TO_ARRAY(loaded)


# bit-packed and 8-bit float types: numpy_helper decodes these, a plain memory map cannot
_PACKED = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "BFLOAT16", "FLOAT8E4M3FN",
                                                   "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
           if hasattr(onnx.TensorProto, n)}
_ORIGINAL_TO_ARRAY = onnx.numpy_helper.to_array


@contextlib.contextmanager
def mapped_reads(folder: Path) -> Iterator[None]:
    """Within the block ORT's quantizers read external weights from ``folder`` memory-mapped and
    infer shapes without loading them (see the module docstring). Not re-entrant across threads:
    it swaps module attributes, restored on exit."""
    from onnxruntime.quantization import base_quantizer, calibrate, onnx_quantizer, quant_utils

    def to_array(tensor, base_dir: str = ""):
        if external_data_helper.uses_external_data(tensor) and not base_dir:
            return read_mapped(tensor, folder)
        return _ORIGINAL_TO_ARRAY(tensor, base_dir)

    def save_and_reload(model):
        return infer_shapes(model, folder)

    def load_with_shape_infer(path):
        return infer_shapes(onnx.load(str(path), load_external_data=False), Path(path).parent)

    swaps = [(onnx.numpy_helper, "to_array", to_array)]
    for module in (quant_utils, base_quantizer, onnx_quantizer):
        swaps.append((module, "save_and_reload_model_with_shape_infer", save_and_reload))
    for module in (quant_utils, calibrate):
        swaps.append((module, "load_model_with_shape_infer", load_with_shape_infer))
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps if hasattr(module, name)]
    try:
        for module, name, value in swaps:
            if hasattr(module, name):
                setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def to_ir(proto: onnx.ModelProto, like: ir.Model, folder: Path) -> ir.Model:
    """``proto`` (built from ``like``'s weightless proto) as an IR model independent of ``folder``:
    an external tensor that ``like`` holds under the same name, type and shape is ``like``'s own
    tensor (memory-mapped from the input's file, or its in-memory array); any other external
    tensor is read into memory. No tensor refers into ``proto``, which can then be freed."""
    originals = {v.name: v.const_value for v in like.graph.initializers.values() if v.const_value is not None}
    model = ir.serde.deserialize_model(proto)
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.TensorProtoTensor):
            # an array of its own: a tensor that refers into the proto keeps all of it alive (every
            # quantized weight), however small the tensor
            value.const_value = ir.Tensor(np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)
            continue
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        same = originals.get(value.name)
        if same is not None and same.dtype == tensor.dtype and tuple(same.shape) == tuple(tensor.shape):
            value.const_value = same
        else:
            tensor.base_dir = str(folder)
            value.const_value = ir.Tensor(np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)
    return model
