"""``--target genai``: the folder ONNX Runtime GenAI loads, verified in that runtime (tiny decoders, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime_genai as og
import pytest

from kv_decoders import decoder, tokenizer
from slimc import frontends
from slimc.errors import OutputPathError, TargetError
from slimc.export import ExportOptions, export, save_folder

CONFIG = {"model_type": "llama", "max_position_embeddings": 128, "num_attention_heads": 4, "hidden_size": 32,
          "bos_token_id": 1, "eos_token_id": 0}


def _source(folder: Path, kv_heads=(2, 2), indices=None, config=CONFIG, with_tokenizer=True) -> Path:
    """A user's ONNX causal LM with its tokenizer and config.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer(folder)) if with_tokenizer else 300
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    onnx.save(decoder(vocab, list(kv_heads), indices), folder / "model.onnx")
    return folder / "model.onnx"


def _batches(path: Path, n: int = 2, batch: int = 2, seq: int = 20) -> list[dict[str, np.ndarray]]:
    session = ort.InferenceSession(str(path))
    ids = np.random.default_rng(0).integers(3, 290, (n, batch, seq))
    out = []
    for i in range(n):
        feed = {"input_ids": ids[i], "attention_mask": np.ones((batch, seq), np.int64),
                "position_ids": np.broadcast_to(np.arange(seq), (batch, seq)).copy()}
        for value in session.get_inputs():
            if value.name.startswith("past_key_values"):
                feed[value.name] = np.zeros((batch, value.shape[1], 0, value.shape[3]), np.float32)
        out.append(feed)
    return out


def _export(path: Path, work: Path, evalset=None, latency: bool = False):
    loaded = frontends.load(path)
    session = ort.InferenceSession(str(path))
    run = lambda batch: session.run(None, batch)  # noqa: E731
    work.mkdir(parents=True, exist_ok=True)
    return export(path, path if latency else None, ExportOptions("genai"), work, evalset=evalset or _batches(path),
                  task=loaded.task, inputs=loaded.inputs, reference_runs=(run, run),
                  output_names=[o.name for o in session.get_outputs()], measure_latency=latency, loaded=loaded), loaded


def _greedy_ort(path: Path, prompt: np.ndarray, new: int) -> list[int]:
    """Greedy tokens by full recomputation in ONNX Runtime (empty past every step): the reference."""
    session = ort.InferenceSession(str(path))
    seq, out = list(prompt), []
    for _ in range(new):
        n = len(seq)
        feed = {"input_ids": np.array([seq]), "attention_mask": np.ones((1, n), np.int64),
                "position_ids": np.arange(n)[None]}
        for value in session.get_inputs():
            if value.name.startswith("past_key_values"):
                feed[value.name] = np.zeros((1, value.shape[1], 0, value.shape[3]), np.float32)
        out.append(int(session.run(["logits"], feed)[0][0, -1].argmax()))
        seq.append(out[-1])
    return out


def _greedy_og(folder: Path, prompt: np.ndarray, new: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


def test_folder_loads_in_genai_and_generates_as_the_graph(tmp_path):
    path = _source(tmp_path / "src")
    exported, loaded = _export(path, tmp_path / "work", latency=True)
    report = exported.report
    assert report["fidelity_vs_onnx"]["max_abs_error"] < 1e-4
    assert report["runtime"].startswith("onnxruntime-genai")
    decode = report["latency"]["decode"]
    assert decode["after"]["decode_tokens_per_s"] > 0 and decode["before"]["ttft_ms"] > 0
    from slimc.receipt import _target_lines

    assert any(line.strip().startswith("decoding (20-token prompt, 32 greedy tokens") for line in _target_lines(report))
    written = save_folder(exported.files, tmp_path / "out", loaded.source_paths)
    names = {p.name for p in written}
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert any(name.endswith(".data") for name in names)  # weights in external data, as the builder writes them
    config = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    assert config["search"]["past_present_share_buffer"] is False  # a concatenated cache grows
    assert (config["model"]["eos_token_id"], config["model"]["context_length"]) == (0, 128)
    text_ids = og.Tokenizer(og.Model(str(tmp_path / "out"))).encode("the compiler writes a folder").astype(np.int64)
    assert _greedy_og(tmp_path / "out", text_ids, 12) == _greedy_ort(path, text_ids, 12)


def test_skipped_layers_and_pruned_kv_heads_still_generate(tmp_path):
    """Layers 0 and 2 left (layerskip), 2 and 1 KV heads (pruning): renumbered and padded, same tokens."""
    path = _source(tmp_path / "src", kv_heads=(2, 1), indices=[0, 2])
    exported, loaded = _export(path, tmp_path / "work")
    assert exported.report["fidelity_vs_onnx"]["max_abs_error"] < 1e-4
    assert any("renumbered" in n for n in exported.report["notes"])
    assert any("padded to 2 heads" in n for n in exported.report["notes"])
    save_folder(exported.files, tmp_path / "out", loaded.source_paths)
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    assert {v.name for v in graph.input} >= {"past_key_values.1.key", "past_key_values.1.value"}
    assert json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 2
    prompt = np.random.default_rng(1).integers(3, 290, 15)
    assert _greedy_og(tmp_path / "out", prompt, 12) == _greedy_ort(path, prompt, 12)


def _plain_lm(folder: Path, past: bool) -> Path:
    """The decoder without its cache interface: past inputs and present outputs removed."""
    path = _source(folder)
    model = onnx.load(str(path))
    if not past:
        import onnx_ir as ir

        m = ir.serde.deserialize_model(model)
        for value in [v for v in m.graph.inputs if v.name.startswith("past")]:
            zero = ir.Value(name=value.name + ".empty", const_value=ir.tensor(np.zeros((1, 2, 0, 8), np.float32)))
            m.graph.register_initializer(zero)
            value.replace_all_uses_with(zero)
            m.graph.inputs.remove(value)
        for value in [v for v in m.graph.outputs if v.name.startswith("present")]:
            m.graph.outputs.remove(value)
        model = ir.serde.serialize_model(m)
    onnx.save(model, path)
    return path


def test_refuses_a_model_without_a_cache_or_not_a_language_model(tmp_path):
    path = _plain_lm(tmp_path / "nocache", past=False)
    feeds = [{"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64),
              "position_ids": np.arange(4)[None]}]
    with pytest.raises(TargetError, match="no KV cache"):
        _export(path, tmp_path / "w1", evalset=feeds)
    other = tmp_path / "encoder.onnx"
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), other)
    with pytest.raises(TargetError, match="causal language models"):
        _export(other, tmp_path / "w2", evalset=[{"x": np.ones((1, 4), np.float32)}])


def test_refuses_missing_tokenizer_or_eos_and_padded_data(tmp_path):
    with pytest.raises(TargetError, match="tokenizer.json"):
        _export(_source(tmp_path / "notok", with_tokenizer=False), tmp_path / "w1")
    no_eos = {k: v for k, v in CONFIG.items() if k != "eos_token_id"}
    path = _source(tmp_path / "noeos", config=no_eos)
    tok_config = json.loads((path.parent / "tokenizer_config.json").read_text())
    tok_config.pop("eos_token", None)
    (path.parent / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(TargetError, match="end-of-sequence"):
        _export(path, tmp_path / "w2")
    path = _source(tmp_path / "ok")
    padded = _batches(path)
    padded[0]["attention_mask"][0, -3:] = 0
    with pytest.raises(TargetError, match="padded"):
        _export(path, tmp_path / "w3", evalset=padded)


def test_save_folder_replaces_its_own_folder_and_protects_others(tmp_path):
    path = _source(tmp_path / "src")
    exported, loaded = _export(path, tmp_path / "work")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="not empty"):
        save_folder(exported.files, foreign, loaded.source_paths)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputPathError, match="input"):
        save_folder(exported.files, tmp_path / "src", loaded.source_paths)
    with pytest.raises(OutputPathError, match="input"):
        save_folder(exported.files, tmp_path, loaded.source_paths)  # holds the input: replacing it deletes it
    out = tmp_path / "out"
    save_folder(exported.files, out, loaded.source_paths)
    (out / "stale.bin").write_text("old")
    save_folder(exported.files, out, loaded.source_paths)  # a folder it wrote: replaced whole
    assert not (out / "stale.bin").exists() and (out / "genai_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".slimc-")]


@pytest.mark.slow
def test_a_genai_builder_folder_compiles_as_a_user_onnx(tmp_path):
    """The GenAI model builder's fp32 output (GroupQueryAttention, shared past/present buffer, head size
    left symbolic in the graph) read as a user's .onnx with its genai_config.json and tokenizer beside it."""
    import subprocess
    import sys

    import torch
    import transformers

    hf = tmp_path / "hf"
    tok = tokenizer(hf)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=1, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    built = tmp_path / "built"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "tiny", "-i", str(hf), "-o",
                    str(built), "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache")], check=True, capture_output=True)
    session = ort.InferenceSession(str(built / "model.onnx"))
    ids = np.random.default_rng(0).integers(3, len(tok) - 3, (2, 16))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feed.update({v.name: np.zeros((2, 2, 0, 16), np.float32) for v in session.get_inputs() if "past" in v.name})
    exported, _ = _export(built / "model.onnx", tmp_path / "work", evalset=[feed])
    assert exported.report["fidelity_vs_onnx"]["max_abs_error"] < 1e-4
    written = json.loads((tmp_path / "work" / "target-genai" / "genai_config.json").read_text())
    original = json.loads((built / "genai_config.json").read_text())
    assert written["search"]["past_present_share_buffer"] is True  # GroupQueryAttention shares the buffer
    for key in ("head_size", "num_key_value_heads", "num_hidden_layers", "num_attention_heads", "hidden_size"):
        assert written["model"]["decoder"][key] == original["model"]["decoder"][key], key
    for key in ("eos_token_id", "bos_token_id", "pad_token_id", "context_length", "vocab_size", "type"):
        assert written["model"][key] == original["model"][key], key


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama (GQA: 4 query heads, 2 KV heads) as a Hugging Face folder with a BPE tokenizer."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("genai-llama")
    folder = root / "llama"
    tok = tokenizer(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.2, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()[:3000]
    (root / "text.txt").write_text(text)
    return folder, root / "text.txt"


@pytest.mark.parametrize("passes", ["cleanup", "int4(method=rtn,block_size=32,force=true)", "cleanup,fuse",
                                    "int4(method=rtn,block_size=32,force=true,embedding=true),fuse"])
def test_cli_writes_a_genai_folder_from_slimcs_cached_export(llama_folder, tmp_path, passes, capsys):
    """slimc's own KV-cache export of a Hugging Face folder -> ``--target genai -o DIR`` -> og.Generator;
    with ``cleanup`` the tokens are transformers' generate() on the same weights."""
    import torch
    import transformers

    from slimc.tools.cli import main

    folder, text = llama_folder
    out = tmp_path / "out"
    assert main([str(folder), "--passes", passes, "--target", "genai", "-o", str(out), "--eval", str(text),
                 "--seq-len", "16", "--no-latency", "--receipt", str(tmp_path / "r.json")]) == 0
    assert f"wrote {out / 'model.onnx'}" in capsys.readouterr().out
    receipt = json.loads((tmp_path / "r.json").read_text())
    assert receipt["target"]["fidelity_vs_onnx"]["max_abs_error"] < 1e-3
    config = json.loads((out / "genai_config.json").read_text())["model"]
    assert (config["type"], config["decoder"]["num_key_value_heads"], config["decoder"]["head_size"]) == ("llama", 2, 8)
    fused = "fuse" in passes  # GroupQueryAttention writes the present into the past buffer
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is fused
    if fused:
        assert "GroupQueryAttention" in {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    model = og.Model(str(out))
    prompt = og.Tokenizer(model).encode("slimc compiles models").astype(np.int64)
    tokens = _greedy_og(out, prompt, 10)
    if passes in ("cleanup", "cleanup,fuse"):
        reference = transformers.LlamaForCausalLM.from_pretrained(folder)
        expected = reference.generate(torch.tensor(prompt[None]), max_new_tokens=10, min_new_tokens=10,
                                      do_sample=False)[0, len(prompt):].tolist()
        assert tokens == expected
    else:
        assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)
