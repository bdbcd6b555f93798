"""The README's quick-tour commands run as written, so the examples cannot drift from the code.

A fenced ``bash`` or ``python`` block preceded by ``<!-- test -->`` runs in the default suite,
each in a fresh folder; blocks preceded by ``<!-- test: slow -->`` run on the real pretrained
models (``pytest -m slow``), all in one folder and in README order, since later commands read
what earlier ones wrote (``slimc-demo/minilm.onnx``). A block passes when it exits 0 without a
traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"<!-- test(?P<slow>: slow)? -->\s*\n```(?P<lang>bash|python)\n(?P<code>.*?)\n```", re.S)


def readme_blocks(text: str) -> list[tuple[bool, str, str]]:
    """(slow, language, code) of every marked block, in order."""
    return [(bool(m.group("slow")), m.group("lang"), m.group("code")) for m in _BLOCK.finditer(text)]


BLOCKS = readme_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def _run(lang: str, code: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The `slimc` script of the environment running the tests comes first, as after the install.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _check(result: subprocess.CompletedProcess, code: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, (
        f"README block failed (exit {result.returncode}):\n{code}\n--- output (tail) ---\n{output[-4000:]}")


def test_the_readme_marks_its_quick_tour_commands():
    fast = [b for b in BLOCKS if not b[0]]
    slow = [b for b in BLOCKS if b[0]]
    assert fast and slow, "README.md: no <!-- test --> / <!-- test: slow --> blocks found"
    assert any("slimc demo" in code for _, _, code in slow)


def test_marker_parsing():
    text = "a\n<!-- test -->\n```bash\nslimc passes\n```\n<!-- test: slow -->\n\n```python\nprint(1)\n```\n```bash\nnot marked\n```"
    assert readme_blocks(text) == [(False, "bash", "slimc passes"), (True, "python", "print(1)")]


@pytest.mark.parametrize("lang,code", [(lang, code) for slow, lang, code in BLOCKS if not slow],
                         ids=lambda v: v.splitlines()[0][:40] if "\n" in v or len(v) > 8 else v)
def test_quick_tour_block(lang, code, tmp_path):
    if lang == "python" and "torch" in code:
        pytest.importorskip("torch")
    _check(_run(lang, code, tmp_path, timeout=600), code)


@pytest.mark.tour
@pytest.mark.slow
def test_quick_tour_real_models(tmp_path):
    for _, lang, code in (b for b in BLOCKS if b[0]):
        _check(_run(lang, code, tmp_path, timeout=3600), code)


def test_every_pass_spec_in_the_readme_parses():
    """The slow blocks' pipelines, checked without a model: a renamed option fails here first."""
    from slimc.pass_spec import parse_pipeline

    specs = [m.group(1) for _, lang, code in BLOCKS if lang == "bash" for m in re.finditer(r'--passes "([^"]+)"', code)]
    specs += [m.group(1) for _, lang, code in BLOCKS if lang == "bash" for m in re.finditer(r"--passes ([^\s\"]+)", code)]
    assert specs
    for spec in specs:
        assert parse_pipeline(spec), spec
