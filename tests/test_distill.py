"""distill: loss and fidelity recover on pruned tiny models, invariants (structure, masks, int8 grids),
LoRA merged, determinism, the trainable lowering's exactness, options and data errors; MiniLM (slow)."""

from __future__ import annotations

import numpy as np
import pytest

import slimc
from slimc import data
from slimc.errors import DataError, PassConfigError
from slimc.pass_spec import parse_pipeline

torch = pytest.importorskip("torch")



class _Toy(torch.nn.Module):
    """x [B, 8, 16] -> two residual MLP blocks (the stream is the input: not prunable) -> [B, 8, 8], or
    mean-pooled to [B, 8] (a classifier). Pruning its FFNs by half costs ~0.3 cosine."""

    def __init__(self, pool: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.ModuleList([torch.nn.Linear(16, 64) for _ in range(2)])
        self.fc2 = torch.nn.ModuleList([torch.nn.Linear(64, 16) for _ in range(2)])
        self.out = torch.nn.Linear(16, 8)
        self.pool = pool

    def forward(self, x):
        h = x
        for a, b in zip(self.fc1, self.fc2):
            h = h + b(torch.relu(a(h)))
        return self.out(h.mean(1) if self.pool else h)


@pytest.fixture(scope="module")
def toy():
    from slimc import frontends

    return frontends.load(_Toy().eval(), {"x": torch.randn(2, 8, 16)})


@pytest.fixture(scope="module")
def toy_classifier():
    from slimc import frontends

    return frontends.load(_Toy(pool=True).eval(), {"x": torch.randn(2, 8, 16)})


def _rows(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 8, 16)).astype(np.float32)}


def _compile(loaded, passes: str, calibration=None, **kw):
    calibration = _rows(96, 0) if calibration is None else calibration
    return slimc.compile(loaded, passes, calibration=calibration, evaluation=_rows(16, 1), measure_latency=False, **kw)


def _report(result, name="distill"):
    return next(r for r in result.receipt.passes if r.name == name)


def _inits(model) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items() if v.const_value is not None}


def _cosines(details) -> tuple[float, float]:
    return tuple(details[k]["metrics"]["cosine"] for k in ("fidelity_before", "fidelity_after"))


def test_recovers_pruned_model(toy):
    result = _compile(toy, "prune(ratio=0.5, target=ffn),distill(steps=60, lr=3e-3)")
    details = _report(result).details
    assert details["held_after"] < 0.3 * details["held_before"]  # the held-back calibration loss
    before, after = _cosines(details)  # on the evaluation data, never trained on
    assert 1 - after < 0.3 * (1 - before), (before, after)  # most of the lost cosine recovered
    assert result.receipt.fidelity["metrics"]["cosine"] == pytest.approx(after)
    assert len(details["block_outputs_matched"]) == 2  # both blocks' outputs: intermediate targets
    assert details["rows_seen"] == 60 * 8 and details["loss"] == "mse"


def test_structure_and_sparsity_masks_kept(toy):
    result = _compile(toy, "sparsify(ratio=0.5),distill(steps=20, lr=3e-3)")
    ref = _compile(toy, "sparsify(ratio=0.5)")
    masked = _report(result).details["masked_initializers"]
    assert masked
    after, before = _inits(result.model), _inits(ref.model)
    assert [(n.op_type, [v.name for v in n.inputs]) for n in result.model.graph] == \
        [(n.op_type, [v.name for v in n.inputs]) for n in ref.model.graph]
    for name in masked:
        assert np.all(after[name][before[name] == 0] == 0)  # zeros stay zero
        assert not np.array_equal(after[name], before[name])  # the rest trained
    assert _report(result).details["held_after"] < _report(result).details["held_before"]


def test_int8_grids_kept(toy):
    spec = "prune(ratio=0.5, target=ffn),int8(mode=dynamic, min_speedup=0.01)"
    result = _compile(toy, spec + ",distill(steps=30, lr=3e-3)")
    ref = _compile(toy, spec)
    details = _report(result).details
    assert details["requantized_initializers"] > 0
    after, before = _inits(result.model), _inits(ref.model)
    assert after.keys() == before.keys()
    for name, arr in before.items():
        assert after[name].dtype == arr.dtype and after[name].shape == arr.shape
    ints = [n for n in before if before[n].dtype == np.int8 and before[n].ndim == 2]
    assert ints and any(not np.array_equal(after[n], before[n]) for n in ints)  # weights moved on their grid
    scales = [n for n in before if before[n].dtype == np.float32 and "scale" in n]
    assert scales and all(np.array_equal(after[n], before[n]) for n in scales)  # the grids stay
    before_cos, after_cos = _cosines(details)
    assert after_cos > before_cos


def test_lora_is_merged(toy):
    result = _compile(toy, "prune(ratio=0.5, target=ffn),distill(steps=30, params=lora, rank=2, lr=1e-2)")
    ref = _compile(toy, "prune(ratio=0.5, target=ffn)")
    after, before = _inits(result.model), _inits(ref.model)
    assert after.keys() == before.keys()  # no adapter initializers
    assert [n.op_type for n in result.model.graph] == [n.op_type for n in ref.model.graph]
    changed = [n for n in after if not np.array_equal(after[n], before[n])]
    assert changed and all(after[n].ndim == 2 for n in changed)  # only matmul weights, merged
    details = _report(result).details
    assert details["trained_values"] < sum(before[n].size for n in changed)  # the adapters are low-rank
    assert details["held_after"] < details["held_before"]


def test_time_budget(toy):
    """minutes=: the steps are planned from the measured step time and the run ends with the budget."""
    details = _report(_compile(toy, "prune(ratio=0.5, target=ffn),distill(minutes=0.1)")).details
    assert details["steps"] >= 10 and details["planned"] >= details["steps"]
    assert details["stopped"] in ("steps done", "time budget spent")
    assert details["held_after"] < details["held_before"]


def test_deterministic_for_a_seed(toy):
    spec = "prune(ratio=0.5, target=ffn),distill(steps=8, seed={})"
    runs = [_inits(_compile(toy, spec.format(3)).model) for _ in range(2)]
    other = _inits(_compile(toy, spec.format(4)).model)
    assert all(np.array_equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not np.array_equal(runs[0][n], other[n]) for n in runs[0])


def test_classifier_kl(toy_classifier):
    result = _compile(toy_classifier, "prune(ratio=0.5),distill(steps=30, lr=3e-3, temperature=2)")
    details = _report(result).details
    assert details["loss"] == "kl" and details["block_outputs_matched"] == []  # kl: logits only by default
    assert details["held_after"] < 0.5 * details["held_before"]


@pytest.mark.slow
def test_causal_lm_kl_top_k(zoo_model):
    """A tiny llama, FFN pruned: kl on the teacher's top-k tokens lowers the held-back loss."""
    z = zoo_model("llama")
    calib = data.synthetic(z.loaded.inputs, n_batches=8, seed=1, sizes={"seq": 16})
    evaluation = data.synthetic(z.loaded.inputs, n_batches=2, seed=9, sizes={"seq": 16})
    result = slimc.compile(z.loaded, "prune(ratio=0.5, target=ffn),distill(steps=20, lr=3e-3, top_k=8)",
                           calibration=calib, evaluation=evaluation, measure_latency=False)
    details = _report(result).details
    assert details["loss"] == "kl" and details["block_outputs_matched"] == []
    assert details["held_after"] < details["held_before"]


def test_trainable_lowering_is_exact(toy):
    """The student before training computes what the int8 graph computes (fake quantization = QDQ)."""
    from slimc.backends.triton.lower import lower

    feed = torch.from_numpy(_rows(4, 5)["x"])
    for mode in ("static", "dynamic"):
        result = _compile(toy, f"int8(mode={mode}, min_speedup=0.01)")
        ref, _ = lower(result.model, kernels=False)
        student, _ = lower(result.model, trainable=True)
        assert student.quantized and all(p.requires_grad for p in student.parameters())
        torch.testing.assert_close(student(feed)[0], ref(feed)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["distill(steps=0)", "distill(steps=5, minutes=1)", "distill(params=everything)",
                                  "distill(lr=2)", "distill(temperature=0)", "distill(batch_size=0)",
                                  "distill(loss=l1)", "distill(nope=1)"])
def test_bad_options(spec):
    with pytest.raises(PassConfigError):
        parse_pipeline(spec)


def test_needs_calibration(toy):
    with pytest.raises(DataError, match="calibration"):
        slimc.compile(toy, "prune(ratio=0.5),distill(steps=2)", calibration=None, measure_latency=False)
    with pytest.raises(DataError, match="at least 2"):
        _compile(toy, "prune(ratio=0.5),distill(steps=2)", calibration=_rows(1, 0))


def test_without_lossy_pass_is_a_noop(toy):
    result = _compile(toy, "cleanup,distill(steps=5)")
    report = _report(result)
    assert not report.modified and "no lossy pass" in report.left_alone[0][1]
    assert result.receipt.fidelity["metrics"]["exact"]


@pytest.mark.slow
def test_minilm_pruned_recovers(tmp_path):
    """all-MiniLM-L6-v2 pruned by half: a short distillation raises the held-out embedding cosine."""
    from slimc import datasets, frontends
    from slimc.tools import models

    loaded = frontends.load(models.minilm_path())
    lee, wiki = datasets.text_files(tmp_path)
    calib = data.load(lee, loaded, seq_len=128, batch_size=8, max_batches=12, role="calibration")
    evaluation = data.load(wiki, loaded, seq_len=128, batch_size=4, max_batches=4, role="evaluation")
    result = slimc.compile(loaded, "prune(ratio=0.5),distill(steps=30, batch_size=8, lr=5e-4, threads=1)", calibration=calib,
                           evaluation=evaluation, measure_latency=False)
    details = _report(result).details
    before = details["fidelity_before"]["metrics"]["cosine"]
    after = details["fidelity_after"]["metrics"]["cosine"]
    assert after > before + 0.03, (before, after)
