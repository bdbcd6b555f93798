"""ONNX operator semantics in PyTorch: one function per op, called from the lowered FX graph.

Values are of two kinds at run time:
* tensors, for everything the model computes;
* *shape values*: Python ``int`` (rank 0) or ``list`` of ints (rank 1), for what ``Shape`` produces
  and the arithmetic on it (Gather, Concat, Slice, Squeeze, Add, Mul, ...). Small int64 constants
  are shape values too. Keeping shapes in Python is what keeps dynamic batch and sequence
  dynamic: under ``torch.export`` the ints are SymInts, where ``tensor.tolist()`` would be a
  data-dependent guard that fails.

An op whose inputs are all shape values computes in Python; as soon as a tensor is involved the
shape values become int64 tensors (`T`). Each function takes the node's inputs positionally
(``None`` for an omitted optional input) and its attributes as keywords, with ONNX's defaults.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F

# ONNX TensorProto data type -> torch dtype.
DTYPES = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16, 6: torch.int32,
    7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.uint32, 13: torch.uint64,
    16: torch.bfloat16,
}
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def is_py(v: Any) -> bool:
    return isinstance(v, (int, list, bool, torch.SymInt, torch.SymBool)) and not isinstance(v, torch.Tensor)


def T(v: Any, dtype: torch.dtype | None = None, like: torch.Tensor | None = None) -> torch.Tensor:  # noqa: N802
    """A value as a tensor: shape values become int64 (or bool) tensors on ``like``'s device."""
    if isinstance(v, torch.Tensor):
        return v if dtype is None else v.to(dtype)
    if isinstance(v, list) and v and all(isinstance(e, (bool, torch.SymBool)) for e in v):
        out = torch.tensor(v, dtype=torch.bool)
    elif isinstance(v, (bool, torch.SymBool)):
        out = torch.tensor(v, dtype=torch.bool)
    else:
        out = torch.tensor(v, dtype=torch.int64)
    if like is not None:
        out = out.to(like.device)
    return out if dtype is None else out.to(dtype)


def output_tensor(v: Any, like: Any = None) -> torch.Tensor:
    """A graph output that is a shape value or constant, as a tensor on the inputs' device."""
    return T(v, like=like if isinstance(like, torch.Tensor) else None)


def _like(values) -> torch.Tensor | None:
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def _ints(v: Any) -> list[int]:
    """A shape-like input (shape value, constant or tensor) as a list of Python ints."""
    if v is None:
        return []
    if isinstance(v, torch.Tensor):
        return [int(e) for e in v.reshape(-1).tolist()]  # data-dependent: eager only
    return list(v) if isinstance(v, list) else [v]


def _scalar(v: Any):
    """The first element of a scalar-like input (shape value, one-element list or tensor) as a number."""
    if isinstance(v, torch.Tensor):
        return v.reshape(-1)[0].item()
    return v[0] if isinstance(v, list) else v


def _pybroadcast(fn, a, b):
    if isinstance(a, list) and isinstance(b, list):
        if len(a) == 1:
            a = a * len(b)
        if len(b) == 1:
            b = b * len(a)
        return [fn(x, y) for x, y in zip(a, b)]
    if isinstance(a, list):
        return [fn(x, b) for x in a]
    if isinstance(b, list):
        return [fn(a, y) for y in b]
    return fn(a, b)


def _binary(pyfn, torchfn):
    def op(a, b):
        if is_py(a) and is_py(b):
            return _pybroadcast(pyfn, a, b)
        like = _like((a, b))
        return torchfn(T(a, like=like), T(b, like=like))

    return op


def _int_div(x, y):
    q = abs(x) // abs(y)  # ONNX integer Div truncates toward zero
    return q if (x >= 0) == (y >= 0) else -q


def _torch_div(a, b):
    if a.dtype in INT_DTYPES and b.dtype in INT_DTYPES:
        return torch.div(a, b, rounding_mode="trunc")
    return torch.div(a, b)


Add = _binary(operator.add, torch.add)
Sub = _binary(operator.sub, torch.sub)
Mul = _binary(operator.mul, torch.mul)
Div = _binary(_int_div, _torch_div)
Equal = _binary(operator.eq, torch.eq)
Less = _binary(operator.lt, torch.lt)
LessOrEqual = _binary(operator.le, torch.le)
Greater = _binary(operator.gt, torch.gt)
GreaterOrEqual = _binary(operator.ge, torch.ge)
And = _binary(lambda x, y: bool(x) and bool(y), torch.logical_and)
Or = _binary(lambda x, y: bool(x) or bool(y), torch.logical_or)
Xor = _binary(lambda x, y: bool(x) != bool(y), torch.logical_xor)


def Pow(a, b):
    a, b = T(a), T(b, like=a if isinstance(a, torch.Tensor) else None)
    out = torch.pow(a, b)
    return out.to(a.dtype)


def Mod(a, b, *, fmod=0):
    if is_py(a) and is_py(b) and not fmod:
        return _pybroadcast(operator.mod, a, b)
    a, b = T(a), T(b)
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def _variadic(pyfn, torchfn):
    def op(*xs):
        if all(is_py(x) for x in xs):
            out = xs[0]
            for x in xs[1:]:
                out = _pybroadcast(pyfn, out, x)
            return out
        like = _like(xs)
        out = T(xs[0], like=like)
        for x in xs[1:]:
            out = torchfn(out, T(x, like=like))
        return out

    return op


Max = _variadic(max, torch.maximum)
Min = _variadic(min, torch.minimum)


def Sum(*xs):
    out = T(xs[0])
    for x in xs[1:]:
        out = out + T(x)
    return out


def Mean(*xs):
    return Sum(*xs) / len(xs)


def _unary(fn):
    def op(x):
        return fn(T(x))

    return op


Neg = _unary(torch.neg)
Abs = _unary(torch.abs)
Sqrt = _unary(torch.sqrt)
Reciprocal = _unary(torch.reciprocal)
Exp = _unary(torch.exp)
Log = _unary(torch.log)
Sin = _unary(torch.sin)
Cos = _unary(torch.cos)
Tan = _unary(torch.tan)
Tanh = _unary(torch.tanh)
Sigmoid = _unary(torch.sigmoid)
Relu = _unary(torch.relu)
Erf = _unary(torch.erf)
Floor = _unary(torch.floor)
Ceil = _unary(torch.ceil)
Round = _unary(torch.round)  # half to even, as ONNX
Sign = _unary(torch.sign)
Not = _unary(torch.logical_not)
Softsign = _unary(F.softsign)
IsNaN = _unary(torch.isnan)


def Identity(x):
    return x


def Softplus(x):
    return F.softplus(x)


def Elu(x, *, alpha=1.0):
    return F.elu(x, alpha)


def LeakyRelu(x, *, alpha=0.01):
    return F.leaky_relu(x, alpha)


def HardSigmoid(x, *, alpha=0.2, beta=0.5):
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


def HardSwish(x):
    return F.hardswish(x)


def Gelu(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


def PRelu(x, slope):
    return torch.where(x < 0, x * slope, x)


def Clip(x, lo=None, hi=None, *, min=None, max=None):  # noqa: A002 - ONNX names (opset < 11 attributes)
    lo = min if lo is None else lo
    hi = max if hi is None else hi
    if lo is not None:
        x = torch.maximum(x, T(lo, x.dtype, like=x))
    if hi is not None:
        x = torch.minimum(x, T(hi, x.dtype, like=x))
    return x


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def Softmax(x, *, axis=-1):
    return torch.softmax(x, dim=axis)


def LogSoftmax(x, *, axis=-1):
    return torch.log_softmax(x, dim=axis)


def Dropout(x, ratio=None, training_mode=None, *, seed=None):
    return x, torch.ones_like(x, dtype=torch.bool)


def Cast(x, *, to, saturate=1):
    dtype = DTYPES[to]
    if is_py(x) and dtype in (torch.int64, torch.int32):
        return x
    if is_py(x) and dtype == torch.bool:
        return _pybroadcast(lambda v, _: bool(v), x, 0)
    return T(x).to(dtype)


def CastLike(x, like, *, saturate=1):
    return T(x).to(like.dtype)


def Where(cond, a, b):
    if is_py(cond) and is_py(a) and is_py(b):
        if not isinstance(cond, list):
            return a if cond else b
        n = len(cond)
        a = a if isinstance(a, list) else [a] * n
        b = b if isinstance(b, list) else [b] * n
        return [x if c else y for c, x, y in zip(cond, a * n if len(a) == 1 else a, b * n if len(b) == 1 else b)]
    like = _like((cond, a, b))
    return torch.where(T(cond, torch.bool, like=like), T(a, like=like), T(b, like=like))


# ---------------------------------------------------------------- shapes


def Shape(x, *, start=0, end=None):
    dims = list(x.shape) if isinstance(x, torch.Tensor) else ([len(x)] if isinstance(x, list) else [])
    rank = len(dims)
    start = max(0, min(rank, _axis(start, rank)))
    end = rank if end is None else max(0, min(rank, _axis(end, rank)))
    return dims[start:end]


def Size(x):
    return x.numel() if isinstance(x, torch.Tensor) else (len(x) if isinstance(x, list) else 1)


def Reshape(x, shape, *, allowzero=0):
    shape = _ints(shape)
    if is_py(x):
        x = T(x)
    if not allowzero:
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def Flatten(x, *, axis=1):
    axis = _axis(axis, x.dim())
    return x.reshape(math.prod(x.shape[:axis]) if axis else 1, -1)


def Transpose(x, *, perm=None):
    x = T(x)
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


def Squeeze(x, axes=None, *, axes_attr=None):
    axes = _ints(axes) if axes is not None else (list(axes_attr) if axes_attr is not None else None)
    if is_py(x):
        if isinstance(x, list) and (axes is None or axes in ([0], [-1])) and len(x) == 1:
            return x[0]
        return x
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in axes)) if axes else x


def Unsqueeze(x, axes=None, *, axes_attr=None):
    axes = _ints(axes) if axes is not None else list(axes_attr)
    if is_py(x) and not isinstance(x, list) and axes in ([0], [-1]):
        return [x]
    x = T(x)
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def Concat(*xs, axis):
    xs = [x for x in xs if not (isinstance(x, list) and not x)]
    if all(is_py(x) for x in xs):
        out: list = []
        for x in xs:
            out += x if isinstance(x, list) else [x]
        return out
    like = _like(xs)
    tensors = [T(x, like=like) for x in xs]
    tensors = [t for t in tensors if t.numel() or t.dim() != 1] or tensors[:1]
    return torch.cat(tensors, dim=axis)


def Split(x, split=None, *, axis=0, num_outputs=None, split_attr=None):
    size = x.shape[axis]
    if split is not None:
        sizes = _ints(split)
    elif split_attr is not None:
        sizes = list(split_attr)
    else:
        n = num_outputs
        chunk = -(-size // n)
        sizes = [chunk] * (n - 1) + [size - chunk * (n - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


def Slice(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    if is_py(x):
        (s,), (e,), (st,) = starts, ends, steps
        return list(x)[slice(*_py_slice(len(x), s, e, st))]
    index: list[Any] = [slice(None)] * x.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, x.dim())
        lo, hi, step = _py_slice(x.shape[a], s, e, st)
        if step > 0:
            index[a] = slice(lo, hi, step)
        else:  # torch has no negative steps: flip, then slice forward
            n = x.shape[a]
            first = lo
            last = hi + 1 if hi is not None else 0
            count = max(0, -(-(first - last + 1) // -step)) if first >= last else 0
            index[a] = slice(n - 1 - first, n - 1 - first + count * -step, -step)
            flips.append(a)
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


def _py_slice(n, start, end, step):
    """ONNX Slice clamping for one axis, as (start, end, step) for Python slicing."""
    big = 2**62
    if step > 0:
        start = max(0, min(n, start + n if start < 0 else start))
        end = max(0, min(n, end + n if end < 0 else end)) if abs(end) < big else (n if end > 0 else 0)
        return start, end, step
    start = max(-1, min(n - 1, start + n if start < 0 else start))
    end = -1 if end <= -big else max(-1, min(n - 1, end + n if end < 0 else end))
    return start, (end if end >= 0 else None), step


def Gather(data, indices, *, axis=0):
    if is_py(data) and is_py(indices):
        return _pybroadcast(lambda i, _: data[i], indices, 0) if isinstance(indices, list) else data[indices]
    data = T(data)
    idx = T(indices, like=data)
    axis = _axis(axis, data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    if idx.dim() == 0:  # index_select, not select: no .item(), so nothing data-dependent under torch.export
        return torch.index_select(data, axis, idx.reshape(1)).squeeze(axis)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1:])


def GatherElements(data, indices, *, axis=0):
    idx = T(indices, like=data)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    return torch.gather(data, axis, idx)


def GatherND(data, indices, *, batch_dims=0):
    idx = T(indices, like=data)
    if batch_dims:
        raise NotImplementedError("GatherND with batch_dims > 0")
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    out = data[tuple(flat[:, i] for i in range(k))]
    return out.reshape(*idx.shape[:-1], *data.shape[k:])


def ScatterND(data, indices, updates, *, reduction="none"):
    out = data.clone()
    k = indices.shape[-1]
    flat = indices.reshape(-1, k)
    upd = updates.reshape(flat.shape[0], *data.shape[k:])
    key = tuple(flat[:, i] for i in range(k))
    if reduction == "none":
        out[key] = upd
    elif reduction == "add":
        out.index_put_(key, upd, accumulate=True)
    else:
        raise NotImplementedError(f"ScatterND reduction={reduction}")
    return out


def Expand(x, shape):
    shape = _ints(shape)
    x = T(x)
    target = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return x.expand(target)


def Tile(x, repeats):
    return x.repeat(_ints(repeats))


def _device(like) -> torch.device | None:
    return like.device if isinstance(like, torch.Tensor) else None


def ConstantOfShape(shape, *, value=None, like=None):
    """``like``: a graph input, whose device the new tensor goes to (the lowering passes it)."""
    fill = value if value is not None else torch.zeros(1, dtype=torch.float32)
    return torch.full(_ints(shape), fill.reshape(-1)[0].item(), dtype=fill.dtype, device=_device(like))


def Range(start, limit, delta, *, like=None):
    dtype = next((v.dtype for v in (start, limit, delta) if isinstance(v, torch.Tensor)), torch.int64)
    device = next((v.device for v in (start, limit, delta) if isinstance(v, torch.Tensor)), _device(like))
    return torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=dtype, device=device)


def Trilu(x, k=None, *, upper=1):
    k = _scalar(k) if k is not None else 0
    return torch.triu(x, k) if upper else torch.tril(x, k)


def CumSum(x, axis, *, exclusive=0, reverse=0):
    axis = _scalar(axis)
    if reverse:
        x = x.flip(axis)
    out = torch.cumsum(x, axis)
    if exclusive:
        out = out - x
    return out.flip(axis) if reverse else out


def ArgMax(x, *, axis=0, keepdims=1, select_last_index=0):
    return torch.argmax(x, dim=axis, keepdim=bool(keepdims))


def ArgMin(x, *, axis=0, keepdims=1, select_last_index=0):
    return torch.argmin(x, dim=axis, keepdim=bool(keepdims))


def TopK(x, k, *, axis=-1, largest=1, sorted=1):  # noqa: A002 - ONNX attribute name
    values, indices = torch.topk(x, _scalar(k), dim=axis, largest=bool(largest), sorted=bool(sorted))
    return values, indices


def Pad(x, pads, value=None, axes=None, *, mode="constant"):
    pads = _ints(pads)
    rank = x.dim()
    axes = [_axis(a, rank) for a in _ints(axes)] if axes is not None else list(range(rank))
    n = len(axes)
    begin, end = pads[:n], pads[n:]
    torch_pads: list[int] = []
    for d in reversed(range(rank)):  # torch: last dim first, (begin, end) pairs
        if d in axes:
            i = axes.index(d)
            torch_pads += [begin[i], end[i]]
        else:
            torch_pads += [0, 0]
    fill = _scalar(value) if value is not None else 0
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode == "constant":
        return F.pad(x, torch_pads, mode="constant", value=fill)
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:  # torch pads only trailing dims in these modes
        torch_pads = torch_pads[:-2]
    return F.pad(x, torch_pads, mode=modes[mode])


def Einsum(*xs, equation):
    return torch.einsum(equation, *xs)


# ---------------------------------------------------------------- reductions


def _reduce(fn):
    def op(x, axes=None, *, keepdims=1, noop_with_empty_axes=0, axes_attr=None):
        axes = _ints(axes) if axes is not None else (list(axes_attr) if axes_attr is not None else [])
        if is_py(x):
            x = T(x)
        if not axes:
            if noop_with_empty_axes:
                return x
            axes = list(range(x.dim()))
        return fn(x, [_axis(a, x.dim()) for a in axes], bool(keepdims))

    return op


def _prod(x, axes, keep):
    for a in sorted(axes, reverse=True):
        x = torch.prod(x, dim=a, keepdim=keep)
    return x


def _amax(x, axes, keep):
    return torch.amax(x, dim=axes, keepdim=keep)


def _amin(x, axes, keep):
    return torch.amin(x, dim=axes, keepdim=keep)


ReduceMean = _reduce(lambda x, a, k: torch.mean(x, dim=a, keepdim=k))
ReduceSum = _reduce(lambda x, a, k: torch.sum(x, dim=a, keepdim=k))
ReduceMax = _reduce(_amax)
ReduceMin = _reduce(_amin)
ReduceProd = _reduce(_prod)
ReduceL2 = _reduce(lambda x, a, k: torch.sqrt(torch.sum(x * x, dim=a, keepdim=k)))
ReduceL1 = _reduce(lambda x, a, k: torch.sum(torch.abs(x), dim=a, keepdim=k))
ReduceSumSquare = _reduce(lambda x, a, k: torch.sum(x * x, dim=a, keepdim=k))
ReduceLogSumExp = _reduce(lambda x, a, k: torch.logsumexp(x, dim=a, keepdim=k))


# ---------------------------------------------------------------- neural network ops


def MatMul(a, b):
    return torch.matmul(a, b)


def Gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):  # noqa: N803 - ONNX names
    a = a.t() if transA else a
    b = b.t() if transB else b
    out = a @ b
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c * beta if beta != 1.0 else c)
    return out


def _conv_padding(x, kernel, strides, dilations, pads, auto_pad):
    """Explicit (begin..., end...) pads for ONNX's auto_pad modes."""
    spatial = x.shape[2:]
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto_pad == "SAME_UPPER" else big)
            pads_e.append(big if auto_pad == "SAME_UPPER" else small)
        return pads_b + pads_e
    if auto_pad == "VALID":
        return [0] * (2 * n)
    return list(pads) if pads is not None else [0] * (2 * n)


def _pad_or_symmetric(x, pads, value=0.0):
    """Symmetric pads go to the op; asymmetric ones are applied here first."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return x, tuple(begin)
    torch_pads = []
    for b, e in zip(reversed(begin), reversed(end)):
        torch_pads += [b, e]
    return F.pad(x, torch_pads, value=value), (0,) * n


def Conv(x, w, b=None, *, group=1, pads=None, strides=None, dilations=None, kernel_shape=None, auto_pad="NOTSET"):
    n = w.dim() - 2
    strides = tuple(strides or (1,) * n)
    dilations = tuple(dilations or (1,) * n)
    kernel = tuple(kernel_shape or w.shape[2:])
    x, padding = _pad_or_symmetric(x, _conv_padding(x, kernel, strides, dilations, pads, auto_pad))
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return conv(x, w, b, strides, padding, dilations, group)


def ConvTranspose(x, w, b=None, *, group=1, pads=None, strides=None, dilations=None, kernel_shape=None,
                  output_padding=None, auto_pad="NOTSET", output_shape=None):
    n = w.dim() - 2
    if auto_pad not in ("NOTSET", "VALID") or output_shape is not None:
        raise NotImplementedError("ConvTranspose with auto_pad SAME or output_shape")
    pads = list(pads or [0] * (2 * n))
    if pads[:n] != pads[n:]:
        raise NotImplementedError("ConvTranspose with asymmetric pads")
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    return conv(x, w, b, tuple(strides or (1,) * n), tuple(pads[:n]), tuple(output_padding or (0,) * n), group,
                tuple(dilations or (1,) * n))


def MaxPool(x, *, kernel_shape, pads=None, strides=None, dilations=None, ceil_mode=0, auto_pad="NOTSET",
            storage_order=0):
    n = len(kernel_shape)
    strides = tuple(strides or (1,) * n)
    dilations = tuple(dilations or (1,) * n)
    x, padding = _pad_or_symmetric(x, _conv_padding(x, kernel_shape, strides, dilations, pads, auto_pad),
                                   value=float("-inf"))
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    return pool(x, tuple(kernel_shape), strides, padding, dilations, bool(ceil_mode))


def AveragePool(x, *, kernel_shape, pads=None, strides=None, ceil_mode=0, count_include_pad=0, auto_pad="NOTSET",
                dilations=None):
    n = len(kernel_shape)
    if dilations and any(d != 1 for d in dilations):
        raise NotImplementedError("AveragePool with dilations")
    strides = tuple(strides or (1,) * n)
    kernel = tuple(kernel_shape)
    explicit = _conv_padding(x, kernel, strides, (1,) * n, pads, auto_pad)
    begin, end = explicit[:n], explicit[n:]
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    if begin == end and all(2 * p <= k for p, k in zip(begin, kernel)):
        return pool(x, kernel, strides, tuple(begin), bool(ceil_mode), bool(count_include_pad))
    torch_pads: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        torch_pads += [b, e]
    summed = pool(F.pad(x, torch_pads), kernel, strides, 0, bool(ceil_mode), True)
    if count_include_pad:
        return summed
    # Average over the real elements only: the same pooling of a padded ones-tensor is their share.
    share = pool(F.pad(torch.ones_like(x[:1, :1]), torch_pads), kernel, strides, 0, bool(ceil_mode), True)
    return summed / share


def GlobalAveragePool(x):
    return torch.mean(x, dim=tuple(range(2, x.dim())), keepdim=True)


def GlobalMaxPool(x):
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


def BatchNormalization(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)


def LayerNormalization(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    axis = _axis(axis, x.dim())
    dims = tuple(range(axis, x.dim()))
    if scale.dim() == x.dim() - axis and bias is None or (bias is not None and bias.shape == scale.shape):
        shape = tuple(x.shape[axis:])
        if tuple(scale.shape) == shape:
            out = F.layer_norm(x, shape, scale, bias, epsilon)
            return out, None, None
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    out = (x - mean) / torch.sqrt(var + epsilon) * scale
    return (out + bias if bias is not None else out), None, None


def InstanceNormalization(x, scale, bias, *, epsilon=1e-5):
    return F.instance_norm(x, weight=scale, bias=bias, eps=epsilon)


def GroupNormalization(x, scale, bias, *, num_groups, epsilon=1e-5, stash_type=1):
    if scale.numel() == x.shape[1]:
        return F.group_norm(x, num_groups, scale, bias, epsilon)
    out = F.group_norm(x, num_groups, None, None, epsilon)  # opset 18: scale/bias per group
    per = x.shape[1] // num_groups
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return out * scale.repeat_interleave(per).reshape(shape) + bias.repeat_interleave(per).reshape(shape)


def Resize(x, roi=None, scales=None, sizes=None, *, mode="nearest", coordinate_transformation_mode="half_pixel",
           nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0,
           antialias=0, axes=None, keep_aspect_ratio_policy="stretch"):
    size = _ints(sizes)[2:] if sizes is not None and _ints(sizes) else None
    factor = [float(s) for s in T(scales).reshape(-1).tolist()][2:] if size is None else None
    if mode == "nearest" and coordinate_transformation_mode == "asymmetric" and nearest_mode == "floor":
        return F.interpolate(x, size=size, scale_factor=factor, mode="nearest")
    if mode == "linear" and coordinate_transformation_mode in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()]
        return F.interpolate(x, size=size, scale_factor=factor, mode=torch_mode,
                             align_corners=coordinate_transformation_mode == "align_corners")
    raise NotImplementedError(f"Resize mode={mode} coordinate_transformation_mode={coordinate_transformation_mode} "
                              f"nearest_mode={nearest_mode}")


# ---------------------------------------------------------------- quantization (generic lowering)


def _axis_shape(scale: torch.Tensor, x: torch.Tensor, axis: int, block_size: int = 0) -> torch.Tensor:
    """A per-axis (or blocked) scale/zero point broadcast against ``x``."""
    if scale.dim() == 0 or scale.numel() == 1 and scale.dim() <= 1:
        return scale.reshape(())
    axis = _axis(axis, x.dim())
    if block_size:
        return scale.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767),
           torch.uint16: (0, 65535), torch.int32: (-(2**31), 2**31 - 1)}


def QuantizeLinear(x, scale, zero_point=None, *, axis=1, saturate=1, block_size=0, output_dtype=0):
    dtype = zero_point.dtype if zero_point is not None else (DTYPES[output_dtype] if output_dtype else torch.uint8)
    lo, hi = _QRANGE[dtype]
    s = _axis_shape(scale, x, axis, block_size)
    z = _axis_shape(zero_point, x, axis, block_size).to(torch.float32) if zero_point is not None else 0.0
    q = torch.round(x.to(torch.float32) / s.to(torch.float32)) + z
    return torch.clamp(q, lo, hi).to(dtype)


def DequantizeLinear(x, scale, zero_point=None, *, axis=1, block_size=0, output_dtype=0, weight_zeros=None):
    """``weight_zeros``: an int64 zero-point buffer the lowering adds for a constant, symmetric, per-channel
    int8 weight, so the pt2e form can dequantize it as PT2E writes a weight."""
    from slimc import kernels

    if kernels.DECOMPOSE == "pt2e" and weight_zeros is not None and scale.dtype == torch.float32:
        return kernels.pt2e_weight(x, scale, weight_zeros, _axis(axis, x.dim()))
    s = _axis_shape(scale, x, axis, block_size)
    xi = x.to(torch.int32)
    if zero_point is not None:
        xi = xi - _axis_shape(zero_point, x, axis, block_size).to(torch.int32)
    return (xi.to(torch.float32) * s.to(torch.float32)).to(scale.dtype)


def fake_quant(x, scale, zero_point=None, *, axis=1, block_size=0, scale_value=None, zp_value=None):
    """``DequantizeLinear(QuantizeLinear(x))`` with the same parameters: the exact same values, and a
    straight-through gradient (1 inside the quantization range, 0 where x was clamped).
    ``scale_value``/``zp_value``: per-tensor parameters as Python numbers, for the pt2e export form."""
    from slimc import kernels

    if kernels.DECOMPOSE == "pt2e" and scale_value is not None and zero_point is not None:
        return kernels.pt2e_qdq(x, scale_value, zp_value, zero_point.dtype)
    q = QuantizeLinear(x, scale, zero_point, axis=axis, block_size=block_size)
    y = DequantizeLinear(q, scale, zero_point, axis=axis, block_size=block_size)
    lo, hi = _QRANGE[q.dtype]
    z = _axis_shape(zero_point, x, axis, block_size).to(torch.float32) if zero_point is not None else 0.0
    pos = x.to(torch.float32) / _axis_shape(scale, x, axis, block_size).to(torch.float32) + z
    inside = ((pos >= lo - 0.5) & (pos <= hi + 0.5)).to(y.dtype)
    return y + (x - x.detach()).to(y.dtype) * inside


def fake_quant_codes(x, scale, zero_point=None, *, axis=1, block_size=0, scale_value=None, zp_value=None):
    """`fake_quant` split in two where the pt2e form shares one quantize between consumers: in that form
    the int8 codes (see `fake_quant_values`), otherwise `fake_quant` itself."""
    from slimc import kernels

    if kernels.DECOMPOSE == "pt2e" and scale_value is not None and zero_point is not None:
        return kernels.pt2e_quantize(x, scale_value, zp_value, zero_point.dtype)
    return fake_quant(x, scale, zero_point, axis=axis, block_size=block_size)


def fake_quant_values(codes, zero_point=None, *, scale_value=None, zp_value=None):
    """The values of `fake_quant_codes`: dequantized in the pt2e form, passed through otherwise."""
    from slimc import kernels

    if kernels.DECOMPOSE == "pt2e" and scale_value is not None and zero_point is not None:
        return kernels.pt2e_dequantize(codes, scale_value, zp_value, zero_point.dtype)
    return codes


def DynamicQuantizeLinear(x):
    """uint8 asymmetric per-tensor quantization, exactly as ONNX defines it (range includes 0)."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / safe), 0, 255)
    q = torch.clamp(torch.round(x / safe) + zp, 0, 255).to(torch.uint8)
    return q, scale, zp.to(torch.uint8)


def ConvInteger(x, w, x_zp=None, w_zp=None, *, group=1, pads=None, strides=None, dilations=None, kernel_shape=None,
                auto_pad="NOTSET"):
    xf = x.to(torch.float64) - (x_zp.to(torch.float64) if x_zp is not None else 0.0)
    wz = _axis_shape(w_zp, w, 0).to(torch.float64) if w_zp is not None else 0.0
    wf = w.to(torch.float64) - wz
    out = Conv(xf, wf, None, group=group, pads=pads, strides=strides, dilations=dilations,
               kernel_shape=kernel_shape, auto_pad=auto_pad)
    return torch.round(out).to(torch.int32)  # exact: products of 8-bit values sum exactly in float64


def dynamic_linear_ste(x, w, w_scale, w_zero):
    """``DynamicQuantizeLinear -> MatMulInteger -> scale`` with a float weight ``w`` [K, N] (for `distill`):
    the activation and the weight are fake-quantized onto ONNX Runtime's grids (uint8 asymmetric per
    tensor; int8 symmetric per column with ``w_scale``), with straight-through gradients."""
    q, scale, zp = DynamicQuantizeLinear(x)
    x_q = (q.to(torch.float32) - zp.to(torch.float32)) * scale
    x_q = x_q + (x - x.detach())
    return torch.matmul(x_q, fake_quant(w, w_scale, w_zero, axis=1))
