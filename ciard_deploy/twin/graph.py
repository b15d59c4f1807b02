"""The twin of an exported ONNX artifact: a torch module that computes what the runtime computes, with gradients.

``build_twin("model.int8.onnx")`` reads the exported file itself (not the PyTorch student it came from)
and returns an ``OnnxTwin``: an ``nn.Module`` that runs the graph node by node, in topological order,
each node a torch function from one table (``OPS``). It takes float32 NCHW images in [0, 1] of any batch
size and returns float32 logits (N, K); autograd flows through every node, so white-box attacks
(``create_attack("pgd20", eps).run(twin, x, y)``) can be crafted against the deployed artifact rather
than against the FP32 student, whose gradients an FP16 or INT8 artifact does not share.

What it reproduces:

- **FP32**: the ONNX operator semantics in float32. Initializers become buffers; a node whose inputs
  are all constants (weight DequantizeLinear, Constant, shape arithmetic on constants) is evaluated
  once, when the twin is built.
- **FP16** (``onnxruntime.transformers.float16`` with ``keep_io_types=True``: a Cast to float16 at the
  input, one back at the output, float16 weights). Measured, not assumed: onnxruntime's CPU provider
  has no float16 kernels for these ops on x86, so it runs the whole graph in float32 on the float16
  weights and drops the casts around them (``InsertedPrecisionFreeCast``): the input is not even
  rounded to float16. ``half="float32"`` (the default) does the same: float16 initializers keep their
  float16 values, every op computes in float32, and a Cast to float16 whose value only feeds compute
  ops is dropped. ``half="emulate"`` follows the graph's own typing instead (each op computes in
  float32 and rounds its output to float16, as float16 kernels on CUDA, TensorRT or an ARM CPU do);
  ``half="native"`` runs torch's half-precision ops (on the CPU it measured the same as emulate).
- **INT8 QDQ** (``onnxruntime.quantization.quantize_static``, QDQ format): fake quantization at every
  QuantizeLinear/DequantizeLinear with the graph's own scales and zero points, per tensor or per
  channel (``axis``): ``clamp(round_half_even(x / scale) + zero_point)`` within the zero point type's
  range (int8, uint8, int16, int32), then ``(q - zero_point) * scale``. Weights stored already
  quantized (an int8 or int32 initializer into DequantizeLinear) are dequantized once, at build. The
  gradient of QuantizeLinear -> DequantizeLinear is straight through: the identity, also where the
  value saturates. onnxruntime fuses the QDQ groups into integer kernels (QLinearConv, QGemm) that
  requantize with one float multiplier, so a value within float rounding of a half-way point can land
  one quantization step apart.

An op the table lacks (or a setting of one the twin does not implement: block quantization, training
mode BatchNormalization, subgraphs, float8/int4 tensors) makes ``build_twin`` raise ``TwinUnsupported``
naming the file and every such op, before anything is built: white-box attacks on that artifact are
then impossible, and only transferred and query-only attacks remain.

Fidelity measured here (onnxruntime 1.32.0 CPU provider, one thread; torch 2.14.1; ``measure_fidelity``):

- the session's PGD-trained digits small_cnn (tests/integration/test_twin_digits.py), 360 test images,
  their PGD-20 @ 0.15 images crafted on each twin, and random images in the 0.15 ball; top-1 agreement
  clean / adversarial / in-ball, max |logit difference|, bit-exact rows:

  ===================== ======================== =========== ======================
  artifact              agreement                max diff    bit-exact rows
  ===================== ======================== =========== ======================
  FP32                  100 / 100 / 100 %        1.9e-6      0 %
  FP16 (float32)        100 / 100 / 100 %        3.8e-6      0 %
  FP16 (emulate/native) 100 / 99.7 / 100 %       7.4e-3      0 %
  INT8                  100 / 100 / 100 %        0.0999      100 / 99.7 / 100 %
  ===================== ======================== =========== ======================

  (FP32 rows differ in the last bits: onnxruntime's NCHWc convolutions sum in another order; the one
  INT8 row that is not bit-exact is one step of the logits' quantization scale, 0.1.) The FP32 twin's
  input gradient equals the PyTorch student's to 4e-9.
- random-weight exports of tiny_cnn, small_cnn, small_cnn_wide, resnet18_tiny, mobilenetv2_tiny,
  mobilenetv2, resnet18, resnet56, wrn-16-2 and preactresnet18 (small_cnn, mobilenetv2_tiny and wrn-16-2
  also through the TorchScript exporter), 128 uniform images and 128 in-ball: 100 % agreement for every
  artifact; max diff FP32 <= 6.6e-7, FP16 (float32) <= 6e-7 (emulate 6e-5 to 9e-4), INT8 <= 0.013 with
  24 to 100 % bit-exact rows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ciard_deploy.errors import ArtifactError

#: How a float16 graph is computed (see ``build_twin``).
HalfMode = Literal["float32", "emulate", "native"]
HALF_MODES: tuple[str, ...] = ("float32", "emulate", "native")


class TwinUnsupported(ArtifactError):
    """The twin cannot reproduce an op of this graph: white-box attacks on the artifact are impossible."""


# --------------------------------------------------------------------------- dtypes
#: ONNX TensorProto data type -> torch dtype, for the types the twin computes with.
DTYPES: dict[int, torch.dtype] = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
                                  7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64}
#: The range a QuantizeLinear output saturates to, by the zero point's type.
QRANGE: dict[torch.dtype, tuple[int, int]] = {torch.int8: (-128, 127), torch.uint8: (0, 255),
                                              torch.int16: (-32768, 32767), torch.int32: (-2**31, 2**31 - 1)}


def _type_name(onnx_type: int) -> str:
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


# --------------------------------------------------------------------------- the up-front check
def _limits(op: str, a: Attrs, consumed_outputs: int) -> str | None:
    """Why this node's settings are beyond the twin (None when it can reproduce them)."""
    if consumed_outputs > 1:
        return "extra outputs"
    if op == "BatchNormalization" and a.get("training_mode", 0):
        return "training_mode=1"
    if op in ("QuantizeLinear", "DequantizeLinear") and a.get("block_size", 0):
        return "block quantization"
    if op == "QuantizeLinear" and a.get("output_dtype", 0) not in (0, 2, 3, 5):
        return f"output_dtype {_type_name(a['output_dtype'])}"
    if op == "Cast" and a.get("to") not in DTYPES:
        return f"to {_type_name(a['to'])}"
    if op in ("MaxPool", "AveragePool", "Conv") and len(a.get("kernel_shape", [0, 0])) not in (1, 2, 3):
        return "rank"
    if op == "AveragePool" and any(d != 1 for d in a.get("dilations", [])):
        return "dilations"
    if op == "Constant" and not any(k in a for k in ("value", "value_float", "value_floats", "value_int",
                                                     "value_ints")):
        return "sparse or string value"
    return None


def check_supported(model: Any, name: str | None = None) -> None:
    """Raises ``TwinUnsupported`` naming every op (and initializer type) of ``model`` the twin cannot
    reproduce, in one line; returns None when it can reproduce them all."""
    graph = model.graph
    opset = _default_opset(model)
    consumers: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
    for out in graph.output:
        consumers[out.name] = consumers.get(out.name, 0) + 1
    bad: list[str] = []
    for node in graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if op not in OPS:
            bad.append(op)
            continue
        if any(att.type in (5, 10) for att in node.attribute):  # GRAPH or GRAPHS: If, Loop, Scan
            bad.append(f"{op} (subgraph)")
            continue
        consumed = sum(1 for o in node.output[1:] if o and consumers.get(o)) + 1
        why = _limits(op, _attributes(node, opset), consumed)
        if why:
            bad.append(f"{op} ({why})")
    for t in graph.initializer:
        if t.data_type not in DTYPES:
            bad.append(f"initializer of type {_type_name(t.data_type)}")
    if bad:
        label = name or "the model"
        raise TwinUnsupported(f"{label}: the twin cannot reproduce op(s) {', '.join(dict.fromkeys(bad))}; white-box "
                              "attacks on this artifact are not possible (transfer and query-only only)")


# --------------------------------------------------------------------------- building
def _default_opset(model: Any) -> int:
    return next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)


def _attributes(node: Any, opset: int) -> Attrs:
    from onnx import helper, numpy_helper

    out: Attrs = {"_opset": opset}
    for att in node.attribute:
        value = helper.get_attribute_value(att)
        if isinstance(value, bytes):
            value = value.decode()
        elif hasattr(value, "raw_data") and hasattr(value, "dims"):  # a TensorProto
            value = numpy_helper.to_array(value)
        out[att.name] = value
    return out


def _topological(nodes: Sequence[Any], available: Iterable[str]) -> list[Any]:
    have = set(available) | {""}
    ordered, pending = [], list(nodes)
    while pending:
        ready = [n for n in pending if all(i in have for i in n.input)]
        if not ready:
            missing = sorted({i for n in pending for i in n.input if i not in have})
            raise ArtifactError(f"the graph reads value(s) no node produces: {', '.join(missing[:5])}")
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            ordered.append(n)
            have.update(n.output)
    return ordered


class OnnxTwin(nn.Module):
    """An ONNX graph executed with torch ops (see the module docstring); build it with ``build_twin``.

    ``forward(x)`` takes float32 NCHW images in [0, 1] (any batch size, any device the twin was moved
    to with ``.to``) and returns float32 logits (N, K), differentiable with respect to ``x``. The twin
    has no training behaviour: BatchNormalization uses the graph's statistics in train mode as well.

    Attributes:
        name: the file (or graph) it was built from.
        precision: ``fp32``, ``fp16`` or ``int8``, read from the graph (float16 initializers, QDQ nodes).
        op_types: the op types the graph runs, sorted.
    """

    def __init__(self, model: Any, name: str, half: HalfMode = "float32") -> None:
        super().__init__()
        from onnx import numpy_helper

        if half not in HALF_MODES:
            raise ValueError(f"half must be one of {', '.join(HALF_MODES)}, got {half!r}")
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise TwinUnsupported(f"{name}: the twin runs graphs with one input and one output, this one has "
                                  f"{len(inputs)} and {len(graph.output)}")
        self.name, self.half_mode = name, half
        self.opset = _default_opset(model)
        self.input_name, self.output_name = inputs[0].name, graph.output[0].name
        self.input_dtype = DTYPES.get(inputs[0].type.tensor_type.elem_type, torch.float32)

        consts = {n: torch.from_numpy(numpy_helper.to_array(t).copy()) for n, t in inits.items()}
        plan: list[tuple[str, list[str], list[str], Attrs]] = []
        with torch.no_grad():
            for node in _topological(graph.node, [self.input_name, *consts]):
                step = (node.op_type, list(node.input), list(node.output), _attributes(node, self.opset))
                if all(i in consts or i == "" for i in node.input):  # constant folding: evaluated once, here
                    for out, value in zip(node.output, self._run(step, [consts.get(i) for i in node.input])):
                        consts[out] = value
                else:
                    plan.append(step)
        consumers: dict[str, set[str]] = {}
        for op, ins, _, _ in plan:
            for i in ins:
                consumers.setdefault(i, set()).add(op)
        # onnxruntime's CPU provider has no float16 kernels for the compute ops: it runs them in float32
        # and drops a cast to float16 that only feeds them (half="float32" does the same)
        for op, _, outs, attrs in plan:
            if op == "Cast" and attrs["to"] == 10 and "Cast" not in consumers.get(outs[0], {"Cast"}):
                attrs["_precision_free"] = True
        self._plan = plan
        needed = {i for _, ins, _, _ in plan for i in ins} | {self.output_name}
        self._buffers_of: dict[str, str] = {}
        for k, value_name in enumerate(v for v in consts if v in needed):
            key = f"c{k}"
            self.register_buffer(key, consts[value_name].contiguous())
            self._buffers_of[value_name] = key
        self._dtypes = {v: consts[v].dtype for v in self._buffers_of}  # restored if .double()/.half() touches them
        op_types = {n.op_type for n in graph.node}
        self.op_types = sorted(op_types)
        self.precision = ("int8" if {"QuantizeLinear", "DequantizeLinear"} & op_types else
                          "fp16" if any(t.data_type == 10 for t in graph.initializer) else "fp32")
        self.eval()

    def _run(self, step: tuple[str, list[str], list[str], Attrs], args: list[torch.Tensor | None]) -> tuple:
        """One node on its input values (None for a missing optional input); returns its outputs."""
        op, _, _, attrs = step
        if attrs.get("_precision_free") and self.half_mode == "float32":
            return (args[0].float(),)  # onnxruntime's CPU provider drops this cast to float16
        widen = self.half_mode != "native" and op != "Cast" and any(a is not None and a.dtype == torch.float16
                                                                for a in args)
        if widen:  # compute in float32 on the float16 values ...
            args = [a.float() if a is not None and a.dtype == torch.float16 else a for a in args]
        out = OPS[op](attrs, *args)
        outs = out if isinstance(out, tuple) else (out,)
        if widen and self.half_mode == "emulate":  # ... and round the result to float16 once
            outs = tuple(o.half() if o.dtype == torch.float32 else o for o in outs)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.input_name: x.to(self.input_dtype)}
        for value_name, key in self._buffers_of.items():
            buf = getattr(self, key)
            env[value_name] = buf if buf.dtype == self._dtypes[value_name] else buf.to(self._dtypes[value_name])
        for step in self._plan:
            outs = self._run(step, [env[i] if i else None for i in step[1]])
            for name, value in zip(step[2], outs):
                if name:
                    env[name] = value
        return env[self.output_name].float()

    def extra_repr(self) -> str:
        return f"{self.name!r}, precision={self.precision}, nodes={len(self._plan)}, ops={','.join(self.op_types)}"


def build_twin(model: str | os.PathLike | Any, name: str | None = None, half: HalfMode = "float32") -> OnnxTwin:
    """The twin of an ONNX file (or ``onnx.ModelProto``): an ``OnnxTwin`` on the CPU, in eval mode.

    Args:
        model: path to the ``.onnx`` file, or a loaded ``onnx.ModelProto``.
        name: how messages name it (default: the file name, or the graph's name).
        half: how a float16 graph is computed (``HALF_MODES``): ``"float32"`` (default) widens its float16
            values and computes every op in float32 without rounding in between, which is what onnxruntime's
            CPU provider does; ``"emulate"`` computes each op in float32 and rounds its output to float16
            (the graph's own semantics, as float16 kernels on CUDA, TensorRT or ARM CPUs compute);
            ``"native"`` runs torch's half-precision ops.

    Raises:
        TwinUnsupported: the graph has ops (or op settings) the twin cannot reproduce; every one is named.
        ArtifactError: the file is missing or not an ONNX model.

    Example:
        >>> twin = build_twin("export/model.int8.onnx")  # doctest: +SKIP
        >>> x_adv = create_attack("pgd20", 0.15).run(twin, x, y)  # doctest: +SKIP
    """
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ArtifactError(f"ONNX file not found: {path}")
        try:
            proto = onnx.load(str(path))
        except Exception as e:
            raise ArtifactError(f"cannot read {path.name} as ONNX: {type(e).__name__}: {e}") from None
        label = name or path.name
    else:
        proto, label = model, name or (model.graph.name or "the ONNX model")
    check_supported(proto, label)
    return OnnxTwin(proto, label, half)
