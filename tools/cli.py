"""The `slimc` command line.

    slimc MODEL --passes "cleanup" -o out.onnx [--calib DATA] [--eval DATA] [--receipt r.json]
    slimc MODEL --passes "prune,int8" --target openvino -o out.xml     export, run in OpenVINO, verify
    slimc MODEL --passes "int4" --backend triton -o out.pt2            torch.fx module, Triton kernels
    slimc passes                      list every pass with its options and defaults
    slimc inspect MODEL               inputs, outputs, params, MACs, op histogram
    slimc inspect MODEL --groups      ... and every pruning group: kind, size, prunable or blocked and why
    slimc demo [--model minilm]       compress a real pretrained model and print the receipt
    slimc generate MODEL --prompt "..." [--max-new-tokens N] [--temperature T --top-k K --top-p P --seed S]
                                      stream text from a causal LM with a KV cache; tokens/s at the end
    slimc search MODEL --budget "speedup>=1.5" [--space prune,layerskip] --calib DATA --eval DATA -o best.onnx
                                      per-block levels by evolutionary search under a budget (docs/search.md)

Errors a user can cause print one message (no traceback) and exit 2; bugs exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from slimc import progress
from slimc.errors import SlimcError

SUBCOMMANDS = ("passes", "inspect", "demo", "generate", "search")


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="errors only: no progress bars, no receipt table")
    group.add_argument("-v", "--verbose", action="store_true", help="log every step (shape inference, pass steps, timings)")


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``--threads -3`` and ``--seq-len 0`` are usage errors, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slimc",
        description="Compress a model with a pipeline of passes; print a receipt of what it cost and gained.",
        epilog="Other commands: 'slimc passes', 'slimc inspect MODEL', 'slimc demo'. "
        'Example: slimc model.onnx --passes "cleanup" -o out.onnx --eval held_out.npz --receipt receipt.json',
    )
    p.add_argument("model", help=".onnx file, Hugging Face folder, .gguf or .pt2 file")
    p.add_argument("--passes", default="cleanup", help='pipeline, e.g. "prune(ratio=0.3, round_to=8),int8" (default: cleanup)')
    p.add_argument("-o", "--output", type=Path, help="where to write the compressed .onnx (omit for a dry run)")
    p.add_argument("--receipt", type=Path, help="also save the receipt as JSON here")
    p.add_argument("--calib", help="calibration data: text file, image folder or .npz")
    p.add_argument("--eval", dest="evaluation", help="held-out evaluation data: text file, image folder or .npz")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per window for text data (default 128)")
    p.add_argument("--threads", type=_positive_int, help="ORT intra-op threads for latency (default: all cores)")
    p.add_argument("--max-loss", help="refuse the result (exit 2, nothing written) unless its fidelity meets this: a "
                   "loss on the task's main metric (0.05: embedding cosine >= 0.95, top-1 agreement >= 0.95, perplexity "
                   "ratio <= 1.05) or bounds such as 'embedding_cosine>=0.98,sqnr_db>=20' (docs/fidelity-guard.md)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--static", action="store_true", help="export with static batch/sequence sizes (causal LMs: without "
                   "a KV cache)")
    p.add_argument("--no-kv-cache", dest="kv_cache", action="store_false", default=None,
                   help="export a causal LM (HF folder, GGUF) without past/present key-value inputs and outputs")
    p.add_argument("--target", help="also export for a runtime and run it there: onnx (default), ort-mobile, openvino, "
                   "ncnn, tflite, executorch, genai; -o then names the artifact (.onnx, .ort, .xml, .param, .tflite, .pte; "
                   "a folder for genai: ONNX Runtime GenAI's model folder)")
    p.add_argument("--opset", type=_positive_int, help="convert the output to this ONNX opset (ONNX's version converter)")
    p.add_argument("--static-shapes", help="pin input shapes, e.g. pixel_values=1x3x224x224 or input_ids=1x128,attention_mask=1x128")
    p.add_argument("--backend", choices=("onnxruntime", "triton"), default="onnxruntime",
                   help="triton: also lower the result to a trainable torch module whose quantized and 2:4 matmuls are "
                   "Triton kernels, check it against ONNX Runtime and time it; -o out.pt2 writes it (torch.export)")
    p.add_argument("--device", help="torch device for --backend triton (default: cuda when available, else cpu)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and compute with float32 inputs/outputs "
                   "(appends the fp16 pass: fp16(keep_io_types=true))")
    _common(p)
    return p


def _sub_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"slimc {command}")
    if command == "inspect":
        p.add_argument("model", help=".onnx file, Hugging Face folder, .gguf or .pt2 file")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.add_argument("--groups", action="store_true", help="list the pruning groups: kind, size, initializers, prunable or blocked and why")
        p.add_argument("--no-kv-cache", dest="kv_cache", action="store_false", default=None,
                       help="load a causal LM without its KV cache")
    elif command == "demo":
        from slimc.tools.demo import DEMO_MODELS

        p.add_argument("--model", choices=sorted(DEMO_MODELS), default="minilm", help="which real model (default: minilm)")
        p.add_argument("--passes", default=None, help="pipeline to run (default: the demo's)")
        p.add_argument("-o", "--output", type=Path, default=Path("slimc-demo"), help="folder for the model and receipt")
    elif command == "generate":
        _generate_options(p)
    elif command == "search":
        _search_options(p)
    _common(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "compile"
    parser = _compile_parser() if command == "compile" else _sub_parser(command)
    args = parser.parse_args(argv if command == "compile" else argv[1:])
    progress.set_verbosity(progress.QUIET if args.quiet else progress.VERBOSE if args.verbose else progress.NORMAL)
    if not args.verbose:  # torchao (pulled in by executorch) warns at import about CUDA kernels it cannot load
        import logging

        logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        return {"compile": _cmd_compile, "passes": _cmd_passes, "inspect": _cmd_inspect, "demo": _cmd_demo,
                "generate": _cmd_generate, "search": _cmd_search}[command](args)
    except SlimcError as exc:
        print(f"slimc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimc: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader closed the pipe (`slimc passes | head`): not slimc's failure
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0
    except Exception:  # a bug: say so, with the traceback for the report
        print("slimc: internal error (a bug in slimc; please report it with this traceback):", file=sys.stderr)
        traceback.print_exc()
        return 1


def _cmd_compile(args: argparse.Namespace) -> int:
    import slimc
    from slimc.fidelity_guard import parse_max_loss
    from slimc.onnx_io import check_output_path
    from slimc.pass_spec import parse_pipeline

    passes = args.passes + (",fp16(keep_io_types=true)" if args.fp16 else "")
    parse_pipeline(passes)  # a bad spec fails before the (slow) load
    parse_max_loss(args.max_loss)
    source = Path(args.model)
    suffix = ".onnx"
    if args.backend == "triton" and args.output is not None and args.output.suffix != ".onnx":
        suffix = ".pt2"
    folder = False
    if args.target is not None:
        from slimc.backends import targets

        suffix, folder = targets.get(args.target).suffix, targets.get(args.target).folder
    if args.output is not None:
        if folder:
            from slimc.export import check_folder_output

            check_folder_output(args.output, (source,))
        else:
            check_output_path(args.output, (source,), suffix=suffix)
        from slimc.atomic import clean_stale

        clean_stale(args.output.resolve().parent)  # partial files of killed runs, at this run's start
    if args.receipt is not None:
        check_output_path(args.receipt, (source,), suffix=".json")
    result = slimc.compile(
        source, passes, calibration=args.calib, evaluation=args.evaluation, dynamic=not args.static,
        measure_latency=not args.no_latency, threads=args.threads, seq_len=args.seq_len,
        target=args.target, opset=args.opset, static_shapes=args.static_shapes, backend=args.backend,
        device=args.device, max_loss=args.max_loss, kv_cache=args.kv_cache,
    )
    protect = result.loaded.source_paths  # the input's files, external data included: no output may touch them
    if args.receipt is not None:
        check_output_path(args.receipt, protect, suffix=".json")
    # Saved before the receipt is printed: the receipt names the artifact files as written.
    written = result.save(args.output) if args.output is not None else None
    if not args.quiet:
        print(result.receipt)
        print(f"\nwrote {', '.join(map(str, written))}" if written else "\n(no -o given: dry run, nothing written)")
    else:  # compile() logged them; -q hides logged warnings, but a collapsed result must not pass unseen
        for warning in result.receipt.warnings:
            print(f"slimc: warning: {warning}", file=sys.stderr)
    if args.receipt is not None:
        result.receipt.save(args.receipt, protect)
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    import textwrap

    from slimc import passes
    from slimc.pass_spec import option_table
    from slimc.tools.gen_docs import option_help

    for name in passes.names():
        cls = passes.get(name)
        print(f"{name}  ({'exact' if cls.exact else 'lossy'}): {cls.description}")
        help_ = option_help(cls)  # the same text as the docs' option tables (the class docstring)
        for opt, typ, default in option_table(cls):
            print(f"    {opt:<22} {typ:<28} default {default!r}")
            if help_.get(opt):
                print(textwrap.fill(help_[opt], width=100, initial_indent=" " * 8, subsequent_indent=" " * 8))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from slimc import frontends
    from slimc.analysis import model_stats
    from slimc.data import synthetic
    from slimc.errors import DataError

    loaded = frontends.load(args.model, kv_cache=args.kv_cache)
    try:
        feed = next(iter(synthetic(loaded.inputs, n_batches=1, sizes={"seq": 128})))
    except DataError as exc:  # an input slimc cannot invent: MACs at the declared shapes only
        feed, note = None, f"MACs at declared shapes only: {exc}"
    else:
        note = None
    stats = model_stats(loaded.model, feed)
    info = {
        "source": loaded.source,
        "task": loaded.task,
        "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape), "kind": s.kind, "batch_axis": s.batch_axis}
                   for s in loaded.inputs],
        "synthetic_inputs": feed is not None and _fed(loaded.inputs),
        "notes": loaded.notes + ([note] if note else []),
        "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": str(v.shape)} for v in loaded.model.graph.outputs],
        **stats,
    }
    if args.groups:
        info["groups"] = _groups(loaded.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['source']}  (task: {info['task']})")
    for role in ("inputs", "outputs"):
        print(f"  {role}:")
        for v in info[role]:
            print(f"    {v['name']:<24} {v['dtype']:<10} {v['shape']}" + (f"  [{v['kind']}]" if "kind" in v else ""))
    sizes = ", ".join(f"{k}[{','.join(map(str, v))}]" for k, v in stats["macs_inputs"].items()) or "declared shapes"
    print(f"  parameters: {stats['params']:,}  ({stats['weight_bytes'] / 1e6:.1f} MB of weights)")
    print(f"  MACs per sample ({sizes}): {stats['macs']:,}" + (
        f"  ({stats['macs_unresolved_nodes']} nodes unresolved)" if stats["macs_unresolved_nodes"] else ""))
    print(f"  nodes: {stats['nodes']}")
    for line in info["notes"]:
        print(f"  note: {line}")
    print("  ops: " + ", ".join(f"{op} {n}" for op, n in stats["op_histogram"].items()))
    if args.groups:
        _print_groups(info["groups"])
    return 0


def _fed(specs) -> list[str]:
    from slimc.data_synthetic import describe

    return [describe(s, s.concrete_shape({"seq": 128})) for s in specs]


def _groups(model) -> list[dict]:
    from slimc.onnx_io import copy_model
    from slimc.passes.prune import DependencyGraph

    copy = copy_model(model)  # the analysis unshares constants
    return [grp.describe() for grp in DependencyGraph(copy).groups()]


def _print_groups(groups: list[dict]) -> None:
    prunable = sum(g["status"] == "prunable" for g in groups)
    print(f"  pruning groups: {len(groups)} ({prunable} prunable)")
    print(f"    {'id':>3}  {'kind':<9} {'size':>5}  {'status':<26} name")
    for g in groups:
        print(f"    {g['id']:>3}  {g['kind']:<9} {g['size']:>5}  {g['status']:<26} {g['name']}")
        inits = g["initializers"]
        print(f"           slices {len(inits)}: " + ", ".join(inits[:4]) + (f", ... ({len(inits) - 4} more)" if len(inits) > 4 else ""))
        for reason in g["reasons"][:3]:
            print(f"           - {reason}")
        if len(g["reasons"]) > 3:
            print(f"           - ... {len(g['reasons']) - 3} more")


def _cmd_demo(args: argparse.Namespace) -> int:
    from slimc.tools.demo import run_demo

    run_demo(args.model, args.output, passes=args.passes, quiet=args.quiet)
    return 0


def _generate_options(p: argparse.ArgumentParser) -> None:
    p.description = "Generate text from a causal LM with a KV cache, streaming tokens to stdout (docs/generate.md)."
    p.add_argument("model", help=".onnx with the KV-cache interface (tokenizer beside it or --tokenizer), Hugging Face "
                   "folder or .gguf (exported by slimc with the cache), or a folder with genai_config.json "
                   "(run by onnxruntime_genai)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="stop after this many new tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample at this temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample only from the K most likely tokens (default 0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample only from the smallest set reaching probability P (default 1: off)")
    p.add_argument("--seed", type=int, help="random seed for sampling (repeatable output)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template as a user turn")
    p.add_argument("--tokenizer", type=Path, help="folder of the tokenizer (default: the model's folder)")
    p.add_argument("--threads", type=_positive_int, help="ORT intra-op threads (default: all cores)")


def _cmd_generate(args: argparse.Namespace) -> int:
    import slimc

    stats = slimc.generate_text(
        args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, chat=args.chat, tokenizer=args.tokenizer, threads=args.threads,
        on_text=lambda piece: print(piece, end="", flush=True),
    ).stats
    print(flush=True)
    if not args.quiet:
        print(f"slimc: {stats.summary()}", file=sys.stderr)
    return 0


def _search_options(p: argparse.ArgumentParser) -> None:
    p.description = ("Search per-block compression levels (prune ratio, block removal) for the model closest to the input "
                     "under a budget, by evolutionary search (docs/search.md).")
    p.add_argument("model", help=".onnx file, Hugging Face folder, .gguf or .pt2 file")
    p.add_argument("--budget", required=True, help="bounds that must all hold, e.g. 'speedup>=1.5', 'size<=60MB,params<=0.7x' "
                   "(measures: speedup, size, params, macs; x = a fraction of the input model)")
    p.add_argument("--space", default="prune,layerskip", help="methods searched per block (default prune,layerskip)")
    p.add_argument("--prune-levels", default="0.125,0.25,0.375,0.5", help="prune ratios a block may take (default 0.125,0.25,0.375,0.5)")
    p.add_argument("--protect", type=int, default=1, help="first/last N blocks are never removed (default 1)")
    p.add_argument("--calib", help="calibration data the fitness is measured on: text file, image folder or .npz")
    p.add_argument("--eval", dest="evaluation", help="held-out data for the chosen model's receipt")
    p.add_argument("-o", "--output", type=Path, help="where to write the chosen model (.onnx)")
    p.add_argument("--receipt", type=Path, help="also save the chosen model's receipt as JSON here")
    p.add_argument("--report", type=Path, help="folder for pareto.json, search_log.jsonl and pareto.png")
    p.add_argument("--generations", type=int, default=20, help="generations of the evolution (default 20)")
    p.add_argument("--offspring", type=_positive_int, default=8, help="children per generation (default 8)")
    p.add_argument("--survivors", type=_positive_int, default=2, help="children re-scored on all batches (default 2)")
    p.add_argument("--batches", type=_positive_int, default=4, help="calibration batches of the full fitness (default 4)")
    p.add_argument("--low-batches", type=_positive_int, default=1, help="batches of the first, cheap selection (default 1)")
    p.add_argument("--finalists", type=_positive_int, default=4, help="candidates timed at the end (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same search (default 0)")
    p.add_argument("--workers", type=_positive_int, default=1, help="parallel evaluations; above 1 they run as Ray tasks "
                   "(pip install 'slimc[search]') (default 1: in this process)")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local instance")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per window for text data (default 128)")
    p.add_argument("--threads", type=_positive_int, help="ORT intra-op threads (default: all cores)")
    p.add_argument("--no-kv-cache", dest="kv_cache", action="store_false", default=None,
                   help="export a causal LM without past/present key-value inputs and outputs")


def _cmd_search(args: argparse.Namespace) -> int:
    import slimc
    from slimc.errors import BudgetError, OptionError
    from slimc.evosearch.budget import parse_budget
    from slimc.onnx_io import check_output_path

    parse_budget(args.budget)  # a bad budget fails before the (slow) load
    try:
        levels = tuple(float(x) for x in args.prune_levels.split(","))
    except ValueError:
        raise OptionError(f"--prune-levels {args.prune_levels!r}: give fractions separated by commas, e.g. 0.25,0.5") from None
    source = Path(args.model)
    for path, suffix in ((args.output, ".onnx"), (args.receipt, ".json")):
        if path is not None:
            check_output_path(path, (source,), suffix=suffix)
    result = slimc.search(
        source, args.budget, space=args.space, calibration=args.calib, evaluation=args.evaluation, prune_levels=levels,
        protect=args.protect, generations=args.generations, offspring=args.offspring, survivors=args.survivors,
        batches=args.batches, low_batches=args.low_batches, finalists=args.finalists, seed=args.seed,
        workers=args.workers, ray_address=args.ray_address, seq_len=args.seq_len, threads=args.threads,
        kv_cache=args.kv_cache, report=args.report)
    if not args.quiet:
        print(result.compiled.receipt)
        print("\nallocation: " + ", ".join(f"{a['block']}={a['level']}" for a in result.allocation))
    if not result.budget_met:
        measured = ", ".join(f"{r['measured_speedup']:.2f}x" for r in result.finalists)
        raise BudgetError(f"no finalist met the budget {result.budget} when measured (speed-ups {measured}); nothing "
                          "was written" + (f" (report in {args.report})" if args.report else "") + ". Run more "
                          "generations, relax the budget, or set --threads as deployed.")
    written = result.save(args.output) if args.output is not None else None
    if args.receipt is not None:
        result.compiled.receipt.save(args.receipt, result.compiled.loaded.source_paths)
    if not args.quiet:
        print(f"\nwrote {', '.join(map(str, written))}" if written else "\n(no -o given: dry run, nothing written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
