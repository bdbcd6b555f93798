"""Tiny hand-built decoder graphs with slimc's KV-cache interface (`slimc.kvcache`), for target tests.

`decoder(...)` writes an ONNX causal LM that takes ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.{i}.key/value`` and returns ``logits`` and
``present.{i}.key/value``: learned position embeddings, per layer plain (unfused) attention
whose K/V are concatenated onto the past, grouped heads repeated for the query heads, a causal
plus padding mask, a residual, then an lm_head. Random weights, seconds to build and run.

Per-layer KV head counts (``kv_heads=[2, 1]``) and layer indices (``indices=[0, 2]``) let tests
build what pruning and layer skipping leave behind. `tokenizer(folder)` writes a small byte-level
BPE tokenizer (trained offline on this repository's README) that both transformers and
onnxruntime-genai read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN, HEADS, HEAD_DIM = 32, 4, 8


def decoder(vocab: int, kv_heads: list[int], indices: list[int] | None = None, seed: int = 0,
            context: int = 128) -> onnx.ModelProto:
    """The decoder as an ONNX model (opset 17); ``kv_heads[k]`` query-head groups in layer ``indices[k]``."""
    rng = np.random.default_rng(seed)
    indices = list(range(len(kv_heads))) if indices is None else indices
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, ins, outs=None, **attrs):
        outs = outs or [f"{op}_{len(nodes)}"]
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]

    weight = lambda *shape: const(f"w{len(inits)}", (rng.standard_normal(shape) * 0.3).astype(np.float32))  # noqa: E731
    x = node("Add", [node("Gather", [weight(vocab, HIDDEN), "input_ids"]),
                     node("Gather", [weight(context, HIDDEN), "position_ids"])])
    seq = node("Gather", [node("Shape", ["input_ids"]), const("one", np.int64(1))])
    total = node("Gather", [node("Shape", ["attention_mask"]), "one"])
    past = node("Sub", [total, seq])
    rows = node("Unsqueeze", [node("Add", [node("Range", [const("zero", np.int64(0)), seq, "one"]), past]),
                              const("ax1", np.array([1], np.int64))])
    causal = node("LessOrEqual", [node("Range", ["zero", total, "one"]), rows])  # [seq, total]
    padded = node("Equal", [node("Unsqueeze", ["attention_mask", const("ax12", np.array([1, 2], np.int64))]), "one"])
    allowed = node("And", [causal, padded])  # [batch, 1, seq, total]
    heads_shape = const("heads_shape", np.array([0, 0, -1, HEAD_DIM], np.int64))
    for index, groups in zip(indices, kv_heads):
        q = node("Transpose", [node("Reshape", [node("MatMul", [x, weight(HIDDEN, HEADS * HEAD_DIM)]), heads_shape])],
                 perm=[0, 2, 1, 3])
        kv = []
        for kind, past_name, present in (("key", f"past_key_values.{index}.key", f"present.{index}.key"),
                                          ("value", f"past_key_values.{index}.value", f"present.{index}.value")):
            new = node("Transpose", [node("Reshape", [node("MatMul", [x, weight(HIDDEN, groups * HEAD_DIM)]),
                                                      heads_shape])], perm=[0, 2, 1, 3])
            full = node("Concat", [past_name, new], [present], axis=2)
            copies = node("Concat", [node("Unsqueeze", [full, const(f"ax2_{index}{kind}", np.array([2], np.int64))])]
                          * (HEADS // groups), axis=2)
            kv.append(node("Reshape", [copies, const(f"rep_{index}{kind}", np.array([0, HEADS, -1, HEAD_DIM], np.int64))]))
        scores = node("Mul", [node("MatMul", [q, node("Transpose", [kv[0]], perm=[0, 1, 3, 2])]),
                              const(f"scale{index}", np.float32(HEAD_DIM ** -0.5))])
        masked = node("Where", [allowed, scores, const(f"neg{index}", np.float32(-1e9))])
        attended = node("MatMul", [node("Softmax", [masked], axis=-1), kv[1]])
        merged = node("Reshape", [node("Transpose", [attended], perm=[0, 2, 1, 3]),
                                  const(f"merge{index}", np.array([0, 0, HEADS * HEAD_DIM], np.int64))])
        x = node("Add", [x, node("Tanh", [node("MatMul", [merged, weight(HEADS * HEAD_DIM, HIDDEN)])])])
    node("MatMul", [x, weight(HIDDEN, vocab)], ["logits"])
    ids = lambda name, dims: helper.make_tensor_value_info(name, TensorProto.INT64, dims)  # noqa: E731
    inputs = [ids("input_ids", ["batch", "seq"]), ids("attention_mask", ["batch", "total"]),
              ids("position_ids", ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
    for index, groups in zip(indices, kv_heads):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{index}.{kind}", TensorProto.FLOAT,
                                                        ["batch", groups, "past", HEAD_DIM]))
            outputs.append(helper.make_tensor_value_info(f"present.{index}.{kind}", TensorProto.FLOAT,
                                                         ["batch", groups, "total", HEAD_DIM]))
    graph = helper.make_graph(nodes, "kv_decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def tokenizer(folder: Path):
    """A 300-token byte-level BPE tokenizer saved to ``folder`` (bos 1, eos = pad 0); returns it."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast
