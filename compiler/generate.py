"""Token generation with a KV cache on ONNX Runtime: prefill once, then one token per step.

The graph has the interface of `slimc.kvcache` (ONNX Runtime GenAI's names). Generation is:

1. **prefill**: the prompt's ids ``[batch, prompt]`` with an empty past (``past_sequence`` 0);
   the logits of the last position give the first new token;
2. **decode**: each step feeds that token ``[batch, 1]``, the attention mask grown by one, the
   next position, and the previous step's ``present.{i}.key/value`` as ``past_key_values.{i}.*``.

The cache stays in ONNX Runtime's own buffers: each step's ``present`` `OrtValue`s are fed back as
the next step's ``past`` (`InferenceSession.run_with_ort_values`), never converted to NumPy; only the
last position's logits are read. Prompts of different lengths in one batch are padded on the left
(mask 0) and their positions count only real tokens, as transformers does.

Token choice (``SamplingConfig``) follows transformers' order: greedy (``temperature=0``), else
logits / temperature, keep the ``top_k`` largest, keep the smallest set whose probability reaches
``top_p``, sample with a seeded NumPy generator. Text, tokenizers and the CLI live in
`slimc.textgen`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from slimc.errors import BackendError, OptionError, first_line
from slimc.kvcache import CacheSpec

NO_CACHE_HINT = (
    "Export it with the KV cache: load the Hugging Face folder or .gguf with slimc (its causal-LM export "
    "takes past_key_values.N.key/value and returns present.N.key/value unless --no-kv-cache / kv_cache=False "
    "or --static was given), or build it with ONNX Runtime "
    "GenAI's model builder (python -m onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p fp32 -e cpu)."
)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen and when generation stops. ``temperature=0`` is greedy; ``top_k=0`` and
    ``top_p=1`` switch those filters off; ``seed`` makes sampling repeatable."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def bad(what: str) -> OptionError:
            return OptionError(f"generate: {what}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad(f"max_new_tokens={self.max_new_tokens!r}: give a whole number >= 1.")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature={self.temperature!r}: give 0 (greedy) or a positive number such as 0.7.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k={self.top_k!r}: give a whole number >= 1, or 0 for no top-k filter.")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p={self.top_p!r}: give a probability in (0, 1], or 1 for no nucleus filter.")
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            raise bad("top_k / top_p filter what is sampled, but temperature=0 decodes greedily: "
                      "set a temperature > 0 (1.0 samples from the model's own distribution).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class GenerationStats:
    """What one generation cost. ``time_to_first_token_s`` is the prefill (prompt in, first token
    out); ``decode_tokens_per_s`` counts the steps after it, per sequence (a batch of 4 makes 4
    tokens per step)."""

    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    decode_s: float
    stop_reason: str  # "eos" (every sequence ended), "max_new_tokens" or "context_length"
    batch: int = 1

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s}

    def summary(self) -> str:
        tps = self.decode_tokens_per_s
        return (f"{self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens ({self.stop_reason}); "
                f"time to first token {self.time_to_first_token_s * 1e3:.1f} ms; decode "
                + (f"{tps:.1f} tokens/s" if tps is not None else "n/a (one token)"))


def choose_tokens(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """One token id per row of ``logits`` ``[batch, vocab]`` (see the module docstring for the order)."""
    logits = logits.astype(np.float64, copy=False)
    if config.greedy:
        return logits.argmax(axis=-1)
    scores = logits / config.temperature
    if config.top_k and config.top_k < scores.shape[-1]:
        kth = np.partition(scores, -config.top_k, axis=-1)[:, -config.top_k, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if config.top_p < 1:
        order = np.argsort(-scores, axis=-1, kind="stable")
        ranked = np.take_along_axis(scores, order, axis=-1)
        probs = _softmax(ranked)
        # drop a token when the more likely ones alone already reach top_p (the first always stays)
        drop = (np.cumsum(probs, axis=-1) - probs) >= config.top_p
        np.put_along_axis(scores, order, np.where(drop, -np.inf, ranked), axis=-1)
    probs = _softmax(scores)
    draws = rng.random((probs.shape[0], 1))
    picked = (np.cumsum(probs, axis=-1) > draws).argmax(axis=-1)
    return picked


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) ``[batch, longest]``: shorter prompts padded on the left, mask 0 there."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise OptionError("generate: every prompt needs at least one token (an empty prompt has nothing to continue).")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


class Generator:
    """The generation loop over one ONNX Runtime session of a KV-cache graph (`slimc.kvcache`).

    ``spec``: the graph's cache interface (`slimc.kvcache.cache_spec`), with every layer's
    kv_heads and head_dim known (`slimc.textgen.resolve_dims` fills dynamic ones).
    ``context_length``: the most positions the model takes (None: unlimited). ``left_padding``:
    whether prompts of unequal length may share a batch (default: when the graph takes position_ids).
    """

    def __init__(self, session: Any, spec: CacheSpec, *, pad_token_id: int = 0, context_length: int | None = None,
                 left_padding: bool | None = None):
        missing = [layer.index for layer in spec.layers if not layer.kv_heads or not layer.head_dim]
        if missing:
            raise BackendError(f"cache layers {missing}: kv_heads/head_dim unknown; resolve them before generating.")
        self.session, self.spec = session, spec
        self.pad_token_id, self.context_length = pad_token_id, context_length
        self.input_names = {i.name for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        if "logits" not in self.output_names:
            raise BackendError(f"the graph has no 'logits' output (outputs: {', '.join(self.output_names)}).")
        # Left padding needs positions fed per token: a graph without position_ids derives them from the
        # mask (GroupQueryAttention counts them from the start, as for right padding) and would misplace them.
        self.left_padding = ("position_ids" in self.input_names) if left_padding is None else left_padding
        self._present = [(layer.names[0], layer.names[2]) for layer in spec.layers] + \
                        [(layer.names[1], layer.names[3]) for layer in spec.layers]

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        config: SamplingConfig = SamplingConfig(),
        on_token: Callable[[list[int]], Any] | None = None,
    ) -> tuple[list[list[int]], GenerationStats]:
        """New token ids per prompt (up to and including an EOS id), and the stats.
        ``on_token(ids)`` is called after every step with one id per prompt (finished rows repeat EOS)."""
        ids, mask = left_pad(prompts, self.pad_token_id)
        if not self.left_padding and not mask.all():
            raise OptionError(
                "generate: prompts of different token lengths are padded on the left, and this graph cannot place "
                "padded tokens (it takes no position_ids, or its fused attention assumes no left padding). Generate "
                "the prompts one at a time, or give prompts of equal token length.")
        batch, width = ids.shape
        limit = config.max_new_tokens
        if self.context_length is not None:
            if width >= self.context_length:
                raise OptionError(f"generate: the prompt has {width} tokens; the model takes at most "
                                  f"{self.context_length} positions. Shorten the prompt.")
            limit = min(limit, self.context_length - width)
        rng = np.random.default_rng(config.seed)
        eos = np.array(sorted(set(config.eos_token_ids)) or [-1], np.int64)
        start = time.perf_counter()
        logits, past = self._step(ids, mask, self._positions(mask, width), self._empty_past(batch))
        token = choose_tokens(logits, config, rng)
        first = time.perf_counter()
        out, done = [token], np.isin(token, eos)
        if on_token is not None:
            on_token(token.tolist())
        while len(out) < limit and not done.all():
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            feed = np.where(done, self.pad_token_id, token)[:, None].astype(np.int64)
            logits, past = self._step(feed, mask, self._positions(mask, 1), past)
            token = np.where(done, eos[0] if eos[0] >= 0 else self.pad_token_id, choose_tokens(logits, config, rng))
            out.append(token)
            done |= np.isin(token, eos)
            if on_token is not None:
                on_token(token.tolist())
        end = time.perf_counter()
        rows = _trim(np.stack(out, axis=1), eos)
        reason = "eos" if done.all() else "max_new_tokens" if len(out) >= config.max_new_tokens else "context_length"
        stats = GenerationStats(prompt_tokens=width, new_tokens=len(out), time_to_first_token_s=first - start,
                                decode_s=end - first, stop_reason=reason, batch=batch)
        return rows, stats

    def _positions(self, mask: np.ndarray, new: int) -> np.ndarray:
        # real tokens count from 0; left padding gets position 0 (masked out anyway)
        return np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -new:]

    def _empty_past(self, batch: int) -> dict[str, Any]:
        import onnxruntime as ort

        return {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self.spec.empty_past(batch).items()}

    def _step(self, ids, mask, positions, past: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """One forward: last-position logits ``[batch, vocab]`` (float32) and the next step's past."""
        import onnxruntime as ort

        feed = dict(past)
        feed["input_ids"] = ort.OrtValue.ortvalue_from_numpy(ids)
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = ort.OrtValue.ortvalue_from_numpy(mask)
        if "position_ids" in self.input_names:
            feed["position_ids"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(positions))
        try:
            outputs = self.session.run_with_ort_values(self.output_names, feed)
        except Exception as exc:  # ORT raises its own types
            raise BackendError(f"ONNX Runtime failed in a generation step: {first_line(exc, 1000)}") from None
        by_name = dict(zip(self.output_names, outputs))
        logits = by_name["logits"].numpy()[:, -1, :].astype(np.float32, copy=False)
        return logits, {past_name: by_name[present_name] for past_name, present_name in self._present}


def _trim(tokens: np.ndarray, eos: np.ndarray) -> list[list[int]]:
    """Each row up to and including its first EOS id."""
    rows = []
    for row in tokens.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows
