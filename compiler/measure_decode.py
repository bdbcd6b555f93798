"""Decode speed of a causal LM with a KV cache, before and after: what the receipt's ``decode`` holds.

Two figures, each timed like the receipt's other latency (`slimc.backends.timing`: warm-up, the
models alternating in rounds, median with p10-p90, large models one session at a time):

- **time to first token**: the prefill, a prompt of ``prompt_tokens`` (``--seq-len``) tokens with
  an empty past, batch 1 — what a user waits before the first token appears;
- **decode step**: one new token at batch 1 with a past of ``prompt_tokens`` tokens (the present
  the model itself returned for that prompt) — its inverse is decode tokens/s.

Each model gets a session of its own with ORT's defaults (prepacked weights, as deployed). The
prompt is the first row of a verified batch's ``input_ids`` (the evaluation text when given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimc.errors import DataError


def prompt_ids(batch: dict[str, np.ndarray], seq_len: int, vocab: int | None, seed: int = 0) -> np.ndarray:
    """``[1, seq_len]`` ids: the batch's first ``input_ids`` row cut (or cycled) to ``seq_len``, else random ids."""
    ids = batch.get("input_ids")
    if ids is not None and np.ndim(ids) == 2 and np.shape(ids)[1] > 0:
        row = np.asarray(ids[0], np.int64)
        return np.resize(row, seq_len)[None, :]
    if not vocab:
        raise DataError("decode speed needs input_ids to time: the verification batch has none and the vocabulary "
                        "size is unknown.")
    return np.random.default_rng(seed).integers(0, vocab, (1, seq_len), dtype=np.int64)


def synthetic_step_feed(spec, prompt: np.ndarray, names: set[str], seed: int = 0) -> dict[str, np.ndarray] | None:
    """A decode step after ``prompt`` (``[1, L]``) without running the prefill: the last token, a mask of
    L + 1, position L, and a past of L random values per layer (timing does not depend on the values).
    None when the cache's head counts or sizes are not static in the graph."""
    if any(not layer.kv_heads or not layer.head_dim or not layer.value_head_dim for layer in spec.layers):
        return None
    rng = np.random.default_rng(seed)
    length = prompt.shape[1]
    feed = {"input_ids": np.ascontiguousarray(prompt[:, -1:], np.int64)}
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones((1, length + 1), np.int64)
    if "position_ids" in names:
        feed["position_ids"] = np.array([[length]], np.int64)
    for layer in spec.layers:
        past_k, past_v, _, _ = layer.names
        feed[past_k] = rng.normal(0, 0.5, (1, layer.kv_heads, length, layer.head_dim)).astype(spec.dtype)
        feed[past_v] = rng.normal(0, 0.5, (1, layer.kv_heads, length, layer.value_head_dim)).astype(spec.dtype)
    return feed


def step_feeds(session: Any, prompt: np.ndarray, folder: Path | None) -> tuple[dict, dict]:
    """(prefill feed, decode-step feed) for ``session``: the step's past is the prefill's present."""
    from slimc.errors import NoKVCacheError
    from slimc.textgen import resolve_dims, spec_from_session

    spec = spec_from_session(session)
    if spec is None:
        raise NoKVCacheError("the model has no KV cache inputs")
    spec = resolve_dims(spec, folder)
    names = {i.name for i in session.get_inputs()}
    length = prompt.shape[1]

    def feed(ids: np.ndarray, total: int, start: int) -> dict[str, np.ndarray]:
        out = {"input_ids": ids}
        if "attention_mask" in names:
            out["attention_mask"] = np.ones((1, total), np.int64)
        if "position_ids" in names:
            out["position_ids"] = np.arange(start, start + ids.shape[1], dtype=np.int64)[None, :]
        return out

    prefill = {**feed(prompt, length, 0), **spec.empty_past(1)}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, prefill)))
    past = {}
    for layer in spec.layers:
        past_k, past_v, present_k, present_v = layer.names
        past[past_k], past[past_v] = outputs[present_k], outputs[present_v]
    step = {**feed(prompt[:, -1:], length + 1, length), **past}
    return prefill, step


def decode(paths: dict[str, Path], batch: dict[str, np.ndarray], seq_len: int, *, vocab: int | None = None,
           folder: Path | None = None, threads: int | None = None, weight_bytes: int = 0, mapped=()) -> dict[str, Any]:
    """The receipt's ``decode`` entry for the model files at ``paths`` (``before``/``after``)."""
    from slimc.backends import onnxruntime as ort_backend
    from slimc.backends.timing import comparison, interleaved, one_at_a_time

    prompt = prompt_ids(batch, seq_len, vocab)
    machine = ort_backend.machine_description(threads)

    def build(path: Path, which: int):
        ort_backend.return_freed_memory()
        ort_backend.release_mapped_pages(mapped)
        session = ort_backend.create_session(path, threads)
        feed = step_feeds(session, prompt, folder)[which]
        return lambda: session.run(None, feed)

    stats = {}
    for key, which, desc in (("time_to_first_token", 0, "timing the prefill"), ("decode_step", 1, "timing decode steps")):
        builders = {name: (lambda p=p, w=which: build(p, w)) for name, p in paths.items()}
        if weight_bytes >= ort_backend.LEAN_BYTES:
            stats[key] = one_at_a_time(builders, warmup=2, repeats=15, rounds=3, budget_s=30.0, desc=desc)
        else:
            stats[key] = interleaved({name: b() for name, b in builders.items()}, budget_s=30.0, desc=desc)
    ort_backend.return_freed_memory()
    out: dict[str, Any] = {"prompt_tokens": seq_len, "batch": 1}
    out["time_to_first_token"] = comparison(stats["time_to_first_token"], {"input_ids": prompt}, machine)
    out["decode_step"] = comparison(stats["decode_step"], {"input_ids": prompt[:, -1:]}, machine)
    out["decode_step"]["past_tokens"] = seq_len
    out["tokens_per_s"] = {name: 1e3 / s.median_ms for name, s in stats["decode_step"].items()}
    if weight_bytes >= ort_backend.LEAN_BYTES:
        out["one_at_a_time"] = True
    return out
