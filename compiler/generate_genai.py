"""Generation through ONNX Runtime GenAI (``onnxruntime_genai``) for a folder with ``genai_config.json``.

Such a folder (made by slimc's ``--target genai`` or GenAI's model builder) is run by the runtime it
was written for: ``og.Model`` / ``og.Generator``, with its own tokenizer, search and stop rules from
the folder's config. Only the options slimc exposes are overridden (length, greedy or sampling,
temperature, top-k, top-p, seed), so ``slimc generate`` on such a folder shows what the deployed
runtime produces. Stats are measured as in `slimc.generate`: the prompt is processed when it is
appended, so time to first token runs from ``append_tokens`` to the first token out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimc.errors import MissingExtraError, ModelLoadError, OptionError
from slimc.generate import GenerationStats, SamplingConfig


def is_genai_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "genai_config.json").is_file()


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise MissingExtraError("this folder is for ONNX Runtime GenAI: pip install onnxruntime-genai") from None
    return og


class GenaiGenerator:
    """``og.Model`` of a GenAI folder with its tokenizer; `generate` mirrors `TextGenerator.generate`."""

    def __init__(self, folder: Path, threads: int | None = None):
        og = _og()
        self.folder = Path(folder)
        try:
            config = og.Config(str(self.folder))
            if threads is not None:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
            self.model = og.Model(config)
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as exc:  # og raises RuntimeError with its own message
            raise ModelLoadError(f"onnxruntime_genai cannot load {self.folder}: {exc}"[:600]) from None
        meta = json.loads((self.folder / "genai_config.json").read_text()).get("model", {})
        self.context_length = meta.get("context_length")
        self.vocab_size = meta.get("vocab_size")

    def encode(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            try:
                prompt = self.tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]),
                                                            add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - no template, or one the runtime cannot render
                raise OptionError(f"--chat: the folder's tokenizer cannot apply a chat template ({exc}); drop --chat "
                                  "to feed the prompt as plain text.") from None
        return [int(t) for t in self.tokenizer.encode(prompt)]

    def generate(self, prompt: str | list[str], *, chat: bool = False, on_text: Callable[[str], Any] | None = None,
                 prompt_ids: list[int] | None = None, **options: Any):
        """Generate from one prompt (``prompt_ids`` skips tokenization); returns a `GenerationResult`."""
        from slimc.textgen import GenerationResult

        if not isinstance(prompt, str):
            raise OptionError("generate: a GenAI folder generates one prompt at a time here; pass a single string.")
        options.pop("eos_token_ids", None)  # the folder's genai_config.json states them
        config = SamplingConfig(**options)
        ids = list(prompt_ids) if prompt_ids is not None else self.encode(prompt, chat)
        generator = self._generator(config, len(ids))
        stream = self.tokenizer.create_stream()
        eos = set(int(t) for t in self.tokenizer.eos_token_ids)
        tokens: list[int] = []
        pieces: list[str] = []  # the text is what was streamed (og's stream and decode differ on invalid UTF-8)
        start = time.perf_counter()
        first = None
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            first = first or time.perf_counter()
            tokens.append(token)
            piece = stream.decode(token) if token not in eos else ""
            if piece:
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)
        end = time.perf_counter()
        reason = "eos" if tokens and tokens[-1] in eos else "max_new_tokens"
        stats = GenerationStats(prompt_tokens=len(ids), new_tokens=len(tokens),
                                time_to_first_token_s=(first or end) - start, decode_s=end - (first or end),
                                stop_reason=reason)
        text = "".join(pieces)
        return GenerationResult(text=text, tokens=tokens, stats=stats, texts=[text], all_tokens=[tokens])

    def _generator(self, config: SamplingConfig, prompt_tokens: int):
        og = _og()
        length = prompt_tokens + config.max_new_tokens
        if self.context_length:
            if prompt_tokens >= self.context_length:
                raise OptionError(f"generate: the prompt has {prompt_tokens} tokens; the model takes at most "
                                  f"{self.context_length} positions. Shorten the prompt.")
            length = min(length, self.context_length)
        search: dict[str, Any] = {"max_length": length, "do_sample": not config.greedy, "min_length": 0}
        if not config.greedy:
            # top_k=0 means no filter here; GenAI's own default (the config's, often 50) would filter
            search.update(temperature=config.temperature, top_p=config.top_p,
                          top_k=config.top_k or self.vocab_size or 1 << 30)
        if config.seed is not None:
            search["random_seed"] = config.seed
        params = og.GeneratorParams(self.model)
        params.set_search_options(**search)
        return og.Generator(self.model, params)
