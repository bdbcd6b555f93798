"""Support matrix: every pass and target on ONNX files made by other exporters, each cell ok / refused / FAILED.

    python -m slimc.tools.export_matrix --out docs/matrix.md [--json FILE] [--variants bert/* paddle/*]
                                        [--columns prune int8 target:onnx] [--corpus FOLDER]

The rows are the corpus of ``tests/exports.py`` (the test zoo through the dynamo exporter with
eager and SDPA attention, unoptimised, the TorchScript exporter, ONNX Runtime's fused transformer
graph, files without shape information, a control-flow model, and files PyPI packages ship), so
this tool runs from a source checkout. The columns are slimc's passes, each alone, and each
installed ``--target`` after ``cleanup``.

A cell is one ``slimc.compile`` of the file (synthetic calibration data, made from the model's
inputs, for the passes that need data), then the result is saved and the saved model loaded in
ONNX Runtime (an ONNX result) or found on disk (a target's artifact, which ``compile`` already
ran in its runtime). It is:

* ``ok``: all of that worked; prune cells add the MACs removed and quantizers the size change,
  so a pass that did nothing shows it (``ok, -0% MACs``);
* ``refused``: a typed `slimc.errors.SlimcError` said why (its first line is the reason);
* ``FAILED``: any other exception: a bug, the exception's type and first line are recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PASSES = {
    "cleanup": "cleanup",
    "prune": "prune(ratio=0.3)",
    "sparsify": "sparsify",
    "layerskip": "layerskip(count=1, protect_last=0)",  # the zoo has two blocks; the default protects both
    # force: the matrix asks whether a quantizer applies; whether it pays off here is bench_quant's question
    "int8": "int8(force=true)",
    "smoothquant": "smoothquant",
    "int4": "int4(force=true)",
    "fp16": "fp16",
}
TARGET_NAMES = ("onnx", "ort-mobile", "openvino", "ncnn", "tflite", "executorch")
# Runtimes that plan for one shape: the cell pins batch 1 and sequence SEQ, as their users must.
STATIC_TARGETS = ("ncnn", "tflite", "executorch")
SEQ = 16
WRAPPED = re.compile(r"^pass '[^']+'(?: \([^)]*\))? failed: ([A-Za-z_][\w.]*): ")
CALIBRATION_BATCHES = 2
SIZE_PASSES = ("int8", "smoothquant", "int4", "fp16", "sparsify")


@dataclasses.dataclass
class Outcome:
    """One cell: ``status`` is "ok", "refused" or "FAILED"; ``reason`` the error's first line."""

    variant: str
    column: str
    status: str
    reason: str = ""
    detail: str = ""
    error_type: str = ""
    where: str = ""  # FAILED: the innermost frame of the traceback, file:line
    seconds: float = 0.0

    def text(self) -> str:
        if self.status == "ok":
            return f"ok, {self.detail}" if self.detail else "ok"
        return f"{self.status}: {self.reason}"


def installed_targets() -> list[str]:
    """The ``--target`` names whose converter and runtime are installed here."""
    from slimc.backends import targets
    from slimc.errors import SlimcError

    found = []
    for name in TARGET_NAMES:
        try:
            targets.get(name).require()
        except SlimcError:
            continue
        found.append(name)
    return found


def columns(targets: Sequence[str] | None = None) -> list[str]:
    """Every pass, then ``target:NAME`` for each installed (or given) target."""
    return [*PASSES, *(f"target:{t}" for t in (installed_targets() if targets is None else targets))]


def compile_args(column: str) -> dict[str, Any]:
    """``slimc.compile`` keywords for a column: a pass alone, or cleanup then a target."""
    if column.startswith("target:"):
        return {"passes": "cleanup", "target": column.split(":", 1)[1]}
    return {"passes": PASSES[column]}


def wrapped_crash(reason: str) -> str | None:
    """The exception type a `PassFailedError` wraps when a pass crashed ("pass 'x' failed: KeyError: ..."),
    else None: typed, but it says nothing a user can act on, so the matrix counts it as FAILED."""
    match = WRAPPED.match(reason)
    return match.group(1) if match else None


def run_cell(variant: str, path: Path, column: str, work: Path) -> Outcome:
    """Compile ``path`` for ``column`` and classify what happened (see the module docstring)."""
    from slimc.errors import SlimcError, first_line

    start = time.perf_counter()
    try:
        detail = _compile_and_check(path, column, work)
        outcome = Outcome(variant, column, "ok", detail=detail)
    except SlimcError as exc:
        reason, inner = first_line(exc, 400), wrapped_crash(first_line(exc, 400))
        if inner is None:
            outcome = Outcome(variant, column, "refused", reason, error_type=type(exc).__name__)
        else:
            outcome = Outcome(variant, column, "FAILED", reason, error_type=f"{type(exc).__name__}({inner})",
                              where=_innermost(exc.__cause__ or exc))
    except Exception as exc:  # the point of the matrix: anything but a SlimcError is a bug to report
        outcome = Outcome(variant, column, "FAILED", first_line(exc, 400), error_type=type(exc).__name__,
                          where=_innermost(exc))
    outcome.seconds = round(time.perf_counter() - start, 2)
    return outcome


def _innermost(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _compile_and_check(path: Path, column: str, work: Path) -> str:
    import slimc
    from slimc import data
    from slimc.backends.onnxruntime import create_session

    args = compile_args(column)
    loaded = slimc.load(str(path))
    calibration = data.synthetic(loaded.inputs, n_batches=CALIBRATION_BATCHES, seed=7, sizes={"seq": SEQ})
    if args.get("target") in STATIC_TARGETS:
        args["static_shapes"] = {s.name: s.concrete_shape({"batch": 1, "seq": SEQ}) for s in loaded.inputs}
    result = slimc.compile(str(path), calibration=calibration, measure_latency=False, seq_len=SEQ, **args)
    suffix = ".onnx"
    if "target" in args:
        from slimc.backends import targets

        suffix = targets.get(args["target"]).suffix or ".onnx"
    out = work / f"out{suffix}"
    files = result.save(out)
    if not files or not all(Path(f).is_file() for f in files):
        raise RuntimeError(f"save() reported {files} but they are not all on disk")
    if suffix == ".onnx":
        create_session(files[0])  # the saved file, not the in-memory IR, must load
    return _detail(column, result.receipt)


def _detail(column: str, receipt) -> str:
    before, after = receipt.before, receipt.after
    if column == "prune":  # no MACs counted: shape inference could not resolve the graph's shapes
        return f"-{100 * (1 - after['macs'] / before['macs']):.0f}% MACs" if before.get("macs") else "MACs not counted"
    if column in SIZE_PASSES and before.get("bytes_on_disk"):
        return f"size x{after['bytes_on_disk'] / before['bytes_on_disk']:.2f}"
    return ""


def run_matrix(variants: Sequence[Any], cols: Sequence[str], work: Path,
               on_cell: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Every (variant, column); a variant that could not be built gets one "not built" outcome."""
    outcomes = []
    for variant in variants:
        if variant.path is None:
            outcomes.append(Outcome(variant.name, "*", "not built", variant.error))
            if on_cell:
                on_cell(outcomes[-1])
            continue
        for column in cols:
            cell = work / f"{variant.name.replace('/', '__')}-{column.replace(':', '_')}"
            cell.mkdir(parents=True, exist_ok=True)
            outcomes.append(run_cell(variant.name, variant.path, column, cell))
            if on_cell:
                on_cell(outcomes[-1])
    return outcomes


def markdown(outcomes: Sequence[Outcome], cols: Sequence[str], machine: str) -> str:
    """Variant x column table; each distinct refusal or failure reason is a numbered note below it."""
    notes: dict[str, int] = {}

    def cell(o: Outcome) -> str:
        if o.status == "ok":
            return o.text()
        # Node names differ between otherwise equal failures ("Name:'node_MatMul_94'"): one note for all.
        reason = re.sub(r"Name:'[^']*'", "Name:'…'", o.reason)
        key = f"{o.error_type}: {reason}" if o.error_type else reason
        number = notes.setdefault(key, len(notes) + 1)
        return f"{o.status} [{number}]"

    rows: dict[str, dict[str, str]] = {}
    for o in outcomes:
        row = rows.setdefault(o.variant, {})
        if o.column == "*":
            row.update({c: cell(o) for c in cols})
        else:
            row[o.column] = cell(o)
    lines = [f"Machine: {machine}.", "", "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(row.get(c, "") for c in cols) + " |" for name, row in rows.items()]
    lines += ["", "Reasons:", ""]
    lines += [f"{n}. {reason.replace('|', '/')}" for reason, n in notes.items()]
    counts = {s: sum(o.status == s for o in outcomes if o.column != "*") for s in ("ok", "refused", "FAILED")}
    lines += ["", f"{counts['ok']} ok, {counts['refused']} refused, {counts['FAILED']} FAILED."]
    return "\n".join(lines) + "\n"


def _corpus_module():
    """``tests/exports.py`` of the source checkout this tool runs from."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    if not (tests / "exports.py").is_file():
        from slimc.errors import SlimcError

        raise SlimcError(f"the export corpus lives in tests/exports.py of a source checkout; {tests} has none. "
                         "Run this tool from a clone of the repository (pip install -e .).")
    sys.path.insert(0, str(tests))
    import exports

    return exports


def _select(names: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    """The names matching any pattern, in the patterns' order (so a long run does what matters first)."""
    chosen = [n for p in (patterns or ["*"]) for n in names if fnmatch.fnmatchcase(n, p)]
    return list(dict.fromkeys(chosen))


def main(argv: list[str] | None = None) -> int:
    from slimc.backends.onnxruntime import machine_description
    from slimc.tools import write_json

    parser = argparse.ArgumentParser(prog="python -m slimc.tools.export_matrix", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the Markdown table (.md) or JSON results (.json)")
    parser.add_argument("--json", type=Path, help="also write every outcome as JSON here")
    parser.add_argument("--variants", nargs="+", help="glob patterns of variant names (default: all)")
    parser.add_argument("--columns", nargs="+", help="passes and target:NAME columns (default: all installed)")
    parser.add_argument("--corpus", type=Path, help="folder for the exported files, kept and reused by later runs (default: a temporary one)")
    parser.add_argument("--from-json", type=Path, help="only render the table of an earlier run's JSON (even unfinished)")
    parser.add_argument("--merge", action="store_true", help="add this run's cells to --json's earlier ones (replacing equal cells)")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        outcomes = [Outcome(**cell) for cell in result["cells"]]
        for o in outcomes:  # runs recorded before wrapped crashes were told apart
            if o.status == "refused" and wrapped_crash(o.reason):
                o.status, o.error_type = "FAILED", f"{o.error_type}({wrapped_crash(o.reason)})"
        return _write(result, markdown(outcomes, result["columns"], result["machine"]), args)
    exports = _corpus_module()
    cols = args.columns or columns()
    result = {"machine": machine_description(None).split(", onnxruntime")[0], "columns": cols, "cells": []}
    earlier = json.loads(args.json.read_text())["cells"] if args.merge and args.json and args.json.exists() else []

    def record(o: Outcome) -> None:
        print(f"{o.variant:26s} {o.column:18s} {o.text()[:150]}", flush=True)
        result["cells"].append(dataclasses.asdict(o))
        done = {(c["variant"], c["column"]) for c in result["cells"]}
        kept = [c for c in earlier if (c["variant"], c["column"]) not in done and c["column"] in (*cols, "*")]
        write_json({**result, "cells": kept + result["cells"]}, args.json)  # after every cell: a long run can be rendered early

    with tempfile.TemporaryDirectory(prefix="slimc-matrix-") as tmp:
        corpus = exports.Corpus(args.corpus or Path(tmp) / "corpus", reuse=args.corpus is not None)
        outcomes: list[Outcome] = []
        for name in _select(exports.all_variant_names(), args.variants):
            outcomes += run_matrix([corpus.get(name)], cols, Path(tmp) / "cells", on_cell=record)
    done = {(o.variant, o.column) for o in outcomes}
    outcomes = [Outcome(**c) for c in earlier if (c["variant"], c["column"]) not in done and c["column"] in (*cols, "*")] + outcomes
    result["cells"] = [dataclasses.asdict(o) for o in outcomes]
    return _write(result, markdown(outcomes, cols, result["machine"]), args)


def _write(result: dict[str, Any], table: str, args) -> int:
    from slimc.tools import write_json

    if args.out.suffix == ".json":
        write_json(result, args.out)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    write_json(result, args.json)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
