"""ONNX's own backend node tests through every pass: no crash, no wrong result, every refusal listed (issue 17).

The cases are the ``onnx/backend/test/data/node`` folders of the onnx 1.20.1 wheel (found in
``$SLIMC_ONNX_NODE_TESTS`` or ``~/.cache/slimc-tests/onnx-node-tests``, else downloaded there with
pip; skipped when neither works), restricted to those ONNX Runtime itself runs correctly. Each runs
``slimc.compile(model, passes=[p], evaluation=[its own inputs])``:

- ``cleanup`` must reproduce the test's expected outputs;
- every pass may only run or refuse with a `SlimcError` whose reason
  ``tests/data/onnx_conformance_expected.json`` lists for that case (latency-guard refusals depend
  on this machine's timings and are always allowed). A crash, a wrong result or a new refusal fails.

The default suite runs a seeded sample; ``-m slow`` runs every case (and also fails on listed
refusals that no longer happen). ``python -m slimc.tools.onnx_conformance`` runs it all and
``--write-expected`` rewrites the expectations file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slimc.tools import onnx_conformance as conf

EXPECTED = Path(__file__).parent / "data" / "onnx_conformance_expected.json"
SAMPLE = 40  # cases per pass in the default suite (a seeded sample; about a minute on 2 cores)


@pytest.fixture(scope="session")
def node_tests() -> Path:
    cache = Path(os.environ.get("SLIMC_ONNX_NODE_TESTS", conf.DEFAULT_CACHE))
    root = conf.node_tests_dir(cache)
    if root is None:
        pytest.skip(f"the onnx {conf.ONNX_WHEEL_VERSION} node tests are not in {cache} and pip could not download them")
    return root


@pytest.fixture(scope="session")
def expected() -> dict[str, dict[str, str]]:
    return json.loads(EXPECTED.read_text())


def _cases(root: Path, names: list[str]) -> list[conf.Case]:
    cases = [conf.load_case(root / name) for name in names]
    return [c for c in cases if c is not None and conf.runs_in_ort(c)]


def _problems(pass_spec: str, cases: list[conf.Case], listed: dict[str, str], *, stale: bool) -> list[str]:
    problems = []
    for case in cases:
        outcome = conf.run_case(case, pass_spec)
        why = conf.check(outcome, listed.get(case.name))
        if why is not None:
            problems.append(f"{pass_spec} {case.name}: {why}")
        elif stale and outcome.status == "ok" and case.name in listed:
            problems.append(f"{pass_spec} {case.name}: runs now, but is listed as refused: remove it from {EXPECTED.name}")
    return problems


@pytest.mark.parametrize("pass_spec", conf.PASSES)
def test_node_test_sample(pass_spec, node_tests, expected):
    names = sorted(p.name for p in node_tests.iterdir() if p.is_dir())
    seed = conf.PASSES.index(pass_spec)  # each pass its own sample: together they cover more operators
    cases = _cases(node_tests, conf.sample(names, SAMPLE, seed=seed))
    assert cases, "no sampled case runs in ONNX Runtime"
    problems = _problems(pass_spec, cases, expected.get(pass_spec, {}), stale=False)
    assert not problems, "\n".join(problems)


@pytest.mark.exhaustive
@pytest.mark.slow
@pytest.mark.parametrize("pass_spec", conf.PASSES)
def test_every_node_test(pass_spec, node_tests, expected):
    cases = conf.ort_cases(node_tests)
    problems = _problems(pass_spec, cases, expected.get(pass_spec, {}), stale=True)
    assert not problems, "\n".join(problems)
    if pass_spec == "cleanup":  # the acceptance bar: cleanup reproduces the expected outputs on >= 98%
        refused = sum(1 for c in cases if c.name in expected.get("cleanup", {}))
        assert refused <= 0.02 * len(cases), f"cleanup refuses {refused} of {len(cases)}"


def test_a_crash_a_wrong_result_and_an_unlisted_refusal_each_fail():
    """The check itself: only a listed refusal (or a latency-guard one) passes."""
    assert conf.check(conf.Outcome("ok"), None) is None
    assert conf.check(conf.Outcome("crash", "IndexError: too many indices"), None) is not None
    assert conf.check(conf.Outcome("wrong", "output 0 differs"), "anything") is not None
    refusal = conf.Outcome("refused", "DataError: evaluation data, batch 0: every input is an empty array (X (2, 0))")
    assert conf.check(refusal, None) is not None
    assert conf.check(refusal, conf.reason_key(refusal.reason)) is None
    assert conf.check(refusal, "PassFailedError: something else") is not None
    assert conf.check(conf.Outcome("refused", "LatencyGuardError: int8: slower (0.06 ms vs 0.04 ms)"), None) is None
    # paths (temporary folders) and parenthesised details are cut off
    assert conf.reason_key("BackendError: ORT cannot load /tmp/slimc-x1/02-int8.onnx: bad") == "BackendError: ORT cannot load"
    assert conf.reason_key(refusal.reason) == "DataError: evaluation data, batch 0: every input is an empty array"
