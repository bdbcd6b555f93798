"""slimc.evaluate: metric values on hand-computed cases, streaming equals one-shot, JSON safety."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from slimc import data, evaluate
from slimc.errors import DataError
from slimc.evaluate import Fidelity
from slimc.model import InputSpec


def _result(task, ref, cand, batch=None, **kw):
    fid = Fidelity(task, **kw)
    fid.update(ref, cand, batch or {})
    return fid.result()


def test_identical_outputs_are_exact_and_json_safe():
    logits = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)
    r = _result("classifier", [logits], [logits.copy()])
    assert r["max_abs_error"] == 0.0 and r["mean_abs_error"] == 0.0
    assert r["cosine"] == 1.0 and r["cosine_min"] == 1.0
    assert r["sqnr_db"] is None and r["exact"] is True  # +inf is not JSON: None plus the flag
    assert r["top1_agreement"] == 1.0 and r["kl_divergence"] == 0.0
    assert r["samples"] == 5 and r["batches"] == 1
    json.dumps(r, allow_nan=False)


def test_known_perturbation():
    ref = np.ones((2, 4), np.float32)
    r = _result("generic", [ref], [ref + 0.1])
    # SQNR = 10 log10(Σ 1 / Σ 0.01) = 10 log10(100) = 20 dB
    assert r["sqnr_db"] == pytest.approx(20.0, abs=1e-4) and r["exact"] is False
    assert r["max_abs_error"] == pytest.approx(0.1) and r["mean_abs_error"] == pytest.approx(0.1)
    assert r["cosine"] == pytest.approx(1.0)  # a uniform shift of a constant keeps the direction
    r = _result("generic", [np.eye(2)], [np.ones((2, 2))])
    assert r["cosine"] == pytest.approx(1 / math.sqrt(2)) and r["cosine_min"] == pytest.approx(1 / math.sqrt(2))
    # Σ r² = 2, Σ (r - c)² = 2: SQNR 0 dB
    assert r["sqnr_db"] == pytest.approx(0.0, abs=1e-12)


def test_top1_agreement_and_kl_by_hand():
    ref = np.array([[0.0, 0.0], [1.0, 0.0]])
    cand = np.array([[math.log(3), 0.0], [0.0, 1.0]])
    r = _result("image-classifier", [ref], [cand])
    # sample 0: p = (½, ½), q = (¾, ¼): KL = ½ ln(⅔) + ½ ln 2 = ½ ln(4/3); same argmax (0)
    # sample 1: p = softmax(1, 0), q = softmax(0, 1) = p reversed; argmax 0 vs 1 disagree
    p1 = np.exp([1, 0]) / np.exp([1, 0]).sum()
    kl1 = float((p1 * (np.log(p1) - np.log(p1[::-1]))).sum())
    assert r["top1_agreement"] == 0.5
    assert r["kl_divergence"] == pytest.approx((0.5 * math.log(4 / 3) + kl1) / 2)


def test_perplexity_of_known_distributions():
    rng = np.random.default_rng(0)
    vocab, ids = 50, rng.integers(0, 50, (3, 9))
    assert evaluate.perplexity(np.zeros((3, 9, vocab)), ids) == pytest.approx(vocab)  # uniform -> V
    # a model that gives every next token probability ½: e^a / (e^a + V - 1) = ½ -> a = ln(V - 1)
    half = np.zeros((3, 9, vocab))
    half[:, :-1][np.arange(3)[:, None], np.arange(8), ids[:, 1:]] = math.log(vocab - 1)
    mask = np.ones_like(ids)
    mask[:, 6:] = 0  # padding: its positions must not count
    half[:, 6:] = rng.standard_normal((3, 3, vocab)) * 10
    batch = {"input_ids": ids, "attention_mask": mask}
    r = _result("causal-lm", [np.zeros((3, 9, vocab))], [half], batch)
    assert r["perplexity_reference"] == pytest.approx(vocab) and r["perplexity"] == pytest.approx(2.0)
    assert r["perplexity_ratio"] == pytest.approx(2.0 / vocab)
    assert r["tokens"] == 3 * 5  # pairs (t, t+1) with both unmasked: t = 0..4
    same = _result("causal-lm", [half], [half.copy()], batch)
    assert same["perplexity_ratio"] == 1.0 and same["next_token_top1_agreement"] == 1.0
    assert same["kl_divergence"] == 0.0


def test_causal_lm_uses_token_input_named_by_the_specs():
    ids = np.array([[1, 2, 3, 0]])
    logits = np.zeros((1, 4, 5))
    specs = [InputSpec("tok", np.dtype(np.int64), ("b", "s"), "tokens", 5)]
    r = _result("causal-lm", [logits], [logits], {"tok": ids}, inputs=specs)
    assert r["perplexity"] == pytest.approx(5.0) and r["tokens"] == 3
    missing = _result("causal-lm", [logits], [logits], {"tok": ids})  # no specs, no "input_ids"
    assert "perplexity" not in missing and "perplexity needs logits" in missing["notes"][0]


def test_encoder_mean_pooling_respects_the_mask():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 6, 8))
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    noisy = hidden.copy()
    noisy[0, 4:] += 100.0  # only padded positions change
    r = _result("encoder", [hidden], [noisy], {"attention_mask": mask})
    assert r["embedding_cosine"] == 1.0 and r["embedding_cosine_min"] == 1.0
    assert r["exact"] is False and r["max_abs_error"] == pytest.approx(100.0)
    flipped = noisy.copy()
    flipped[1] *= -1  # sentence 1 embedding reversed: cosine -1
    r = _result("encoder", [hidden], [flipped], {"attention_mask": mask})
    assert r["embedding_cosine_min"] == pytest.approx(-1.0) and r["embedding_cosine"] == pytest.approx(0.0)
    pooled = _result("encoder", [np.eye(2)], [np.ones((2, 2))])  # already pooled [batch, dim]
    assert pooled["embedding_cosine"] == pytest.approx(1 / math.sqrt(2))


@pytest.mark.parametrize("task", ["classifier", "causal-lm", "encoder"])
def test_streaming_equals_one_shot(task):
    rng = np.random.default_rng(1)
    shape = (6, 5, 7) if task != "classifier" else (6, 7)
    ref = rng.standard_normal(shape)
    cand = ref + 0.3 * rng.standard_normal(shape)
    aux = rng.standard_normal((6, 3))
    batch = {"input_ids": rng.integers(0, 7, (6, 5)), "attention_mask": (rng.random((6, 5)) > 0.2).astype(np.int64)}
    one = _result(task, [ref, aux], [cand, aux * 1.1], batch)
    fid = Fidelity(task)
    for s in (slice(0, 1), slice(1, 4), slice(4, 6)):
        fid.update([ref[s], aux[s]], [cand[s], aux[s] * 1.1], {k: v[s] for k, v in batch.items()})
    streamed = fid.result()
    assert streamed.pop("batches") == 3 and one.pop("batches") == 1
    worst_s, worst_o = streamed.pop("worst"), one.pop("worst")
    assert worst_s == pytest.approx(worst_o)
    assert streamed == pytest.approx(one)
    assert len(one) >= 9  # generic and task metrics are all there


def test_outputs_worst_case_shape_change_and_nan():
    ref = [np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 2)), np.arange(2)]
    cand = [np.ones((2, 3)), np.ones((2, 3)) * 1.5, np.ones((2, 1)), np.arange(2)]
    fid = Fidelity("generic", ["main", "worse", "pruned", "index"])
    fid.update(ref, cand, {})
    r = fid.result()
    assert r["output"] == "main" and r["exact"] is True
    assert r["worst"]["max_abs_error"] == 0.5 and r["worst"]["exact"] is False
    assert r["worst"]["sqnr_db"] == pytest.approx(10 * math.log10(1 / 0.25))
    assert any("pruned changed shape" in n for n in r["notes"])
    assert r["non_floating"] == {"index": {"elements_differing": 0, "elements": 2, "exact": True}}
    assert set(fid.per_output()) == {"main", "worse"}
    nan = _result("generic", [np.ones((2, 2))], [np.full((2, 2), np.nan)])
    assert nan["max_abs_error"] is None and nan["exact"] is False and nan["nonfinite"] == 4
    json.dumps(nan, allow_nan=False)


def test_evaluate_runs_both_models_over_a_dataset():
    specs = [InputSpec("x", np.dtype(np.float32), ("batch", 4), "float")]
    ds = data.synthetic(specs, n_batches=3, sizes={"batch": 5})
    r = evaluate.evaluate(lambda b: [b["x"] * 2], lambda b: {"y": b["x"] * 2 + 1e-3}, ds, "generic", ["y"])
    assert r["batches"] == 3 and r["samples"] == 15 and r["output"] == "y"
    assert r["max_abs_error"] == pytest.approx(1e-3, rel=1e-3) and r["sqnr_db"] > 40
    with pytest.raises(DataError, match="no batches to evaluate"):
        evaluate.evaluate(lambda b: [], lambda b: [], [], "generic")
    with pytest.raises(ValueError, match="unknown task 'llm'"):
        Fidelity("llm")


def test_string_and_integer_outputs_are_compared_exactly():
    """Issue 17: verification and fidelity crashed on string outputs (could not convert string to float)."""
    from slimc.errors import VerificationError
    from slimc.verify import outputs_match

    words = np.array([["a", "bc"], ["d", ""]], dtype=object)
    assert outputs_match([[words]], [[words.copy()]], ["s"]).ok
    changed = words.copy()
    changed[1, 1] = "e"
    assert not outputs_match([[words]], [[changed]], ["s"]).ok
    assert not outputs_match([[np.arange(3)]], [[np.array([0, 1, 3])]], ["i"]).ok
    with pytest.raises(VerificationError, match="changed shape"):
        outputs_match([[words]], [[words[:1]]], ["s"])
    r = _result("generic", [np.ones((2, 2)), words], [np.ones((2, 2)), changed])
    assert r["non_floating"]["output 1"] == {"elements_differing": 1, "elements": 4, "exact": False}
    json.dumps(r, allow_nan=False)
