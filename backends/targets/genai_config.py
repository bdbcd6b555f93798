"""``genai_config.json`` for a slimc causal LM: what ONNX Runtime GenAI needs to know to run the graph.

The facts come from two places, and the graph wins where both speak:

- the graph's KV-cache interface (`slimc.kvcache.cache_spec`): the cache layers, their KV heads
  and head size, the cache dtype, whether it takes ``position_ids``, the vocabulary (``logits``'
  last dim); and whether attention is ONNX Runtime's ``GroupQueryAttention``, which alone can
  write the present cache into the past buffer in place (``past_present_share_buffer``);
- the model's own configuration: ``config.json`` and ``generation_config.json`` of a Hugging Face
  folder, the metadata of a GGUF file (read through transformers), or, beside an ``.onnx`` input,
  the ``genai_config.json`` / ``config.json`` that came with it: the architecture name, hidden
  size, attention heads, context length, the bos/eos/pad ids and the sampling defaults.

Facts the runtime needs that neither place holds are a `TargetError` naming them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx_ir as ir

from slimc.errors import TargetError
from slimc.kvcache import CacheSpec

# ONNX Runtime GenAI 0.18's plain decoder-only model types: the graph holds the whole architecture,
# the type only names it. Any other architecture runs as the generic "decoder".
DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite", "olmo",
                           "smollm3", "nemotron"})
SEARCH_DEFAULTS = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


def source_config(loaded: Any) -> dict[str, Any]:
    """The model's configuration as one flat dict: config.json with generation_config.json over it
    (a Hugging Face folder or GGUF), or the ``model`` section of a genai_config.json beside an ONNX file;
    the token ids, context length and type the front end resolved (``loaded.generation``) over it."""
    config = _file_config(tuple(getattr(loaded, "source_paths", ()) or ()))
    info = getattr(loaded, "generation", None)  # what the front end resolved for generation wins
    if info is not None:
        for ours, theirs in (("bos_token_id", "bos_token_id"), ("pad_token_id", "pad_token_id"),
                             ("max_position_embeddings", "context_length"), ("model_type", "model_type"),
                             ("vocab_size", "vocab_size"), ("eos_token_id", "eos_token_ids")):
            if getattr(info, theirs, None) not in (None, []):
                config[ours] = getattr(info, theirs)
    return config


def _file_config(paths: tuple) -> dict[str, Any]:
    if not paths:
        return {}
    path = Path(paths[0])
    if path.suffix.lower() == ".gguf":
        return _gguf_config(path)
    folder = path if path.is_dir() else path.parent
    config = _read_json(folder / "config.json")
    config.update({k: v for k, v in _read_json(folder / "generation_config.json").items() if v is not None})
    genai = _read_json(folder / "genai_config.json").get("model", {}) if path.suffix.lower() == ".onnx" else {}
    if genai:  # a builder's folder: its numbers are the ones the runtime was given
        decoder = genai.get("decoder", {})
        config.setdefault("model_type", genai.get("type"))
        config.setdefault("max_position_embeddings", genai.get("context_length"))
        for ours, theirs in (("hidden_size", "hidden_size"), ("num_attention_heads", "num_attention_heads"),
                             ("head_dim", "head_size")):
            config.setdefault(ours, decoder.get(theirs))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            config.setdefault(key, genai.get(key))
    return {k: v for k, v in config.items() if v is not None}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _gguf_config(path: Path) -> dict[str, Any]:
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception:  # noqa: BLE001 - no config: the facts the graph holds are used, missing ones refused
        return {}
    return {k: v for k, v in config.to_dict().items() if v is not None}


def uses_group_query_attention(model: ir.Model, spec: CacheSpec) -> bool:
    """Whether every past key/value feeds ONNX Runtime's GroupQueryAttention, which may share the
    past and present buffers; a cache concatenated by plain ops must grow instead. Besides the
    attention, a past may only be read by ``Shape`` nodes that do not read its sequence axis (2):
    with a shared buffer that axis is the buffer's capacity, not the past length."""
    inputs = {v.name: v for v in model.graph.inputs}
    for name in spec.input_names:
        uses = {id(node): node for node, _ in inputs[name].uses()}.values()
        if not any(node.op_type == "GroupQueryAttention" for node in uses):
            return False
        for node in uses:
            if node.op_type == "GroupQueryAttention":
                continue
            if node.op_type != "Shape" or 2 in _shape_axes(node):
                return False
    return True


def _shape_axes(node: ir.Node) -> range:
    start = node.attributes["start"].value if "start" in node.attributes else 0
    end = node.attributes["end"].value if "end" in node.attributes else None
    return range(4)[start:end]


def _tokens(config: dict[str, Any], tokenizer: Any) -> tuple[Any, Any, Any]:
    """(bos, eos, pad) ids: the config's, else the tokenizer's; eos may be a list; pad defaults to eos."""
    def pick(key):
        value = config.get(key)
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, key, None)
        return value

    bos, eos, pad = pick("bos_token_id"), pick("eos_token_id"), pick("pad_token_id")
    if eos is None:
        raise TargetError("target 'genai': the model names no end-of-sequence token (no eos_token_id in its config, "
                          "generation_config or tokenizer), so generation could never stop. Give the tokenizer an "
                          "eos token (tokenizer_config.json) beside the model.")
    eos = [int(e) for e in eos] if isinstance(eos, (list, tuple)) else int(eos)
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return (int(bos) if bos is not None else None), eos, int(pad)


def build(model: ir.Model, spec: CacheSpec, config: dict[str, Any], tokenizer: Any, filename: str) -> dict[str, Any]:
    """The genai_config.json document for ``model`` (already renumbered: cache layers 0..n-1)."""
    kv_heads = {layer.kv_heads for layer in spec.layers}
    head_sizes = {layer.head_dim for layer in spec.layers} | {layer.value_head_dim for layer in spec.layers}
    heads = config.get("num_attention_heads")
    head_size = head_sizes.pop() if len(head_sizes) == 1 and None not in head_sizes else None
    if head_size is None:
        head_size = config.get("head_dim") or (config["hidden_size"] // heads if heads and config.get("hidden_size") else None)
    missing = ["head size"] if head_size is None else []
    if None in kv_heads or len(kv_heads) != 1:
        raise TargetError(f"target 'genai': the cache layers have KV head counts {sorted(kv_heads, key=str)}; "
                          "genai_config.json holds one static count (slimc pads per-layer counts before this).")
    kv = int(next(iter(kv_heads)))
    context = config.get("max_position_embeddings") or config.get("n_positions") or config.get("max_sequence_length")
    if context is None:
        missing.append("context length (max_position_embeddings)")
    vocab = _vocab(model) or config.get("vocab_size")
    if vocab is None:
        missing.append("vocabulary size")
    if missing:
        raise TargetError(f"target 'genai': the graph does not fix and the model's configuration does not state: "
                          f"{', '.join(missing)}. Compile from the Hugging Face folder or GGUF file, or put the "
                          "model's config.json beside the .onnx file.")
    bos, eos, pad = _tokens(config, tokenizer)
    inputs = {"input_ids": "input_ids"}
    if spec.attention_mask:
        inputs["attention_mask"] = "attention_mask"
    if spec.position_ids:
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    model_type = str(config.get("model_type") or "decoder").lower()
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename, "head_size": int(head_size),
        "hidden_size": int(config.get("hidden_size") or (heads or kv) * head_size),
        "inputs": inputs,
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
        "num_attention_heads": int(heads or kv),
        "num_hidden_layers": len(spec.layers), "num_key_value_heads": kv,
    }
    search = {key: config.get(key, default) for key, default in SEARCH_DEFAULTS.items()}
    search.update(max_length=int(context), past_present_share_buffer=uses_group_query_attention(model, spec))
    return {
        "model": {"bos_token_id": bos, "context_length": int(context), "decoder": decoder, "eos_token_id": eos,
                  "pad_token_id": pad, "type": model_type if model_type in DECODER_TYPES else "decoder",
                  "vocab_size": int(vocab)},
        "search": dict(sorted(search.items())),
    }


def _vocab(model: ir.Model) -> int | None:
    logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
    if logits is None or logits.shape is None or not len(logits.shape):
        return None
    dim = logits.shape[-1]
    return dim if isinstance(dim, int) else None
