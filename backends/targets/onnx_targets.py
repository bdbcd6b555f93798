"""The ONNX Runtime targets: ``onnx`` (a plain ``.onnx`` file) and ``ort-mobile`` (``.ort``).

``ort-mobile`` is ONNX Runtime's own converter (`onnxruntime.tools.convert_onnx_models_to_ort`):
the model is optimised with the portable graph optimisations (``Fixed`` style, level ``all``
without the x86-only NCHWc layout, QDQ kept as int8 for ARM execution providers) and saved in
the ORT flatbuffer format, with the ``required_operators.config`` a reduced ORT build takes
(``build.sh --minimal_build --include_ops_by_config FILE``). Both artifacts are verified by
loading them in onnxruntime on this CPU: the ``.ort`` file runs in the full build as in a
mobile one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from slimc.backends import onnxruntime as ort_backend
from slimc.backends.targets import Runner, Target, TargetError
from slimc.errors import first_line


def _ort_runner(path: Path, threads: int | None) -> Runner:
    session = ort_backend.create_session(path, threads)

    def bind(batch):
        feed = ort_backend.prepare_feed(session, batch)
        return lambda: session.run(None, feed)

    return Runner(run=lambda batch: ort_backend.run(session, batch), bind=bind, runtime=f"onnxruntime {ort.__version__}")


@contextlib.contextmanager
def _quiet_logging():
    """ORT's tools log INFO lines ("Created config in <work folder>") through a handler on the root
    logger: keep them off the user's stderr; warnings still show."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


class OnnxTarget(Target):
    """The prepared ONNX file itself (opset conversion and static shapes happen before any target)."""

    name = "onnx"
    suffix = ".onnx"
    extra = ""

    def convert(self, onnx_path: Path, out_dir: Path, stem: str) -> list[Path]:
        from slimc.onnx_io import external_files, load_onnx, save_onnx

        model = load_onnx(onnx_path)  # written anew: its external-data file is named after the new file
        return save_onnx(model, out_dir / f"{stem}.onnx", external_data=bool(external_files(model)))

    def load(self, files: Sequence[Path], threads: int | None, source) -> Runner:
        return _ort_runner(files[0], threads)


class OrtMobileTarget(Target):
    """``.ort`` + ``.required_operators.config`` from ORT's converter."""

    name = "ort-mobile"
    suffix = ".ort"
    extra = ""

    def convert(self, onnx_path: Path, out_dir: Path, stem: str) -> list[Path]:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

        src = out_dir / "src"
        src.mkdir(parents=True, exist_ok=True)
        model = self.single_file(onnx_path, src / f"{stem}.onnx")  # the ORT format holds at most 2 GB too
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), _quiet_logging():
                # target_platform="arm": QDQ nodes stay int8 for NNAPI / QNN / XNNPACK, no x86-only layouts
                convert_onnx_models_to_ort(model, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform="arm")
        except Exception as exc:
            raise TargetError(f"target 'ort-mobile': ONNX Runtime's converter failed: {first_line(exc, 600)}") from None
        ort_file, config = out_dir / f"{stem}.ort", out_dir / f"{stem}.required_operators.config"
        if not ort_file.exists() or not config.exists():
            raise TargetError(f"target 'ort-mobile': the converter wrote no .ort / config file: {log.getvalue()[-600:]}")
        shutil.rmtree(src, ignore_errors=True)
        return [ort_file, config]

    def load(self, files: Sequence[Path], threads: int | None, source) -> Runner:
        return _ort_runner(files[0], threads)
