"""Exactness of `fuse` on graphs that quantize activations at run time.

`fuse` is exact: the fused ops compute the same float32 sums, up to a few ulps of reassociation.
But a graph that rounds activations to int8 while it runs (``MatMulNBits`` at
``accuracy_level=4``, dynamic int8) turns an ulp of difference into a whole quantization step
whenever a value sits on a rounding boundary, so comparing outputs after such a graph measures
the int8 rounding, not the fusion. For ``MatMulNBits`` the pass checks itself the way the op is
defined: both graphs run with every MatMulNBits at ``accuracy_level=0`` (dequantize, multiply in
float) must agree within the exact tolerance; the pipeline then verifies the deployed graphs as
a lossy pass (NaN/inf and fidelity). Dynamic int8 cannot be switched off, so there the
comparison is not made and the report says so.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from slimc import workdir
from slimc.errors import DataError, VerificationError
from slimc.onnx_io import copy_model, save_onnx
from slimc.passes.quant import common
from slimc.passes.quant.common import attr

DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat"})


def rounding_ops(model: ir.Model) -> tuple[int, list[str]]:
    """(MatMulNBits nodes that quantize activations, dynamic int8 op types) of ``model``."""
    nbits = sum(1 for n in model.graph.all_nodes() if n.op_type == "MatMulNBits" and attr(n, "accuracy_level", 0) != 0)
    return nbits, sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in DYNAMIC_OPS})


def check(before: ir.Model, after: ir.Model, ctx) -> str | None:
    """None when the pipeline can verify the fusion exactly; otherwise what was checked instead (raises on a mismatch)."""
    from slimc.backends import onnxruntime as ort_backend
    from slimc.verify import outputs_match

    nbits, dynamic = rounding_ops(before)
    if not nbits and not dynamic:
        return None
    if dynamic:
        return (f"not compared exactly: the graph quantizes activations at run time ({', '.join(dynamic)}), which turns "
                "ulp differences into int8 steps; verified for NaN/inf, fidelity in the receipt")
    try:
        feed = common.latency_feed(ctx, before)
    except DataError:
        return ("not compared exactly: MatMulNBits at accuracy_level=4 rounds activations to int8 and no input was "
                "available to check the fusion at accuracy_level=0")
    outputs = []
    with workdir.new("fuse-check") as tmp:
        for label, model in (("before", before), ("after", after)):
            exact = copy_model(model)
            for node in exact.graph.all_nodes():
                if node.op_type == "MatMulNBits":
                    node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
            path = Path(tmp) / f"{label}.onnx"
            save_onnx(exact, path)
            session = ort_backend.create_session(path)
            outputs.append(ort_backend.run(session, feed))
            names = [o.name for o in session.get_outputs()]
            del session
    diff = outputs_match([outputs[0]], [outputs[1]], names)
    if not diff.ok:
        raise VerificationError(
            f"fuse changed output '{diff.output}' by {diff.max_abs:.3g} ({diff.max_scaled:.1f}x the exact tolerance) "
            "with MatMulNBits at accuracy_level=0. This is a bug in the pass; please report it.")
    return (f"exact with MatMulNBits at accuracy_level=0 (max abs diff {diff.max_abs:.2g}); the deployed graph "
            f"(accuracy_level=4 on {nbits} node(s)) rounds activations to int8, so it is verified as a lossy pass")
