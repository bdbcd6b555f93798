"""Hugging Face front end: a model folder (config.json + safetensors) or a GGUF file, offline.

transformers loads the model with ``local_files_only`` (and ``HF_HUB_OFFLINE=1``): nothing is
ever fetched. Causal LMs (``*ForCausalLM``, ``*LMHeadModel``, every GGUF) are exported with a KV
cache by default (`slimc.frontends.hf_cache`, the interface in `slimc.kvcache`): inputs
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value``; outputs
``logits`` and ``present.{i}.key/value``. With ``kv_cache=False`` (``--no-kv-cache``), or with
``dynamic=False`` (a static graph cannot grow a cache), and for every other kind, the model is
wrapped so ``forward`` returns one tensor and keeps no KV cache, then exported by the PyTorch
front end:

- causal LMs without a cache: ``logits [batch, seq, vocab]``;
- image classifiers (``*ForImageClassification``): ``logits [batch, classes]``;
- sequence classifiers (``*ForSequenceClassification``): ``logits [batch, classes]``;
- anything else (encoders such as BERT / sentence-transformers): ``last_hidden_state``.

Attention is loaded as ``eager`` so the graph holds explicit MatMul / Softmax / GQA Expand
nodes, which the pruning and quantization passes understand (SDPA adds NaN guards).

Exports are cached under ``cache_dir`` (default ``$SLIMC_CACHE_DIR`` or
``~/.cache/slimc/exports``), keyed by the files' resolved paths, sizes and modification
times, the slimc / torch / transformers versions and the ``dynamic`` and KV-cache flags. A cache hit loads
the ``.onnx`` and re-reads only the config and tokenizer: no weights, no export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from slimc import progress
from slimc.errors import ModelLoadError, UnsafeModelError, first_line
from slimc.kvcache import GenerationInfo
from slimc.model import LoadedModel, infer_input_specs, size_images

try:
    import torch

    _Module = torch.nn.Module
except ImportError:  # torch is optional; _transformers() says how to install it
    _Module = object

log = logging.getLogger("slimc")

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
GGUF_NOTE = (
    "weights were dequantized from the GGUF file's {storage} storage, so the fp32 baseline already carries "
    "that rounding: fidelity is measured against the dequantized model, not the original weights."
)
# llama.cpp names files after their storage type: "SmolLM2-135M-Instruct.Q4_1.gguf".
_GGUF_TYPE = re.compile(r"(?<![A-Za-z0-9])(I?Q\d+_[A-Z0-9_]*[A-Z0-9]|BF16|F16|F32)(?![A-Za-z0-9])", re.I)
_OUTPUT = {"causal-lm": "logits", "image-classifier": "logits", "classifier": "logits", "encoder": "last_hidden_state"}


@dataclasses.dataclass
class CacheStats:
    """How many loads exported and how many reused a cached export (tests and --verbose)."""

    exports: int = 0
    hits: int = 0


CACHE_STATS = CacheStats()


@dataclasses.dataclass
class _Source:
    """Where the model lives: a folder, or a GGUF file (``gguf`` is its name) in ``folder``."""

    path: Path
    folder: Path
    gguf: str | None

    @property
    def extra(self) -> dict[str, Any]:
        """Keyword arguments every transformers ``from_pretrained`` call needs. ``trust_remote_code=False``
        stated, not defaulted: without it transformers asks on a terminal whether to run the folder's code."""
        return {"local_files_only": True, "trust_remote_code": False, **({"gguf_file": self.gguf} if self.gguf else {})}

    @property
    def label(self) -> str:
        # Packaged folders are often just "model": the parent's name says which one.
        name = self.path.name if self.gguf else f"{self.path.parent.name}/{self.path.name}"
        return f"{name} ({'GGUF file' if self.gguf else 'Hugging Face folder'})"


def load_pretrained(path: str | os.PathLike, *, dynamic: bool = True, cache_dir=None,
                    kv_cache: bool | None = None) -> LoadedModel:
    """Load a Hugging Face folder or ``.gguf`` file; export it, or reuse the cached export.

    ``kv_cache``: export a causal LM with past/present key-value tensors (`slimc.kvcache`); None (the
    default) means yes when ``dynamic``, since a static graph cannot take a growing cache.
    """
    from slimc.frontends import hf_cache

    source = _source(Path(path))
    with_cache = hf_cache.wants_cache(kv_cache, dynamic)
    entry = _cache_root(cache_dir) / _cache_key(source, dynamic, with_cache)
    cached = _read_cache(entry)
    if cached is not None:
        model, meta, config, tokenizer = cached
    else:
        config = _load_config(source)
        kind = _kind(config, source)
        model, notes, generation = _export(source, config, kind, dynamic, with_cache)
        tokenizer = None if kind == "image-classifier" else _tokenizer(source)
        meta = {"kind": kind, "notes": notes, "generation": generation.to_json() if generation else None}
        _write_cache(entry, model, meta, config, tokenizer)
    loaded = _describe(source, model, config, meta["kind"], meta["notes"], tokenizer)
    loaded.generation = GenerationInfo.from_json(meta["generation"]) if meta.get("generation") else None
    return loaded


def _source(path: Path) -> _Source:
    if path.is_dir():
        _check_folder(path)
        return _Source(path=path, folder=path, gguf=None)
    if path.suffix.lower() == ".gguf":
        return _Source(path=path, folder=path.parent, gguf=path.name)
    raise ModelLoadError(f"{path} is neither a Hugging Face model folder nor a .gguf file.")


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a Hugging Face model folder: it has no config.json. Point at the folder that "
            "save_pretrained() wrote (config.json + model.safetensors)."
        )
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise UnsafeModelError(
            f"{folder} holds only pickled weights ({', '.join(pickled[:3])}); loading them can run arbitrary "
            "code. Convert them to safetensors: model.save_pretrained(folder, safe_serialization=True)."
        )
    raise ModelLoadError(
        f"{folder} has a config.json but no weights (*.safetensors). Copy the weights next to config.json, "
        "or save the model again with save_pretrained()."
    )


def _transformers():
    # Must be set before transformers/huggingface_hub are first imported to take effect;
    # local_files_only on every call covers the case where they already were.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ModelLoadError("loading Hugging Face models needs PyTorch and transformers: pip install 'slimc[torch]'.") from None
    return transformers


def _load_config(source: _Source):
    tf = _transformers()
    try:
        return tf.AutoConfig.from_pretrained(source.folder, **source.extra)
    except ImportError as exc:  # e.g. the gguf package
        raise ModelLoadError(f"reading {source.label} needs a missing package: {exc}") from None
    except Exception as exc:  # JSON errors, unknown model_type, corrupt GGUF header...
        first = first_line(exc)
        if "custom code" in first or "trust_remote_code" in first:
            raise UnsafeModelError(
                f"{source.label} needs its own Python code (auto_map in config.json) to load; slimc never runs a model "
                "folder's code. Load the model in Python yourself and pass the nn.Module to slimc.compile(), or "
                "export it to ONNX."
            ) from None
        raise ModelLoadError(
            f"cannot read the model config of {source.label}: {first}. Check that config.json is valid JSON "
            "from save_pretrained(), and that this transformers version knows its model_type."
        ) from None


def _kind(config, source: _Source) -> str:
    if source.gguf:
        return "causal-lm"  # transformers loads GGUF files only as causal LMs
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if arch.endswith("ForImageClassification"):
        return "image-classifier"
    if arch.endswith("ForSequenceClassification"):
        return "classifier"
    return "encoder"


def _cache_root(cache_dir) -> Path:
    default = Path.home() / ".cache" / "slimc" / "exports"
    return Path(cache_dir or os.environ.get("SLIMC_CACHE_DIR") or default)


def _cache_key(source: _Source, dynamic: bool, kv_cache: bool = True) -> str:
    """Hash of what decides the export: the files (path, size, mtime) and the tool versions."""
    import transformers

    from slimc import __version__

    files = [source.path] if source.gguf else sorted(p for p in source.folder.iterdir() if p.is_file())
    stamps = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps([stamps, __version__, torch.__version__, transformers.__version__, bool(dynamic),
                       bool(kv_cache)])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _read_cache(entry: Path):
    """(model, meta, config, tokenizer) from a cache entry, or None on a miss or a bad entry.

    The entry keeps the config and tokenizer next to the .onnx: re-reading them from a GGUF
    file takes ~20 s (the whole vocabulary is parsed in Python), from the entry well under one.
    """
    from slimc import onnx_io

    if not (entry / "model.onnx").is_file():
        return None
    tf = _transformers()
    try:
        meta = json.loads((entry / "meta.json").read_text())
        model = onnx_io.load_onnx(entry / "model.onnx")
        safe = {"local_files_only": True, "trust_remote_code": False}
        config = tf.AutoConfig.from_pretrained(entry / "hf", **safe)
        tokenizer = tf.AutoTokenizer.from_pretrained(entry / "hf", **safe) if meta["tokenizer"] else None
    except Exception as exc:  # anything unreadable means "export again", never a failed load
        log.warning("ignoring unreadable cached export %s (%s); exporting again", entry, exc)
        return None
    CACHE_STATS.hits += 1
    log.info("reusing cached export %s", entry)
    return model, meta, config, tokenizer


def _write_cache(entry: Path, model, meta: dict[str, Any], config, tokenizer) -> None:
    """Write the entry into a temporary folder and rename it into place (atomic for readers)."""
    from slimc import atomic, onnx_io

    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.partial_dir(entry.parent)
        config.save_pretrained(tmp / "hf")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "hf")
        (tmp / "meta.json").write_text(json.dumps({**meta, "tokenizer": tokenizer is not None}))
        onnx_io.save_onnx(model, tmp / "model.onnx")
        if entry.exists():  # an unreadable entry that _read_cache skipped
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    except Exception as exc:  # a read-only home or a full disk must not stop the compile
        log.warning("could not cache the export in %s: %s", entry.parent, exc)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _export(source: _Source, config, kind: str, dynamic: bool, kv_cache: bool):
    """(model, notes, generation info of a causal LM) exported from the weights."""
    from slimc.frontends import hf_cache, torch_module

    module = _load_weights(source, kind)
    generation = hf_cache.generation_info(module) if kind == "causal-lm" else None
    if kind == "causal-lm" and kv_cache:
        model = hf_cache.export(module, label=type(module).__name__)
        CACHE_STATS.exports += 1
        return model, [], generation
    wrapper = _SingleOutput.build(module, kind)
    example = _example_inputs(config, kind, wrapper, source)
    loaded = torch_module.load_module(
        wrapper, example, dynamic=dynamic, output_names=[_OUTPUT[kind]], task=kind, source=source.label,
        label=type(module).__name__,
    )
    CACHE_STATS.exports += 1
    return loaded.model, loaded.notes, generation


def _load_weights(source: _Source, kind: str):
    tf = _transformers()
    auto = {
        "causal-lm": tf.AutoModelForCausalLM,
        "image-classifier": tf.AutoModelForImageClassification,
        "classifier": tf.AutoModelForSequenceClassification,
        "encoder": tf.AutoModel,
    }[kind]
    from slimc.frontends.torch_module import quiet_exporter

    bars_were_on = tf.utils.logging.is_progress_bar_enabled()
    if progress.verbosity() < progress.VERBOSE:
        tf.utils.logging.disable_progress_bar()  # one slimc status line instead of per-tensor bars
    try:
        with progress.step(f"loading {source.label} with transformers"), quiet_exporter():
            model = auto.from_pretrained(
                source.folder, dtype=torch.float32, attn_implementation="eager", **source.extra
            )
    except Exception as exc:  # missing/corrupt weights, shape mismatches, missing packages
        first = first_line(exc)
        raise ModelLoadError(
            f"transformers cannot load the weights of {source.label}: {type(exc).__name__}: {first}. "
            "Check that the weight files are complete and match config.json."
        ) from None
    finally:
        if bars_were_on:
            tf.utils.logging.enable_progress_bar()
    return model.eval()


class _SingleOutput(_Module):
    """Calls the HF model without a KV cache and returns one named field of its output."""

    def __init__(self, model, field: str, token_types: bool, no_cache: bool):
        super().__init__()
        self.model, self.field = model, field
        self.token_types, self.no_cache = token_types, no_cache

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None):
        if pixel_values is not None:
            return getattr(self.model(pixel_values=pixel_values), self.field)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.no_cache:
            kwargs["use_cache"] = False
        return getattr(self.model(**kwargs), self.field)

    @classmethod
    def build(cls, model, kind: str) -> _SingleOutput:
        params = inspect.signature(model.forward).parameters
        types = "token_type_ids" in params and (getattr(model.config, "type_vocab_size", 0) or 0) > 0
        return cls(model, _OUTPUT[kind], token_types=types, no_cache="use_cache" in params).eval()


def _example_inputs(config, kind: str, wrapper, source: _Source) -> dict[str, Any]:
    """Batch 2 x 16 tokens below the vocabulary size, or 2 images of the model's size."""
    gen = torch.Generator().manual_seed(0)
    if kind == "image-classifier":
        h, w = _image_size(config, source.folder)
        return {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), h, w, generator=gen)}
    vocab = _vocab_size(config) or 2
    seq = min(16, getattr(config, "max_position_embeddings", 16) or 16)
    ids = torch.randint(0, vocab, (2, seq), generator=gen)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if wrapper.token_types:
        example["token_type_ids"] = torch.zeros_like(ids)
    return example


def _vocab_size(config) -> int | None:
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    return vocab


def _preprocessor_config(folder: Path) -> dict[str, Any]:
    file = folder / "preprocessor_config.json"
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", file)
        return {}


def _image_size(config, folder: Path) -> tuple[int, int]:
    """The config's image size (ViT position embeddings fix it), else the preprocessor's, else 224."""
    size = getattr(config, "image_size", None)
    if size is None:
        pre = _preprocessor_config(folder)
        size = pre.get("crop_size") if pre.get("do_center_crop") else None
        size = size or pre.get("size") or 224
    if isinstance(size, dict):
        edge = size.get("shortest_edge", 224)
        return int(size.get("height", edge)), int(size.get("width", edge))
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


def _image_preprocess(config, folder: Path, notes: list[str]) -> dict[str, Any]:
    pre = _preprocessor_config(folder)
    if "image_mean" not in pre or "image_std" not in pre:
        notes.append("no image_mean/image_std in preprocessor_config.json: images are normalised with ImageNet's.")
    return {
        "size": _image_size(config, folder),
        "mean": list(pre.get("image_mean", IMAGENET_MEAN)),
        "std": list(pre.get("image_std", IMAGENET_STD)),
    }


# Files a tokenizer is built from; without one of them AutoTokenizer would return an empty
# default tokenizer for the model type (transformers 5), which silently mis-tokenises text.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def _tokenizer(source: _Source):
    if not source.gguf and not any((source.folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    tf = _transformers()
    try:
        with progress.step(f"loading the tokenizer of {source.label}"):
            return tf.AutoTokenizer.from_pretrained(source.folder, **source.extra)
    except Exception as exc:  # no tokenizer files: the model still compiles, text data is refused later
        log.info("no tokenizer for %s (%s: %s)", source.label, type(exc).__name__, str(exc)[:200])
        return None


def _describe(source: _Source, model, config, kind: str, notes: list[str], tokenizer) -> LoadedModel:

    notes = list(notes)
    inputs = infer_input_specs(model)
    vocab = _vocab_size(config)
    for spec in inputs:
        if spec.name == "input_ids" and vocab:
            spec.kind, spec.high = "tokens", vocab
    if source.gguf:
        match = _GGUF_TYPE.search(source.gguf)
        notes.append(GGUF_NOTE.format(storage=match.group(1).upper() if match else "quantized"))
    image = _image_preprocess(config, source.folder, notes) if kind == "image-classifier" else None
    if image and image.get("size"):  # synthetic images at the size the preprocessor states
        size = image["size"]
        size_images(inputs, (size, size) if isinstance(size, int) else tuple(size), "from the preprocessor config")
    return LoadedModel(
        model=model,
        inputs=inputs,
        task=kind,
        source=source.label,
        source_paths=(source.path,),
        tokenizer=tokenizer,
        image_preprocess=image,
        notes=notes,
    )
