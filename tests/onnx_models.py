"""Small ONNX models built with onnx.helper, for fast tests that need no PyTorch export, and the
helpers tests share to run IR models and compare their outputs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def tiny_cnn(seed: int = 0, *, junk: bool = True, batch: str | int = "batch") -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(3->4, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(4->5) -> logits.

    With ``junk``, adds what `cleanup` must remove, exactly once each:
    2 Identity nodes, 1 dead node (Neg whose output is unused), 1 duplicate subexpression
    (a second identical Relu feeding an Add with the first... folded away by CSE),
    1 constant-foldable node (Add of two constants), 1 unused initializer, 1 duplicate initializer.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    b = rng.standard_normal(4).astype(np.float32) * 0.1
    fc = rng.standard_normal((5, 4)).astype(np.float32) * 0.5
    fc_b = rng.standard_normal(5).astype(np.float32) * 0.1
    inits = [_init("conv.w", w), _init("conv.b", b), _init("fc.w", fc), _init("fc.b", fc_b)]
    nodes = [helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["conv"], pads=[1, 1, 1, 1], name="conv")]
    if junk:
        half = np.full((1,), 0.5, np.float32)
        inits += [
            _init("unused.w", rng.standard_normal((16, 16)).astype(np.float32)),
            _init("c.half", half), _init("c.half_dup", half.copy()),
        ]
        nodes += [
            helper.make_node("Identity", ["conv"], ["conv_id"], name="id1"),
            helper.make_node("Relu", ["conv_id"], ["relu_a"], name="relu_a"),
            helper.make_node("Relu", ["conv_id"], ["relu_b"], name="relu_b"),  # duplicate of relu_a
            helper.make_node("Add", ["c.half", "c.half_dup"], ["one"], name="const_add"),  # foldable: 1.0
            helper.make_node("Add", ["relu_a", "relu_b"], ["relu_sum"], name="sum"),
            helper.make_node("Mul", ["relu_sum", "c.half"], ["relu_half"], name="half"),  # == relu
            helper.make_node("Mul", ["relu_half", "one"], ["relu"], name="times_one"),
            helper.make_node("Neg", ["relu"], ["dead"], name="dead_neg"),
            helper.make_node("Identity", ["relu"], ["relu_id"], name="id2"),
        ]
        pooled_input = "relu_id"
    else:
        nodes.append(helper.make_node("Relu", ["conv"], ["relu"], name="relu"))
        pooled_input = "relu"
    nodes += [
        helper.make_node("GlobalAveragePool", [pooled_input], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="slimc-tests")
    onnx.checker.check_model(model, full_check=True)
    return model


def tiny_cnn_macs(batch: int = 1) -> int:
    """Hand count: Conv 4*8*8 outputs x 3*3*3 = 6912; Gemm 5 x 4 = 20."""
    return batch * (4 * 8 * 8 * 27 + 5 * 4)


def tiny_token_model(vocab: int = 50, hidden: int = 8, seed: int = 0) -> onnx.ModelProto:
    """input_ids[batch, seq] -> Gather(embedding) -> MatMul -> out[batch, seq, hidden]; plus attention_mask."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("emb", rng.standard_normal((vocab, hidden)).astype(np.float32)),
        _init("proj", rng.standard_normal((hidden, hidden)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"], name="unsq"),
        helper.make_node("MatMul", ["h", "proj"], ["p"], name="proj"),
        helper.make_node("Mul", ["p", "mask3"], ["out"], name="mask"),
    ]
    inits.append(_init("axes", np.array([-1], np.int64)))
    graph = helper.make_graph(
        nodes, "tiny_tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", hidden])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="slimc-tests")


def run_checked(model, feed, tmp_path, name: str = "model") -> list[np.ndarray]:
    """Save an IR model, pass it through the full ONNX checker, and run ``feed`` in ORT."""
    import onnx_ir as ir

    from slimc.backends.onnxruntime import create_session, run

    path = tmp_path / f"{name}.onnx"
    ir.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    return run(create_session(path), feed)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - got)^2), in float64."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10((ref ** 2).sum() / max(((ref - got) ** 2).sum(), 1e-30)))
