"""Single ONNX ops lowered to torch, against ONNX Runtime: the corners the zoo graphs do not reach.

Each case is one node in a one-node model (opset 18): negative-step slices, asymmetric pads,
auto_pad SAME, ceil-mode pooling, integer division, old-opset attributes, multi-output ops.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from slimc.backends import onnxruntime as ort_backend  # noqa: E402
from slimc.backends.triton.lower import LoweringError, lower  # noqa: E402

RNG = np.random.default_rng(0)
F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _run_both(tmp_path, op, inputs, attrs=None, consts=None, outputs=1, opset=18, domain=""):
    """Build ``op(inputs..., consts...)``, run it in ORT and lowered to torch; return both outputs."""
    consts = consts or {}
    names = list(inputs) + list(consts)
    node = helper.make_node(op, names, [f"y{i}" for i in range(outputs)], domain=domain, **(attrs or {}))
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in inputs.items()],
        [], initializer=[onnx.numpy_helper.from_array(v, n) for n, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.value_info}
    model.graph.output.extend(inferred[f"y{i}"] for i in range(outputs))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    ref = ort_backend.create_session(path).run(None, inputs)
    gm, _ = lower(ir.load(path))
    with torch.no_grad():
        got = gm(*[torch.from_numpy(v) for v in inputs.values()])
    return ref, [g.numpy() for g in got]


CASES = {
    "slice_negative_step": ("Slice", {"x": _x(5, 7)}, {}, {"s": np.array([-1, 5], np.int64), "e": np.array([-100, 0], np.int64),
                                                          "a": np.array([0, 1], np.int64), "st": np.array([-2, -1], np.int64)}),
    "slice_clamped_ends": ("Slice", {"x": _x(4, 6)}, {}, {"s": np.array([1], np.int64), "e": np.array([2**62], np.int64),
                                                         "a": np.array([-1], np.int64)}),
    "pad_reflect_axes": ("Pad", {"x": _x(2, 3, 5)}, {"mode": "reflect"}, {"p": np.array([1, 2, 2, 1], np.int64),
                                                                           "v": np.array(0, np.float32),
                                                                           "ax": np.array([1, 2], np.int64)}),
    "pad_constant": ("Pad", {"x": _x(2, 3)}, {}, {"p": np.array([0, 1, 2, 0], np.int64), "v": np.array(1.5, np.float32)}),
    "conv_same_upper_stride": ("Conv", {"x": _x(1, 3, 9, 8)}, {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
                               {"w": _x(4, 3, 3, 3)}),
    "conv_asymmetric_pads_groups": ("Conv", {"x": _x(1, 4, 7, 7)}, {"pads": [0, 1, 2, 1], "group": 2},
                                    {"w": _x(6, 2, 3, 3), "b": _x(6)}),
    "conv_1d_dilated": ("Conv", {"x": _x(2, 3, 20)}, {"dilations": [2], "pads": [2, 2]}, {"w": _x(5, 3, 3)}),
    "conv_transpose": ("ConvTranspose", {"x": _x(1, 4, 5, 5)}, {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                                 "output_padding": [1, 1]}, {"w": _x(4, 3, 3, 3)}),
    "maxpool_ceil_pads": ("MaxPool", {"x": _x(1, 2, 9, 9)}, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                                              "ceil_mode": 1}, {}),
    "avgpool_asymmetric_exclude_pad": ("AveragePool", {"x": _x(1, 2, 7, 6)}, {"kernel_shape": [3, 3], "pads": [0, 1, 2, 1]}, {}),
    "avgpool_include_pad": ("AveragePool", {"x": _x(1, 2, 6, 6)}, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                                   "count_include_pad": 1}, {}),
    "global_average_pool": ("GlobalAveragePool", {"x": _x(2, 3, 4, 5)}, {}, {}),
    "batchnorm": ("BatchNormalization", {"x": _x(2, 3, 4, 4)}, {"epsilon": 1e-3},
                  {"s": _x(3), "b": _x(3), "m": _x(3), "v": np.abs(_x(3)) + 0.5}),
    "layernorm_axis1": ("LayerNormalization", {"x": _x(2, 3, 4)}, {"axis": 1}, {"s": _x(3, 4), "b": _x(3, 4)}),
    "instance_norm": ("InstanceNormalization", {"x": _x(2, 3, 5, 5)}, {}, {"s": _x(3), "b": _x(3)}),
    "gemm_trans_alpha_beta": ("Gemm", {"a": _x(5, 4)}, {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0},
                              {"b": _x(3, 5), "c": _x(3)}),
    "integer_div_truncates": ("Div", {"a": np.array([7, -7, 9, -9], np.int64)}, {}, {"b": np.array([2, 2, -4, -4], np.int64)}),
    "mod_fmod": ("Mod", {"a": _x(6)}, {"fmod": 1}, {"b": np.full(6, 0.7, np.float32)}),
    "gather_negative_indices": ("Gather", {"x": _x(5, 3)}, {"axis": 0}, {"i": np.array([[-1, 0], [2, -2]], np.int64)}),
    "gather_elements": ("GatherElements", {"x": _x(3, 4)}, {"axis": 1}, {"i": np.array([[0, 3], [1, 1], [-1, 2]], np.int64)}),
    "expand_bidirectional": ("Expand", {"x": _x(3, 1)}, {}, {"s": np.array([2, 1, 4], np.int64)}),
    "tile": ("Tile", {"x": _x(2, 3)}, {}, {"r": np.array([2, 1], np.int64)}),
    "trilu_lower_k": ("Trilu", {"x": _x(4, 5)}, {"upper": 0}, {"k": np.array(1, np.int64)}),
    "cumsum_exclusive_reverse": ("CumSum", {"x": _x(3, 4)}, {"exclusive": 1, "reverse": 1}, {"a": np.array(1, np.int64)}),
    "reduce_max_keepdims0": ("ReduceMax", {"x": _x(3, 4, 5)}, {"keepdims": 0}, {"a": np.array([0, 2], np.int64)}),
    "reduce_sum_empty_axes_noop": ("ReduceSum", {"x": _x(3, 4)}, {"noop_with_empty_axes": 1}, {}),
    "reduce_l2": ("ReduceL2", {"x": _x(3, 4)}, {}, {"a": np.array([1], np.int64)}),
    "argmax": ("ArgMax", {"x": _x(3, 5)}, {"axis": 1, "keepdims": 0}, {}),
    "hard_sigmoid": ("HardSigmoid", {"x": _x(10)}, {"alpha": 0.3, "beta": 0.4}, {}),
    "clip_one_side": ("Clip", {"x": _x(10)}, {}, {"lo": np.array(-0.2, np.float32)}),
    "softmax_axis0": ("Softmax", {"x": _x(3, 4)}, {"axis": 0}, {}),
    "gelu_tanh": ("Gelu", {"x": _x(10)}, {"approximate": "tanh"}, {}),
    "einsum": ("Einsum", {"a": _x(2, 3, 4), "b": _x(2, 4, 5)}, {"equation": "bij,bjk->bik"}, {}),
    "where_broadcast": ("Where", {"c": RNG.random((3, 1)) > 0.5, "a": _x(1, 4)}, {}, {"b": _x(3, 4)}),
    "quantize_per_axis": ("QuantizeLinear", {"x": _x(2, 3) * 5}, {"axis": 1},
                          {"s": np.array([0.1, 0.2, 0.05], np.float32), "z": np.array([-3, 0, 7], np.int8)}),
    "dequantize_uint8": ("DequantizeLinear", {"x": RNG.integers(0, 256, (2, 5)).astype(np.uint8)}, {},
                         {"s": np.array(0.1, np.float32), "z": np.array(128, np.uint8)}),
    "dynamic_quantize": ("DynamicQuantizeLinear", {"x": _x(4, 6)}, {}, {}),
    "resize_linear": ("Resize", {"x": _x(1, 2, 4, 4)}, {"mode": "linear"},
                      {"roi": np.zeros(0, np.float32), "sc": np.array([1, 1, 2, 2], np.float32)}),
    "resize_nearest_sizes": ("Resize", {"x": _x(1, 2, 3, 3)}, {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                                               "nearest_mode": "floor"},
                             {"roi": np.zeros(0, np.float32), "sc": np.zeros(0, np.float32), "sz": np.array([1, 2, 6, 9], np.int64)}),
    "topk": ("TopK", {"x": _x(3, 7)}, {"axis": 1}, {"k": np.array([3], np.int64)}),
    "split_num_outputs": ("Split", {"x": _x(7, 2)}, {"num_outputs": 3, "axis": 0}, {}),
    "split_sizes": ("Split", {"x": _x(2, 6)}, {"axis": 1}, {"s": np.array([1, 5], np.int64)}),
    "flatten_axis2": ("Flatten", {"x": _x(2, 3, 4, 5)}, {"axis": 2}, {}),
}
OUTPUTS = {"dynamic_quantize": 3, "topk": 2, "split_num_outputs": 3, "split_sizes": 2}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_op_matches_onnxruntime(tmp_path, case):
    op, inputs, attrs, consts = CASES[case]
    ref, got = _run_both(tmp_path, op, inputs, attrs, consts, outputs=OUTPUTS.get(case, 1), opset=20 if op == "Gelu" else 18)
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape, case
        if np.issubdtype(r.dtype, np.floating):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(g, r)


def test_old_opset_attributes(tmp_path):
    """Opset 11: Squeeze/Unsqueeze/ReduceMean axes and Split sizes are attributes, not inputs."""
    x = {"x": _x(2, 1, 3)}
    ref, got = _run_both(tmp_path, "Squeeze", x, {"axes": [1]}, opset=11)
    np.testing.assert_array_equal(got[0], ref[0])
    ref, got = _run_both(tmp_path, "ReduceMean", x, {"axes": [2], "keepdims": 0}, opset=11)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    ref, got = _run_both(tmp_path, "Split", {"x": _x(5, 2)}, {"split": [2, 3]}, outputs=2, opset=11)
    assert [g.shape for g in got] == [r.shape for r in ref]


def test_unknown_op_is_a_clear_error(tmp_path):
    node = helper.make_node("Hardmax", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F32, [2, 3])],
                              [helper.make_tensor_value_info("y", F32, [2, 3])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    with pytest.raises(LoweringError, match="Hardmax.*no torch lowering"):
        lower(model)
    node = helper.make_node("FusedThing", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F32, [2, 3])],
                              [helper.make_tensor_value_info("y", F32, [2, 3])])
    model = ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]))
    with pytest.raises(LoweringError, match="com.example.FusedThing"):
        lower(model)


def test_shape_arithmetic_stays_in_python_and_dynamic(tmp_path):
    """Shape -> Gather -> Concat -> Reshape: the lowered graph computes the shape from the input's,
    so a different batch size works, and torch.export keeps the dimension symbolic."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "zero1"], ["b1"]),
        helper.make_node("Concat", ["b1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F32, ["batch", 3, 4])],
        [helper.make_tensor_value_info("y", F32, ["batch", 12])],
        initializer=[onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"),
                     onnx.numpy_helper.from_array(np.array([0], np.int64), "zero1"),
                     onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus1")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    gm, report = lower(model)
    assert report.buffers == 0  # the int64 constants are Python literals, not buffers
    for batch in (2, 5):
        assert gm(torch.randn(batch, 3, 4))[0].shape == (batch, 12)
    program = torch.export.export(gm, (torch.randn(2, 3, 4),), dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}})
    assert program.module()(torch.randn(7, 3, 4))[0].shape == (7, 12)
