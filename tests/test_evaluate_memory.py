"""Bounded memory in evaluation: sub-batches of rows, chunked float64 work, same numbers as unchunked.

A causal LM with a 262k vocabulary returns 537 MB of float32 logits per 4 x 128 tokens; `evaluate`
must never hold a whole batch of them, nor float64 copies of one sequence's logits. The models
here are lookup tables (logits = table[token]) so the unchunked result is computed by hand.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from slimc import evaluate, subbatch
from slimc.model import InputSpec

VOCAB, SEQ, ROWS = 50, 12, 5


def _lookup_models(seed: int = 0):
    rng = np.random.default_rng(seed)
    table_r = rng.standard_normal((VOCAB, VOCAB)).astype(np.float32)
    table_c = table_r + 0.3 * rng.standard_normal((VOCAB, VOCAB)).astype(np.float32)
    ids = rng.integers(0, VOCAB, (ROWS, SEQ))
    mask = np.ones((ROWS, SEQ), np.int64)
    mask[1, 9:] = 0  # padding: positions without a next token are not scored
    return table_r, table_c, {"input_ids": ids, "attention_mask": mask}


def _log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _unchunked(ref, cand, ids, mask):
    """The metrics computed over the whole batch at once (what chunking must reproduce)."""
    lr, lc = _log_softmax(ref), _log_softmax(cand)
    pair = (mask[:, :-1] & mask[:, 1:]).astype(bool)
    nxt = ids[:, 1:]
    nll_r = -np.take_along_axis(lr[:, :-1], nxt[..., None], -1)[..., 0][pair]
    nll_c = -np.take_along_axis(lc[:, :-1], nxt[..., None], -1)[..., 0][pair]
    seen = mask.astype(bool)
    r64, c64 = ref.astype(np.float64), cand.astype(np.float64)
    flat_r, flat_c = r64.reshape(len(r64), -1), c64.reshape(len(c64), -1)
    cos = (flat_r * flat_c).sum(1) / (np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_c, axis=1))
    return {
        "perplexity_reference": math.exp(nll_r.mean()), "perplexity": math.exp(nll_c.mean()),
        "next_token_top1_agreement": (lr.argmax(-1) == lc.argmax(-1))[seen].mean(),
        "kl_divergence": np.maximum((np.exp(lr) * (lr - lc)).sum(-1), 0)[seen].mean(),
        "sqnr_db": 10 * math.log10((r64**2).sum() / ((r64 - c64) ** 2).sum()),
        "max_abs_error": np.abs(r64 - c64).max(), "mean_abs_error": np.abs(r64 - c64).mean(),
        "cosine": cos.mean(), "cosine_min": cos.min(), "tokens": int(pair.sum()),
    }


def test_lm_evaluation_runs_sub_batches_and_chunks_log_softmax(monkeypatch):
    table_r, table_c, batch = _lookup_models()
    chunk = 3 * VOCAB  # three positions of float64 log-probs at a time
    monkeypatch.setattr(evaluate, "CHUNK_ELEMENTS", chunk)
    rows_run, softmax_sizes = [], []
    real_log_softmax = evaluate._log_softmax

    def spy_log_softmax(x):
        softmax_sizes.append(x.size)
        return real_log_softmax(x)

    monkeypatch.setattr(evaluate, "_log_softmax", spy_log_softmax)

    def model(table):
        def run(b):
            rows_run.append(len(b["input_ids"]))
            return [table[b["input_ids"]]]
        return run

    row_bytes = SEQ * VOCAB * 4
    inputs = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq"), "tokens", VOCAB),
              InputSpec("attention_mask", np.dtype(np.int64), ("batch", "seq"), "attention_mask")]
    got = evaluate.evaluate(model(table_r), model(table_c), [batch], "causal-lm", ["logits"], inputs=inputs,
                            max_output_bytes=2 * row_bytes)

    # the first run measures one row; after that at most two rows' logits per run, never the batch
    assert rows_run[0] == 1 and max(rows_run) == 2 and sum(rows_run) == 2 * ROWS
    assert softmax_sizes and max(softmax_sizes) <= chunk
    assert got["batches"] == 1 and got["samples"] == ROWS
    want = _unchunked(table_r[batch["input_ids"]], table_c[batch["input_ids"]], batch["input_ids"],
                      batch["attention_mask"])
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


def test_whole_batches_without_a_budget():
    """Run functions that look outputs up by batch (precomputed references) still get whole batches."""
    table_r, table_c, batch = _lookup_models()
    seen = []
    outputs = {id(batch): [table_r[batch["input_ids"]]]}

    def reference(b):
        seen.append(len(b["input_ids"]))
        return outputs[id(b)]

    evaluate.evaluate(reference, lambda b: [table_c[b["input_ids"]]], [batch], "causal-lm")
    assert seen == [ROWS]


def test_wide_outputs_are_compared_in_column_chunks(monkeypatch):
    """Generic statistics over rows wider than a chunk equal the one-shot computation."""
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((3, 40, 7)).astype(np.float32)
    cand = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)
    cand[2] = ref[2]  # an identical sample has cosine exactly 1
    whole = evaluate.Fidelity("generic")
    whole.update([ref], [cand])
    monkeypatch.setattr(evaluate, "CHUNK_ELEMENTS", 16)  # a row of 280 elements in 18 chunks
    chunked = evaluate.Fidelity("generic")
    chunked.update([ref], [cand])
    a, b = whole.result(), chunked.result()
    assert b["cosine_min"] < 1.0 and b["exact"] is False
    for key in ("max_abs_error", "mean_abs_error", "cosine", "cosine_min", "sqnr_db"):
        assert b[key] == pytest.approx(a[key], rel=1e-12), key


def _lookup_onnx(path, table):
    """input_ids [batch, seq] -> Gather(table) -> logits [batch, seq, vocab]: an LM by its interface."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"])], "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        initializer=[onnx.numpy_helper.from_array(table, "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_compile_runs_models_in_sub_batches(tmp_path, monkeypatch):
    """compile() runs the models on sub-batches that fit the output budget: verification and fidelity."""
    import slimc
    from slimc.backends import onnxruntime as ort_backend

    table_r, _, batch = _lookup_models()
    _lookup_onnx(tmp_path / "lm.onnx", table_r)
    np.savez(tmp_path / "eval.npz", input_ids=np.concatenate([batch["input_ids"]] * 2)[:8])  # one batch of 8

    monkeypatch.setattr(subbatch, "OUTPUT_BUDGET_BYTES", 3 * SEQ * VOCAB * 4)
    rows = []
    real_run = ort_backend.run

    def spy_run(session, b):
        rows.append(len(b["input_ids"]))
        return real_run(session, b)

    monkeypatch.setattr(ort_backend, "run", spy_run)
    result = slimc.compile(str(tmp_path / "lm.onnx"), "cleanup", evaluation=str(tmp_path / "eval.npz"),
                           measure_latency=False)
    fidelity = result.receipt.fidelity
    assert fidelity["batches"] == 1 and fidelity["metrics"]["samples"] == 8
    assert fidelity["metrics"]["perplexity_ratio"] == pytest.approx(1.0)
    # at most 3 rows per run: the input's run check (8 rows), cleanup's exactness check against it (2 x 8)
    # and the fidelity measurement (2 x 8); before, each of these ran (and kept) whole batches
    assert max(rows) <= 3 and sum(rows) == 5 * 8
