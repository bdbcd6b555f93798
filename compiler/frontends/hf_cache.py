"""KV-cache export of a transformers causal LM: the graph `slimc.kvcache` describes.

The model is wrapped in a module with flat tensor inputs and outputs
(``input_ids, attention_mask[, position_ids], past_key_values.{i}.key/value`` ->
``logits, present.{i}.key/value``). The wrapper builds a transformers ``DynamicCache`` from the
past tensors, runs the model with ``use_cache=True`` and returns the cache's tensors after the
model appended this step's keys and values, so the graph holds exactly the attention
transformers runs in ``generate()``.

The trace uses a past of 3 tokens and 5 new ones (batch 2): ``torch.export`` specialises dims of
size 0 and 1, so a trace on an empty past would freeze it. The same graph serves a full forward:
fed a past of length 0 (`slimc.kvcache.CacheSpec.empty_past`) every concatenation is with an
empty tensor and the mask covers only the new tokens (tested against transformers for both).
The example past is the model's own keys and values for 3 tokens, so every cache shape (KV
heads, head size, per layer) comes from the model, not from reading its config.

Dims are named by role afterwards: ``batch``, ``seq`` (new tokens), ``past_seq`` and
``total_seq`` (mask and present length, ``past_seq + seq``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import onnx_ir as ir

from slimc import kvcache
from slimc.errors import ExportError, ModelLoadError, OptionError
from slimc.model import LoadedModel, infer_input_specs

try:
    import torch

    _Module = torch.nn.Module
except ImportError:  # torch is optional; the caller checked for it
    _Module = object

BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past_seq", "total_seq"
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 5, 3


def is_causal_lm(module: Any) -> bool:
    """A transformers model that generates text (``*ForCausalLM`` / ``*LMHeadModel`` with generate)."""
    import sys

    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(module, tf.PreTrainedModel):
        return False
    return type(module).__name__.endswith(("ForCausalLM", "LMHeadModel")) and hasattr(module, "generate")


class CausalLMWithCache(_Module):
    """Flat tensors in, flat tensors out, with a transformers ``DynamicCache`` in between."""

    def __init__(self, model):
        super().__init__()
        self.model, self.positions = model, _takes_positions(model)
        self.cache_arg = cache_argument(model)

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(ddp_cache_data=[tuple(pair) for pair in past])
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, self.cache_arg: cache, "use_cache": True}
        if self.positions:
            kwargs["position_ids"] = position_ids
        logits = self.model(**kwargs).logits
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, *present)


def cache_argument(model) -> str:
    """The forward's cache keyword: transformers 5.x renames ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _takes_positions(model) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Eager attention while exporting (explicit MatMul/Softmax/GQA Expand for the passes), restored after:
    the caller's module must not change."""
    before = getattr(model.config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


@contextlib.contextmanager
def without_cache(model) -> Iterator[None]:
    """``use_cache`` off while exporting the plain form (a returned cache object cannot be traced), restored
    after."""
    config = model.config
    before = getattr(config, "use_cache", None)
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = before


def example(model) -> tuple[dict, list[str], list[str]]:
    """(keyword example inputs, input names, output names) for the trace: the model's own cache of
    ``_EXAMPLE_PAST`` tokens, then ``_EXAMPLE_SEQ`` new tokens."""
    from transformers.cache_utils import DynamicCache

    vocab = getattr(model.config.get_text_config(), "vocab_size", None) or 2
    b, s, p = _EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST
    ids = torch.randint(0, vocab, (b, p + s), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    try:
        with torch.no_grad():
            model(input_ids=ids[:, :p], attention_mask=torch.ones(b, p, dtype=torch.long), use_cache=True,
                  **{cache_argument(model): cache})
        past = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
    except Exception as exc:  # a model whose cache DynamicCache cannot hold (state-space, hybrid layers...)
        raise ExportError(
            f"{type(model).__name__} does not run with a transformers DynamicCache ({type(exc).__name__}: "
            f"{str(exc)[:200]}); export it without a KV cache (--no-kv-cache, kv_cache=False)."
        ) from exc
    past = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in past]
    if not past or any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in past):
        raise ExportError(
            f"{type(model).__name__} keeps a cache that is not one key and one value tensor "
            "[batch, heads, length, head_dim] per layer, so slimc cannot export it with a KV cache; "
            "export it without one (--no-kv-cache, kv_cache=False)."
        )
    takes_positions = _takes_positions(model)
    n = len(past) // 2
    # a model without position ids still gets them in the trace: the unused input is dropped by `export`
    kwargs = {"input_ids": ids[:, p:].clone(),  # a view would make torch.export guard on its strides
              "attention_mask": torch.ones(b, p + s, dtype=torch.long),
              "position_ids": torch.arange(p, p + s).expand(b, s).contiguous(),
              "past": [(past[2 * i], past[2 * i + 1]) for i in range(n)]}
    inputs = ["input_ids", "attention_mask"] + (["position_ids"] if takes_positions else [])
    inputs += [name.format(i) for i in range(n) for name in (kvcache.PAST_KEY, kvcache.PAST_VALUE)]
    outputs = ["logits"] + [name.format(i) for i in range(n) for name in (kvcache.PRESENT_KEY, kvcache.PRESENT_VALUE)]
    return kwargs, inputs, outputs


def dynamic_shapes(kwargs: dict) -> dict:
    """Batch, new-token and total lengths and every past length dynamic (``Dim.AUTO``: the model's own
    relations between them, e.g. mask length = past + new, are left for torch.export to find)."""
    from torch.export import Dim

    auto = Dim.AUTO
    shapes = {key: {0: auto, 1: auto} for key in kwargs if key != "past"}
    shapes["past"] = [({0: auto, 2: auto}, {0: auto, 2: auto}) for _ in kwargs["past"]]
    return shapes


def export(model, *, label: str) -> ir.Model:
    """The KV-cache graph of ``model`` (a transformers causal LM), dims named by role."""
    from slimc.frontends import torch_module

    with eager_attention(model):
        kwargs, inputs, outputs = example(model)
        wrapper = CausalLMWithCache(model).eval()
        program = torch_module.export_program(wrapper, (), kwargs, label=label, shapes=dynamic_shapes(kwargs))
        traced = inputs if "position_ids" in inputs else [*inputs[:2], "position_ids", *inputs[2:]]
        ir_model = torch_module.program_to_ir(program, input_names=traced, output_names=outputs, name=label)
    _drop_unused_inputs(ir_model, ("position_ids",))
    got = [v.name for v in ir_model.graph.inputs], [v.name for v in ir_model.graph.outputs]
    if got != (inputs, outputs):
        raise ExportError(
            f"the KV-cache export of {label} has inputs {got[0]} and outputs {got[1]}, not the expected {inputs} and "
            f"{outputs}; export it without a KV cache (--no-kv-cache, kv_cache=False)."
        )
    name_dims(ir_model)
    return ir_model


def _drop_unused_inputs(model: ir.Model, names: tuple[str, ...]) -> None:
    """Remove graph inputs nothing reads (position ids of a model that takes none)."""
    for value in list(model.graph.inputs):
        if value.name in names and not value.uses():
            model.graph.inputs.remove(value)


def name_dims(model: ir.Model) -> None:
    """Rename the exporter's symbols by role; present tensors are declared ``total_seq`` long."""
    from slimc.frontends.torch_module import _rename_symbols

    roles = {"input_ids": (BATCH, SEQ), "position_ids": (BATCH, SEQ), "attention_mask": (BATCH, TOTAL)}
    mapping: dict[str, str] = {}
    for value in model.graph.inputs:
        axes = roles.get(value.name) or ((BATCH, None, PAST, None) if kvcache.is_cache_input(value.name) else ())
        for dim, role in zip(value.shape or (), axes):
            if role is not None and isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str):
                if mapping.setdefault(dim.value, role) != role:
                    raise ExportError(f"the KV-cache export ties the {mapping[dim.value]} and {role} lengths together; "
                                      "export this model without a KV cache (--no-kv-cache, kv_cache=False).")
    _rename_symbols(model, {sym: role for sym, role in mapping.items() if sym != role})
    for value in model.graph.outputs:
        shape = value.shape
        if kvcache.is_cache_output(value.name) and shape is not None and len(shape) == 4:
            value.shape = ir.Shape([shape[0], shape[1], ir.SymbolicDim(TOTAL), shape[3]])


def generation_info(model) -> kvcache.GenerationInfo:
    """Token ids and context length from the model's generation config (else its config)."""
    config = model.config.get_text_config()
    gen = getattr(model, "generation_config", None)

    def pick(name: str):
        value = getattr(gen, name, None) if gen is not None else None
        return value if value is not None else getattr(config, name, None)

    eos = pick("eos_token_id")
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    context = next((getattr(config, key) for key in kvcache.CONTEXT_KEYS if isinstance(getattr(config, key, None), int)),
                   None)
    bos, pad = pick("bos_token_id"), pick("pad_token_id")
    return kvcache.GenerationInfo(
        eos_token_ids=eos_ids, bos_token_id=None if bos is None else int(bos),
        pad_token_id=None if pad is None else int(pad), context_length=context,
        model_type=getattr(config, "model_type", None), vocab_size=getattr(config, "vocab_size", None),
    )


def wants_cache(kv_cache: bool | None, dynamic: bool) -> bool:
    """Whether a causal LM is exported with its KV cache; a static export with one is refused."""
    if kv_cache and not dynamic:
        raise OptionError("a KV-cache export needs dynamic shapes (the cache grows by one token per step): drop "
                          "--static / dynamic=False, or export without a cache (--no-kv-cache, kv_cache=False).")
    return dynamic if kv_cache is None else bool(kv_cache)


def load_causal_lm_module(module, *, input_names=None) -> LoadedModel:
    """A transformers causal LM ``nn.Module``, exported with its KV cache (the inputs are the cache
    interface's, so no example inputs are needed; the module is not changed)."""
    if input_names is not None:
        raise ModelLoadError("input_names cannot rename a KV-cache export's inputs (slimc.kvcache fixes them); "
                             "drop input_names, or export without a cache (kv_cache=False).")
    label = type(module).__name__
    was_training = module.training
    try:
        model = export(module.eval(), label=label)
    finally:
        module.train(was_training)
    from slimc.frontends.huggingface import _vocab_size

    inputs = infer_input_specs(model)
    vocab = _vocab_size(module.config)
    for spec in inputs:
        if spec.name == "input_ids" and vocab:
            spec.kind, spec.high = "tokens", vocab
    return LoadedModel(model=model, inputs=inputs, task="causal-lm", source=f"{label} (PyTorch module)",
                       generation=generation_info(module))


def load_plain_causal_lm_module(module, example_inputs, *, input_names=None, dynamic: bool = True) -> LoadedModel:
    """A transformers causal LM ``nn.Module`` without a KV cache (``logits`` only), exported from the
    example inputs with eager attention; the module is restored afterwards."""
    from slimc.frontends import torch_module

    with eager_attention(module), without_cache(module):
        loaded = torch_module.load_module(module, example_inputs, input_names=input_names, dynamic=dynamic,
                                          task="causal-lm")
    loaded.generation = generation_info(module)
    return loaded
