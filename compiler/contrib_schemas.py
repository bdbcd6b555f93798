"""ONNX schemas for ONNX Runtime's contrib ops that live in the default domain, so `onnx.checker` accepts them.

ONNX Runtime registers ``SimplifiedLayerNormalization`` (RMSNorm, written by the `fuse` pass and
by ONNX Runtime GenAI's model builder) in the default ONNX domain, where the ONNX checker knows
only standard ops and rejects it ("No Op registered"). Registering its schema (inputs, outputs,
types and attributes as ONNX Runtime declares them, no shape inference) lets the full checker
validate everything else in such a model. ``com.microsoft`` ops need nothing: the checker does
not check custom domains. `register` is idempotent and process-wide; `slimc.verify` calls it.
"""

from __future__ import annotations

from onnx import defs, helper

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]


def _simplified_layer_norm() -> defs.OpSchema:
    param, optional = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption.Optional
    return defs.OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        doc="ONNX Runtime contrib op (default domain): RMSNorm over the axes from `axis` on.",
        inputs=[param("X", "T"), param("scale", "V")],
        outputs=[param("Y", "V"), param("inv_std_var", "U", param_option=optional)],
        type_constraints=[("T", _FLOATS, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", _FLOATS, "")],
        attributes=[defs.OpSchema.Attribute("axis", helper.make_attribute("axis", -1), ""),
                    defs.OpSchema.Attribute("epsilon", helper.make_attribute("epsilon", 1e-5), ""),
                    defs.OpSchema.Attribute("stash_type", helper.make_attribute("stash_type", 1), "")],
    )


def register() -> None:
    """Make the ONNX checker know the default-domain ORT contrib ops (once per process)."""
    if not defs.has("SimplifiedLayerNormalization", ""):
        defs.register_schema(_simplified_layer_norm())
