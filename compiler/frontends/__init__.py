"""Front ends: every supported model source becomes a `LoadedModel` (onnx_ir IR + input facts).

Dispatch is by type and, for paths, by what the path is:
- ``.onnx`` file (weights inline or in external data files)             -> onnx_file
- ``torch.nn.Module`` with example inputs, or a ``.pt2`` ExportedProgram -> torch_module / pt2
  (a transformers causal LM module is exported with its KV cache, like a folder: huggingface)
- Hugging Face model folder (config.json + safetensors) or ``.gguf``     -> huggingface
- pickled ``.pt`` / ``.pth`` / ``.bin`` whole models are refused (arbitrary code execution).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimc.errors import ModelLoadError
from slimc.model import LoadedModel, infer_input_specs, infer_task


def load(
    source: Any,
    example_inputs: Any = None,
    *,
    input_names: list[str] | None = None,
    dynamic: bool = True,
    cache_dir: str | os.PathLike | None = None,
    kv_cache: bool | None = None,
) -> LoadedModel:
    """Turn ``source`` into a `LoadedModel`.

    ``example_inputs`` (a tensor, tuple of tensors, or dict name -> tensor) is required for an
    ``nn.Module``. ``dynamic`` keeps batch (and sequence for token inputs) dynamic in the export.
    ``cache_dir`` caches exports of Hugging Face folders and GGUF files (default
    ``~/.cache/slimc``). ``kv_cache``: export a causal LM (folder, GGUF, transformers module) with
    past/present key-value tensors (`slimc.kvcache`); None (the default) means yes when ``dynamic``.
    """
    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, ir.Model):
        from slimc.onnx_io import external_files

        return _bare(source, "onnx_ir.Model", external_files(source))
    if _is_onnx_proto(source):
        return _bare(ir.serde.deserialize_model(source), "onnx.ModelProto")
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), example_inputs, input_names=input_names, dynamic=dynamic, cache_dir=cache_dir,
                          kv_cache=kv_cache)
    from slimc.frontends import torch_module

    if torch_module.is_torch_module(source):
        from slimc.frontends import hf_cache

        if hf_cache.is_causal_lm(source):
            if hf_cache.wants_cache(kv_cache, dynamic):
                return hf_cache.load_causal_lm_module(source, input_names=input_names)
            return hf_cache.load_plain_causal_lm_module(source, example_inputs, input_names=input_names,
                                                        dynamic=dynamic)
        return torch_module.load_module(source, example_inputs, input_names=input_names, dynamic=dynamic)
    raise ModelLoadError(
        f"cannot compile a {type(source).__name__}: pass an .onnx path, a Hugging Face folder, a .gguf or "
        ".pt2 file, an nn.Module with example_inputs, or an onnx_ir.Model."
    )


def _bare(model: ir.Model, source: str, paths: tuple[Path, ...] = ()) -> LoadedModel:
    """A graph with no front-end facts: brought to slimc's form (`slimc.normalize`: Constant weights
    become initializers), then input kinds, sizes and task are inferred from the graph."""
    from slimc.normalize import normalize

    from slimc.input_rules import metadata_image_size

    notes = normalize(model)
    inputs = infer_input_specs(model)
    stated = metadata_image_size(model)  # image folders are resized to the size the model states
    preprocess = {"size": stated[0]} if stated is not None and any(s.kind == "image" for s in inputs) else None
    return LoadedModel(model=model, inputs=inputs, task=infer_task(model, inputs), source=source, source_paths=paths,
                       notes=notes, image_preprocess=preprocess)


def _is_onnx_proto(source: Any) -> bool:
    return type(source).__name__ == "ModelProto" and hasattr(source, "graph")


def _load_path(path: Path, example_inputs, *, input_names, dynamic, cache_dir, kv_cache) -> LoadedModel:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder.")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from slimc.onnx_io import external_files, load_onnx

        model = load_onnx(path)
        return _bare(model, str(path), (path, *external_files(model)))  # outputs may touch none of them
    if path.is_dir() or suffix == ".gguf":
        from slimc.frontends import huggingface

        return huggingface.load_pretrained(path, dynamic=dynamic, cache_dir=cache_dir, kv_cache=kv_cache)
    if suffix == ".pt2":
        from slimc.frontends import pt2

        return pt2.load_pt2(path, input_names=input_names, dynamic=dynamic)
    if suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):
        from slimc.errors import UnsafeModelError

        raise UnsafeModelError(
            f"{path} is a pickled PyTorch file. Loading it runs arbitrary Python code from the file, so "
            "slimc refuses it. Instead: export it with torch.export.save(torch.export.export(model, args), "
            "'model.pt2') and pass the .pt2; or pass the nn.Module to slimc.compile() in Python; or save a "
            "Hugging Face folder (save_pretrained, safetensors)."
        )
    raise ModelLoadError(
        f"{path}: unknown model format '{suffix}'. slimc reads .onnx, .pt2, .gguf and Hugging Face folders."
    )
