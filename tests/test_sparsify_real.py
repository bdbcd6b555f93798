"""`sparsify` on SmolLM2-135M (slow): held-out perplexity bounds with a margin over what this
configuration measured, and the ordering the papers report (Wanda far better than magnitude at 2:4).

Calibration: 4 batches of the Lee news corpus; evaluation: 3 batches of held-out Wikipedia text.
"""

from __future__ import annotations

import pytest

import slimc
from slimc.tools import bench_quant

pytestmark = pytest.mark.slow

# measured with exactly this configuration (see docs/passes/sparsify.md for the full benchmark)
WANDA_2_4_PPL_RATIO = 9.5  # measured 7.51 (perplexity 170.6 vs dense 22.7)
MAGNITUDE_2_4_PPL_RATIO_AT_LEAST = 30.0  # measured 58.4


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    case = bench_quant.smollm2(tmp_path_factory.mktemp("text"), calib_batches=4, eval_batches=3)
    loaded = case.load()
    return loaded, *case.data(loaded)


def _ratio(smollm2, spec: str) -> tuple[float, dict]:
    loaded, calib, evaluation = smollm2
    result = slimc.compile(loaded, spec, calibration=calib, evaluation=evaluation, measure_latency=False)
    (report,) = result.receipt.passes
    return result.receipt.fidelity["metrics"]["perplexity_ratio"], report.details


def test_smollm2_2_4_wanda_beats_magnitude(smollm2):
    wanda, details = _ratio(smollm2, "sparsify(pattern=2:4, method=wanda, stages=1, measure_zip=false)")
    assert details["nm_valid"] and details["sparsity"] > 0.49
    assert wanda < WANDA_2_4_PPL_RATIO, wanda
    magnitude, _ = _ratio(smollm2, "sparsify(pattern=2:4, method=magnitude, measure_zip=false)")
    assert magnitude > MAGNITUDE_2_4_PPL_RATIO_AT_LEAST and magnitude > 2 * wanda, (magnitude, wanda)
