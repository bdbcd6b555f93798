"""Faults while writing: a kill at each step, a full disk, two writers, an output over the input.

What must hold in every case: the output is either the old model with its own weights or the
new one with its own (never a model beside another run's data file), the error is typed, the
input model's files are never touched, and what a killed run left behind (partial files in the
output folder, work folders) is removed by the next run once its process is gone.
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_models import tiny_cnn

import slimc
from slimc.atomic import atomic_output, owner_tag
from slimc.errors import OutputPathError
from slimc.onnx_io import data_file_pattern, save_onnx
from slimc.receipt import Receipt

X = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)


def run(path: Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def model(seed: int) -> ir.Model:
    return ir.serde.deserialize_model(tiny_cnn(seed))  # same graph for every seed, other weights


def partials(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(".slimc-"))


def data_files(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path.parent) if data_file_pattern(path).fullmatch(n))


# A writer that SIGKILLs itself at one rename into the output folder: before it or right after it.
KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import onnx_ir as ir
    from slimc.onnx_io import save_onnx

    source, target, kill_at, when = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    model = ir.load(source)
    real, calls = os.replace, [0]

    def replace(src, dst):
        if os.path.dirname(os.path.abspath(dst)) != os.path.dirname(os.path.abspath(target)):
            return real(src, dst)  # a rename inside the partial folder (onnx_ir's own data-file write)
        calls[0] += 1
        if calls[0] == kill_at and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
        if calls[0] == kill_at and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    save_onnx(model, target, external_data=True)
""")


# save_onnx's steps: data file renamed in (1), model renamed in (2: the commit), old data removed.
@pytest.mark.parametrize(("kill_at", "when", "expect"), [
    (1, "before", "old"),  # killed while the new files were only in the partial folder
    (1, "after", "old"),  # the new data file is in place, the model is not: the old model must still match its data
    (2, "after", "new"),  # the new model is in; the old data file was not yet removed
])
def test_kill_at_each_write_step_leaves_a_matching_pair(tmp_path, kill_at, when, expect):
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    save_onnx(model(0), out, external_data=True)
    onnx.save(tiny_cnn(1), tmp_path / "new.onnx")
    expected = {"old": run(out), "new": run(tmp_path / "new.onnx")}[expect]
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "new.onnx"), str(out), str(kill_at), when])
    assert proc.returncode == -9
    np.testing.assert_array_equal(run(out), expected)
    save_onnx(model(2), out, external_data=True)  # the next write cleans what the killed one left
    assert partials(out.parent) == [] and len(data_files(out)) == 1
    np.testing.assert_array_equal(run(out), run_model(model(2), tmp_path))


def run_model(m: ir.Model, tmp_path: Path) -> np.ndarray:
    path = tmp_path / "reference.onnx"
    save_onnx(m, path)
    return run(path)


def test_full_disk_leaves_the_old_output_and_nothing_else(tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    save_onnx(model(0), out, external_data=True)
    before, reference = sorted(os.listdir(tmp_path)), run(out)

    def full_disk(model, path, **kwargs):
        Path(path).write_bytes(b"half a model")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ir, "save", full_disk)
    with pytest.raises(OutputPathError, match="No space left on device"):
        save_onnx(model(1), out, external_data=True)
    assert sorted(os.listdir(tmp_path)) == before
    np.testing.assert_array_equal(run(out), reference)


def test_full_disk_while_writing_the_receipt(tmp_path, monkeypatch):
    path = tmp_path / "receipt.json"
    path.write_text('{"old": true}\n')
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real(self, text[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OutputPathError, match="No space left on device"):
        _receipt().save(path)
    monkeypatch.undo()
    assert path.read_text() == '{"old": true}\n' and partials(tmp_path) == []


def _receipt() -> Receipt:
    stats = {"params": 1, "weight_bytes": 4, "bytes_on_disk": 10, "macs": 1, "nodes": 1, "op_histogram": {}}
    return Receipt(source="m", task="generic", passes=[], before=stats, after=stats, fidelity={}, verification=[])


CONCURRENT_WRITER = textwrap.dedent("""
    import sys
    import onnx_ir as ir
    from slimc.onnx_io import save_onnx

    model = ir.load(sys.argv[1])
    for _ in range(int(sys.argv[3])):
        save_onnx(model, sys.argv[2], external_data=True)
""")


def test_concurrent_writers_leave_one_complete_pair(tmp_path):
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(CONCURRENT_WRITER)
    sources, results = [], []
    for seed in (0, 1):
        sources.append(tmp_path / f"m{seed}.onnx")
        onnx.save(tiny_cnn(seed), sources[-1])
        results.append(run(sources[-1]))
    procs = [subprocess.Popen([sys.executable, str(script), str(src), str(out), "4"]) for src in sources]
    assert [p.wait() for p in procs] == [0, 0]
    got = run(out)
    assert any(np.array_equal(got, r) for r in results)
    assert len(data_files(out)) == 1 and partials(out.parent) == []


# ---- companions of the output never touch the input's files --------------------------------------


def test_output_data_file_never_replaces_the_inputs_weights(tmp_path, monkeypatch):
    """The input keeps its weights in ``out.onnx.data``: where the output's data file used to go."""
    import slimc.onnx_io as onnx_io

    source = tmp_path / "in.onnx"
    onnx.save_model(tiny_cnn(0), str(source), save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    weights, reference = (tmp_path / "out.onnx.data").read_bytes(), run(source)
    result = slimc.compile(source, "cleanup", measure_latency=False)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)  # the output gets external data too
    written = result.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").read_bytes() == weights
    np.testing.assert_array_equal(run(source), reference)
    np.testing.assert_allclose(run(written[0]), reference, rtol=1e-5, atol=1e-6)


def test_input_weights_named_like_an_old_output_data_file_survive(tmp_path):
    """An earlier slimc output renamed to be the input still reads ``out.onnx.<hex>.data``."""
    first = save_onnx(model(0), tmp_path / "out.onnx", external_data=True)
    os.replace(first[0], tmp_path / "in.onnx")
    result = slimc.compile(tmp_path / "in.onnx", "cleanup", measure_latency=False)
    written = result.save(tmp_path / "out.onnx")
    assert first[1].exists() and first[1] != written[-1]
    np.testing.assert_array_equal(run(tmp_path / "in.onnx"), run(written[0]))


def test_receipt_and_target_companions_over_input_files_are_refused(tmp_path, capsys):
    from slimc.export import save_artifact
    from slimc.tools.cli import main

    source = tmp_path / "in.onnx"
    onnx.save_model(tiny_cnn(0), str(source), save_as_external_data=True, location="weights.json", size_threshold=0)
    weights = (tmp_path / "weights.json").read_bytes()
    args = [str(source), "--passes", "cleanup", "--no-latency", "-q", "--receipt", str(tmp_path / "weights.json")]
    assert main(args) == 2
    assert "input model's file" in capsys.readouterr().err
    assert (tmp_path / "weights.json").read_bytes() == weights
    artifact = [tmp_path / "work.xml", tmp_path / "work.bin"]
    for f in artifact:
        f.write_text("artifact")
    with pytest.raises(OutputPathError, match="input model's file"):
        save_artifact(artifact, tmp_path / "model.xml", ".xml", protect=(tmp_path / "model.bin",))
    assert not (tmp_path / "model.xml").exists()


# ---- leftovers of killed runs, modes --------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_leftovers_of_dead_runs_are_removed_and_work_folders_live_in_one_place(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "out"
    monkeypatch.setenv("SLIMC_WORKDIR", str(work))
    host = owner_tag().split("-")[1]
    dead, live = f"{dead_pid()}-{host}-", f"{os.getppid()}-{host}-"
    for folder in (out / f".slimc-{dead}x1", out / f".slimc-{live}x2", out / ".slimc-unowned", work / f"run-{dead}x3",
                   work / f"run-{live}x4"):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"partial")
    (out / f".slimc-{dead}x5.onnx").write_bytes(b"partial")
    onnx.save(tiny_cnn(0), tmp_path / "in.onnx")
    result = slimc.compile(tmp_path / "in.onnx", "cleanup", measure_latency=False)
    assert Path(result._workdir.name).parent == work
    result.save(out / "model.onnx")
    assert partials(out) == sorted([f".slimc-{live}x2", ".slimc-unowned"])
    assert sorted(os.listdir(work)) == sorted([f"run-{live}x4", Path(result._workdir.name).name])
    del result
    gc.collect()
    assert os.listdir(work) == [f"run-{live}x4"]


def test_every_output_follows_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        written = save_onnx(model(0), tmp_path / "model.onnx", external_data=True)
        _receipt().save(tmp_path / "receipt.json")
        with atomic_output(tmp_path / "model.pt2", ".pt2") as tmp:
            tmp.write_bytes(b"archive")
        paths = [*written, tmp_path / "receipt.json", tmp_path / "model.pt2"]
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in paths} == {p.name: "0o640" for p in paths}
    finally:
        os.umask(previous)
