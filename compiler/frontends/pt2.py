"""`.pt2` front end: an ExportedProgram saved with ``torch.export.save`` -> IR.

Unlike a pickled ``.pt``, a ``.pt2`` archive holds a serialised graph and raw weights, not
Python objects, so loading it runs no code from the file. The program is already traced, so
its dynamic dims are whatever it was exported with: ``dynamic`` cannot add or remove any, and
is accepted only so every front end takes the same arguments.
"""

from __future__ import annotations

import os
from pathlib import Path

from slimc.errors import ModelLoadError, first_line
from slimc.model import LoadedModel


def load_pt2(path: str | os.PathLike, *, input_names: list[str] | None = None, dynamic: bool = True) -> LoadedModel:
    """Read ``path`` with ``torch.export.load`` and export its program to the IR."""
    from slimc.frontends import torch_module

    path = Path(path)
    program = _read_program(path)
    loaded = torch_module.load_module(
        program, None, input_names=input_names, dynamic=dynamic, source=f"{path.name} (torch.export archive)"
    )
    loaded.source_paths = (path,)
    return loaded


def _read_program(path: Path):
    from slimc.frontends.torch_module import quiet_exporter

    try:
        import torch
    except ImportError:
        raise ModelLoadError(
            f"{path} is a PyTorch archive; reading it needs PyTorch: pip install 'slimc[torch]'."
        ) from None
    try:
        with quiet_exporter():
            return torch.export.load(str(path))
    except Exception as exc:  # zipfile, JSON and torch errors all mean "not a usable archive"
        first = first_line(exc, 200)
        raise ModelLoadError(
            f"{path} is not a readable torch.export archive ({type(exc).__name__}: {first}). Re-create it with "
            "torch.export.save(torch.export.export(model, args), 'model.pt2') using the same PyTorch version."
        ) from None

