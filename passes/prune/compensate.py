"""Compensation: make a consumer's output after pruning closer to its output before.

Per consumer (a weight contracting pruned channels), with X the consumer's input channels over
the calibration data, S the kept and R the removed channels:

- ``bias`` (FLAP): the removed channels' mean contribution moves into the bias,
  ``b += W_R · mean(X_R)``. Exact in expectation; for a Conv the mean is spread over the
  kernel, which is exact away from zero-padded borders.
- ``least_squares``: refit the kept weights and the bias to the original output,
  ``argmin E‖X_S W'_S + b' − X W − b‖²``, from the statistics XᵀX, ΣX and the row count
  (normal equations with 1% diagonal damping). MatMul and Gemm consumers only; Conv consumers
  fall back to ``bias`` (patch statistics would be needed), and the report says so.

Compensation runs on the unpruned weights, before `apply.apply_plan` slices them; a bias the
consumer lacks is created, and registered as a slot of the graph so that pruning its own
output channels slices it too.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimc.passes.prune.apply import _new_const, set_constant
from slimc.passes.prune.graph import Contraction, DependencyGraph
from slimc.passes.prune.importance import _stats_for


def compensate(g: DependencyGraph, plan: dict[int, np.ndarray], stats: dict, method: str) -> tuple[int, list[tuple[str, str]]]:
    """Compensate every consumer that loses channels under ``plan``; returns (count, left alone)."""
    done, left, count = set(), [], 0
    plan = {g.atoms.find(k): v for k, v in plan.items()}
    for c in g.contractions:
        if id(c.node) in done:
            continue
        keep = g.atoms.keep_mask(g.slots[c.weight][c.weight_axis], plan)
        if keep is None or keep.all():
            continue
        done.add(id(c.node))
        where = c.node.name or c.node.op_type
        st = _stats_for(stats, c)
        if st is None:
            left.append((where, "no activation statistics for this consumer (grouped convolution)"))
            continue
        if c.node.op_type == "MatMul" and c.act is not c.node.inputs[0]:
            left.append((where, "the weight is the left operand of MatMul; no per-output bias to compensate into"))
            continue
        w = g.array(c.weight).astype(np.float64)
        shared = len(list(c.weight.uses())) > 1  # a tied weight cannot be refit for one of its uses
        if method == "least_squares" and c.node.op_type in ("MatMul", "Gemm") and w.ndim == 2 and st.gram is not None and not shared:
            new_w, delta = _least_squares(w, c.weight_axis, keep, st)
            set_constant(c.weight, new_w.astype(g.array(c.weight).dtype))
            g.forget(c.weight)
        else:
            if method == "least_squares":
                why = "the weight is tied to another layer" if shared else "least squares needs a 2-D MatMul/Gemm weight"
                left.append((where, f"{c.node.op_type}: {why}; bias compensation used"))
            delta = _bias_delta(w, c, ~keep, st.mean)
        _add_bias(g, c, delta)
        count += 1
    return count, left


def _bias_delta(w: np.ndarray, c: Contraction, removed: np.ndarray, mean: np.ndarray) -> np.ndarray:
    part = np.tensordot(np.compress(removed, w, axis=c.weight_axis), mean[removed], axes=([c.weight_axis], [0]))
    out_axis = c.out_axis - (1 if c.out_axis > c.weight_axis else 0)
    other = tuple(i for i in range(part.ndim) if i != out_axis)
    return part.sum(axis=other) if other else part


def _least_squares(w: np.ndarray, axis: int, keep: np.ndarray, st) -> tuple[np.ndarray, np.ndarray]:
    wk = w if axis == 0 else w.T  # [K, N]
    s_idx, r_idx = np.flatnonzero(keep), np.flatnonzero(~keep)
    gram, total = st.gram, st.sum
    n = len(s_idx)
    m = np.empty((n + 1, n + 1))
    m[:n, :n] = gram[np.ix_(s_idx, s_idx)]
    m[:n, n] = m[n, :n] = total[s_idx]
    m[n, n] = st.count
    m[np.arange(n), np.arange(n)] += 0.01 * max(float(np.mean(np.diag(gram)[s_idx])), 1e-12)
    rhs = np.vstack([gram[np.ix_(s_idx, r_idx)] @ wk[r_idx], total[r_idx][None, :] @ wk[r_idx]])
    try:
        sol = np.linalg.solve(m, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(m, rhs, rcond=None)[0]
    out = wk.copy()
    out[s_idx] += sol[:n]
    return (out if axis == 0 else out.T), sol[n]


def _matmul_bias(c: Contraction) -> ir.Value | None:
    out = c.node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    n = c.weight.const_value.shape[c.out_axis]
    if other is None or other.const_value is None or other.const_value.size != n or other.const_value.shape[-1] != n:
        return None
    return other


def _add_bias(g: DependencyGraph, c: Contraction, delta: np.ndarray) -> None:
    node, out = c.node, c.node.outputs[0]
    dtype = g.array(c.weight).dtype
    if node.op_type == "MatMul":
        bias = _matmul_bias(c)
        if bias is not None:
            old = np.asarray(bias.const_value.numpy())
            set_constant(bias, (old + delta.reshape(old.shape)).astype(old.dtype))
            g.forget(bias)
            return
        value = _new_const(g.graph, f"{node.name}_bias", delta.astype(dtype))
        g.slots[value] = [g.slots[out][-1]]
        add = ir.Node("", "Add", [out, value], name=f"{node.name}_compensation")
        add.outputs[0].shape, add.outputs[0].type = out.shape, out.type
        g.slots[add.outputs[0]] = list(g.slots[out])
        for use in list(out.uses()):
            if use.node is not add:
                use.node.replace_input_with(use.idx, add.outputs[0])
        if out.is_graph_output():  # the biased value takes over the output's place and name
            index = list(g.graph.outputs).index(out)
            name, out.name = out.name, f"{out.name}__before_bias"
            add.outputs[0].name = name
            g.graph.outputs[index] = add.outputs[0]
        g.graph.insert_after(node, add)
        return
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2]
        old = np.asarray(bias.const_value.numpy())
        set_constant(bias, (old + delta.reshape(old.shape) if old.size == delta.size else old + delta).astype(old.dtype))
        g.forget(bias)
        return
    value = _new_const(g.graph, f"{node.name}_bias", delta.astype(dtype))
    g.slots[value] = [g.slots[out][1 if node.op_type != "Gemm" else -1]]
    node.resize_inputs(3)
    node.replace_input_with(2, value)
