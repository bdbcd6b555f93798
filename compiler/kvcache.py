"""The KV-cache interface of a causal-LM graph: names, layout, and how to find it in a model.

slimc uses the same convention as ONNX Runtime GenAI's model builder, so one `genai_config.json`
writer and one generation loop serve both slimc's exports and the builder's:

- inputs: ``input_ids`` int64 ``[batch, sequence]``; ``attention_mask`` int64
  ``[batch, total_sequence]`` (past + new tokens); ``position_ids`` int64 ``[batch, sequence]``
  (when the model takes positions); ``past_key_values.{i}.key`` / ``past_key_values.{i}.value``
  ``[batch, kv_heads_i, past_sequence, head_dim]`` per decoder layer ``i`` (0-based, layer order);
- outputs: ``logits`` ``[batch, sequence, vocab]``; ``present.{i}.key`` / ``present.{i}.value``
  ``[batch, kv_heads_i, total_sequence, head_dim]``.

A full forward (perplexity, calibration, a prompt's prefill) feeds past tensors whose
``past_sequence`` is 0. Passes may change ``kv_heads_i`` (pruning KV groups) or drop a layer's
entries (layer skipping); the indices of the remaining layers are kept, so they need not be
contiguous: read the layers from the graph with `cache_spec`, never count them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import onnx_ir as ir

PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


@dataclasses.dataclass
class CacheLayer:
    """One decoder layer's cache: its graph inputs and outputs and their static sizes (None if dynamic)."""

    index: int
    kv_heads: int | None
    head_dim: int | None
    value_head_dim: int | None

    @property
    def names(self) -> tuple[str, str, str, str]:
        """(past key, past value, present key, present value) value names."""
        i = self.index
        return PAST_KEY.format(i), PAST_VALUE.format(i), PRESENT_KEY.format(i), PRESENT_VALUE.format(i)


@dataclasses.dataclass
class CacheSpec:
    """The cache interface of a graph: its layers, the element type, and which extra inputs it takes."""

    layers: list[CacheLayer]
    dtype: np.dtype
    position_ids: bool
    attention_mask: bool

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past tensors of length 0: feeding these makes the graph a plain full forward."""
        feeds = {}
        for layer in self.layers:
            past_k, past_v, _, _ = layer.names
            feeds[past_k] = np.zeros((batch, layer.kv_heads or 0, 0, layer.head_dim or 0), self.dtype)
            feeds[past_v] = np.zeros((batch, layer.kv_heads or 0, 0, layer.value_head_dim or 0), self.dtype)
        return feeds

    @property
    def input_names(self) -> set[str]:
        """Every past-cache input name."""
        return {name for layer in self.layers for name in layer.names[:2]}

    @property
    def output_names(self) -> set[str]:
        """Every present-cache output name."""
        return {name for layer in self.layers for name in layer.names[2:]}


def is_cache_input(name: str) -> bool:
    """Whether a graph input name is a past-cache tensor."""
    return _PAST.match(name) is not None


def is_cache_output(name: str) -> bool:
    """Whether a graph output name is a present-cache tensor."""
    return _PRESENT.match(name) is not None


def cache_pairs(inputs, name=lambda item: item.name) -> list[tuple[int, Any, Any]]:
    """``(layer index, past key, past value)`` of the past-cache items among ``inputs`` (graph values or
    ORT input metadata), in layer order; a `ValueError` when a layer has one of the two."""
    found: dict[int, dict[str, Any]] = {}
    for item in inputs:
        match = _PAST.match(name(item) or "")
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = item
    pairs = []
    for index in sorted(found):
        key, value = found[index].get("key"), found[index].get("value")
        if key is None or value is None:
            raise ValueError(f"cache layer {index} has a past key or a past value but not both: not a KV-cache graph.")
        pairs.append((index, key, value))
    return pairs


def cache_spec(model: ir.Model) -> CacheSpec | None:
    """The cache interface of ``model``, or None when its graph takes no past key/values."""
    pairs = cache_pairs(model.graph.inputs)
    if not pairs:
        return None
    layers, dtype = [], np.dtype(np.float32)
    for index, key, value in pairs:
        if key.dtype is not None:
            dtype = np.dtype(key.dtype.numpy())
        layers.append(CacheLayer(index, _dim(key, 1), _dim(key, 3), _dim(value, 3)))
    names = {v.name for v in model.graph.inputs}
    return CacheSpec(layers, dtype, position_ids="position_ids" in names, attention_mask="attention_mask" in names)


def _dim(value: ir.Value, axis: int) -> int | None:
    """A static dim of a rank-4 cache value, or None when it is dynamic or the shape is unknown."""
    shape = value.shape
    if shape is None or len(shape) != 4:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


# Config keys that state how many positions a model was trained for, in the order transformers models use them.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclasses.dataclass
class GenerationInfo:
    """What a generation loop needs besides the graph: stop/start/padding token ids and the context length,
    from the model's generation config (else its config). None where the model does not say."""

    eos_token_ids: list[int]
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    context_length: int | None = None
    model_type: str | None = None
    vocab_size: int | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GenerationInfo:
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)} | {"eos_token_ids": data.get("eos_token_ids") or []})


def position_ids(attention_mask: np.ndarray, seq: int | None = None) -> np.ndarray:
    """Positions of the last ``seq`` tokens of a ``[batch, total_sequence]`` mask, as transformers'
    ``generate()`` makes them: the count of attended tokens before each one (``cumsum(mask) - 1``), and 1 on
    padding (any value works there: padded tokens are masked out). An all-ones mask gives ``arange``."""
    mask = np.asarray(attention_mask).astype(np.int64)
    positions = np.cumsum(mask, axis=-1) - 1
    positions[mask == 0] = 1
    seq = mask.shape[-1] if seq is None else seq
    return positions[:, mask.shape[-1] - seq:]
