"""Tiny transformers models with random weights: one per architecture family the front ends meet.

Each builder returns ``(module, example_inputs, task)``: the Hugging Face model itself (so the
exporter sees the real ``ModelOutput`` and names outputs from it), a dict of keyword example
tensors (batch 2, sequence 16, or 2 small images), and the task slimc should infer. Sizes are
the smallest that keep each family's structure (grouped-query attention, rotary positions,
depthwise convs, residual stages), so every model exports in seconds on a CPU.

Attention is ``eager`` (explicit MatMul / Softmax / GQA Expand), as the Hugging Face front end
loads it, so graph-level tests see what real models produce.

Random weights prove only that the export preserves numerics (DESIGN.md, honesty rules).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

BATCH, SEQ, VOCAB = 2, 16, 128
# Token ids the configs mention must exist in the tiny vocabulary, or transformers warns.
_SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _tokens(names=("input_ids", "attention_mask"), batch=BATCH, seq=SEQ) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return {name: feeds[name] for name in names}


def _image(size: int, batch: int = BATCH) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))}


def _build(model_cls, config) -> torch.nn.Module:
    torch.manual_seed(0)
    return model_cls(config).eval()


def bert():
    config = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, attn_implementation="eager",
    )
    return _build(tf.BertModel, config), _tokens(("input_ids", "attention_mask", "token_type_ids")), "encoder"


def gpt2():
    config = tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    return _build(tf.GPT2LMHeadModel, config), _tokens(), "causal-lm"


def llama():
    """Grouped-query attention: 4 query heads share 2 KV heads; rotary positions."""
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, attn_implementation="eager", **_SPECIAL,
    )
    return _build(tf.LlamaForCausalLM, config), _tokens(), "causal-lm"


def vit():
    config = tf.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=10, attn_implementation="eager",
    )
    return _build(tf.ViTForImageClassification, config), _image(32), "image-classifier"


def resnet():
    config = tf.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10,
    )
    return _build(tf.ResNetForImageClassification, config), _image(64), "image-classifier"


def resnet_bottleneck():
    """ResNet-50's block: 1x1 reduce, 3x3, 1x1 expand, projection shortcuts (tiny widths)."""
    config = tf.ResNetConfig(
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 2], layer_type="bottleneck", num_labels=10,
    )
    return _build(tf.ResNetForImageClassification, config), _image(64), "image-classifier"


def mobilenet_v2():
    config = tf.MobileNetV2Config(image_size=64, depth_multiplier=0.25, num_labels=10)
    return _build(tf.MobileNetV2ForImageClassification, config), _image(64), "image-classifier"


def convnext():
    config = tf.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32, num_labels=10)
    return _build(tf.ConvNextForImageClassification, config), _image(32), "image-classifier"


ZOO: dict[str, Callable[[], tuple]] = {
    "bert": bert,
    "gpt2": gpt2,
    "llama": llama,
    "vit": vit,
    "resnet": resnet,
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_v2": mobilenet_v2,
    "convnext": convnext,
}
TOKEN_MODELS = ("bert", "gpt2", "llama")


def shifted_inputs(example: dict[str, torch.Tensor], batch: int = 3, seq: int = 7) -> dict[str, torch.Tensor]:
    """Inputs shaped unlike the export's (batch 3, sequence 7), right-padded masks included.

    Padding checks that the mask is a real input of the graph, not folded away because the
    export's example mask was all ones.
    """
    if "pixel_values" in example:
        size = example["pixel_values"].shape[-1]
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))}
    feeds = _tokens(tuple(example), batch=batch, seq=seq)
    if "attention_mask" in feeds:
        lengths = torch.tensor([seq, seq - 2, 3][:batch])
        feeds["attention_mask"] = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return feeds
