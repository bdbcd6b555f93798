"""The `sparsify` pass: unstructured and N:M weight sparsity (magnitude, Wanda, SparseGPT, OWL).

1. Targets (`_layers`): every MatMul / Gemm / Conv whose weight is a constant float
   initializer. Each weight is viewed as a [K, N] matrix, K the reduction dimension (MatMul as
   stored; Gemm ``transB=1`` transposed; Conv ``[N, C/g, kh, kw]`` as ``[kh·kw·C/g, N]`` with the
   input channel fastest, so an N:M group is M consecutive *input channels* at one kernel
   position, the layout sparse tensor cores and NVIDIA's ASP use). A weight shared by several
   nodes is one layer with the statistics of all its inputs. What is not a target (attention's
   activation x activation products, tied embeddings reached through a Transpose, excluded
   nodes, N:M layers whose input channels are not a multiple of M) is reported with the reason.
2. Statistics (`slimc.calibrate.collect`): the L2 norm of every input channel of every target
   (Wanda, OWL) and, for SparseGPT, the Gram matrix XᵀX of the input (MatMul, Gemm and 1x1
   ungrouped Conv; a KxK or grouped Conv has an im2col Hessian the instrumented graph does not
   compute, so it falls back to Wanda and says so).
3. Stages: like the papers' layer-by-layer runs, the targets are cut into ``stages`` groups in
   dependency order (a target's level is one more than the deepest target it reads from) and
   each stage's statistics are measured on the model with every earlier stage already sparse,
   so later layers see, and correct for, the errors of earlier ones. ``stages=1`` measures
   everything once on the dense model (fastest).
4. Layer ratios: ``uniform`` (every layer at ``ratio``) or ``owl`` (OWL: from the outlier ratio
   on the dense model, weighted mean kept at ``ratio``; `masks.owl_ratios`). As in the paper,
   the outlier ratio and the sparsity are per *residual block* (``owl_granularity=block``: the
   Wanda scores of all the block's weights pooled; the blocks come from the dataflow analysis
   of `slimc.passes.skip.blocks`, weights outside any block form their own group); ``layer``
   gives every weight matrix its own ratio, which measured worse on SmolLM2 (README).
5. Masks and updates per layer (`slimc.passes.sparse.masks`), written back in the stored layout.

The result is a dense ONNX model with zeros: ONNX Runtime has no sparse kernels on CPU, so it
runs exactly as fast as before. The report says so, and gives what the zeros are worth for
storage: a bitmask + non-zero values estimate, and the deflate (zip) size of the whole file
before and after.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Sequence
from typing import Literal, Optional

import numpy as np
import onnx_ir as ir

from slimc import progress
from slimc.data import first_batches
from slimc.errors import DataError, PassConfigError
from slimc.onnx_io import copy_model
from slimc.passes.quant import common
from slimc.passes.quant.common import attr
from slimc.passes.sparse import masks
from slimc.pipeline import Pass, PassContext, PassReport

ERROR_COLUMNS = 256  # output columns the reported output errors are estimated on (exact costs K²N)
AUTO_STAGES = 8
FEW_ROWS_PER_INPUT = 4  # SparseGPT calibration rows per input below which its updates overfit (warned)
DENSE_NOTE = ("the ONNX file stays dense (zeros stored): ONNX Runtime has no sparse kernels on CPU, so latency "
              "does not change; the gain is storage (compressed size) and, on GPU, the Triton backend's N:M kernels")


@dataclasses.dataclass
class _Layer:
    """One weight (initializer) to sparsify, with every node that multiplies by it."""

    weight: ir.Value
    ops: list[common.WeightedOp]
    groups: int = 1  # Conv groups

    @property
    def conv(self) -> bool:
        return self.ops[0].node.op_type == "Conv"

    @property
    def label(self) -> str:
        node = self.ops[0].node
        return f"{node.name or node.op_type} ({node.op_type})"

    @property
    def act_axis(self) -> int:
        return 1 if self.conv else -1

    @property
    def in_channels(self) -> int:
        """Input channels per group (the fastest-varying part of K)."""
        shape = self.weight.const_value.shape
        return int(shape[1]) if self.conv else int(shape[self.ops[0].k_axis])

    @property
    def hessian_ok(self) -> bool:
        """Whether XᵀX over the input's channel axis is the layer's Hessian (not so for KxK or grouped Conv)."""
        if not self.conv:
            return True
        shape = self.weight.const_value.shape
        return self.groups == 1 and all(int(d) == 1 for d in shape[2:])

    def canonical(self) -> np.ndarray:
        """The weight as [K, N] float32 (see the module docstring)."""
        w = np.asarray(self.weight.const_value.numpy(), np.float32)
        if self.conv:
            perm = (*range(2, w.ndim), 1, 0)
            return np.transpose(w, perm).reshape(-1, w.shape[0])
        return w.T if self.ops[0].k_axis == 1 else w

    def stored(self, canon: np.ndarray) -> np.ndarray:
        """The inverse of `canonical`, in the initializer's dtype."""
        shape = tuple(int(d) for d in self.weight.const_value.shape)
        dtype = self.weight.const_value.numpy().dtype
        if self.conv:
            spatial = shape[2:]
            w = canon.reshape(*spatial, shape[1], shape[0])
            inverse = np.argsort((*range(2, len(shape)), 1, 0))
            return np.ascontiguousarray(np.transpose(w, inverse)).astype(dtype)
        return np.ascontiguousarray(canon.T if self.ops[0].k_axis == 1 else canon).astype(dtype)

    def row_norms(self, channel_norm: np.ndarray) -> np.ndarray:
        """Per-channel input norms ([C_in]) laid out along canonical K ([K], or [K, N] when grouped)."""
        shape = self.weight.const_value.shape
        spatial = int(np.prod([int(d) for d in shape[2:]])) if self.conv else 1
        if self.groups == 1:
            return np.tile(channel_norm, spatial)
        n = int(shape[0])
        per_group = channel_norm.reshape(self.groups, self.in_channels)  # [g, C/g]
        cols = per_group[np.arange(n) // (n // self.groups)].T  # [C/g, N]
        return np.tile(cols, (spatial, 1))


@dataclasses.dataclass
class Sparsify(Pass):
    """Zero weights of MatMul/Gemm/Conv: unstructured or N:M, by magnitude, Wanda or SparseGPT, uniform or OWL ratios."""

    ratio: Optional[float] = None
    pattern: str = "unstructured"
    method: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    layerwise: Literal["uniform", "owl"] = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    owl_granularity: Literal["block", "layer"] = "block"
    exclude: Optional[list[str]] = None
    stages: Optional[int] = None
    damp: float = 0.01
    block: int = masks.SPARSEGPT_BLOCK
    calibration_batches: int = 16
    measure_zip: bool = True

    name = "sparsify"
    exact = False
    description = "weight sparsity (unstructured or N:M) by magnitude, Wanda or SparseGPT, uniform or OWL layer ratios"

    def __post_init__(self) -> None:
        super().__init__()
        self.nm = self._pattern()
        if self.ratio is not None and (isinstance(self.ratio, bool) or not 0.0 <= float(self.ratio) < 1.0):
            raise PassConfigError(f"sparsify: ratio={self.ratio} is out of range; use a fraction in [0, 1), e.g. ratio=0.5 zeroes half the weights.")
        if self.nm is not None:
            implied = 1 - self.nm[0] / self.nm[1]
            if self.ratio is not None and abs(self.ratio - implied) > 1e-9:
                raise PassConfigError(
                    f"sparsify: pattern={self.pattern} keeps {self.nm[0]} of every {self.nm[1]} weights, i.e. ratio={implied:g}; "
                    f"ratio={self.ratio} contradicts it. Leave ratio out with an N:M pattern.")
            if self.layerwise == "owl":
                raise PassConfigError("sparsify: layerwise=owl varies the ratio per layer, which an N:M pattern fixes; "
                                      "use pattern=unstructured with owl.")
        self.target = (1 - self.nm[0] / self.nm[1]) if self.nm is not None else (0.5 if self.ratio is None else float(self.ratio))
        if self.method not in ("magnitude", "wanda", "sparsegpt"):
            raise PassConfigError(f"sparsify: method={self.method!r} is unknown; use magnitude (no data), wanda or sparsegpt.")
        if self.layerwise not in ("uniform", "owl"):
            raise PassConfigError(f"sparsify: layerwise={self.layerwise!r} is unknown; use uniform or owl.")
        if not 0.0 <= self.owl_lambda < 0.5:
            raise PassConfigError(f"sparsify: owl_lambda={self.owl_lambda} is out of range; use e.g. 0.08 (ratios vary by ±lambda).")
        if self.owl_granularity not in ("block", "layer"):
            raise PassConfigError(f"sparsify: owl_granularity={self.owl_granularity!r} is unknown; use block (one ratio per "
                                  "residual block, as the OWL paper) or layer (one per weight matrix).")
        if self.owl_m <= 0:
            raise PassConfigError(f"sparsify: owl_m={self.owl_m} must be > 0 (outliers are scores above owl_m times the layer mean).")
        if self.stages is not None and (isinstance(self.stages, bool) or self.stages < 1):
            raise PassConfigError("sparsify: stages must be >= 1 (1 = statistics once on the dense model), or none for automatic.")
        if self.block < 1 or (self.nm is not None and self.block % self.nm[1]):
            raise PassConfigError(f"sparsify: block={self.block} must be a positive multiple of M ({self.nm[1] if self.nm else 1}).")
        if not 0.0 <= self.damp < 10.0:
            raise PassConfigError(f"sparsify: damp={self.damp} is out of range; use a small fraction such as damp=0.01.")
        if self.calibration_batches < 1:
            raise PassConfigError("sparsify: calibration_batches must be >= 1.")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]

    def _pattern(self) -> tuple[int, int] | None:
        text = str(self.pattern).strip().lower()
        if text == "unstructured":
            return None
        parts = text.split(":")
        if len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1]) <= 64:
            return int(parts[0]), int(parts[1])
        raise PassConfigError(
            f"sparsify: pattern={self.pattern!r} is not understood; use unstructured, or N:M such as 2:4 or 4:8 "
            "(keep N of every M consecutive weights along the input dimension; 2:4 is what sparse tensor cores run).")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude" or self.layerwise == "owl"

    # ------------------------------------------------------------ targets

    def _layers(self, model: ir.Model) -> tuple[list[_Layer], list[tuple[str, str]]]:
        left: list[tuple[str, str]] = []
        ops = {id(op.node): op for op in common.weighted_ops(model)}
        by_weight: dict[int, _Layer] = {}
        for node in model.graph:
            if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx"):
                continue
            label = f"{node.name or node.op_type} ({node.op_type})"
            op = ops.get(id(node))
            if op is None:
                left.append((label, "its weight is computed in the graph (activation x activation, e.g. attention, or a "
                                    "tied embedding through a Transpose), not a constant float initializer"))
                continue
            reason = self._refusal(node, op)
            if reason:
                left.append((label, reason))
                continue
            layer = by_weight.setdefault(id(op.weight), _Layer(op.weight, [], int(attr(node, "group", 1)) if node.op_type == "Conv" else 1))
            layer.ops.append(op)
        layers = []
        for layer in by_weight.values():
            if self.nm is not None and layer.in_channels % self.nm[1]:
                left.append((layer.label, f"{layer.in_channels} input channels are not a multiple of M={self.nm[1]}: no {self.pattern} layout"))
            elif layer.weight.const_value.size < 2:
                left.append((layer.label, "a single weight"))
            else:
                layers.append(layer)
        return layers, left

    def _refusal(self, node: ir.Node, op: common.WeightedOp) -> str:
        if op.weight.is_graph_input():
            return "the weight is also a graph input (a caller may replace it at run time)"
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            return "Gemm with transA=1"
        if common.node_matches(node, self.exclude):
            return "matches exclude="
        return ""

    # ------------------------------------------------------------ statistics

    def _levels(self, model: ir.Model, layers: Sequence[_Layer]) -> dict[int, int]:
        """Dependency level of each layer (keyed by id(layer)): 1 + the deepest layer upstream of its input."""
        owner = {id(op.node): layer for layer in layers for op in layer.ops}
        level: dict[int, int] = {}  # id(value) -> level
        result: dict[int, int] = {}
        for node in model.graph:
            depth = max((level.get(id(v), 0) for v in node.inputs if v is not None), default=0)
            layer = owner.get(id(node))
            if layer is not None:
                depth += 1
                result[id(layer)] = min(result.get(id(layer), depth), depth)
            for out in node.outputs:
                level[id(out)] = depth
        return result

    def _stages(self, model: ir.Model, layers: list[_Layer]) -> list[list[_Layer]]:
        if not self.needs_data or self.method == "magnitude":
            return [layers]
        levels = self._levels(model, layers)
        distinct = sorted(set(levels.values()))
        count = min(len(distinct), self.stages or AUTO_STAGES)
        chunks = np.array_split(np.asarray(distinct), count)
        stage_of = {int(lv): s for s, chunk in enumerate(chunks) for lv in chunk}
        stages: list[list[_Layer]] = [[] for _ in range(count)]
        for layer in layers:
            stages[stage_of[levels[id(layer)]]].append(layer)
        return [s for s in stages if s]

    def _statistics(self, model: ir.Model, layers: Sequence[_Layer], ctx: PassContext, gram: bool, desc: str) -> dict[int, dict]:
        """{id(layer): {"norm": [C_in], "gram": [C, C] or None, "rows": n}} from one calibration run."""
        from slimc.calibrate import StatRequest, collect

        want: dict[tuple[str, int], bool] = {}
        for layer in layers:
            for op in layer.ops:
                key = (op.node.inputs[0].name, layer.act_axis)
                want[key] = want.get(key, False) or (gram and layer.hessian_ok)
        requests = {key: StatRequest(key[0], key[1], gram=g) for key, g in want.items()}
        calib = ctx.calibration
        batches = first_batches(calib, self.calibration_batches)
        stats = collect(model, list(requests.values()), batches, desc=desc)
        out = {}
        for layer in layers:
            parts = [stats[requests[(op.node.inputs[0].name, layer.act_axis)]] for op in layer.ops]
            entry = {"norm": np.sqrt(sum(p.sumsq for p in parts)), "gram": None, "rows": sum(p.count for p in parts)}
            if gram and layer.hessian_ok:
                entry["gram"] = sum(p.gram for p in parts)
            out[id(layer)] = entry
        return out

    # ------------------------------------------------------------ one layer

    def _sparsify(self, layer: _Layer, ratio: float, stats: dict | None) -> tuple[np.ndarray, dict]:
        w = layer.canonical()
        info: dict = {}
        norms = layer.row_norms(stats["norm"]) if stats is not None else None
        method = self.method
        if method == "sparsegpt" and (stats is None or stats["gram"] is None):
            method = "wanda"
            info["fallback"] = "wanda: SparseGPT needs the layer's im2col Hessian (KxK or grouped Conv)"
        h = None
        if method == "sparsegpt":
            from slimc.passes.quant.gptq import hessian

            h = hessian(stats["gram"], stats["rows"])
            new, sg = masks.sparsegpt(w, h, ratio, self.nm, self.damp, self.block)
            info["calibration_rows"] = int(stats["rows"])
            if sg.dead_inputs:
                info["dead_inputs"] = sg.dead_inputs
            if sg.damp != self.damp:
                info["damp_used"] = sg.damp
        elif method == "wanda":
            new = w * masks.mask(masks.wanda_score(w, norms), ratio, self.nm, per_row=True)
        else:
            new = w * masks.mask(np.abs(w), ratio, self.nm, per_row=False)
        info["method"] = method
        if h is not None or norms is not None:
            cols = slice(None)
            if w.shape[1] > ERROR_COLUMNS:
                cols = np.linspace(0, w.shape[1] - 1, ERROR_COLUMNS).round().astype(int)
            n_cols = norms if norms is None or norms.ndim == 1 else norms[:, cols]
            info["output_error"] = round(masks.output_error(w[:, cols], new[:, cols], h, None if h is not None else n_cols), 6)
            if h is None:
                info["output_error_estimate"] = "diagonal (input norms only)"
        return new, info

    # ------------------------------------------------------------ the pass

    def apply(self, model: ir.Model, ctx: PassContext) -> PassReport:
        start = time.perf_counter()
        common.refuse_quantized(model, self.name)
        if self.needs_data and (ctx.calibration is None or len(ctx.calibration) == 0):
            what = f"method={self.method}" if self.method != "magnitude" else "layerwise=owl"
            raise DataError(
                f"sparsify: {what} needs calibration data (the input statistics of every layer). Pass calibration= "
                "to slimc.compile() or --calib on the command line, or use sparsify(method=magnitude).")
        work = copy_model(model)
        layers, left = self._layers(work)
        if not layers:
            return PassReport(name=self.name, modified=False, summary="nothing to sparsify: no MatMul/Gemm/Conv with a constant float weight qualifies",
                              details={"layers": []}, left_alone=left, seconds=time.perf_counter() - start)
        ratios = {id(layer): self.target for layer in layers}
        dense_stats: dict[int, dict] = {}
        owl_info = None
        if self.layerwise == "owl":
            dense_stats = self._statistics(work, layers, ctx, gram=False, desc="sparsify: OWL outlier statistics")
            ratios, owl_info = self._owl(work, layers, dense_stats)
        stages = self._stages(work, layers)
        results = []
        bar = progress.bar(range(len(layers)), f"sparsify {self.method} {self.pattern}", total=len(layers), unit="layer")
        ticks = iter(bar)
        for index, stage in enumerate(stages):
            stats: dict[int, dict] = {}
            if self.method != "magnitude":
                reuse = len(stages) == 1 and self.method == "wanda" and dense_stats
                stats = dense_stats if reuse else self._statistics(
                    work, stage, ctx, gram=self.method == "sparsegpt", desc=f"sparsify statistics (stage {index + 1}/{len(stages)})")
            for layer in stage:
                new, info = self._sparsify(layer, ratios[id(layer)], stats.get(id(layer)))
                stored = layer.stored(new)
                layer.weight.const_value = ir.tensor(stored, name=layer.weight.name)
                results.append(self._layer_report(layer, ratios[id(layer)], new, stored, info, index))
                next(ticks, None)
        for _ in ticks:
            pass
        details = self._details(results, len(stages), owl_info)
        if self.measure_zip:
            details["zip_bytes_before"], details["zip_bytes_after"] = _zip_size(model), _zip_size(work)
        common.replace_in_place(model, work)
        return PassReport(name=self.name, modified=True, summary=self._summary(details), details=details,
                          left_alone=left + [("latency", DENSE_NOTE)], seconds=time.perf_counter() - start)

    def _owl(self, model: ir.Model, layers: Sequence[_Layer], stats: dict[int, dict]) -> tuple[dict[int, float], dict]:
        """OWL ratios per group: a residual block's weights (the paper's granularity) or each weight."""
        groups = self._owl_groups(model, layers) if self.owl_granularity == "block" else {
            layer.weight.name: [layer] for layer in layers}
        scores = {label: np.concatenate([masks.wanda_score(layer.canonical(), layer.row_norms(stats[id(layer)]["norm"])).ravel()
                                         for layer in members]) for label, members in groups.items()}
        outliers = np.array([masks.outlier_ratio(scores[label], self.owl_m) for label in groups])
        sizes = np.array([sum(layer.weight.const_value.size for layer in members) for members in groups.values()], np.float64)
        r = masks.owl_ratios(outliers, sizes, self.target, self.owl_lambda)
        ratios = {id(layer): float(x) for x, members in zip(r, groups.values()) for layer in members}
        info = {"m": self.owl_m, "lambda": self.owl_lambda, "granularity": self.owl_granularity, "groups": len(groups),
                "outlier_ratio": {label: round(float(o), 6) for label, o in zip(groups, outliers)},
                "group_ratio": {label: round(float(x), 6) for label, x in zip(groups, r)}}
        return ratios, info

    @staticmethod
    def _owl_groups(model: ir.Model, layers: Sequence[_Layer]) -> dict[str, list[_Layer]]:
        """Weights grouped by the residual block (`slimc.passes.skip.blocks`) their first node is in;
        a weight in no block (a classifier, an LM head) is a group of its own."""
        import onnx_ir.passes.common as ir_common

        from slimc.passes.skip import blocks

        ir_common.TopologicalSortPass()(model)
        units = blocks.analyse(model).units("block")
        owner = {id(node): unit.label or f"block {k}" for k, unit in enumerate(units) for node in unit.nodes}
        groups: dict[str, list[_Layer]] = {}
        for layer in layers:
            label = owner.get(id(layer.ops[0].node), layer.weight.name)
            groups.setdefault(label, []).append(layer)
        return groups

    def _layer_report(self, layer: _Layer, ratio: float, new: np.ndarray, stored: np.ndarray, info: dict, stage: int) -> dict:
        entry = {
            "weight": layer.weight.name, "nodes": [op.node.name for op in layer.ops], "shape": list(stored.shape),
            "K": int(new.shape[0]), "N": int(new.shape[1]), "ratio": round(ratio, 6),
            "sparsity": round(float(np.mean(stored == 0)), 6), "params": int(stored.size),
            "zeros": int(stored.size - np.count_nonzero(stored)), "stage": stage + 1,
            "dense_bytes": int(stored.nbytes), "sparse_bytes": masks.compressed_bytes(stored), **info,
        }
        if self.nm is not None:
            entry["nm_valid"] = masks.nm_valid(new, *self.nm)
        return entry

    def _details(self, results: list[dict], stages: int, owl: dict | None) -> dict:
        params = sum(r["params"] for r in results)
        zeros = sum(r["zeros"] for r in results)
        details = {
            "method": self.method, "pattern": self.pattern, "layerwise": self.layerwise, "target_ratio": self.target,
            "sparsity": zeros / params if params else 0.0,
            "mean_layer_sparsity": float(np.mean([r["sparsity"] for r in results])),
            "params": params, "zeros": zeros, "layers_sparsified": len(results), "stages": stages,
            "dense_bytes": sum(r["dense_bytes"] for r in results), "sparse_bytes": sum(r["sparse_bytes"] for r in results),
            "latency": DENSE_NOTE, "layers": results,
        }
        if self.nm is not None:
            details["nm_valid"] = all(r["nm_valid"] for r in results)
        fallbacks = [r["weight"] for r in results if "fallback" in r]
        if fallbacks:
            details["sparsegpt_fallback_to_wanda"] = fallbacks
        few = [r["weight"] for r in results if r.get("calibration_rows", FEW_ROWS_PER_INPUT * r["K"]) < FEW_ROWS_PER_INPUT * r["K"]]
        if few:  # measured on SmolLM2: 2k tokens made held-out errors worse than Wanda's, 8k better
            details["warning"] = (f"SparseGPT fits its weight updates to the calibration tokens; {len(few)} layer(s) saw fewer "
                                  f"than {FEW_ROWS_PER_INPUT}x their input width, where held-out error can exceed Wanda's. "
                                  "Give more calibration data (calibration_batches= and a longer --calib).")
        errors = [r["output_error"] for r in results if "output_error" in r]
        if errors:
            details["mean_output_error"] = float(np.mean(errors))
        if owl is not None:
            ratios = [r["ratio"] for r in results]
            details["owl"] = {**owl, "min_ratio": min(ratios), "max_ratio": max(ratios)}
        return details

    def _summary(self, d: dict) -> str:
        text = (f"{d['layers_sparsified']} weights -> {d['sparsity']:.1%} zeros ({self.method}, {self.pattern}"
                f"{', OWL ratios ' + format(d['owl']['min_ratio'], '.2f') + '-' + format(d['owl']['max_ratio'], '.2f') if 'owl' in d else ''}"
                f"{', ' + str(d['stages']) + ' calibration stage(s)' if self.method != 'magnitude' else ''})")
        if "nm_valid" in d:
            text += f"; {self.pattern} layout {'valid in every layer' if d['nm_valid'] else 'INVALID'}"
        text += f"; sparse storage estimate {_mb(d['dense_bytes'])} -> {_mb(d['sparse_bytes'])} (bitmask + values)"
        if "zip_bytes_after" in d and d["zip_bytes_before"] and d["zip_bytes_after"]:
            text += f"; zipped file {_mb(d['zip_bytes_before'])} -> {_mb(d['zip_bytes_after'])}"
        if "mean_output_error" in d:
            text += f"; mean relative output error {d['mean_output_error']:.2e} (calibration data)"
        if "warning" in d:
            text += f"; WARNING: {d['warning']}"
        return text + "; dense file, same ORT CPU latency"


def _zip_size(model: ir.Model, level: int = 1) -> int | None:
    """Deflate size of the serialized model (None above protobuf's 2 GB limit).

    Level 1, not zip's default 6: on float weights 6 is 4x slower (about 4 MB/s on a busy 2-core
    machine, minutes for a 540 MB model) for a file only ~5% smaller.
    """
    from slimc.onnx_io import PROTOBUF_LIMIT, model_proto, tensor_bytes

    if tensor_bytes(model) >= PROTOBUF_LIMIT:  # decided before external weights are read into memory
        return None
    proto = model_proto(model)
    if proto.ByteSize() >= PROTOBUF_LIMIT:
        return None
    data = proto.SerializeToString()
    del proto
    comp, size = zlib.compressobj(level), 0
    view = memoryview(data)
    for i in range(0, len(data), 1 << 24):
        size += len(comp.compress(view[i:i + (1 << 24)]))
    return size + len(comp.flush())


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
