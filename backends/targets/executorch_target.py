"""The ``executorch`` target: an ExecuTorch program (``.pte``) with XNNPACK delegation, run in
ExecuTorch's runtime.

The compressed ONNX model is lowered to torch by the triton backend's lowering
(`slimc.backends.triton.lower`), exported with ``torch.export`` and lowered with
``to_edge_transform_and_lower(XnnpackPartitioner())``: XNNPACK takes the float ops it supports,
ExecuTorch's portable kernels run the rest. 2:4-sparse matmuls are exported as their
decomposed reference math on the compressed weights.

Static int8 (QDQ) is exported in PT2E's form (``decomposed("pt2e")``): ``quantized_decomposed``
quantize/dequantize per tensor around float conv/linear with symmetric per-channel int8 weights,
uint8 activations rewritten as the same values in int8, float biases, one quantize per tensor and
a dequantize per consumer. XNNPACK's partitioner fuses these into its int8 kernels. ``int8``
builds static QDQ for this target (``--target executorch``), as for ort-mobile.

Measured (ExecuTorch 1.5.1, this CPU): written as plain float math instead, int8 ran in the
portable kernels, 280x slower than dense on EfficientNet-Lite0 (1364 ms vs 4.9 ms). The PT2E form
first computed wrong classes on EfficientNet-Lite0 (top-1 0.000) for two reasons, both fixed in
the lowering and tested: a conv bias computed at run time from ORT's int32 bias (XNNPACK's first
conv then gave one value everywhere), and a residual input quantized twice, once for the Add and
once inside a kernel-lowered 1x1 conv. A third fix made it fast: with a reshape on either side of
a quantized linear XNNPACK left every linear float in the portable kernels. Now EfficientNet-Lite0
int8 runs 2.8x faster than the dense .pte, MiniLM 2.1x (benchmarks/targets). Dynamic int8
(MatMulInteger) and int4 (MatMulNBits) have no such form here and are refused.

ExecuTorch plans memory ahead of time, so every input shape must be pinned (``--static-shapes``),
as for ncnn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from slimc.backends.targets import INTEGER_OPS, Runner, Target, TargetError, dynamic_inputs, graph_inputs, op_types, ort_only_ops
from slimc.errors import first_line

STATIC_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


def lower_to_edge(model):
    """The IR through the torch backend, ``torch.export`` and XNNPACK partitioning: an ExecuTorch
    ``EdgeProgramManager`` (``.exported_program()`` shows what XNNPACK took)."""
    import executorch.kernels.quantized  # noqa: F401 - out variants of quantized_decomposed for what XNNPACK leaves
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from slimc import data
    from slimc.backends.triton import module as torch_backend
    from slimc.model import infer_input_specs

    gm = torch_backend.to_torch(model, device="cpu", pt2e=True)
    example = next(iter(data.synthetic(infer_input_specs(model), n_batches=1, seed=0)))
    args = tuple(torch_backend.feed(gm, example, "cpu"))
    try:
        with torch_backend.decomposed("pt2e"), torch.no_grad():
            program = _without_unused_state(torch.export.export(gm, args, strict=False))
            return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    except Exception as exc:  # e.g. an XNNPACK pass that fails on this graph: named, nothing written
        cause = exc.__cause__ or exc
        raise TargetError(f"target 'executorch': lowering failed: {type(exc).__name__}: {first_line(exc, 400)}"
                          + (f" (caused by {type(cause).__name__}: {first_line(cause, 200)})" if cause is not exc else "")
                          ) from None


def _without_unused_state(program):
    """``program`` without the parameters, buffers and constants no node reads.

    The lowered module keeps what its kernels read beside what the pt2e form reads (a 1x1 conv's int8
    weight as [C_in, C_out] for the W8A8 kernel and as [C_out, C_in, 1, 1] for PT2E); ExecuTorch drops
    unused parameters only, so the unused int8 buffers went into the .pte (EfficientNet-Lite0: 9.4 MB
    where the int8 ONNX is 5.2 MB)."""
    from torch.export.graph_signature import InputKind

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    state = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    unused = [spec for spec in program.graph_signature.input_specs
              if spec.kind in state and not placeholders[spec.arg.name].users]
    for spec in unused:
        program.graph_signature.input_specs.remove(spec)
        program.state_dict.pop(spec.target, None)
        program.constants.pop(spec.target, None)
        program.graph.erase_node(placeholders[spec.arg.name])
    program.graph_module.recompile()
    return program


class ExecuTorchTarget(Target):
    name = "executorch"
    suffix = ".pte"
    extra = "executorch"
    modules = ("executorch", "torch")

    def unsupported(self, proto: onnx.ModelProto) -> dict[str, str]:
        from slimc.backends.triton.lower import supported_ops

        known = set(supported_ops())
        ops = op_types(proto)
        bad = {op: "no torch lowering in slimc (the ExecuTorch target goes through the torch backend)"
               for op in ops if op not in known}
        bad.update({op: "dynamic int8 / int4 would run in ExecuTorch's portable kernels, not XNNPACK (measured 7x slower "
                        "than dense on MiniLM as float math); use int8(mode=static), which is exported in PT2E's form "
                        "and runs in XNNPACK's int8 kernels, or quantize the float model with ExecuTorch's XNNPACK quantizer"
                    for op in ops if op in INTEGER_OPS - STATIC_QDQ})
        bad.update(dynamic_inputs(proto, "ExecuTorch plans memory for one shape"))
        bad.update(ort_only_ops(proto))
        return bad

    def convert(self, onnx_path: Path, out_dir: Path, stem: str) -> list[Path]:
        from slimc.onnx_io import load_onnx

        edge = lower_to_edge(load_onnx(onnx_path))
        try:
            program = edge.to_executorch()
        except Exception as exc:
            raise TargetError(f"target 'executorch': {type(exc).__name__}: {first_line(exc, 600)}") from None
        pte = out_dir / f"{stem}.pte"
        pte.write_bytes(program.buffer)
        return [pte]

    def load(self, files: Sequence[Path], threads: int | None, source: onnx.ModelProto) -> Runner:
        import executorch
        import executorch.kernels.quantized  # noqa: F401 - the quantized ops XNNPACK leaves to the portable kernels
        import torch
        from executorch.runtime import Runtime

        from slimc.backends.triton.ops import DTYPES

        try:
            method = Runtime.get().load_program(str(files[0])).load_method("forward")
        except Exception as exc:
            raise TargetError(f"target 'executorch': the runtime cannot load the program: {first_line(exc, 600)}") from None
        inputs = [(name, DTYPES.get(elem, torch.float32)) for name, _, elem in graph_inputs(source)]

        def feed(batch):
            missing = [name for name, _ in inputs if name not in batch]
            if missing:
                raise TargetError(f"target 'executorch': the program takes {', '.join(missing)}, which the data does not give.")
            return [torch.as_tensor(np.asarray(batch[name], order="C")).to(dtype) for name, dtype in inputs]

        def run(batch):
            return [o.numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in method.execute(feed(batch))]

        def bind(batch):
            ready = feed(batch)
            return lambda: method.execute(ready)

        return Runner(run=run, bind=bind, runtime=f"executorch {getattr(executorch, '__version__', '1.x')} (XNNPACK)")
