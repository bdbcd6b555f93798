"""`.pt2` front end: an ExportedProgram saved with ``torch.export.save`` -> IR, without running code.

A ``.pt2`` archive holds a serialised graph (JSON) and raw weights, but ``torch.export.load``
also unpickles parts of it (the sample inputs always) and evaluates strings from it. slimc
reads the archive itself: the program JSON, checked first (`pt2_safety`), and the weights and
constants as raw tensors; the sample inputs are never read, and an archive holding any other
pickle is refused with `UnsafeModelError`. The program is already traced, so its dynamic dims
are whatever it was exported with: ``dynamic`` cannot add or remove any, and is accepted only
so every front end takes the same arguments.
"""

from __future__ import annotations

import os
from pathlib import Path

from slimc.errors import ModelLoadError, SlimcError, first_line
from slimc.frontends import pt2_safety
from slimc.model import LoadedModel

PROGRAM = "model"  # the program torch.export.save writes and torch.export.load returns


def load_pt2(path: str | os.PathLike, *, input_names: list[str] | None = None, dynamic: bool = True) -> LoadedModel:
    """Read ``path`` (see the module docstring) and export its program to the IR."""
    from slimc.frontends import torch_module

    path = Path(path)
    program = read_program(path)
    loaded = torch_module.load_module(
        program, None, input_names=input_names, dynamic=dynamic, source=f"{path.name} (torch.export archive)"
    )
    loaded.source_paths = (path,)
    return loaded


def read_program(path: Path):
    """The archive's ExportedProgram, read without unpickling or evaluating anything from it."""
    from slimc.frontends.torch_module import quiet_exporter

    try:
        import torch  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"{path} is a PyTorch archive; reading it needs PyTorch: pip install 'slimc[torch]'."
        ) from None
    try:
        with quiet_exporter():
            program = _deserialize(path)
    except SlimcError:
        raise
    except Exception as exc:  # zipfile, JSON and torch errors all mean "not a usable archive"
        raise ModelLoadError(
            f"{path} is not a readable torch.export archive ({type(exc).__name__}: {first_line(exc, 200)}). Re-create "
            "it with torch.export.save(torch.export.export(model, args), 'model.pt2') using the same PyTorch version."
        ) from None
    pt2_safety.check_targets(path, program)
    return program


def _deserialize(path: Path):
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive import _package as package
    from torch.export.pt2_archive import constants as names

    with package.PT2ArchiveReader(str(path)) as reader:
        version = reader.read_string(names.ARCHIVE_VERSION_PATH)
        if version != names.ARCHIVE_VERSION_VALUE:
            raise ModelLoadError(f"{path}: archive version {version}, this PyTorch reads "
                                 f"{names.ARCHIVE_VERSION_VALUE}. Re-save it with this PyTorch version.")
        files = set(reader.get_file_names())
        program_file = names.MODELS_FILENAME_FORMAT.format(PROGRAM)
        if program_file not in files:
            raise ModelLoadError(
                f"{path} holds no exported program ({program_file}); it is not a torch.export.save archive."
            )
        raw = pt2_safety.check_program_json(path, reader.read_bytes(program_file))
        raw["guards_code"] = []  # Python source; torch compiles it into a guard function
        state_dict = _tensors(path, reader, files, "weights", names.WEIGHTS_DIR,
                              names.WEIGHTS_CONFIG_FILENAME_FORMAT.format(PROGRAM), names)
        constants = _tensors(path, reader, files, "constants", names.CONSTANTS_DIR,
                             names.CONSTANTS_CONFIG_FILENAME_FORMAT.format(PROGRAM), names)
        serialized = _dict_to_dataclass(schema.ExportedProgram, raw)
        # example_inputs=None: the sample inputs are a pickle and are never read.
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)


def _tensors(path: Path, reader, files: set[str], kind: str, folder: str, config_file: str, names) -> dict:
    """Raw (never pickled) tensors of ``kind`` ("weights"/"constants"), as torch.export.load builds them."""
    from torch.export.pt2_archive import _package as package

    if f"{folder}{PROGRAM}.pt" in files:
        raise pt2_safety.refuse(path, f"its {kind} are a pickle (the legacy format)")
    if config_file not in files:
        raise ModelLoadError(f"{path}: {config_file} is missing; the archive is incomplete.")
    config = package._load_payload_config(reader, config_file)
    for fqn, meta in config.config.items():
        if meta.use_pickle:
            raise pt2_safety.refuse(path, f"its {kind[:-1]} {fqn!r} is a pickle")
        if kind == "constants" and not meta.path_name.startswith(names.TENSOR_CONSTANT_FILENAME_PREFIX):
            raise pt2_safety.refuse(path, f"its constant {fqn!r} is a pickled Python object")
    # No entry is pickled now, so torch's reader takes only its raw-tensor branch.
    load = package._load_state_dict if kind == "weights" else package._load_constants
    return load(reader, PROGRAM)
