"""`slimc demo`: compress a real pretrained model shipped by a PyPI package; print the receipt.

The models and data come from pip packages (no model hub): all-MiniLM-L6-v2 (sentence
encoder, evaluated by embedding cosine on held-out Wikipedia text), SmolLM2-135M-Instruct
(causal LM from a GGUF file, evaluated by perplexity on Wikipedia, calibrated on the Lee news
corpus) and EfficientNet-Lite0 (ImageNet classifier, evaluated by top-1 agreement on
scikit-image photos with crops and flips).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from slimc.errors import OutputPathError


@dataclasses.dataclass(frozen=True)
class DemoModel:
    title: str
    passes: str
    build: Callable[[Path], dict[str, Any]]  # data folder -> compile() keyword arguments


def _minilm(data: Path) -> dict[str, Any]:
    from slimc import datasets
    from slimc.tools.models import minilm_path

    calib, evaluation = datasets.text_files(data)
    return {"model": minilm_path(), "calibration": calib, "evaluation": evaluation, "seq_len": 128}


def _smollm2(data: Path) -> dict[str, Any]:
    from slimc import datasets
    from slimc.tools.models import smollm2_gguf

    calib, evaluation = datasets.text_files(data)
    return {"model": smollm2_gguf(), "calibration": calib, "evaluation": evaluation, "seq_len": 128}


def _efficientnet(data: Path) -> dict[str, Any]:
    import torch

    from slimc import datasets
    from slimc.tools.models import efficientnet_lite0

    return {
        "model": efficientnet_lite0(),
        "example_inputs": torch.randn(1, 3, 224, 224),
        "evaluation": datasets.photo_dataset(224, n=32, seed=0),
    }


DEMO_MODELS = {
    "minilm": DemoModel("all-MiniLM-L6-v2 (sentence encoder, 22.7 M params)",
                        "prune(ratio=0.2, target=ffn, importance=flap, compensate=bias)", _minilm),
    "smollm2": DemoModel("SmolLM2-135M-Instruct (causal LM, GGUF Q4_1 weights)",
                         "prune(ratio=0.2, target=ffn, importance=wanda)", _smollm2),
    "efficientnet-lite0": DemoModel("EfficientNet-Lite0 (ImageNet classifier)", "cleanup", _efficientnet),
}


def run_demo(name: str, output: Path, *, passes: str | None = None, quiet: bool = False):
    """Compile demo model ``name``; write ``<output>/<name>.onnx`` and its JSON receipt."""
    import slimc

    demo = DEMO_MODELS[name]
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputPathError(f"{output} exists and is not a folder; give a folder for the demo's files.")
    output.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"slimc demo: {demo.title}, passes: {passes or demo.passes}")
    kwargs = demo.build(output / "data")
    result = slimc.compile(kwargs.pop("model"), passes or demo.passes, **kwargs)
    written = result.save(output / f"{name}.onnx")
    result.receipt.save(output / f"{name}.receipt.json")
    if not quiet:
        print(result.receipt)
        print(f"\nwrote {', '.join(map(str, written))} and {output / f'{name}.receipt.json'}")
    return result
