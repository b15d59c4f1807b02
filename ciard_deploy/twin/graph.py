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
- QAT artifacts (``quantize_aware/export.py``: Q/DQ on the input of each Conv/Gemm only, so onnxruntime
  runs those in float on the dequantized values, not as QLinearConv), digits, 360 test images, their
  PGD-20 @ 0.15 images crafted on the twin, 1080 in-ball: 100 % agreement, 99.7 to 100 % bit-exact rows,
  max diff <= 0.034 (float summation order, then one activation step). Before the export put each
  bias on the int32 grid, onnxruntime's optimizer rewrote the float biases of some layers to int32
  itself (``WeightBiasQuantization``: those whose output is quantized again): 59 to 93 % bit-exact,
  max diff 0.08, and 99 % agreement on 100 in-ball points of tests/integration/test_workflow_qat.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn

from ciard_deploy.errors import ArtifactError
from ciard_deploy.twin.ops import DTYPES, OPS, Attrs, TwinUnsupported, type_name

#: How a float16 graph is computed (see ``build_twin``).
HalfMode = Literal["float32", "emulate", "native"]
HALF_MODES: tuple[str, ...] = ("float32", "emulate", "native")


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
        return f"output_dtype {type_name(a['output_dtype'])}"
    if op == "Cast" and a.get("to") not in DTYPES:
        return f"to {type_name(a['to'])}"
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
            bad.append(f"initializer of type {type_name(t.data_type)}")
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
