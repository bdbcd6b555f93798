"""The `slimc` CLI: commands, exit codes, typed errors without tracebacks, nothing half-written."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx_models import tiny_cnn

from slimc.tools.cli import main


@pytest.fixture()
def cnn_file(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(junk=True), path)
    return path


def test_compile_writes_model_and_receipt(cnn_file, tmp_path, capsys):
    out, receipt = tmp_path / "out.onnx", tmp_path / "receipt.json"
    assert main([str(cnn_file), "--passes", "cleanup", "-o", str(out), "--receipt", str(receipt), "--no-latency"]) == 0
    printed = capsys.readouterr().out
    assert "slimc receipt" in printed and "13" in printed and f"wrote {out}" in printed
    assert len(onnx.load(out).graph.node) == 8
    assert json.loads(receipt.read_text())["after"]["nodes"] == 8


def test_quiet_prints_nothing(cnn_file, tmp_path, capsys):
    assert main([str(cnn_file), "-o", str(tmp_path / "o.onnx"), "-q", "--no-latency"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--passes", "nope"], "unknown pass 'nope'. Available passes: cleanup"),
        (["--passes", "cleanup(cse=maybe)"], "expected true or false"),
    ],
)
def test_bad_pass_specs_exit_2(cnn_file, tmp_path, capsys, args, message):
    assert main([str(cnn_file), *args, "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_output_over_input_is_refused(cnn_file, capsys):
    before = cnn_file.read_bytes()
    assert main([str(cnn_file), "-o", str(cnn_file)]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert cnn_file.read_bytes() == before


def test_missing_output_folder(cnn_file, tmp_path, capsys):
    assert main([str(cnn_file), "-o", str(tmp_path / "nope" / "o.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_truncated_model_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(onnx.load_model_from_string(tiny_cnn().SerializeToString()).SerializeToString()[:100])
    assert main([str(bad), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert "not a readable ONNX model" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [bad]


def test_passes_lists_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cleanup  (exact)" in out and "fold_size_limit" in out and "1048576" in out


def test_inspect(cnn_file, capsys):
    assert main(["inspect", str(cnn_file)]) == 0
    out = capsys.readouterr().out
    assert "x" in out and "logits" in out and "MACs per sample" in out and "6,932" in out
    assert main(["inspect", str(cnn_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["macs"] == 6932 and info["op_histogram"]["Identity"] == 2


def test_receipt_path_is_checked_before_work(cnn_file, tmp_path, capsys):
    assert main([str(cnn_file), "--receipt", str(tmp_path / "r.txt"), "--no-latency"]) == 2
    assert "must end in .json" in capsys.readouterr().err


def test_prune_from_the_command_line_and_inspect_groups(zoo_model, tmp_path, capsys):
    import onnx_ir as ir

    model = tmp_path / "llama.onnx"
    ir.save(zoo_model("llama").loaded.model, model)
    assert main(["inspect", str(model), "--groups", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    kinds = {(g["kind"], g["status"]) for g in groups}
    assert ("kv_heads", "prunable") in kinds and ("ffn", "prunable") in kinds
    assert any(g["status"] == "blocked" and "graph output 'logits'" in g["reasons"] for g in groups)
    assert main(["inspect", str(model), "--groups"]) == 0
    assert "pruning groups:" in capsys.readouterr().out
    out = tmp_path / "small.onnx"
    assert main([str(model), "--passes", "prune(ratio=0.5)", "-o", str(out), "--no-latency", "-q"]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    assert main([str(model), "--passes", "prune(ratio=1.5)", "-o", str(tmp_path / "bad.onnx"), "-q"]) == 2
    assert "ratio=1.5 is out of range" in capsys.readouterr().err and not (tmp_path / "bad.onnx").exists()


def test_int8_from_the_command_line_and_its_latency_guard(cnn_file, tmp_path, capsys):
    import numpy as np

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    # the guard refuses (nothing is 100x faster): exit 2, the numbers, nothing written
    assert main([str(cnn_file), "--passes", "int8(mode=static, min_speedup=100)", "--calib", str(calib),
                 "-o", str(out), "--no-latency", "-q"]) == 2
    err = capsys.readouterr().err
    assert "Refused" in err and "force=true" in err and "Traceback" not in err and not out.exists()
    assert main([str(cnn_file), "--passes", "int8(mode=static, force=true)", "--calib", str(calib),
                 "-o", str(out), "--no-latency", "-q"]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(out)).graph.node)


def test_sparsify_and_layerskip_from_the_command_line(zoo_model, tmp_path, capsys):
    import numpy as np
    import onnx_ir as ir

    z = zoo_model("gpt2")
    model = tmp_path / "gpt2.onnx"
    ir.save(z.loaded.model, model)
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    ids = rng.integers(3, 100, size=(8, 16))
    np.savez(calib, input_ids=ids, attention_mask=np.ones_like(ids))
    out, receipt = tmp_path / "out.onnx", tmp_path / "r.json"
    spec = "layerskip(count=1, unit=mlp, protect_last=0),sparsify(pattern=2:4, method=wanda)"
    assert main([str(model), "--passes", spec, "--calib", str(calib), "-o", str(out), "--receipt", str(receipt),
                 "--no-latency", "-q"]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    skip, sparse = json.loads(receipt.read_text())["passes"]
    assert skip["name"] == "layerskip" and len(skip["details"]["removed"]) == 1
    assert sparse["details"]["nm_valid"] and sparse["details"]["sparsity"] == pytest.approx(0.5)
    # data-driven without data: exit 2, a message that says what to pass, nothing written
    bad = tmp_path / "bad.onnx"
    assert main([str(model), "--passes", "layerskip(count=1)", "-o", str(bad), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--calib" in err and "Traceback" not in err and not bad.exists()


def test_ort_mobile_receipt_names_the_written_files_and_stderr_stays_quiet(cnn_file, tmp_path, capsys, caplog):
    out, receipt = tmp_path / "phone.ort", tmp_path / "receipt.json"
    assert main([str(cnn_file), "--passes", "cleanup", "--target", "ort-mobile", "-o", str(out), "--receipt",
                 str(receipt), "--no-latency"]) == 0
    captured = capsys.readouterr()
    assert "Created config" not in captured.err
    assert not any("Created config" in r.getMessage() for r in caplog.records)  # ORT logs through the root logger
    assert "target ort-mobile: phone.ort" in captured.out and "on 2 batches" in captured.out
    names = [f["name"] for f in json.loads(receipt.read_text())["target"]["files"]]
    assert names == ["phone.ort", "phone.required_operators.config"]


@pytest.mark.parametrize("args, message", [
    (["--threads", "-3"], "--threads: expected a whole number >= 1, got -3"),
    (["--threads", "0"], "--threads: expected a whole number >= 1, got 0"),
    (["--seq-len", "0"], "--seq-len: expected a whole number >= 1, got 0"),
    (["--seq-len", "many"], "--seq-len: expected a whole number >= 1, got 'many'"),
    (["--opset", "-1"], "--opset: expected a whole number >= 1, got -1"),
])
def test_non_positive_counts_are_usage_errors(cnn_file, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main([str(cnn_file), *args, "-o", str(tmp_path / "o.onnx")])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": -3}, "threads=-3: give a whole number >= 1"),
    ({"threads": 1.5}, "threads=1.5"),
    ({"seq_len": 0}, "seq_len=0: give a whole number of tokens >= 1"),
    ({"seq_len": True}, "seq_len=True"),
])
def test_compile_refuses_bad_counts_with_an_option_error(cnn_file, kwargs, message):
    import slimc
    from slimc.errors import OptionError

    with pytest.raises(OptionError, match=None) as info:
        slimc.compile(cnn_file, "cleanup", measure_latency=False, **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("spec, message", [
    ("prune(ignore=" + "[" * 1200 + ")", "nested more than 16 levels"),
    ("prune(ignore='mm0x)", "is never closed"),
])
def test_hostile_pass_specs_exit_2_without_a_traceback(cnn_file, tmp_path, capsys, spec, message):
    assert main([str(cnn_file), "--passes", spec, "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_output_piped_into_a_closed_reader_is_not_an_internal_error():
    import subprocess
    import sys

    cmd = f"{sys.executable} -m slimc.tools.cli passes | head -1"
    run = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert "internal error" not in run.stderr and "Traceback" not in run.stderr
    assert run.returncode == 0 and run.stdout.strip()
