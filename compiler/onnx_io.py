"""Reading and writing `.onnx` files: typed errors on bad files, external data, atomic writes.

Reading checks what ONNX's own loader reports only as a protobuf DecodeError deep in a
traceback: a missing file, a truncated or non-ONNX file, an external-data file that is absent
or whose ``location`` leaves the model's folder (an absolute path or ``..``: refused, so a model
file cannot make slimc read, and copy into its output, any other file). External weights stay
on disk, memory-mapped, and are read only when a pass needs them.

Writing (`save_onnx`) goes to a partial folder beside the target (`slimc.atomic`). Weights over
~1.8 GB (the protobuf limit is 2 GB) go to external data in ``<name>.<8 hex>.data``, a name new
for every write and referenced by the model; under a lock on the folder the data file is
renamed into place first and the model last, then data files of earlier writes to the same
name are removed. A kill at any point leaves either the old model with its own data or the new
one with its own: never a model next to another run's weights.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from slimc import atomic
from slimc.atomic import atomic_output, write_text_atomic  # noqa: F401 - part of this module's API
from slimc.errors import ModelLoadError, OutputPathError

PROTOBUF_LIMIT = 2**31 - 1
# Write weights as external data well before the hard protobuf limit.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_onnx(path: str | os.PathLike) -> ir.Model:
    """Load an `.onnx` file into the IR, with typed, actionable errors; external weights stay lazy."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file. Check the path.")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not an .onnx file.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable ONNX model (truncated or not ONNX: {type(exc).__name__}). "
            "Re-export or re-download it."
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{path} parsed but holds no graph: it is probably not an ONNX model.")
    locations = _external_locations(proto)
    _check_locations(path, locations)
    missing = sorted(loc for loc in locations if not (path.parent / loc).is_file())
    if missing:
        raise ModelLoadError(
            f"{path} keeps weights in external data files that are missing: {', '.join(missing)}. "
            "Copy them next to the model (same relative path) and try again."
        )
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises plain exceptions on malformed graphs
        raise ModelLoadError(f"{path}: the ONNX graph is malformed: {exc}") from None
    # Locations stay relative (as ONNX requires); the base folder is absolute so a later
    # chdir cannot point them elsewhere.
    _set_base_dir(model, str(path.parent.absolute()))
    return model


def _external_locations(proto: onnx.ModelProto) -> set[str]:
    locations = set()
    for tensor in _proto_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.add(next((e.value for e in tensor.external_data if e.key == "location"), ""))
    return locations


def _check_locations(path: Path, locations: Iterable[str]) -> None:
    for location in locations:
        normal = os.path.normpath(location) if location else ""
        if not location or os.path.isabs(location) or normal == ".." or normal.startswith(".." + os.sep) \
                or re.match(r"^[A-Za-z]:", location):
            raise ModelLoadError(
                f"{path}: an external-data location ({location!r}) is not a path inside the model's folder. ONNX "
                "requires a relative path there; slimc refuses the model rather than read a file outside it. "
                "Re-save it with onnx.save_model(..., save_as_external_data=True, location='model.onnx.data')."
            )


def _proto_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _proto_tensors(sub)


def _tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor the model holds (initializers and tensor attributes, subgraphs included), in a
    fixed order (the same for a model and its copy)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from attr.value


def _set_base_dir(model: ir.Model, base_dir: str) -> None:
    for tensor in _tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = base_dir


def external_files(model: ir.Model) -> tuple[Path, ...]:
    """The files the model's external weights are read from (absolute paths, sorted)."""
    return tuple(sorted({Path(t.path).absolute() for t in _tensors(model) if isinstance(t, ir.ExternalTensor)}))


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy of an IR model (through its proto; ``copy.deepcopy`` recurses too deep).

    External weights are not read: the copy refers to the same files (its tensors get the
    original's base folders, which the proto does not carry).
    """
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for old, new in zip(_tensors(model), _tensors(copy), strict=True):
        if isinstance(old, ir.ExternalTensor) and isinstance(new, ir.ExternalTensor):
            new.base_dir = old.base_dir
    return copy


@contextlib.contextmanager
def inline_weights(model: ir.Model, keep=None):
    """Within the block, external weights are in-memory tensors (views of the memory-mapped
    files): what serialises them into the proto rather than as references to files the proto's
    reader cannot locate. The model is restored on exit. ``keep``: a predicate on an external
    initializer that keeps it a reference (a placeholder that is never read)."""
    swapped: list[tuple[object, str, object]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor) and not (keep and keep(value.const_value)):
                    swapped.append((value, "const_value", value.const_value))
                    value.const_value = _in_memory(value.const_value)
            for node in graph:
                for name, attr in list(node.attributes.items()):
                    if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                        swapped.append((node.attributes, name, attr))
                        node.attributes[name] = ir.AttrTensor(name, _in_memory(attr.value))
        yield model
    finally:
        for owner, key, original in reversed(swapped):
            if key == "const_value":
                owner.const_value = original
            else:
                owner[key] = original


def _in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)


def model_proto(model: ir.Model) -> onnx.ModelProto:
    """The IR as an `onnx.ModelProto` holding every weight (for libraries that work on protos:
    ORT's quantizer, float16, shape inference). Weights are copied into the proto once."""
    with inline_weights(model):
        return ir.serde.serialize_model(model)


def tensor_bytes(model: ir.Model) -> int:
    """Bytes held by initializers (what decides whether external data is needed)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def same_file(a: Path, b: Path) -> bool:
    """True when two paths name one file (also through links and hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).absolute().resolve() == Path(b).absolute().resolve()


def check_output_path(output: Path, inputs: tuple[Path, ...] = (), suffix: str = ".onnx") -> None:
    """Refuse an output over an input file, in a folder that cannot be written, or misnamed."""
    output = Path(output)
    resolved = output.resolve()
    for src in inputs:
        src = Path(src)
        if same_file(output, src) or (src.is_dir() and src.resolve() in resolved.parents):
            raise OutputPathError(
                f"output {output} would overwrite the input model's file {src}. Choose another output path."
            )
    folder = resolved.parent
    if not folder.exists():
        raise OutputPathError(f"output folder {folder} does not exist. Create it first.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder {folder} is not writable. Choose a folder you can write to.")
    if output.suffix != suffix:
        raise OutputPathError(f"output {output} must end in {suffix}.")


def data_file_pattern(path: Path) -> re.Pattern[str]:
    """Names of the external-data files `save_onnx` writes for ``path``: ``<name>.<8 hex>.data``."""
    return re.compile(re.escape(Path(path).name) + r"\.[0-9a-f]{8}\.data")


def save_onnx(
    model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None, protect: tuple[Path, ...] = ()
) -> list[Path]:
    """Write ``model`` to ``path`` atomically (see the module docstring); return the files written.

    ``external_data=None`` stores weights externally only when they exceed ~1.8 GB. Files in
    ``protect`` (the input model's) are never replaced or removed.
    """
    path = Path(path)
    check_output_path(path, protect)
    protect = tuple(protect) + external_files(model)  # never remove a file the model still reads from
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    folder = path.parent
    try:
        tmpdir = atomic.partial_dir(folder)
    except OSError as exc:
        raise OutputPathError(f"could not write {path}: {exc.strerror or exc}") from None
    try:
        tmp_model = tmpdir / path.name
        data_name = _new_data_name(path) if external_data else None
        if data_name:
            ir.save(model, tmp_model, external_data=data_name)  # streams the weights, memory-mapped ones too
        else:
            with inline_weights(model):
                ir.save(model, tmp_model)
        staged = [tmp_model] + ([tmpdir / data_name] if data_name else [])
        atomic.follow_umask(*staged)
        return _commit(tmpdir, path, data_name, protect)
    except OSError as exc:
        raise OutputPathError(f"could not write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmpdir)


def _new_data_name(path: Path) -> str:
    while True:
        name = f"{path.name}.{secrets.token_hex(4)}.data"
        if not (path.parent / name).exists():
            return name


def _commit(tmpdir: Path, path: Path, data_name: str | None, protect: tuple[Path, ...]) -> list[Path]:
    """Under the folder lock: data file in, model in (the commit point), old data files out."""
    folder = path.parent
    with atomic.folder_lock(folder):
        written = [path]
        if data_name:
            os.replace(tmpdir / data_name, folder / data_name)
            written.append(folder / data_name)
        os.replace(tmpdir / path.name, path)
        _remove_old_data(path, keep=data_name, protect=protect)
    return written


def _remove_old_data(path: Path, keep: str | None, protect: tuple[Path, ...]) -> None:
    """Data files of earlier writes to ``path`` (or of writes killed before their model went in)."""
    pattern = data_file_pattern(path)
    for entry in os.scandir(path.parent):
        if entry.name == keep or not pattern.fullmatch(entry.name):
            continue
        if any(same_file(Path(entry.path), p) for p in protect):
            continue  # the input model's weights, written by an earlier slimc run under this name
        with contextlib.suppress(OSError):
            os.unlink(entry.path)


def map_saved_weights(model: ir.Model, path: str | os.PathLike, min_bytes: int = 1 << 20) -> int:
    """After ``model`` was written to ``path`` with external data: its in-memory initializers of at
    least ``min_bytes`` become memory-mapped views of the data file written (same bytes), so the
    weights a pass made (pruned, quantized arrays) leave the heap. Returns the bytes remapped.

    The maps are opened here: they stay valid if the file is later removed (POSIX), and their
    pages can be released (`slimc.backends.onnxruntime.release_mapped_pages`)."""
    path = Path(path)
    saved = onnx.load(str(path), load_external_data=False)
    external = {t.name: {e.key: e.value for e in t.external_data} for t in saved.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    moved = 0
    for name, value in model.graph.initializers.items():
        tensor, info = value.const_value, external.get(name)
        if tensor is None or info is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < min_bytes:
            continue
        mapped = ir.ExternalTensor(info["location"], int(info.get("offset", 0)), int(info["length"]), tensor.dtype,
                                   shape=ir.Shape(tensor.shape), name=tensor.name, base_dir=str(path.parent.absolute()))
        if mapped.length != tensor.nbytes:
            continue  # not this tensor's bytes as written: keep the array
        mapped.numpy()  # opens the map now (no page is read)
        value.const_value = mapped
        moved += tensor.nbytes
    return moved


def from_proto(proto: onnx.ModelProto, like: ir.Model) -> ir.Model:
    """Deserialize ``proto`` (made from ``like`` by a proto-level tool) keeping external weights
    lazy: each external tensor gets the base folder the tensor of that name has in ``like``."""
    base = {t.name: t.base_dir for t in _tensors(like) if isinstance(t, ir.ExternalTensor)}
    model = ir.serde.deserialize_model(proto)
    for tensor in _tensors(model):
        if isinstance(tensor, ir.ExternalTensor) and tensor.name in base:
            tensor.base_dir = base[tensor.name]
    return model
