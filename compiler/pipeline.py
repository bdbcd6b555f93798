"""The pass contract: options as dataclass fields, a typed report, a declared exactness.

A slimc pass is an `onnx_ir.passes.InPlacePass`, so it composes with onnx_ir's own passes and
`PassManager`. On top of that it declares

- ``name``: its CLI name (``cleanup``, ``prune``, ...);
- ``exact``: whether it promises numerically identical outputs (verified after it runs);
- ``apply(model, ctx) -> PassReport``: does the work and says what it did and what it left
  alone, with reasons. ``call(model)`` (onnx_ir's entry point) runs ``apply`` with an empty
  context, for data-free use inside an onnx_ir pipeline.

Options are the dataclass fields of the subclass; ``__post_init__`` validates them and raises
`PassConfigError` saying what to write instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx_ir as ir

from slimc.model import LoadedModel


@dataclasses.dataclass
class PassReport:
    """What one pass did. ``details`` is JSON-serialisable; ``left_alone`` lists (what, why)."""

    name: str
    modified: bool
    summary: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    left_alone: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["left_alone"] = [{"what": what, "why": why} for what, why in self.left_alone]
        return data


@dataclasses.dataclass
class PassContext:
    """What a pass may need beyond the graph: model facts and calibration data.

    ``calibration`` is a `slimc.data.Dataset` (batches streamed through the backend), or None
    for data-free runs; data-driven passes must refuse None with a `DataError`.
    """

    loaded: LoadedModel | None = None
    calibration: Any = None
    seed: int = 0
    target: str | None = None  # the --target the result is exported to (passes may adapt: int8 for ort-mobile)
    threads: int | None = None  # ORT intra-op threads for the passes' own latency measurements (--threads)
    # The model the pipeline's first lossy pass started from (`distill`'s teacher), loaded from its stage file
    # only when a pass asks for it (`needs_teacher`); None before any lossy pass ran.
    teacher: Any = None
    teacher_label: str | None = None  # which stage that is ("input", "cleanup", ...)
    previous: list[PassReport] = dataclasses.field(default_factory=list)  # the reports of the passes already run


class Pass(ir.passes.InPlacePass):
    """Base class of slimc passes. Subclasses are dataclasses whose fields are the options."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    description: ClassVar[str] = ""
    # Whether the pass handles the ONNX Runtime fused ops `fuse` writes; the others must run before it.
    runs_after_fuse: ClassVar[bool] = False
    # Whether the pass reads `PassContext.teacher` (the input of the first lossy pass, kept only for such passes).
    needs_teacher: ClassVar[bool] = False

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        report = self.apply(model, PassContext())
        return ir.passes.PassResult(model, modified=report.modified)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}

    def spec(self) -> str:
        """The pass as it would be written on the command line."""
        opts = ", ".join(f"{k}={_format_value(v)}" for k, v in self.options().items())
        return f"{self.name}({opts})" if opts else self.name


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items()) + "}"
    return str(value)
