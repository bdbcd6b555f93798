"""The calibration runner: its streamed per-channel statistics against numpy on the full activations."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimc.calibrate import ChannelStats, StatRequest, collect
from slimc.data import Dataset
from slimc.errors import DataError

RNG = np.random.default_rng(0)
W = RNG.standard_normal((5, 6)).astype(np.float32)
CONV_W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
CONV_B = RNG.standard_normal(4).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int = 18, **kwargs) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *kwargs.pop("extra", [])])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def mlp(opset: int = 18) -> ir.Model:
    """X[batch, 4, 5] -> MatMul W[5, 6] -> h -> Relu -> r -> Neg -> Y (no value_info on h, r)."""
    return _model(
        [helper.make_node("MatMul", ["X", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Neg", ["r"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4, 5])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4, 6])],
        [numpy_helper.from_array(W, "W")], opset,
    )


def conv() -> ir.Model:
    """x[N, 3, 6, 6] -> Conv(3 -> 4, 3x3, pad 1) -> c -> Relu -> y."""
    return _model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [numpy_helper.from_array(CONV_W, "w"), numpy_helper.from_array(CONV_B, "b")],
    )


def dataset(name: str, shape: tuple[int, ...], dtype=np.float32, sizes=(2, 3, 1)) -> Dataset:
    rng = np.random.default_rng(1)
    return Dataset([{name: rng.standard_normal((n, *shape)).astype(dtype)} for n in sizes], "test")


def concat(data: Dataset, name: str) -> np.ndarray:
    return np.concatenate([b[name] for b in data]).astype(np.float64)


def conv_ref(x: np.ndarray) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((x.shape[0], 4, 6, 6))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", padded[:, :, i:i + 6, j:j + 6], CONV_W[:, :, i, j])
    return out + CONV_B[None, :, None, None]


def check(stats: ChannelStats, act: np.ndarray, axis: int, gram: bool = False, rtol: float = 1e-5) -> None:
    """Compare with numpy on the concatenated activations ``act``."""
    rows = np.moveaxis(act, axis, -1).reshape(-1, act.shape[axis])
    assert stats.count == rows.shape[0]
    atol = 10 * rtol * np.abs(rows).max() * rows.shape[0]
    np.testing.assert_allclose(stats.sum, rows.sum(0), rtol=rtol, atol=atol)
    np.testing.assert_allclose(stats.sumsq, (rows**2).sum(0), rtol=rtol, atol=atol)
    np.testing.assert_allclose(stats.mean, rows.mean(0), rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(stats.var, rows.var(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.norm, np.linalg.norm(rows, axis=0), rtol=rtol)
    np.testing.assert_allclose(stats.rms, np.sqrt((rows**2).mean(0)), rtol=rtol)
    assert stats.sum.dtype == stats.sumsq.dtype == np.float64
    if gram:
        assert stats.gram.shape == (rows.shape[1],) * 2 and stats.gram.dtype == np.float64
        np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=rtol, atol=atol)
    else:
        assert stats.gram is None


@pytest.mark.parametrize("opset", [11, 13, 18])  # ReduceSum takes axes as an attribute before 13
def test_mlp_intermediates_and_input(opset):
    model, data = mlp(opset), dataset("X", (4, 5))
    x = concat(data, "X")
    h = x @ W.astype(np.float64)
    r = np.maximum(h, 0)
    requests = [
        StatRequest("h", -1), StatRequest("h", 1),  # one value, two channel axes
        StatRequest("r", 2, gram=True), StatRequest("X", -1, gram=True), StatRequest("X", 1),
    ]
    stats = collect(model, requests, data)
    assert set(stats) == set(requests)
    check(stats[requests[0]], h, 2)
    check(stats[requests[1]], h, 1)
    check(stats[requests[2]], r, 2, gram=True)
    check(stats[requests[3]], x, 2, gram=True)
    check(stats[requests[4]], x, 1)


def test_same_value_axis_with_and_without_gram():
    data = dataset("X", (4, 5))
    plain, gram, gram_neg = StatRequest("h", 2), StatRequest("h", 2, gram=True), StatRequest("h", -1, gram=True)
    stats = collect(mlp(), [plain, gram, gram_neg], data)
    h = concat(data, "X") @ W.astype(np.float64)
    check(stats[plain], h, 2)
    check(stats[gram], h, 2, gram=True)
    np.testing.assert_array_equal(stats[gram_neg].gram, stats[gram].gram)


def test_conv_channels_nchw():
    data = dataset("x", (3, 6, 6), sizes=(1, 4, 2))
    c = conv_ref(concat(data, "x"))
    requests = [StatRequest("c", 1, gram=True), StatRequest("y", 1), StatRequest("x", 1)]
    stats = collect(conv(), requests, data)
    check(stats[requests[0]], c, 1, gram=True)
    check(stats[requests[1]], np.maximum(c, 0), 1)
    check(stats[requests[2]], concat(data, "x"), 1)
    assert stats[requests[0]].count == 7 * 6 * 6


@pytest.mark.parametrize("dtype", [np.float16, np.float64])  # float16 is cast to float32, float64 kept
def test_non_float32_values(dtype):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = _model(
        [helper.make_node("Relu", ["X"], ["r"]), helper.make_node("Cast", ["r"], ["Y"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("X", elem, ["batch", 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 8])], [],
    )
    data = dataset("X", (8,), dtype)
    request = StatRequest("r", 1, gram=True)
    stats = collect(model, [request, StatRequest("X", -1)], data)
    rtol = 1e-4 if dtype == np.float16 else 1e-12
    check(stats[request], np.maximum(concat(data, "X"), 0), 1, gram=True, rtol=rtol)
    check(stats[StatRequest("X", -1)], concat(data, "X"), 1, rtol=rtol)


def test_caller_model_unchanged():
    model = mlp()
    before = ir.serde.serialize_model(model).SerializeToString()
    nodes, outputs = len(list(model.graph)), [v.name for v in model.graph.outputs]
    collect(model, [StatRequest("h", -1, gram=True), StatRequest("X", 1)], dataset("X", (4, 5)))
    assert len(list(model.graph)) == nodes and [v.name for v in model.graph.outputs] == outputs
    assert ir.serde.serialize_model(model).SerializeToString() == before


@pytest.mark.parametrize("data", [None, Dataset([], "empty")])
def test_no_data_is_a_data_error(data):
    with pytest.raises(DataError, match="--calib"):
        collect(mlp(), [StatRequest("h", -1)], data)


@pytest.mark.parametrize(
    "request_, message",
    [
        (StatRequest("nope", 0), "no value named 'nope'"),
        (StatRequest("W", 0), "initializer"),
        (StatRequest("h", 3), "out of range"),
        (StatRequest("h", -4), "out of range"),
        (StatRequest("shape", 0), "INT64"),
    ],
)
def test_bad_requests_are_value_errors(request_, message):
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["h"]), helper.make_node("Shape", ["h"], ["shape"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4, 5])],
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [3])],
        [numpy_helper.from_array(W, "W")],
    )
    with pytest.raises(ValueError, match=message):
        collect(model, [request_], dataset("X", (4, 5)))


def test_unknown_rank_is_a_value_error():
    model = _model(
        [helper.make_node("Mystery", ["X"], ["m"], domain="custom"), helper.make_node("Relu", ["m"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [],
        extra=[helper.make_opsetid("custom", 1)],
    )
    with pytest.raises(ValueError, match="rank of 'm' is unknown"):
        collect(model, [StatRequest("m", 1)], dataset("X", (4,)))


def test_channel_axis_must_keep_its_size():
    data = Dataset([{"X": np.ones((2, 4, 5), np.float32)}, {"X": np.ones((3, 4, 5), np.float32)}], "test")
    with pytest.raises(ValueError, match="same size in every batch"):
        collect(mlp(), [StatRequest("X", 0)], data)


def test_onnx_model_roundtrip_still_valid():
    """The instrumented model is built from the saved copy; the caller's model still checks and runs."""
    model = mlp()
    collect(model, [StatRequest("r", -1)], dataset("X", (4, 5)))
    onnx.checker.check_model(ir.serde.serialize_model(model))


def test_instrumented_model_shares_work_and_drops_original_outputs(monkeypatch):
    import slimc.calibrate as calibrate

    seen = []
    real = calibrate.create_session

    def spy(path, threads=None, **kw):
        seen.append(onnx.load(str(path)))
        return real(path, threads, **kw)

    monkeypatch.setattr(calibrate, "create_session", spy)
    requests = [StatRequest("h", -1), StatRequest("h", 2, gram=True), StatRequest("h", 1), StatRequest("h", 1)]
    collect(mlp(), requests, dataset("X", (4, 5)))
    (proto,) = seen
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Mul") == 1 and ops.count("Size") == 1 and ops.count("MatMul") == 2  # model's + gram
    assert ops.count("ReduceSum") == 4  # sum and sumsq for axes 2 and 1
    assert "Y" not in [o.name for o in proto.graph.output] and len(proto.graph.output) == 6


def test_weights_in_external_data(monkeypatch):
    """Large models are saved with external data; the instrumented proto must keep pointing at it."""
    import slimc.calibrate as calibrate
    import slimc.onnx_io

    monkeypatch.setattr(slimc.onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)
    real, files = calibrate.create_session, []
    monkeypatch.setattr(calibrate, "create_session", lambda path, t, **kw: files.extend(path.parent.iterdir()) or real(path, t, **kw))
    big = RNG.standard_normal((5, 40)).astype(np.float32)  # over ir.save's 256-byte inline limit
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["h"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4, 5])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 4, 40])],
        [numpy_helper.from_array(big, "W")],
    )
    data = dataset("X", (4, 5))
    request = StatRequest("h", -1, gram=True)
    stats = collect(model, [request], data)
    names = sorted(f.name for f in files)
    assert names[0] == "model.onnx" and re.fullmatch(r"model\.onnx\.[0-9a-f]{8}\.data", names[1]), names
    check(stats[request], concat(data, "X") @ big.astype(np.float64), 2, gram=True)


@pytest.mark.parametrize("opset", [13, 18])  # ReduceMax takes axes as an attribute before 18
def test_absmax_is_the_running_max_over_batches(opset):
    model, data = mlp(opset), dataset("X", (4, 5), sizes=(2, 3, 1, 4))
    x = concat(data, "X")
    h = x @ W.astype(np.float64)
    last, mid, plain = StatRequest("h", -1, absmax=True), StatRequest("h", 1, absmax=True), StatRequest("h", -1)
    stats = collect(model, [last, mid, plain, StatRequest("X", 2, gram=True, absmax=True)], data)
    np.testing.assert_allclose(stats[last].absmax, np.abs(h).max(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(stats[mid].absmax, np.abs(h).max(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(stats[StatRequest("X", 2, gram=True, absmax=True)].absmax, np.abs(x).max(axis=(0, 1)), rtol=1e-6)
    assert stats[last].absmax.dtype == np.float64 and stats[plain].absmax is None
    check(stats[last], h, 2)  # the other statistics are unchanged by asking for absmax
    check(stats[StatRequest("X", 2, gram=True, absmax=True)], x, 2, gram=True)
    # each batch's maximum alone is smaller somewhere: the result really is the max over batches
    per_batch = [np.abs(b["X"].astype(np.float64) @ W.astype(np.float64)).max(axis=(0, 1)) for b in data]
    np.testing.assert_allclose(stats[last].absmax, np.max(per_batch, axis=0), rtol=1e-6)


def test_absmax_rank1_and_float16():
    model = _model(
        [helper.make_node("Neg", ["X"], ["n"]), helper.make_node("Cast", ["n"], ["Y"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [6])], [],
    )
    rng = np.random.default_rng(3)
    data = Dataset([{"X": rng.standard_normal(6).astype(np.float16)} for _ in range(3)], "test")
    stats = collect(model, [StatRequest("n", 0, absmax=True)], data)
    want = np.max([np.abs(b["X"].astype(np.float64)) for b in data], axis=0)
    np.testing.assert_allclose(stats[StatRequest("n", 0, absmax=True)].absmax, want, rtol=1e-3)
