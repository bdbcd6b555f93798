"""Text in, text out: tokenizers, streaming detokenisation, and what ``slimc generate`` runs.

`open_generator` turns what the user names into something that generates:

- an ``.onnx`` with the KV-cache interface, its tokenizer beside it (or ``tokenizer=``);
- a Hugging Face folder or ``.gguf``, loaded by slimc's front end (which exports causal LMs with
  the cache) and run by `slimc.generate.Generator`;
- a folder with ``genai_config.json`` (ONNX Runtime GenAI's layout, slimc's ``--target genai``),
  run through ``onnxruntime_genai``'s own ``og.Generator`` (`slimc.generate_genai`).

`TextStream` turns tokens into text as they come: a byte-level piece can hold part of a UTF-8
character, so text is released only once the decoded tail no longer ends in U+FFFD, and the
tail is decoded with a few tokens of left context so that tokenizers that drop a leading space
when a token starts a string still space words correctly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimc.errors import ModelLoadError, NoKVCacheError, OptionError
from slimc.generate import NO_CACHE_HINT, GenerationStats, Generator, SamplingConfig
from slimc.kvcache import CacheLayer, CacheSpec, cache_pairs

log = logging.getLogger("slimc")
# past_key_values.{i}.key / .value (`slimc.kvcache.PAST_KEY` / `PAST_VALUE`)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclasses.dataclass
class GenerationResult:
    """What ``generate`` returns: the new text (``texts`` per prompt), the new token ids, the stats."""

    text: str
    tokens: list[int]
    stats: GenerationStats
    texts: list[str] = dataclasses.field(default_factory=list)
    all_tokens: list[list[int]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return self.text


class TextStream:
    """Incremental detokenisation of one sequence (see the module docstring)."""

    CONTEXT = 5  # prompt tokens kept as left context

    def __init__(self, tokenizer: Any, prompt_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)[-self.CONTEXT:]
        self.prefix = 0  # start of the decoded window
        self.read = len(self.ids)  # tokens already released as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """The text this token completes ('' while a character is still partial)."""
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        if len(full) <= len(done) or full.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        done = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return full[len(done):]


def stream_text(tokenizer: Any, prompt_ids: list[int], tokens: list[int]) -> str:
    """The text `TextStream` streams for ``tokens`` after ``prompt_ids``, in one go."""
    stream = TextStream(tokenizer, prompt_ids)
    return "".join(stream.push(t) for t in tokens) + stream.flush()


def load_tokenizer(folder: Path) -> Any:
    """The transformers tokenizer saved in ``folder`` (tokenizer.json etc.), or a typed error."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"no tokenizer in {folder} (looked for {', '.join(_TOKENIZER_FILES)}): pass "
                             "--tokenizer FOLDER (tokenizer=) naming the folder its tokenizer was saved to.")
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {type(exc).__name__}: {exc}"[:500]) from None


def eos_ids(tokenizer: Any, folder: Path | None) -> tuple[int, ...]:
    """EOS ids: the tokenizer's, plus ``eos_token_id`` of generation_config.json / config.json beside the model."""
    found = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        found.add(int(tokenizer.eos_token_id))
    for name in ("generation_config.json", "config.json"):
        path = folder / name if folder is not None else None
        if path is not None and path.is_file():
            value = _json(path).get("eos_token_id")
            found.update(int(v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return tuple(sorted(found))


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_dims(spec: CacheSpec, folder: Path | None) -> CacheSpec:
    """Fill cache layers whose kv_heads/head_dim the graph leaves dynamic (the GenAI builder writes
    ``kv_cache_dim``) from the model's genai_config.json or config.json beside it; refuse to guess."""
    config = _json(folder / "genai_config.json").get("model", {}).get("decoder", {}) if folder else {}
    hf = _json(folder / "config.json") if folder else {}
    heads = config.get("num_key_value_heads") or hf.get("num_key_value_heads") or hf.get("num_attention_heads")
    head_dim = config.get("head_size") or hf.get("head_dim") or (
        hf["hidden_size"] // hf["num_attention_heads"] if hf.get("hidden_size") and hf.get("num_attention_heads") else None)
    layers = []
    for layer in spec.layers:
        kv = layer.kv_heads or heads
        key_dim = layer.head_dim or head_dim
        value_dim = layer.value_head_dim or key_dim
        if not kv or not key_dim:
            raise ModelLoadError(
                f"the graph's cache layer {layer.index} has dynamic kv_heads/head_dim and no genai_config.json or "
                "config.json beside the model states them: keep the model's config.json next to the .onnx.")
        layers.append(dataclasses.replace(layer, kv_heads=kv, head_dim=key_dim, value_head_dim=value_dim))
    return dataclasses.replace(spec, layers=layers)


def context_length(folder: Path | None) -> int | None:
    """The most positions the model takes, when its config states it (rotary tables end there)."""
    if folder is None:
        return None
    genai = _json(folder / "genai_config.json").get("model", {}).get("context_length")
    return genai or _json(folder / "config.json").get("max_position_embeddings")


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """The prompt's ids; with ``chat`` through the tokenizer's chat template as one user turn."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise OptionError("--chat (chat=True): this tokenizer has no chat template; drop --chat to feed the prompt as "
                          "plain text.")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class TextGenerator:
    """A `Generator` with its tokenizer: prompts in, streamed text out."""

    def __init__(self, generator: Generator, tokenizer: Any, eos: tuple[int, ...]):
        self.generator, self.tokenizer, self.eos = generator, tokenizer, eos

    def generate(self, prompt: str | list[str], *, chat: bool = False, on_text: Callable[[str], Any] | None = None,
                 **options: Any) -> GenerationResult:
        """Generate from one prompt (or a list: a left-padded batch). ``on_text(piece)`` streams the
        first prompt's text. ``options``: `SamplingConfig` fields (``eos_token_ids`` defaults to the model's)."""
        options.setdefault("eos_token_ids", self.eos)
        config = SamplingConfig(**options)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [encode_prompt(self.tokenizer, p, chat) for p in prompts]
        stream = TextStream(self.tokenizer, ids[0]) if on_text is not None else None
        eos = set(config.eos_token_ids)
        ended = False

        def on_token(step: list[int]) -> None:
            nonlocal ended
            if stream is None or ended:
                return
            ended = step[0] in eos
            piece = "" if ended else stream.push(step[0])
            if piece:
                on_text(piece)

        rows, stats = self.generator.generate_ids(ids, config, on_token)
        if stream is not None:
            tail = stream.flush()
            if tail:
                on_text(tail)
        # decoded as streamed (with the prompt's last tokens as context), so the text joins the prompt as printed
        texts = [stream_text(self.tokenizer, p, [t for t in row if t not in eos]) for p, row in zip(ids, rows)]
        return GenerationResult(text=texts[0], tokens=rows[0], stats=stats, texts=texts, all_tokens=rows)


def from_session(session: Any, tokenizer: Any, folder: Path | None, *, spec: CacheSpec | None = None,
                 op_types: set[str] = frozenset(), generation: Any = None) -> TextGenerator:
    """A `TextGenerator` over ``session``. ``spec``: the cache interface (default: read from the session's
    inputs); ``folder``: where the model's config files are (dims the graph leaves dynamic, EOS ids);
    ``op_types``: the graph's operators (fused attention cannot take left padding); ``generation``: the
    front end's `slimc.kvcache.GenerationInfo` (EOS/pad ids, context length), when it has one."""
    spec = spec if spec is not None else spec_from_session(session)
    if spec is None:
        raise NoKVCacheError(f"this graph has no KV cache (no past_key_values.N.key/value inputs). {NO_CACHE_HINT}")
    spec = resolve_dims(spec, folder)
    eos = tuple(sorted(set(eos_ids(tokenizer, folder)) | set(getattr(generation, "eos_token_ids", None) or ())))
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(generation, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    context = context_length(folder) or getattr(generation, "context_length", None)
    generator = Generator(session, spec, pad_token_id=int(pad), context_length=context,
                          left_padding=spec.position_ids and "GroupQueryAttention" not in op_types)
    return TextGenerator(generator, tokenizer, eos)


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


def spec_from_session(session: Any) -> CacheSpec | None:
    """The cache interface read from an ORT session's declared inputs (as `cache_spec` reads an IR model)."""
    try:
        pairs = cache_pairs(session.get_inputs())
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if not pairs:
        return None
    layers, dtype = [], np.dtype(np.float32)
    for index, key, value in pairs:
        if _ORT_TYPES.get(key.type) is None:
            raise ModelLoadError(f"cache layer {index} is {key.type}: generation supports float32 and float16 caches.")
        dtype = np.dtype(_ORT_TYPES[key.type])
        layers.append(CacheLayer(index, _static(key.shape, 1), _static(key.shape, 3), _static(value.shape, 3)))
    names = {meta.name for meta in session.get_inputs()}
    return CacheSpec(layers, dtype, position_ids="position_ids" in names, attention_mask="attention_mask" in names)


def _static(shape: list, axis: int) -> int | None:
    dim = shape[axis] if shape is not None and len(shape) == 4 else None
    return dim if isinstance(dim, int) and dim > 0 else None


def open_generator(source: Any, *, tokenizer: str | Path | None = None, threads: int | None = None):
    """What generates from ``source`` (see the module docstring): a `TextGenerator`, or a
    `slimc.generate_genai.GenaiGenerator` for a folder with genai_config.json."""
    from slimc.generate_genai import GenaiGenerator, is_genai_folder

    path = Path(source)
    if is_genai_folder(path):
        if tokenizer is not None:
            raise OptionError("--tokenizer: a GenAI folder uses the tokenizer files in it; drop --tokenizer.")
        return GenaiGenerator(path, threads)
    if path.suffix == ".onnx":
        return _open_onnx(path, tokenizer, threads)
    return _open_frontend(path, tokenizer, threads)


def _open_onnx(path: Path, tokenizer: str | Path | None, threads: int | None) -> TextGenerator:
    from slimc.backends import onnxruntime as ort_backend

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file.")
    tok = load_tokenizer(Path(tokenizer) if tokenizer is not None else path.parent)
    session = ort_backend.create_session(path, threads)
    try:  # the operators only (weights stay on disk): fused attention cannot take left padding
        import onnx_ir as ir

        ops = padding_ops(ir.load(str(path)).graph.all_nodes())
    except Exception:  # noqa: BLE001 - ORT loaded it; without the op list, padding is refused conservatively
        ops = {"GroupQueryAttention"}
    return from_session(session, tok, path.parent, op_types=ops)


def _open_frontend(path: Path, tokenizer: str | Path | None, threads: int | None) -> TextGenerator:
    """An HF folder or .gguf through slimc's front end (exported with the KV cache), staged to a work folder."""
    import weakref

    from slimc import frontends
    from slimc import workdir as workdirs
    from slimc.kvcache import cache_spec

    loaded = frontends.load(path)
    spec = cache_spec(loaded.model)
    if spec is None:
        raise NoKVCacheError(f"{loaded.source} was exported without a KV cache. {NO_CACHE_HINT}")
    tok = load_tokenizer(Path(tokenizer)) if tokenizer is not None else loaded.tokenizer
    if tok is None:
        raise ModelLoadError(f"{loaded.source} has no tokenizer: pass --tokenizer FOLDER (tokenizer=).")
    workdir = workdirs.new("generate")
    generator = stage_model(loaded.model, Path(workdir.name), tok, path if path.is_dir() else None, threads, spec,
                            generation=getattr(loaded, "generation", None))
    weakref.finalize(generator, workdir.cleanup)
    return generator


def stage_model(model, work: Path, tokenizer: Any, folder: Path | None, threads: int | None,
                spec: CacheSpec | None = None, generation: Any = None) -> TextGenerator:
    """Save an IR model to ``work`` and wrap a session of it (prepacked weights, as deployed)."""
    import onnx_ir as ir

    from slimc.backends import onnxruntime as ort_backend
    from slimc.kvcache import cache_spec
    from slimc.onnx_io import save_onnx

    spec = spec if spec is not None else cache_spec(model)
    if spec is None:
        raise NoKVCacheError(f"this model has no KV cache (no past_key_values.N.key/value inputs). {NO_CACHE_HINT}")
    path = work / "generate.onnx"
    # memory-mapped weights are streamed to an external data file, not copied into one protobuf
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    save_onnx(model, path, external_data=True if external else None)
    session = ort_backend.create_session(path, threads)
    return from_session(session, tokenizer, folder, spec=spec, op_types=padding_ops(model.graph.all_nodes()),
                        generation=generation)


def padding_ops(nodes) -> set[str]:
    """The graph's operator types, leaving out GroupQueryAttention nodes that take the graph's own mask
    (`fuse` writes them; exact with left padding): a GroupQueryAttention left in means no left padding."""
    from slimc.passes.fuse.gqa import takes_any_padding

    return {n.op_type for n in nodes if not takes_any_padding(n)}


def generate_text(model: Any, prompt: str | list[str], *, tokenizer: str | Path | None = None, threads: int | None = None,
                  chat: bool = False, on_text: Callable[[str], Any] | None = None, **options: Any) -> GenerationResult:
    """Generate from ``model`` (a path: see `open_generator`) in one call; ``options`` are `SamplingConfig`'s
    (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``eos_token_ids``).
    For several prompts on one model, keep `open_generator`'s result and call its ``generate``."""
    return open_generator(model, tokenizer=tokenizer, threads=threads).generate(prompt, chat=chat, on_text=on_text, **options)
