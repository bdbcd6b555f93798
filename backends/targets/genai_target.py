"""``--target genai``: a folder ONNX Runtime GenAI (``onnxruntime_genai``) loads as it is.

The folder holds ``model.onnx`` with its weights in external data, ``genai_config.json``
(`slimc.backends.targets.genai_config`) and the tokenizer's files. The graph keeps slimc's
KV-cache interface (`slimc.kvcache`), which is the one GenAI's model builder writes, with two
adjustments the runtime's configuration forces, both on the graph's inputs and outputs only:

- **renumbering**: the runtime names cache tensors ``past_key_values.%d.key`` for ``0..layers-1``;
  after ``layerskip`` the remaining layers keep their indices, so they are renamed in order;
- **one KV head count**: ``num_key_value_heads`` is one number; after pruning KV groups a layer
  with fewer heads takes a padded past (sliced back to its heads inside the graph) and returns a
  zero-padded present, so each layer still computes with its own heads.

Verification loads the folder with ``og.Model`` and runs each evaluation sample as a prompt
(``append_tokens``, the runtime's prefill): logits and present tensors come back through
``get_output`` and are compared with the compressed ONNX graph. Timing is the prefill of one
sample, interleaved with the input model's folder, plus decode tokens/s (`decode_speed`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from slimc.backends.targets import Runner, Target
from slimc.errors import TargetError
from slimc.kvcache import CacheSpec, cache_spec, is_cache_input, is_cache_output

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


class GenAiTarget(Target):
    """A folder for ``onnxruntime_genai``: ``model.onnx`` (+ data), ``genai_config.json``, tokenizer files."""

    name = "genai"
    suffix = ""
    folder = True
    extra = "genai"
    modules = ("onnxruntime_genai",)

    def __init__(self) -> None:
        self.loaded: Any = None
        self.config: dict[str, Any] | None = None

    def use_source(self, loaded: Any) -> None:
        self.loaded = loaded

    def unsupported(self, proto: onnx.ModelProto) -> dict[str, str]:
        check_interface(proto)
        return {}

    def notes(self, proto: onnx.ModelProto) -> list[str]:
        spec = cache_spec(ir.serde.deserialize_model(_io_only(proto)))
        notes = []
        if spec is not None and [layer.index for layer in spec.layers] != list(range(len(spec.layers))):
            notes.append(f"cache layers {[layer.index for layer in spec.layers]} are renumbered 0..{len(spec.layers) - 1} "
                         "in the folder's graph I/O (ONNX Runtime GenAI counts layers from 0)")
        heads = sorted({layer.kv_heads for layer in spec.layers} if spec else set(), key=str)
        if len(heads) > 1:
            notes.append(f"layers with fewer than {heads[-1]} KV heads take a cache padded to {heads[-1]} heads in "
                         "the runtime (genai_config.json holds one count); their compute is unchanged")
        return notes

    def convert(self, onnx_path: Path, out_dir: Path, stem: str) -> list[Path]:
        from slimc.backends.targets import genai_config
        from slimc.onnx_io import load_onnx, save_onnx

        model = load_onnx(onnx_path)
        spec = cache_spec(model)
        order = [layer.index for layer in spec.layers]
        _pad_heads(model, spec)
        _renumber(model, order)
        spec = cache_spec(model)
        if self.config is None:  # read once: the input model's folder is converted with the same facts
            self.config = genai_config.source_config(self.loaded)
        config = self.config
        tokenizer = getattr(self.loaded, "tokenizer", None)
        document = genai_config.build(model, spec, config, tokenizer, "model.onnx")
        files = save_onnx(model, out_dir / "model.onnx", external_data=True)
        (out_dir / "genai_config.json").write_text(json.dumps(document, indent=4) + "\n")
        return files + [out_dir / "genai_config.json"] + self._tokenizer_files(out_dir)

    def _tokenizer_files(self, out_dir: Path) -> list[Path]:
        """The tokenizer's files: saved from the loaded tokenizer, or copied from beside an ONNX input."""
        tokenizer = getattr(self.loaded, "tokenizer", None)
        paths = tuple(getattr(self.loaded, "source_paths", ()) or ())
        written: list[Path] = []
        if tokenizer is not None:
            tmp = out_dir / ".tokenizer"
            tokenizer.save_pretrained(tmp)
            for f in sorted(tmp.iterdir()):
                written.append(Path(shutil.move(str(f), out_dir / f.name)))
            shutil.rmtree(tmp, ignore_errors=True)
        elif paths and Path(paths[0]).suffix.lower() == ".onnx":
            for name in TOKENIZER_FILES:
                if (Path(paths[0]).parent / name).is_file():
                    written.append(Path(shutil.copyfile(Path(paths[0]).parent / name, out_dir / name)))
        if not any(f.name == "tokenizer.json" for f in written):
            raise TargetError("target 'genai': the model has no tokenizer.json, and ONNX Runtime GenAI tokenizes with "
                              "it. Compile from the Hugging Face folder or GGUF file, or put the tokenizer's files "
                              "(tokenizer.json, tokenizer_config.json) beside the .onnx file.")
        return written

    def load(self, files: Sequence[Path], threads: int | None, source: onnx.ModelProto) -> Runner:
        import onnxruntime_genai as og

        folder = Path(files[0]).parent
        config = og.Config(str(folder))
        if threads:
            options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        model = og.Model(config)
        return GenAiRunner(model, og, source).runner(f"onnxruntime-genai {og.__version__}")


class GenAiRunner:
    """Runs evaluation samples as prompts through ``og.Generator`` and returns the source model's outputs."""

    def __init__(self, model: Any, og: Any, source: onnx.ModelProto) -> None:
        self.model, self.og = model, og
        self.outputs = [o.name for o in source.graph.output]
        indices = sorted({int(n.split(".")[1]) for n in self.outputs if is_cache_output(n)})
        renamed = {old: new for new, old in enumerate(indices)}
        # the folder's output names, in the source's order (cache layers renumbered 0..n-1)
        self.names = [f"present.{renamed[int(n.split('.')[1])]}.{n.split('.')[2]}" if is_cache_output(n) else n
                      for n in self.outputs]
        self.heads = [_static_dim(o, 1) if is_cache_output(o.name) else None for o in source.graph.output]

    def runner(self, runtime: str) -> Runner:
        return Runner(run=self.run, bind=self.bind, runtime=runtime, decode=self.decode)

    def decode(self, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
        """Greedy generation of ``new_tokens`` after ``prompt``: (seconds to the first token, seconds per later token)."""
        gen = self.generator(prompt, new_tokens)
        start = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            gen.generate_next_token()
        end = time.perf_counter()
        return first - start, (end - first) / max(new_tokens - 1, 1)

    def generator(self, prompt: np.ndarray, new_tokens: int = 0) -> Any:
        params = self.og.GeneratorParams(self.model)
        length = len(prompt) + max(new_tokens, 1)
        params.set_search_options(max_length=length, min_length=length if new_tokens else 0, do_sample=False)
        return self.og.Generator(self.model, params)

    def run(self, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        per_sample = []
        for prompt in prompts(batch):
            gen = self.generator(prompt)
            gen.append_tokens(prompt)
            per_sample.append([_output(gen, name, heads, len(prompt)) for name, heads in zip(self.names, self.heads)])
        return [np.concatenate(parts, axis=0) for parts in zip(*per_sample)]

    def bind(self, batch: dict[str, np.ndarray]):
        prompt = prompts(batch)[0]

        def prefill():
            self.generator(prompt).append_tokens(prompt)

        return prefill


def _output(gen: Any, name: str, heads: int | None, length: int) -> np.ndarray:
    """One output after a prompt. A present tensor is cut to the source's interface: a layer padded to
    more KV heads (`_pad_heads`) back to its heads, a shared past/present buffer (GroupQueryAttention,
    max_length long) to the prompt's positions."""
    out = np.asarray(gen.get_output(name))
    return out[:, :heads, :length] if is_cache_output(name) else out


def _static_dim(value: onnx.ValueInfoProto, axis: int) -> int | None:
    dims = value.type.tensor_type.shape.dim
    return dims[axis].dim_value if len(dims) > axis and dims[axis].HasField("dim_value") else None


def prompts(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Each sample's token ids as a prompt. The runtime builds the mask and positions of a fresh
    prompt itself, so a sample must be a full forward: no past, no padding, positions 0..n-1."""
    ids = np.asarray(batch["input_ids"], dtype=np.int64)
    for name, value in batch.items():
        if is_cache_input(name) and np.shape(value)[2] != 0:
            raise TargetError(f"target 'genai': the evaluation data feeds {name} with a past of length "
                              f"{np.shape(value)[2]}; the runtime owns the cache, so verification runs full forwards "
                              "(past length 0). Evaluate with text (--eval FILE) or with empty past tensors.")
    if "attention_mask" in batch and not np.all(np.asarray(batch["attention_mask"]) == 1):
        raise TargetError("target 'genai': the evaluation data is padded (attention_mask has zeros); the runtime "
                          "masks padding itself, so verification needs unpadded samples (text windows are).")
    if "position_ids" in batch and not np.array_equal(np.asarray(batch["position_ids"]),
                                                      np.broadcast_to(np.arange(ids.shape[1]), ids.shape)):
        raise TargetError("target 'genai': the evaluation data's position_ids are not 0..n-1; the runtime numbers "
                          "a prompt's positions from 0, so verification needs samples that do too.")
    return [row for row in ids]


def check_interface(proto: onnx.ModelProto) -> None:
    """A causal LM with slimc's KV-cache interface, or a `TargetError` that says what is missing."""
    model = ir.serde.deserialize_model(_io_only(proto))
    names_in = {v.name for v in model.graph.inputs}
    names_out = {v.name for v in proto.graph.output}
    if "input_ids" not in names_in or "logits" not in names_out:
        raise TargetError("target 'genai' runs causal language models (inputs input_ids, outputs logits); this model "
                          f"takes {sorted(names_in)} and returns {sorted(names_out)}. Use --target onnx for it.")
    try:
        spec = cache_spec(model)
    except ValueError as exc:
        raise TargetError(f"target 'genai': the model's KV cache is incomplete: {exc}.") from None
    if spec is None:
        raise TargetError("target 'genai': the model has no KV cache (no past_key_values.N.key/value inputs), so the "
                          "runtime would recompute the whole prefix for every token. Export it with its cache "
                          "(the default; not --no-kv-cache).")
    if spec.output_names - names_out:
        raise TargetError(f"target 'genai': the graph takes past tensors but does not return "
                          f"{', '.join(sorted(spec.output_names - names_out))}.")
    ids = next(v for v in model.graph.inputs if v.name == "input_ids")
    if ids.shape is not None and len(ids.shape) == 2 and isinstance(ids.shape[1], int):
        raise TargetError(f"target 'genai': input_ids has static dims {ids.shape}; the runtime feeds prompts of any "
                          "length and then one token at a time. Drop --static-shapes for this target.")


def _io_only(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph's inputs alone, without nodes or weights (cheap to read the cache interface from;
    outputs left out, as nothing produces them in this copy)."""
    slim = onnx.ModelProto(ir_version=proto.ir_version)
    slim.opset_import.extend(proto.opset_import)
    slim.graph.input.extend(proto.graph.input)
    return slim


def _renumber(model: ir.Model, order: list[int]) -> None:
    """Cache inputs/outputs of layer ``order[k]`` renamed to layer ``k``."""
    if order == list(range(len(order))):
        return
    renamed = {old: new for new, old in enumerate(order)}
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        name = value.name or ""
        if is_cache_input(name) or is_cache_output(name):
            parts = name.split(".")
            parts[-2] = str(renamed[int(parts[-2])])
            value.name = "~" + ".".join(parts)  # two passes: new names may equal old ones of other layers
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if (value.name or "").startswith("~"):
            value.name = value.name[1:]


def _pad_heads(model: ir.Model, spec: CacheSpec) -> None:
    """Layers with fewer KV heads than the most take a past of the most heads (sliced to theirs) and
    return a present zero-padded to it: the runtime allocates one cache shape for every layer."""
    heads = {layer.kv_heads for layer in spec.layers}
    if None in heads and len(heads) > 1:
        raise TargetError("target 'genai': some cache layers have a dynamic KV head count and others a fixed one; "
                          "the runtime needs one count for every layer.")
    if len(heads) <= 1:
        return
    most = max(heads)
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    for layer in spec.layers:
        if layer.kv_heads == most:
            continue
        for past, present in zip(layer.names[:2], layer.names[2:]):
            _widen_past(model, inputs[past], layer.kv_heads, most)
            _widen_present(model, outputs[present], layer.kv_heads, most)


def _const(model: ir.Model, name: str, values: list[int]) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.array(values, np.int64)))
    model.graph.register_initializer(value)
    return value


def _widen_past(model: ir.Model, value: ir.Value, heads: int, most: int) -> None:
    """Graph input ``value`` ([batch, heads, past, dim]) becomes a [batch, most, past, dim] input sliced to ``heads``."""
    name = value.name
    value.name = f"{name}.narrow"
    wide = ir.Value(name=name, shape=ir.Shape([most if axis == 1 else d for axis, d in enumerate(value.shape)]),
                    type=value.type)
    starts, ends, axes = (_const(model, f"{name}.{what}", [v]) for what, v in (("start", 0), ("end", heads), ("axis", 1)))
    node = ir.Node("", "Slice", [wide, starts, ends, axes], num_outputs=1)
    node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type = f"{name}.sliced", value.shape, value.type
    value.replace_all_uses_with(node.outputs[0])
    graph = model.graph
    graph.inputs[graph.inputs.index(value)] = wide
    graph.insert_before(graph.node(0), node) if len(graph) else graph.append(node)


def _widen_present(model: ir.Model, value: ir.Value, heads: int, most: int) -> None:
    """Graph output ``value`` ([batch, heads, total, dim]) is returned zero-padded to ``most`` heads."""
    name = value.name
    value.name = f"{name}.narrow"
    pads = _const(model, f"{name}.pads", [0, 0, 0, 0, 0, most - heads, 0, 0])
    node = ir.Node("", "Pad", [value, pads], num_outputs=1)
    out = node.outputs[0]
    out.name, out.type = name, value.type
    out.shape = ir.Shape([most if axis == 1 else d for axis, d in enumerate(value.shape)])
    graph = model.graph
    graph.append(node)
    graph.outputs[graph.outputs.index(value)] = out
