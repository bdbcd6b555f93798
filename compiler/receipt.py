"""The receipt: what a compile changed, what it cost in fidelity, what it gained in speed and size.

Every number here is measured in the run that produced it: sizes and MACs are counted on the
IR before and after, bytes on disk are the saved files, latency is the ORT median of both
models measured alternately on this machine, fidelity is measured on the evaluation data
(held out from calibration) or, when none was given, on synthetic inputs, and says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from slimc.pipeline import PassReport


@dataclasses.dataclass
class Receipt:
    """What one compile changed, what it cost in fidelity and what it gained (docs/receipt.md has every key).

    Attributes:
        source: the model as given (a path, or the module's class name).
        task: ``causal-lm``, ``encoder``, ``image-classifier``, ``classifier`` or ``generic``; picks the metrics.
        passes: each pass's report, in order: what it changed and what it left alone, with reasons.
        before: statistics of the input model: params, weight_bytes, bytes_on_disk, nodes, op_histogram, macs.
        after: the same statistics of the result.
        fidelity: the result against the input model on the evaluation data (``synthetic`` when none was given).
        verification: the checks each stage passed (ONNX checker, ORT load, exactness for exact passes).
        latency: ONNX Runtime CPU medians of both models measured alternately, ``speedup``, ``within_noise``.
        notes: warnings about the run (synthetic evaluation data, calibration and evaluation from one source).
        version: the slimc version that wrote it.
        target: with ``target=``: the artifact, its fidelity and latency in the target runtime.
        backend: with ``backend="triton"``: the torch module, its agreement with ONNX Runtime, torch latency.
        decode: causal LMs with a KV cache: time to first token and decode tokens/s at batch 1, both models
            alternating (`slimc.measure_decode`).
    """

    source: str
    task: str
    passes: list[PassReport]
    before: dict[str, Any]
    after: dict[str, Any]
    fidelity: dict[str, Any]
    verification: list[dict[str, Any]]
    latency: dict[str, Any] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    version: str = ""
    target: dict[str, Any] | None = None  # slimc.export: the artifact, verified in its runtime
    backend: dict[str, Any] | None = None  # the torch/Triton backend: lowering, agreement with ORT, latency
    fidelity_guard: dict[str, Any] | None = None  # slimc.fidelity_guard: collapse threshold and max_loss checks
    warnings: list[str] = dataclasses.field(default_factory=list)  # loud: shown first in the table
    decode: dict[str, Any] | None = None  # slimc.measure_decode: time to first token, decode tokens/s

    @property
    def speedup(self) -> float | None:
        return self.latency.get("speedup") if self.latency else None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passes"] = [p.to_json() for p in self.passes]
        return json_safe(data)

    def save(self, path: str | Path, protect: tuple[Path, ...] = ()) -> None:
        """Write the JSON receipt atomically; refuses to replace a file in ``protect`` (the input model's)."""
        from slimc.onnx_io import check_output_path, write_text_atomic

        check_output_path(Path(path), tuple(protect), suffix=Path(path).suffix)
        write_text_atomic(Path(path), json.dumps(self.to_json(), indent=2) + "\n")

    def __str__(self) -> str:
        return render(self)


def json_safe(value: Any) -> Any:
    """inf/nan are not JSON: write them as strings ("inf") so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    return value


def _si(n: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _ratio(before: float, after: float) -> str:
    if before == after:
        return "same"
    if not after or not before:
        return "-"
    return f"{before / after:.2f}x smaller" if after < before else f"{after / before:.2f}x larger"


def _row(label: str, before: str, after: str, change: str) -> str:
    return f"  {label:<36}{before:>14}{after:>14}   {change}"


def render(r: Receipt) -> str:
    """A plain-text table for terminals and logs."""
    b, a = r.before, r.after
    sizes = (", ".join(f"{k}={v}" for k, v in a.get("macs_sizes", {}).items())
             or ", ".join(f"{k}[{','.join(map(str, v))}]" for k, v in a.get("macs_inputs", {}).items()) or "static shapes")
    lines = [
        f"slimc receipt: {r.source}  (task: {r.task})",
        f"  passes: {', '.join(p.name for p in r.passes) or '(none)'}",
        *[f"  !!! WARNING: {w}" for w in r.warnings],
        "",
        _row("", "before", "after", "change"),
        _row("parameters", _si(b["params"]), _si(a["params"]), _ratio(b["params"], a["params"])),
        _row("weights", _si(b["weight_bytes"], "B"), _si(a["weight_bytes"], "B"), _ratio(b["weight_bytes"], a["weight_bytes"])),
        _row("file size on disk", _si(b["bytes_on_disk"], "B"), _si(a["bytes_on_disk"], "B"), _ratio(b["bytes_on_disk"], a["bytes_on_disk"])),
        _row(f"MACs per sample ({sizes})", _si(b["macs"]), _si(a["macs"]), _ratio(b["macs"], a["macs"])),
        _row("nodes", str(b["nodes"]), str(a["nodes"]), f"{a['nodes'] - b['nodes']:+d}"),
    ]
    if a.get("macs_unresolved_nodes"):
        lines.append(f"  ({a['macs_unresolved_nodes']} weighted nodes had unresolved shapes and are not in the MAC count)")
    lines += _latency_lines(r.latency)
    lines += _decode_lines(r.decode)
    lines += _op_change_lines(b["op_histogram"], a["op_histogram"])
    lines += ["", _fidelity_header(r.fidelity)] + _metric_lines(r.fidelity.get("metrics", {}))
    lines += _guard_lines(r.fidelity_guard)
    lines += ["", "  passes:"]
    for p in r.passes:
        lines.append(f"    {p.name} ({p.seconds:.1f} s): {p.summary}")
        lines += [f"      left alone: {what}: {why}" for what, why in p.left_alone[:20]]
        if len(p.left_alone) > 20:
            lines.append(f"      ... and {len(p.left_alone) - 20} more (see the JSON receipt)")
    lines += ["", "  verification:"] + [f"    {v['pass']}: {v['result']}" for v in r.verification]
    lines += _target_lines(r.target)
    lines += _backend_lines(r.backend)
    if r.notes:
        lines += ["", "  notes:"] + [f"    - {n}" for n in r.notes]
    return "\n".join(lines)


def _guard_lines(guard: dict[str, Any] | None) -> list[str]:
    if not guard:
        return []
    checks = "; ".join(f"{c['metric']} {_fmt(c['value']) if c['value'] is not None else 'not measured'} "
                       f"(needs {c['bound']}, {c['source']})" for c in guard["checks"])
    return [f"  fidelity guard: {guard['status'].upper() if guard['status'] == 'collapsed' else guard['status']}: {checks}"]


def _latency_lines(lat: dict[str, Any] | None) -> list[str]:
    if not lat:
        return [_row("latency (ORT)", "-", "-", "not measured")]
    if "error" in lat:
        return [_row("latency (ORT)", "-", "-", f"not measured: {lat['error']}")]
    before, after = lat["before"]["median_ms"], lat["after"]["median_ms"]
    speed = lat["speedup"]
    change = f"{speed:.2f}x {'faster' if speed >= 1 else 'SLOWER'}"
    if within_noise(lat):
        change = f"no measurable change ({speed:.2f}x, inside the p10-p90 spread)"
    return [
        _row(f"latency median ({lat['feed']})", f"{before:.2f} ms", f"{after:.2f} ms", change),
        f"    measured on {lat['machine']}; {lat['after']['runs']} runs each, alternating, after warm-up"
        + ("; one model in memory at a time (large weights)" if lat.get("one_at_a_time") else ""),
    ]


def _decode_lines(dec: dict[str, Any] | None) -> list[str]:
    if not dec:
        return []
    if "error" in dec:
        return [_row("decode speed (ORT)", "-", "-", f"not measured: {dec['error']}")]
    ttft, step, tps = dec["time_to_first_token"], dec["decode_step"], dec["tokens_per_s"]

    def change(lat: dict[str, Any]) -> str:
        speed = lat["speedup"]
        if within_noise(lat):
            return f"no measurable change ({speed:.2f}x, inside the p10-p90 spread)"
        return f"{speed:.2f}x {'faster' if speed >= 1 else 'SLOWER'}"

    return [
        _row(f"time to first token ({dec['prompt_tokens']} tokens)", f"{ttft['before']['median_ms']:.2f} ms",
             f"{ttft['after']['median_ms']:.2f} ms", change(ttft)),
        _row(f"decode tokens/s (batch 1, past {step['past_tokens']})", f"{tps['before']:.1f}", f"{tps['after']:.1f}",
             change(step)),
    ]


def _target_lines(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return []
    files = ", ".join(f"{f['name']} ({_si(f['bytes'], 'B')})" for f in t["files"])
    lines = ["", f"  target {t['target']}: {files}; run in {t['runtime']} on this machine"]
    for key, label in (("fidelity_vs_onnx", "vs the compressed ONNX in ORT (conversion)"),
                       ("fidelity_vs_input", "vs the input model in ORT (whole compile)")):
        m = t.get(key) or {}
        shown = {k: m[k] for k in ("max_abs_error", "cosine", "sqnr_db", "top1_agreement", "perplexity_ratio",
                                    "embedding_cosine") if k in m}
        lines.append(f"    fidelity {label}: " + (", ".join(f"{k}={_fmt(v)}" for k, v in _shown(shown, m).items()) or "-"))
    lines += [f"    note: {n}" for n in t.get("notes") or []]
    lat = t.get("latency")
    if lat and "error" in lat:
        lines.append(f"    latency in {t['runtime']}: not measured: {lat['error']}")
    elif lat:
        after = lat["after"]["median_ms"]
        if "before" in lat:
            noise = ", inside the p10-p90 spread: no measurable change" if lat.get("within_noise") else ""
            lines.append(f"    latency in {t['runtime']} ({lat['feed']}): input model {lat['before']['median_ms']:.2f} ms, "
                         f"result {after:.2f} ms ({lat['speedup']:.2f}x{noise}); {lat['machine']}")
        else:
            lines.append(f"    latency in {t['runtime']} ({lat['feed']}): {after:.2f} ms; {lat['machine']}")
        if lat.get("decode"):
            lines.append(_target_decode_line(lat["decode"]))
    return lines


def _target_decode_line(d: dict[str, Any]) -> str:
    """A generating target's decode speed: tokens/s (range over rounds) and time to first token."""
    def one(m):
        low, high = m["decode_tokens_per_s_range"]
        return f"{m['decode_tokens_per_s']:.1f} tokens/s ({low:.1f}-{high:.1f}), first token {m['ttft_ms']:.1f} ms"

    parts = [f"input model {one(d['before'])}"] if "before" in d else []
    parts.append(f"result {one(d['after'])}" + (f" ({d['decode_speedup']:.2f}x)" if "decode_speedup" in d else ""))
    return (f"    decoding ({d['prompt_tokens']}-token prompt, {d['new_tokens']} greedy tokens, {d['rounds']} rounds): "
            + "; ".join(parts))


def _backend_lines(b: dict[str, Any] | None) -> list[str]:
    if not b:
        return []
    low = b["lowering"]
    kernels = ", ".join(f"{k} x{n}" for k, n in low["kernels"].items()) or "none (no quantized or 2:4 matmuls)"
    agree = b["agreement_with_onnxruntime"]
    lines = ["", f"  backend triton: torch.fx GraphModule, {low['nodes']} ONNX nodes lowered; kernels: {kernels}",
             f"    kernels run as: {b['kernel_impl']}",
             f"    trainable parameters: {_si(low['trainable_parameters'])}; buffers: {_si(low['buffers'])} elements",
             f"    agreement with {agree.get('reference', 'ONNX Runtime')} ({agree['batches']} batch{'es' if agree['batches'] != 1 else ''}): max abs diff "
             f"{agree['max_abs_diff']:.3g}, relative L2 {agree['relative_l2']:.3g} ({agree['criterion']}: passed)"]
    if "relative_l2_vs_deployed_ort" in agree:
        lines.append(f"    relative L2 vs the deployed ORT model (accuracy_level=4): {agree['relative_l2_vs_deployed_ort']:.3g}")
    shown = {k: v for k, v in (b.get("fidelity") or {}).items() if k in ("max_abs_error", "cosine", "sqnr_db",
                                                                          "top1_agreement", "perplexity_ratio")}
    if shown:
        lines.append("    fidelity vs the input model in ORT: " + ", ".join(f"{k}={_fmt(v)}" for k, v in
                                                                           _shown(shown, b.get("fidelity") or {}).items()))
    lines += [f"    left generic: {what}: {why}" for what, why in list(low["left_generic"].items())[:10]]
    lat = b.get("latency")
    if lat and "error" in lat:
        lines.append(f"    latency in torch: not measured: {lat['error']}")
    elif lat:
        noise = ", inside the p10-p90 spread: no measurable change" if lat.get("within_noise") else ""
        caveat = "; the kernels ran as their PyTorch references: not a measure of the GPU kernels" if (
            "references" in b.get("kernel_impl", "") and low["kernels"]) else ""
        lines.append(f"    latency in torch ({lat['feed']}): input model {lat['before']['median_ms']:.2f} ms, result "
                     f"{lat['after']['median_ms']:.2f} ms ({lat['speedup']:.2f}x{noise}); {lat['machine']}{caveat}")
    return lines


def within_noise(lat: dict[str, Any]) -> bool:
    """True when the two runs' p10-p90 ranges overlap: the ratio is not a measured difference."""
    b, a = lat["before"], lat["after"]
    return a["p10_ms"] <= b["p90_ms"] and b["p10_ms"] <= a["p90_ms"]


def _op_change_lines(before: dict[str, int], after: dict[str, int]) -> list[str]:
    changed = sorted(op for op in set(before) | set(after) if before.get(op, 0) != after.get(op, 0))
    if not changed:
        return ["  op histogram: unchanged"]
    parts = [f"{op} {before.get(op, 0)}->{after.get(op, 0)}" for op in changed]
    return ["  op changes: " + ", ".join(parts)]


def _fidelity_header(f: dict[str, Any]) -> str:
    if "error" in f:
        return f"  fidelity vs the input model: not measured: {f['error']}"
    kind = "SYNTHETIC inputs (no --eval data given)" if f.get("synthetic") else "held-out data"
    return f"  fidelity vs the input model, on {kind}: {f.get('data', '')}"


def _shown(shown: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """``sqnr_db`` of identical outputs is None in the JSON (no inf there); the table says +inf."""
    if "sqnr_db" in shown and shown["sqnr_db"] is None and metrics.get("exact"):
        return {**shown, "sqnr_db": math.inf}
    return shown


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    return [f"    {key}: {_fmt(value)}" for key, value in _shown(metrics, metrics).items()]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf (identical)" if v > 0 else "-inf"
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)
