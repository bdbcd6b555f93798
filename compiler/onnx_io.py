"""Reading and writing `.onnx` files: typed errors on bad files, atomic writes, external data.

Reading checks what ONNX's own loader reports only as a protobuf DecodeError deep in a
traceback: a missing file, a truncated or non-ONNX file, an external-data file that is absent.
Writing goes to a temporary file in the destination folder and is renamed into place, so a
failure never leaves a half-written model; models over 2 GB store weights as external data
(the protobuf limit), in ``<name>.onnx.data`` beside the model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from slimc.errors import ModelLoadError, OutputPathError

PROTOBUF_LIMIT = 2**31 - 1
# Write weights as external data well before the hard protobuf limit.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy of an IR model (through its proto; ``copy.deepcopy`` recurses too deep)."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def load_onnx(path: str | os.PathLike) -> ir.Model:
    """Load an `.onnx` file into the IR, with typed, actionable errors."""
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
    missing = sorted(_missing_external_files(proto, path.parent))
    if missing:
        raise ModelLoadError(
            f"{path} keeps weights in external data files that are missing: {', '.join(missing)}. "
            "Copy them next to the model (same relative path) and try again."
        )
    try:
        return ir.serde.deserialize_model(_with_base_dir(proto, path.parent))
    except Exception as exc:  # onnx_ir raises plain exceptions on malformed graphs
        raise ModelLoadError(f"{path}: the ONNX graph is malformed: {exc}") from None


def _missing_external_files(proto: onnx.ModelProto, base: Path) -> set[str]:
    missing = set()
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location is None or not (base / location).is_file():
                missing.add(str(location))
    return missing


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_tensors(sub)


def _with_base_dir(proto: onnx.ModelProto, base: Path) -> onnx.ModelProto:
    # onnx_ir resolves external data relative to a base dir given at deserialization time.
    # Setting it on the proto's external tensors keeps the weights lazy (memory-mapped).
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and not os.path.isabs(entry.value):
                    entry.value = str(base / entry.value)
    return proto


def tensor_bytes(model: ir.Model) -> int:
    """Bytes held by initializers (what decides whether external data is needed)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def check_output_path(output: Path, inputs: tuple[Path, ...] = (), suffix: str = ".onnx") -> None:
    """Refuse an output over an input file, in a folder that cannot be written, or misnamed."""
    output = Path(output)
    resolved = output.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if resolved == src or (src.is_dir() and src in resolved.parents):
            raise OutputPathError(
                f"output {output} would overwrite the input model {src}. Choose another output path."
            )
    folder = resolved.parent
    if not folder.exists():
        raise OutputPathError(f"output folder {folder} does not exist. Create it first.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder {folder} is not writable. Choose a folder you can write to.")
    if output.suffix != suffix:
        raise OutputPathError(f"output {output} must end in {suffix}.")


def save_onnx(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` to ``path`` atomically; return the files written.

    ``external_data=None`` stores weights externally only when they exceed ~1.8 GB.
    The model and its data file are written into a temporary folder beside the target and
    renamed into place only after both are complete.
    """
    path = Path(path)
    check_output_path(path)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=".slimc-", dir=path.parent))
    try:
        tmp_model = tmpdir / path.name
        ir.save(model, tmp_model, external_data=data_name if external_data else None)
        written = [path]
        if external_data:
            os.replace(tmpdir / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        os.replace(tmp_model, path)
        return written
    except OSError as exc:
        raise OutputPathError(f"could not write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmpdir)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file (receipts) via temp file + rename."""
    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {path}: folder {folder} is missing or not writable.")
    with atomic_output(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ""):
    """A temporary file beside ``path`` for the block to write; renamed onto ``path`` when the block
    succeeds and removed otherwise, so ``path`` is either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".slimc-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputPathError(f"could not write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
