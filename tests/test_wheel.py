"""The built wheel (not the editable checkout) installs, imports and runs the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
from onnx_models import tiny_cnn

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_cli(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = wheels.glob("slimc-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    onnx.save(tiny_cnn(), work / "m.onnx")
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import sys, slimc; from slimc.tools.cli import main;"
        "assert slimc.__file__.startswith(sys.argv[1]), slimc.__file__;"
        "import slimc.passes.cleanup, slimc.backends.onnxruntime, slimc.frontends, slimc.tools.models;"
        "sys.exit(main(['m.onnx', '--passes', 'cleanup', '-o', 'out.onnx', '-q', '--no-latency']))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert onnx.load(work / "out.onnx").graph.node
    script = subprocess.run([sys.executable, "-c", "from slimc.tools.cli import main; main(['passes'])"],
                            cwd=work, env=env, capture_output=True, text=True)
    assert "cleanup" in script.stdout
