"""ONNX's own backend node tests through every slimc pass: no crash, no wrong result.

The ``onnx`` 1.20.1 wheel ships ``onnx/backend/test/data/node/``: one-operator models, each with
its own inputs and expected outputs (later wheels no longer ship them). This tool

1. finds them (``--cache``, default ``~/.cache/slimc-tests/onnx-node-tests``), downloading the
   wheel with pip into that folder when absent;
2. keeps the cases ONNX Runtime itself runs correctly (the reference: slimc cannot do better than
   its runtime);
3. runs ``slimc.compile(model, passes=[p], evaluation=[the test's inputs])`` for every pass and
   sorts each run into ``ok`` / ``refused`` (a typed `SlimcError`, reason kept) / ``crash`` (any
   other exception) / ``wrong`` (cleanup only: the compiled model's outputs differ from the
   test's expected outputs);
4. writes the counts and every refusal as JSON.

Usage::

    python -m slimc.tools.onnx_conformance --out conformance.json [--passes cleanup,fp16] [--sample 100]

``tests/test_onnx_conformance.py`` uses the same functions; its expectations file lists every
refusal with its reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ONNX_WHEEL_VERSION = "1.20.1"
NODE_DIR = "onnx/backend/test/data/node"
DEFAULT_CACHE = Path.home() / ".cache" / "slimc-tests" / "onnx-node-tests"
PASSES = ("cleanup", "fp16", "int8", "int4", "sparsify", "prune")
# The options each pass runs with. One-operator models mostly hold nothing to prune, which `prune`
# refuses (exit 2) unless told to accept it: the suite asks whether it crashes or breaks a model.
OPTIONS = {"prune": "prune(allow_noop=true)"}
# cleanup is exact: its result must equal the test's expected outputs within the backend test's
# own tolerances (onnx.backend.test uses rtol=1e-3, atol=1e-7; fp reassociation in folded graphs
# needs a little more absolute slack near zero).
RTOL, ATOL = 1e-3, 1e-5


@dataclasses.dataclass
class Case:
    """One node test: its folder, model file, inputs by graph input name, expected outputs in order."""

    name: str
    model: Path
    inputs: dict[str, Any]
    expected: list[Any]


# ---------------------------------------------------------------- finding the tests


def node_tests_dir(cache: Path = DEFAULT_CACHE, *, download: bool = True) -> Path | None:
    """The node-test folder in ``cache``; fetched from the onnx 1.20.1 wheel (pip) when absent."""
    target = cache / NODE_DIR
    if target.is_dir() and any(target.iterdir()):
        return target
    if not download:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", f"onnx=={ONNX_WHEEL_VERSION}", "--no-deps",
               "--only-binary=:all:", "-d", tmp]
        if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
            return None
        wheels = list(Path(tmp).glob("onnx-*.whl"))
        if not wheels:
            return None
        with zipfile.ZipFile(wheels[0]) as archive:
            archive.extractall(cache, [n for n in archive.namelist() if n.startswith(NODE_DIR + "/")])
    return target if target.is_dir() else None


def _read_tensor(path: Path, type_proto: Any) -> Any:
    """One ``input_*.pb`` / ``output_*.pb``: a tensor, or (for sequence/optional types) None."""
    import onnx
    from onnx import numpy_helper

    if type_proto is not None and not type_proto.HasField("tensor_type"):
        return None  # sequences, maps, optionals: slimc's data loaders take tensors only
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(tensor)


def load_case(folder: Path) -> Case | None:
    """The case in ``folder``; None when it has no data set or a non-tensor input or output."""
    import onnx

    data = folder / "test_data_set_0"
    if not (folder / "model.onnx").is_file() or not data.is_dir():
        return None
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    inputs = sorted(data.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    outputs = sorted(data.glob("output_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    if len(inputs) != len(graph_inputs) or len(outputs) != len(model.graph.output):
        return None  # optional inputs left out of the data set
    feeds = {vi.name: _read_tensor(p, vi.type) for vi, p in zip(graph_inputs, inputs)}
    expected = [_read_tensor(p, vi.type) for vi, p in zip(model.graph.output, outputs)]
    if any(v is None for v in [*feeds.values(), *expected]):
        return None
    return Case(folder.name, folder / "model.onnx", feeds, expected)


def close(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal within the backend tests' tolerance; strings and other non-numbers exactly; NaN == NaN."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return False
    if not (np.issubdtype(want.dtype, np.number) or want.dtype == np.bool_):
        return bool(np.array_equal(got.astype(object), want.astype(object)))
    if np.issubdtype(want.dtype, np.floating) or np.issubdtype(want.dtype, np.complexfloating):
        return bool(np.allclose(got.astype(want.dtype), want, rtol=RTOL, atol=ATOL, equal_nan=True))
    return bool(np.array_equal(got, want))


def runs_in_ort(case: Case) -> bool:
    """ONNX Runtime loads the model and reproduces the expected outputs (the reference)."""
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(case.model), options, providers=["CPUExecutionProvider"])
        got = session.run(None, case.inputs)
    except Exception:  # noqa: BLE001 - anything ORT cannot run is out of scope
        return False
    return len(got) == len(case.expected) and all(close(g, w) for g, w in zip(got, case.expected))


def ort_cases(root: Path) -> list[Case]:
    """Every case ONNX Runtime runs correctly, sorted by name."""
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        case = load_case(folder)
        if case is not None and runs_in_ort(case):
            cases.append(case)
    return cases


def sample(names: list[str], n: int, seed: int = 0) -> list[str]:
    """A seeded sample of ``n`` names (all of them when n >= len)."""
    if n >= len(names):
        return list(names)
    return sorted(random.Random(seed).sample(names, n))


# ---------------------------------------------------------------- running one pass


@dataclasses.dataclass
class Outcome:
    """What one ``compile`` did: ok / refused / crash / wrong, with the reason."""

    status: str
    reason: str = ""


def run_case(case: Case, pass_spec: str) -> Outcome:
    """``slimc.compile`` the case with one pass and the case's own inputs as evaluation data."""
    import slimc
    from slimc.errors import SlimcError

    given = {k: np.array(v, copy=True) for k, v in case.inputs.items()}
    try:
        result = slimc.compile(str(case.model), passes=[OPTIONS.get(pass_spec, pass_spec)], evaluation=[case.inputs],
                               threads=1)
        with tempfile.TemporaryDirectory() as tmp:
            result.save(Path(tmp) / "out.onnx")
            outcome = _check_exact(case, Path(tmp) / "out.onnx") if pass_spec == "cleanup" else Outcome("ok")
    except SlimcError as exc:
        outcome = Outcome("refused", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    except Exception as exc:  # noqa: BLE001 - exactly what the conformance run counts
        outcome = Outcome("crash", f"{type(exc).__name__}: {str(exc)[:300]}")
    changed = [k for k, v in given.items() if not close(case.inputs[k], v)]
    if changed:  # slimc must hand the caller's data back as it was given
        case.inputs.update(given)
        return Outcome("wrong", f"slimc modified the caller's evaluation arrays {changed}")
    return outcome


def _check_exact(case: Case, path: Path) -> Outcome:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    got = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, case.inputs)
    for k, (g, w) in enumerate(zip(got, case.expected, strict=True)):
        if not close(g, w):
            return Outcome("wrong", f"output {k} differs from the expected output")
    return Outcome("ok")


def run_all(cases: list[Case], passes: tuple[str, ...] = PASSES, progress: bool = False) -> dict[str, Any]:
    """Every case through every pass: counts per pass, and every non-ok outcome by case name."""
    import logging

    logging.getLogger("slimc").setLevel(logging.ERROR)
    import onnxruntime

    from slimc import __version__

    results: dict[str, Any] = {"cases": len(cases), "slimc": __version__, "onnxruntime": onnxruntime.__version__,
                               "node_tests": f"onnx {ONNX_WHEEL_VERSION}", "passes": {}}
    for pass_spec in passes:
        counts: Counter = Counter()
        details: dict[str, dict[str, str]] = {}
        for i, case in enumerate(cases):
            outcome = run_case(case, pass_spec)
            counts[outcome.status] += 1
            if outcome.status != "ok":
                details[case.name] = {"status": outcome.status, "reason": outcome.reason}
            if progress:
                print(f"[{pass_spec} {i + 1}/{len(cases)}] {case.name}: {outcome.status} {outcome.reason[:120]}",
                      file=sys.stderr, flush=True)
        results["passes"][pass_spec] = {"counts": dict(counts), "not_ok": details}
    return results


# A refusal by a latency guard depends on this machine's timings: the same case may run elsewhere.
TIMING_REFUSALS = ("LatencyGuardError: ",)


def reason_key(reason: str) -> str:
    """The stable part of a refusal's reason for the expectations file: its error type and message up to
    the first path or parenthesis (temporary folders change between runs), at most 100 characters."""
    kind, _, message = reason.partition(": ")
    cut = re.search(r"[(/]", message)
    message = (message[: cut.start()] if cut else message)[:100].rstrip(" ,:;'\"")
    return f"{kind}: {message}" if message else kind


def expectations(results: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Every refusal by pass and case as `reason_key`, except the timing-dependent ones."""
    out = {}
    for name, r in results["passes"].items():
        out[name] = {case: reason_key(d["reason"]) for case, d in sorted(r["not_ok"].items())
                     if d["status"] == "refused" and not d["reason"].startswith(TIMING_REFUSALS)}
    return out


def check(outcome: Outcome, listed: str | None) -> str | None:
    """Why ``outcome`` breaks the expectations (None: it keeps them). A crash or a wrong result always
    does; a refusal must be listed with a reason it contains, unless a latency guard made it."""
    if outcome.status == "ok":
        return None
    if outcome.status == "refused" and (outcome.reason.startswith(TIMING_REFUSALS) or (listed and listed in outcome.reason)):
        return None
    want = f" (listed: {listed!r})" if listed else " (not listed)"
    return f"{outcome.status}: {outcome.reason}{want}"


def table(results: dict[str, Any]) -> str:
    """The counts as a Markdown table."""
    lines = [f"{results['cases']} node tests that ONNX Runtime runs correctly.", "",
             "| pass | ran | typed refusal | crash | wrong result |", "|---|---:|---:|---:|---:|"]
    for name, r in results["passes"].items():
        c = r["counts"]
        lines.append(f"| `{name}` | {c.get('ok', 0)} | {c.get('refused', 0)} | {c.get('crash', 0)} | {c.get('wrong', 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder holding (or to hold) the node tests")
    parser.add_argument("--passes", default=",".join(PASSES), help="comma-separated pass specs")
    parser.add_argument("--sample", type=int, default=0, help="a seeded sample of this many cases (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--markdown", type=Path, default=None, help="the counts table as Markdown")
    parser.add_argument("--write-expected", type=Path, default=None,
                        help="write every refusal (pass -> case -> reason) as the test's expectations file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    root = node_tests_dir(args.cache)
    if root is None:
        print(f"cannot find or download the onnx {ONNX_WHEEL_VERSION} node tests into {args.cache}", file=sys.stderr)
        return 2
    cases = ort_cases(root)
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c.name in wanted]
    elif args.sample:
        keep = set(sample([c.name for c in cases], args.sample, args.seed))
        cases = [c for c in cases if c.name in keep]
    results = run_all(cases, tuple(p for p in args.passes.split(",") if p), progress=not args.quiet)
    from slimc.tools import write_results

    write_results(results, table(results), args.out, args.markdown)
    if args.write_expected is not None:
        args.write_expected.parent.mkdir(parents=True, exist_ok=True)
        args.write_expected.write_text(json.dumps(expectations(results), indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
