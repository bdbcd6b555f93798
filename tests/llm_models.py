"""Tiny causal LMs for generation tests: a random GQA Llama saved as a Hugging Face folder with a
tokenizer trained offline, and its ONNX Runtime GenAI model-builder export (fp32, CPU).

The tokenizer is a byte-level BPE trained on a few sentences that include accented and CJK
characters, so generated pieces split UTF-8 characters the way real LLM tokenizers do.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a small test of generation",
    "café naïve ünïcödé 日本語のテキスト",
    "numbers 123 456 and symbols !? done",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tokenizer(chat_template: bool = True):
    """A byte-level BPE `PreTrainedTokenizerFast` (vocab 300, <s> = 0, </s> = 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_folder(folder: Path, *, layers: int = 2, seed: int = 0, max_positions: int = 128) -> Path:
    """A random Llama (GQA: 4 query heads, 2 KV heads, hidden 64) with its tokenizer, saved to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def genai_build(hf_folder: Path, out: Path, precision: str = "fp32") -> Path:
    """ONNX Runtime GenAI's model builder on ``hf_folder`` (offline, CPU): out/model.onnx + genai_config.json."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "tiny-llama", "-i", str(hf_folder),
           "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / (out.name + "-cache"))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "model.onnx").is_file():
        raise RuntimeError(f"the GenAI model builder failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return out


def gpt2_folder(folder: Path, seed: int = 0) -> Path:
    """A random GPT-2 (learned positions, 4 heads, no GQA) with the same tokenizer, saved to ``folder``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                        eos_token_id=1)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
