"""`slimc generate` on the real SmolLM2-135M-Instruct (slow): its GGUF dequantized by transformers, saved as a
Hugging Face folder and built by ONNX Runtime GenAI's model builder (fp32, CPU). Greedy tokens must equal
transformers' ``generate()`` on the same weights, and ``og.Generator``'s on the same folder."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import llm_models

    from slimc.tools.models import smollm2_gguf

    path = smollm2_gguf()
    root = tmp_path_factory.mktemp("smollm2")
    kwargs = dict(gguf_file=path.name, local_files_only=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    # transformers refuses to save a GGUF-loaded model: the same (dequantized) weights in a plain one
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return model, tokenizer, llm_models.genai_build(root / "hf", root / "genai")


def test_smollm2_greedy_equals_transformers_and_genai(smollm2):
    import torch

    from slimc.textgen import open_generator

    model, tokenizer, folder = smollm2
    ours = open_generator(folder / "model.onnx")
    result = ours.generate(PROMPT, chat=True, max_new_tokens=24)
    ids = ours.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             tokenize=False)
    ids = ours.tokenizer(ids, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    expected = out[0, len(ids):].tolist()
    assert result.tokens == expected[: len(result.tokens)] and len(result.tokens) >= 8
    assert result.text.strip() == ours.tokenizer.decode([t for t in result.tokens if t not in ours.eos], skip_special_tokens=True,
                                                        clean_up_tokenization_spaces=False).strip()
    theirs = open_generator(folder).generate(PROMPT, prompt_ids=ids, max_new_tokens=24)
    assert theirs.tokens == result.tokens
