"""Text data: a text file or string -> token-id windows for a language model.

See `slimc.data` for the window layout (the tokenizer's own special tokens wrap each window).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from slimc.data import (
    Batch,
    Dataset,
    DEFAULT_BATCH_SIZE,
    TEXT_KINDS,
    validate_batch,
)
from slimc.data_batching import _groups
from slimc.errors import DataError
from slimc.model import InputSpec, LoadedModel


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer wraps every sequence in, found by encoding a word both ways."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k]), list(full[k + len(plain):])
    return [], []


def _tokenize(tokenizer: Any, text: str, chunk_chars: int = 4000) -> np.ndarray:
    """Token ids of ``text``, tokenized in line-aligned chunks (fast, batched, no length warning)."""
    chunks, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > chunk_chars:
            chunks.append(current)
            current = ""
        current += line
    chunks.append(current)
    encoded = tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"]
    return np.fromiter((t for ids in encoded for t in ids), dtype=np.int64)


def _text_batch(windows: np.ndarray, inputs: Sequence[InputSpec]) -> Batch:
    b, s = windows.shape
    batch = {}
    for spec in inputs:
        shape = spec.concrete_shape({"batch": b, "seq": s})
        if spec.kind == "tokens":
            batch[spec.name] = windows
        elif spec.kind == "attention_mask":
            batch[spec.name] = np.ones(shape, np.int64)
        elif spec.kind == "position_ids":
            batch[spec.name] = np.broadcast_to(np.arange(s), shape)
        elif spec.kind == "past_key_values":
            continue  # an empty past, added by validate_batch (`slimc.data.complete_cache_inputs`)
        else:
            batch[spec.name] = np.zeros(shape, np.int64)
    return batch


def _text_seq_len(loaded: LoadedModel, tokens: InputSpec, seq_len: int, name: str) -> int:
    if len(tokens.shape) > 1 and isinstance(tokens.shape[1], int):
        return tokens.shape[1]  # exported with a fixed length: no other length runs
    limit = getattr(loaded.tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000 and seq_len > limit:
        raise DataError(
            f"{name}: seq_len {seq_len} exceeds the model's maximum length {limit}; pass --seq-len {limit} or less."
        )
    return seq_len


def from_text(
    text: str, loaded: LoadedModel, *, seq_len: int = 128, batch_size: int = DEFAULT_BATCH_SIZE,
    name: str = "text", where: str = "data",
) -> Dataset:
    """Tokenize ``text`` with the model's tokenizer into windows of ``seq_len`` tokens."""
    names = loaded.input_names()
    if loaded.tokenizer is None:
        raise DataError(
            f"{where} {name} is text but the model has no tokenizer to turn it into ids. Pass a .npz "
            f"with arrays named {names} instead, or load the model from a folder that holds its tokenizer."
        )
    tokens = [s for s in loaded.inputs if s.kind == "tokens"]
    other = [f"{s.name} ({s.kind})" for s in loaded.inputs if s.kind not in (*TEXT_KINDS, "past_key_values")]
    if len(tokens) != 1 or other:
        raise DataError(
            f"{where} {name}: text can fill token ids, masks, token types and positions, but the model "
            f"takes {[f'{s.name} ({s.kind})' for s in loaded.inputs]}. Pass a .npz with arrays named {names}."
        )
    seq_len = _text_seq_len(loaded, tokens[0], seq_len, f"{where} {name}")
    prefix, suffix = _special_tokens(loaded.tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    ids = _tokenize(loaded.tokenizer, text)
    n = len(ids) // max(body, 1)
    if body < 1 or n == 0:
        raise DataError(
            f"{where} {name}: {len(ids)} tokens, fewer than one window of {seq_len}. "
            "Pass more text or a smaller --seq-len."
        )
    windows = np.concatenate(
        [np.tile(prefix, (n, 1)), ids[: n * body].reshape(n, body), np.tile(suffix, (n, 1))], axis=1
    ).astype(np.int64)
    groups = _groups(n, loaded.inputs, batch_size)
    batches = [
        validate_batch(_text_batch(windows[g.start:g.stop], loaded.inputs), loaded.inputs, f"{where} {name}, batch {i}")
        for i, g in enumerate(groups)
    ]
    return Dataset(batches, f"{name}: {sum(map(len, groups))} windows of {seq_len} tokens")
