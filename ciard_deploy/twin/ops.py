"""The twin's op table: each ONNX operator the twin reproduces as a torch function (``OPS``), the ONNX
dtypes it computes with, and the error for what it cannot reproduce. ``graph.py`` runs a graph
through this table; what each op reproduces, and how exactly, is in its module docstring.

Adding an op: a function ``fn(attributes, *inputs)`` here and its row in ``OPS`` (plus, where its
settings can exceed what the function does, a rule in ``graph._limits``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ciard_deploy.errors import ArtifactError


class TwinUnsupported(ArtifactError):
    """The twin cannot reproduce an op of this graph: white-box attacks on the artifact are impossible."""


# --------------------------------------------------------------------------- dtypes
#: ONNX TensorProto data type -> torch dtype, for the types the twin computes with.
DTYPES: dict[int, torch.dtype] = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
                                  7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64}
#: The range a QuantizeLinear output saturates to, by the zero point's type.
QRANGE: dict[torch.dtype, tuple[int, int]] = {torch.int8: (-128, 127), torch.uint8: (0, 255),
                                              torch.int16: (-32768, 32767), torch.int32: (-2**31, 2**31 - 1)}


def type_name(onnx_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(onnx_type)


# --------------------------------------------------------------------------- op helpers
Attrs = dict[str, Any]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _pads(a: Attrs, x: torch.Tensor, kernel: Sequence[int]) -> list[int]:
    """ONNX pads (all begins, then all ends) for ``x``, resolving ``auto_pad`` against its spatial size."""
    n = len(kernel)
    strides = a.get("strides", [1] * n)
    dilations = a.get("dilations", [1] * n)
    mode = a.get("auto_pad", "NOTSET")
    if mode == "VALID":
        return [0] * (2 * n)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begins.append(small if mode == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins + ends
    return list(a.get("pads", [0] * (2 * n)))


def _pad_pairs(pads: list[int]) -> list[int]:
    """ONNX pads (all begins, then all ends) as ``F.pad`` takes them (last dimension first)."""
    n = len(pads) // 2
    return [v for b, e in zip(reversed(pads[:n]), reversed(pads[n:])) for v in (b, e)]


def _torch_padding(pads: list[int], kernel: Sequence[int] | None = None) -> list[int] | None:
    """The symmetric padding torch can apply itself (pools: at most half the kernel), else None."""
    n = len(pads) // 2
    if pads[:n] != pads[n:] or (kernel is not None and any(2 * p > k for p, k in zip(pads[:n], kernel))):
        return None
    return pads[:n]


def _along(t: torch.Tensor | None, axis: int, rank: int) -> torch.Tensor | None:
    """A per-axis (1-D) scale or zero point shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    if t is None or t.dim() == 0 or rank <= 1:
        return t
    shape = [1] * rank
    shape[_axis(axis, rank)] = -1
    return t.reshape(shape)


def _quantize(a: Attrs, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """QuantizeLinear, fake: the integer values as a float tensor; gradient straight through (of x / scale)."""
    qtype = zero_point.dtype if zero_point is not None else DTYPES[int(a.get("output_dtype", 0) or 2)]
    lo, hi = QRANGE[qtype]
    axis, rank = a.get("axis", 1), x.dim()
    v = x / _along(scale, axis, rank).to(x.dtype)
    z = _along(zero_point, axis, rank)
    if z is not None:
        v = v + z.to(x.dtype)
    q = torch.clamp(torch.round(v.detach()), lo, hi)  # round(x/s) + z == round(x/s + z): z is an integer
    return q + (v - v.detach())  # value exactly q, gradient that of v


def _dequantize(a: Attrs, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    axis, rank = a.get("axis", 1), q.dim()
    s, z = _along(scale, axis, rank), _along(zero_point, axis, rank)
    if z is not None:
        q = q.long() - z.long() if not q.is_floating_point() else q - z.to(q.dtype)  # exact integer difference
    return q.to(s.dtype) * s


def _conv(a: Attrs, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    kernel = a.get("kernel_shape", list(w.shape[2:]))
    n = len(kernel)
    pads = _pads(a, x, kernel)
    padding = _torch_padding(pads)
    if padding is None:
        x, padding = F.pad(x, _pad_pairs(pads)), [0] * n
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return fn(x, w, b, a.get("strides", [1] * n), padding, a.get("dilations", [1] * n), a.get("group", 1))


def _max_pool(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    kernel = a["kernel_shape"]
    n = len(kernel)
    pads = _pads(a, x, kernel)
    padding = _torch_padding(pads, kernel)
    if padding is None:
        x, padding = F.pad(x, _pad_pairs(pads), value=-math.inf), [0] * n
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    return fn(x, kernel, a.get("strides", [1] * n), padding, a.get("dilations", [1] * n), bool(a.get("ceil_mode", 0)))


def _avg_pool(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    kernel = a["kernel_shape"]
    n = len(kernel)
    pads = _pads(a, x, kernel)
    include, ceil = bool(a.get("count_include_pad", 0)), bool(a.get("ceil_mode", 0))
    strides = a.get("strides", [1] * n)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    padding = _torch_padding(pads, kernel)
    if padding is not None:
        return fn(x, kernel, strides, padding, ceil, include)
    # asymmetric (or wide) pads: the mean over the zero-padded input, divided by the share of real pixels
    out = fn(F.pad(x, _pad_pairs(pads)), kernel, strides, [0] * n, ceil, True)
    if include:
        return out
    share = fn(F.pad(torch.ones_like(x[:1, :1]), _pad_pairs(pads)), kernel, strides, [0] * n, ceil, True)
    return out / share


def _gemm(a: Attrs, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor | None = None) -> torch.Tensor:
    A = A.t() if a.get("transA", 0) else A
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if a.get("transB", 0) and alpha == 1.0 and beta == 1.0 and (C is None or C.dim() <= 1):
        return F.linear(A, B, C)
    y = A @ (B.t() if a.get("transB", 0) else B)
    y = y * alpha if alpha != 1.0 else y
    return y if C is None else y + beta * C


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _reshape(a: Attrs, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    dims = _ints(shape) or []
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    axis = _axis(a.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reduce_mean(a: Attrs, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    dims = a["axes"] if "axes" in a else _ints(axes)
    if not dims:
        if a.get("noop_with_empty_axes", 0):
            return x
        dims = list(range(x.dim()))
    return x.mean(dim=[_axis(d, x.dim()) for d in dims], keepdim=bool(a.get("keepdims", 1)))


def _batch_norm(a: Attrs, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                var: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _clip(a: Attrs, x: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
    lo = a["min"] if "min" in a else (None if lo is None else lo.to(x.dtype))  # opset < 11: attributes
    hi = a["max"] if "max" in a else (None if hi is None else hi.to(x.dtype))
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


def _softmax(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    if a["_opset"] >= 13:
        return torch.softmax(x, dim=a.get("axis", -1))
    axis = _axis(a.get("axis", 1), x.dim())  # before opset 13: the input as a 2-D matrix from axis on
    return torch.softmax(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)


def _div(a: Attrs, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point():
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


def _unsqueeze(a: Attrs, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    dims = a["axes"] if "axes" in a else _ints(axes) or []
    rank = x.dim() + len(dims)
    for d in sorted(_axis(d, rank) for d in dims):
        x = x.unsqueeze(d)
    return x


def _squeeze(a: Attrs, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    dims = a["axes"] if "axes" in a else _ints(axes)
    if dims is None:
        return x.squeeze()
    return x.squeeze(tuple(_axis(d, x.dim()) for d in dims))


def _gather(a: Attrs, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    axis = _axis(a.get("axis", 0), x.dim())
    flat = idx.reshape(-1).long() % x.shape[axis]  # negative indices count from the end
    out = x.index_select(axis, flat)
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


def _shape(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    dims = list(x.shape)[a.get("start", 0):a.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


def _constant(a: Attrs) -> torch.Tensor:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            value = a[key]
            if isinstance(value, np.ndarray):
                return torch.from_numpy(value.copy())
            return torch.tensor(value, dtype=torch.float32 if "float" in key else torch.int64)
    raise TwinUnsupported("Constant without a value, value_float(s) or value_int(s)")  # caught by the up-front check


#: op_type -> torch function ``fn(attributes, *inputs)`` (a missing optional input is None).
OPS: dict[str, Callable[..., Any]] = {
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Div": _div,
    "Neg": lambda a, x: -x,
    "Abs": lambda a, x: x.abs(),
    "Sqrt": lambda a, x: x.sqrt(),
    "Exp": lambda a, x: x.exp(),
    "Round": lambda a, x: torch.round(x),  # half to even, as ONNX
    "Relu": lambda a, x: F.relu(x),
    "LeakyRelu": lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Sigmoid": lambda a, x: torch.sigmoid(x),
    "Tanh": lambda a, x: torch.tanh(x),
    "HardSigmoid": lambda a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda a, x: x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0),
    "Clip": _clip,
    "Softmax": _softmax,
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda a, x, y: torch.matmul(x, y),
    "BatchNormalization": _batch_norm,
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": lambda a, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda a, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": _reduce_mean,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda a, x: x.permute(*(a["perm"] if "perm" in a else reversed(range(x.dim())))),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": lambda a, *xs: torch.cat(xs, dim=a["axis"]),
    "Shape": _shape,
    "Gather": _gather,
    "Identity": lambda a, x: x,
    "Dropout": lambda a, x, *rest: x,  # inference: the identity
    "Cast": lambda a, x: x.to(DTYPES[a["to"]]),
    "Constant": _constant,
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
}
#: Every op type the twin reproduces (ai.onnx domain).
SUPPORTED_OPS = frozenset(OPS)



__all__ = ["Attrs", "DTYPES", "OPS", "QRANGE", "SUPPORTED_OPS", "TwinUnsupported", "type_name"]
