"""The twin's op table against onnxruntime, on small graphs built here with onnx.helper.

Each graph runs in onnxruntime (CPU, one thread) and in the twin on the same input; float ops agree to
float rounding, QuantizeLinear/DequantizeLinear bit for bit (rounding half to even, saturation, per-channel
scales), and the fake quantization passes gradients straight through.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ciard_deploy.errors import ArtifactError
from ciard_deploy.twin import SUPPORTED_OPS, OnnxTwin, TwinUnsupported, build_twin

pytestmark = pytest.mark.unit
RNG = np.random.default_rng(0)
F32 = TensorProto.FLOAT


def graph(nodes: list, out_shape: list | None = None, inits: dict[str, np.ndarray] | None = None,
          in_shape: tuple = ("N", 4, 6, 6), opset: int = 18, in_type: int = F32) -> onnx.ModelProto:
    """A model with input ``x`` and output ``y`` (float32 unless said), from nodes and numpy initializers."""
    inputs = [helper.make_tensor_value_info("x", in_type, list(in_shape))]
    outputs = [helper.make_tensor_value_info("y", F32, out_shape)]
    tensors = [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()]
    g = helper.make_graph(nodes, "g", inputs, outputs, tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def twin_run(model: onnx.ModelProto, x: np.ndarray, **kw: Any) -> np.ndarray:
    with torch.no_grad():
        return build_twin(model, **kw)(torch.from_numpy(x)).numpy()


def rand(*shape: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    return RNG.uniform(lo, hi, size=shape).astype(np.float32)


def node(op: str, inputs: list[str], output: str = "y", **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], **attrs)


W = rand(6, 4, 3, 3, lo=-1, hi=1)
B = rand(6, lo=-1, hi=1)
W_GROUPED = rand(6, 2, 3, 3, lo=-1, hi=1)
G = rand(10, 54, lo=-1, hi=1)

#: name -> (model, input shape): one graph per op (and per setting worth checking)
CASES: dict[str, Callable[[], tuple[onnx.ModelProto, tuple]]] = {
    "Relu": lambda: (graph([node("Sub", ["x", "h"], "s"), node("Relu", ["s"])], inits={"h": np.float32(0.5)}), ()),
    "LeakyRelu": lambda: (graph([node("Sub", ["x", "h"], "s"), node("LeakyRelu", ["s"], alpha=0.1)],
                                inits={"h": np.float32(0.5)}), ()),
    "Sigmoid": lambda: (graph([node("Sigmoid", ["x"])]), ()),
    "Tanh": lambda: (graph([node("Tanh", ["x"])]), ()),
    "HardSigmoid": lambda: (graph([node("HardSigmoid", ["x"], alpha=3.0, beta=-1.0)]), ()),
    "HardSwish": lambda: (graph([node("Mul", ["x", "k"], "s"), node("HardSwish", ["s"])],
                                inits={"k": np.float32(8.0)}), ()),
    "Neg-Abs": lambda: (graph([node("Neg", ["x"], "n"), node("Abs", ["n"])]), ()),
    "Exp-Sqrt": lambda: (graph([node("Exp", ["x"], "e"), node("Sqrt", ["e"])]), ()),
    "Round-half-to-even": lambda: (graph([node("Mul", ["x", "k"], "m"), node("Add", ["m", "h"], "t"),
                                         node("Round", ["t"])],  # x * 0 + (-2.5, -1.5, ..., 2.5): halves
                                        inits={"k": np.float32(0.0), "h": np.arange(-2.5, 3.0, 1.0, np.float32)}),
                                  ()),
    "Clip": lambda: (graph([node("Clip", ["x", "lo", "hi"])], inits={"lo": np.float32(0.2), "hi": np.float32(0.7)}),
                     ()),
    "Clip-min-only": lambda: (graph([node("Clip", ["x", "lo"])], inits={"lo": np.float32(0.2)}), ()),
    "Clip-opset6": lambda: (graph([node("Clip", ["x"], min=0.2, max=0.7)], opset=6), ()),
    "Softmax": lambda: (graph([node("Softmax", ["x"], axis=1)]), ()),
    "Softmax-opset11": lambda: (graph([node("Softmax", ["x"], axis=1)], opset=11), ()),
    "Add-Mul-Sub-Div broadcast": lambda: (graph([node("Add", ["x", "a"], "t1"), node("Mul", ["t1", "b"], "t2"),
                                                 node("Sub", ["t2", "c"], "t3"), node("Div", ["t3", "d"])],
                                                inits={"a": rand(4, 1, 1), "b": rand(1, 6), "c": np.float32(0.3),
                                                       "d": rand(1, 4, 1, 1, lo=0.5)}), ()),
    "Conv": lambda: (graph([node("Conv", ["x", "w", "b"], pads=[1, 1, 1, 1])], inits={"w": W, "b": B}), ()),
    "Conv-stride-dilation-nobias": lambda: (graph([node("Conv", ["x", "w"], strides=[2, 2], dilations=[2, 1],
                                                        pads=[2, 1, 2, 1])], inits={"w": W}), ()),
    "Conv-asymmetric-pads": lambda: (graph([node("Conv", ["x", "w", "b"], pads=[0, 1, 2, 0], strides=[2, 1])],
                                           inits={"w": W, "b": B}), ()),
    "Conv-groups": lambda: (graph([node("Conv", ["x", "w"], group=2, kernel_shape=[3, 3])],
                                  inits={"w": W_GROUPED}), ()),
    "Conv-SAME_UPPER": lambda: (graph([node("Conv", ["x", "w"], auto_pad="SAME_UPPER", strides=[2, 2])],
                                      inits={"w": W}, in_shape=("N", 4, 7, 7)), (4, 7, 7)),
    "Conv-SAME_LOWER": lambda: (graph([node("Conv", ["x", "w"], auto_pad="SAME_LOWER", strides=[2, 2])],
                                      inits={"w": W}, in_shape=("N", 4, 7, 7)), (4, 7, 7)),
    "Conv-VALID": lambda: (graph([node("Conv", ["x", "w"], auto_pad="VALID")], inits={"w": W}), ()),
    "MaxPool": lambda: (graph([node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2])]), ()),
    "MaxPool-pads": lambda: (graph([node("MaxPool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]), ()),
    "MaxPool-asymmetric": lambda: (graph([node("MaxPool", ["x"], kernel_shape=[2, 2], pads=[0, 0, 1, 1],
                                               strides=[2, 2])], in_shape=("N", 4, 7, 7)), (4, 7, 7)),
    "MaxPool-ceil": lambda: (graph([node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)],
                                   in_shape=("N", 4, 8, 8)), (4, 8, 8)),
    "MaxPool-SAME_UPPER": lambda: (graph([node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2],
                                               auto_pad="SAME_UPPER")], in_shape=("N", 4, 7, 7)), (4, 7, 7)),
    "AveragePool": lambda: (graph([node("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2])]), ()),
    "AveragePool-pads-exclude": lambda: (graph([node("AveragePool", ["x"], kernel_shape=[3, 3],
                                                     pads=[1, 1, 1, 1])]), ()),
    "AveragePool-pads-include": lambda: (graph([node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                                     count_include_pad=1)]), ()),
    "AveragePool-asymmetric": lambda: (graph([node("AveragePool", ["x"], kernel_shape=[2, 2], pads=[0, 0, 1, 1],
                                                   strides=[2, 2])], in_shape=("N", 4, 7, 7)), (4, 7, 7)),
    "AveragePool-ceil": lambda: (graph([node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                             ceil_mode=1)], in_shape=("N", 4, 8, 8)), (4, 8, 8)),
    "GlobalAveragePool": lambda: (graph([node("GlobalAveragePool", ["x"])]), ()),
    "GlobalMaxPool": lambda: (graph([node("GlobalMaxPool", ["x"])]), ()),
    "ReduceMean-opset18": lambda: (graph([node("ReduceMean", ["x", "ax"], keepdims=0)],
                                         inits={"ax": np.array([-1, -2], np.int64)}), ()),
    "ReduceMean-opset13": lambda: (graph([node("ReduceMean", ["x"], axes=[2, 3])], opset=13), ()),
    "BatchNormalization": lambda: (graph([node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
                                         inits={"s": rand(4, lo=0.5, hi=2), "b": rand(4, lo=-1), "m": rand(4),
                                                "v": rand(4, lo=0.1, hi=2)}), ()),
    "Flatten-Gemm": lambda: (graph([node("Flatten", ["x"], "f"), node("Gemm", ["f", "w", "b"], transB=1)],
                                   inits={"w": rand(10, 144, lo=-1), "b": rand(10)}), ()),
    "Gemm-transA-alpha-beta": lambda: (graph([node("Reshape", ["x", "sh"], "r"), node("Transpose", ["r"], "t"),
                                              node("Gemm", ["t", "w", "c"], transA=1, alpha=0.5, beta=2.0)],
                                             inits={"sh": np.array([0, -1], np.int64), "w": rand(3, 5, lo=-1),
                                                    "c": rand(1, 5)}, in_shape=("N", 3)), (3,)),
    "Flatten-axis2-MatMul": lambda: (graph([node("Flatten", ["x"], "f", axis=2), node("MatMul", ["f", "w"])],
                                           inits={"w": rand(36, 5, lo=-1)}), ()),
    "Shape-Gather-Unsqueeze-Concat-Reshape": lambda: (graph([
        node("Shape", ["x"], "shape"), node("Gather", ["shape", "zero"], "n", axis=0),
        node("Unsqueeze", ["n", "ax0"], "n1"), node("Concat", ["n1", "rest"], "target", axis=0),
        node("Reshape", ["x", "target"])],
        inits={"zero": np.array(0, np.int64), "ax0": np.array([0], np.int64), "rest": np.array([-1], np.int64)}), ()),
    "Squeeze-Unsqueeze-Identity": lambda: (graph([node("GlobalAveragePool", ["x"], "p"),
                                                  node("Squeeze", ["p", "ax"], "s"), node("Identity", ["s"], "i"),
                                                  node("Unsqueeze", ["i", "ax1"], "y")],
                                                 inits={"ax": np.array([2, 3], np.int64),
                                                        "ax1": np.array([-1], np.int64)}), ()),
    "Squeeze-Unsqueeze-opset11": lambda: (graph([node("GlobalMaxPool", ["x"], "p"),
                                                 node("Squeeze", ["p"], "s", axes=[3]),
                                                 node("Unsqueeze", ["s"], "y", axes=[0])], opset=11), ()),
    "Constant-Cast": lambda: (graph([helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
        np.float32(0.25))), node("Cast", ["x"], "h", to=TensorProto.FLOAT16), node("Cast", ["h"], "f", to=F32),
        node("Mul", ["f", "k"])]), ()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_op_agrees_with_onnxruntime(case):
    model, shape = CASES[case]()
    x = rand(3, *(shape or (4, 6, 6)))
    expected, got = ort_run(model, x), twin_run(model, x)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_the_table_covers_what_the_exporters_write():
    exported = {"Conv", "Relu", "Clip", "Add", "Sub", "Mul", "Div", "Gemm", "MatMul", "Flatten", "Reshape", "MaxPool",
                "AveragePool", "GlobalAveragePool", "ReduceMean", "BatchNormalization", "Constant", "Identity", "Cast",
                "Shape", "Gather", "Unsqueeze", "Concat", "QuantizeLinear", "DequantizeLinear"}
    assert exported <= SUPPORTED_OPS


# --------------------------------------------------------------------------- quantization
def qdq(scale: Any, zero_point: np.ndarray, axis: int | None = None,
        in_shape: tuple = ("N", 4, 6, 6)) -> onnx.ModelProto:
    kw = {} if axis is None else {"axis": axis}
    return graph([node("QuantizeLinear", ["x", "s", "z"], "q", **kw), node("DequantizeLinear", ["q", "s", "z"], **kw)],
                 inits={"s": np.asarray(scale, np.float32), "z": zero_point}, in_shape=in_shape)


def test_qdq_rounds_half_to_even_and_saturates_bit_exactly():
    s = np.float32(0.125)  # a power of two: k.5 * s is exact, so the ties really are ties
    ties = (np.arange(-6, 6, dtype=np.float32) + 0.5) * s
    beyond = np.array([-100.0, -16.0625, 15.875, 16.0, 100.0], np.float32)  # int8 range is [-16, 15.875] here
    x = np.concatenate([ties, beyond, rand(200, lo=-20, hi=20)]).reshape(-1, 1).astype(np.float32)
    model = qdq(s, np.array(0, np.int8), in_shape=("N", 1))
    got, expected = twin_run(model, x), ort_run(model, x)
    np.testing.assert_array_equal(got, expected)
    assert got[:12, 0].tolist() == [(np.round(v / s)) * s for v in ties.tolist()]  # numpy rounds half to even too
    assert got[:12, 0].tolist()[5:7] == [0.0, 0.0] and got[12:17, 0].tolist() == [-16.0, -16.0, 15.875, 15.875, 15.875]


def test_qdq_uint8_zero_point_and_default_zero_point():
    x = rand(64, 3, lo=-2, hi=3)
    model = qdq(0.01, np.array(128, np.uint8), in_shape=("N", 3))
    np.testing.assert_array_equal(twin_run(model, x), ort_run(model, x))
    no_zp = graph([node("QuantizeLinear", ["x", "s"], "q"), node("DequantizeLinear", ["q", "s"])],
                  inits={"s": np.float32(0.01)}, in_shape=("N", 3))  # uint8, zero point 0: negatives clip to 0
    got = twin_run(no_zp, x)
    np.testing.assert_array_equal(got, ort_run(no_zp, x))
    assert got.min() == 0.0 and np.isclose(got.max(), 2.55)


def test_qdq_per_channel_activation_and_weights():
    scales = np.array([0.01, 0.02, 0.05, 0.1], np.float32)
    x = rand(5, 4, 6, 6, lo=-3, hi=3)
    model = qdq(scales, np.array([0, 1, -2, 3], np.int8), axis=1)
    np.testing.assert_array_equal(twin_run(model, x), ort_run(model, x))
    # int8 weights stored quantized, per output channel (axis 0), into a Conv: dequantized at build
    wq = RNG.integers(-127, 128, size=(6, 4, 3, 3)).astype(np.int8)
    ws = rand(6, lo=0.001, hi=0.01)
    conv = graph([node("DequantizeLinear", ["wq", "ws", "wz"], "w", axis=0), node("Conv", ["x", "w"], pads=[1] * 4)],
                 inits={"wq": wq, "ws": ws, "wz": np.zeros(6, np.int8)})
    np.testing.assert_allclose(twin_run(conv, x), ort_run(conv, x), rtol=1e-5, atol=1e-5)
    twin = build_twin(conv)
    assert twin.precision == "int8" and [b.dtype for b in twin.buffers()] == [torch.float32]  # folded once


def test_int32_bias_dequantizes_exactly():
    q = np.array([-(2**30), -7, 0, 5, 2**30 + 3], np.int32)
    model = graph([node("DequantizeLinear", ["q", "s"], "b"), node("Add", ["x", "b"])],
                  inits={"q": q, "s": np.float32(1e-6)}, in_shape=("N", 5))
    x = rand(2, 5)
    np.testing.assert_array_equal(twin_run(model, x), ort_run(model, x))


def test_fake_quantization_gradient_is_straight_through():
    model = qdq(0.125, np.array(0, np.int8), in_shape=("N", 1))
    x = torch.tensor([[-100.0], [-1.3], [0.06], [0.0625], [3.3], [15.9], [100.0]], requires_grad=True)
    y = build_twin(model)(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # identity, also where the value saturates
    assert y[:, 0].tolist() == [-16.0, -1.25, 0.0, 0.0, 3.25, 15.875, 15.875]


# --------------------------------------------------------------------------- FP16
@pytest.fixture(scope="module")
def fp16_model() -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp32 = graph([node("Sub", ["x", "m"], "s"), node("Div", ["s", "d"], "n"),
                  node("Conv", ["n", "w", "b"], "c", pads=[1] * 4), node("Relu", ["c"], "r"),
                  node("GlobalAveragePool", ["r"], "p"), node("Flatten", ["p"], "f"),
                  node("Gemm", ["f", "g", "gb"], transB=1)],
                 inits={"m": np.float32(0.3), "d": np.float32(0.2), "w": W, "b": B, "g": rand(10, 6, lo=-1),
                        "gb": rand(10)})
    half = convert_float_to_float16(fp32, keep_io_types=True)
    from ciard_deploy.export.onnx import topological_sort

    topological_sort(half)
    return half


def test_fp16_graph_modes(fp16_model):
    x = rand(16, 4, 6, 6)
    expected = ort_run(fp16_model, x)
    twin = build_twin(fp16_model)
    assert twin.precision == "fp16" and any(b.dtype == torch.float16 for b in twin.buffers())
    # onnxruntime's CPU provider computes a float16 graph in float32 on the float16 weights
    np.testing.assert_allclose(twin_run(fp16_model, x), expected, rtol=1e-5, atol=1e-6)
    # the graph's own semantics: every float16 value rounded, so the logits are float16 numbers
    emulated = twin_run(fp16_model, x, half="emulate")
    assert np.array_equal(emulated, emulated.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(emulated, expected, atol=1e-2)
    np.testing.assert_allclose(twin_run(fp16_model, x, half="native"), emulated, atol=1e-2)
    with pytest.raises(ValueError, match="half must be one of"):
        build_twin(fp16_model, half="bf16")


def test_fp16_buffers_survive_a_dtype_cast(fp16_model):
    x = rand(4, 4, 6, 6)
    twin = build_twin(fp16_model, half="emulate")
    before = twin(torch.from_numpy(x)).detach()
    twin.float()  # nn.Module.float() widens float16 buffers: the twin restores their type when it runs
    assert torch.equal(twin(torch.from_numpy(x)).detach(), before)


# --------------------------------------------------------------------------- the module
CONV_NET = ("Conv", lambda: graph([node("Conv", ["x", "w", "b"], "c", pads=[1] * 4), node("Relu", ["c"], "r"),
                                   node("MaxPool", ["r"], "p", kernel_shape=[2, 2], strides=[2, 2]),
                                   node("Flatten", ["p"], "f"), node("Gemm", ["f", "g"], transB=1)],
                                  inits={"w": W, "b": B, "g": G}))


def test_dynamic_batch_gradients_copy_and_device():
    model = CONV_NET[1]()
    twin = build_twin(model)
    assert isinstance(twin, OnnxTwin) and not twin.training and twin.precision == "fp32"
    for n in (1, 7):  # logits up to ~25: another summation order moves them by ulps of 25 (2e-6), near 0 too
        x = rand(n, 4, 6, 6)
        np.testing.assert_allclose(twin_run(model, x), ort_run(model, x), rtol=1e-5, atol=1e-5)
    x = torch.from_numpy(rand(3, 4, 6, 6)).requires_grad_(True)
    torch.nn.functional.cross_entropy(twin(x), torch.tensor([0, 1, 2])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    clone = copy.deepcopy(twin).to("cpu")
    assert torch.equal(clone(x).detach(), twin(x).detach())
    assert set(twin.state_dict()) == {f"c{i}" for i in range(3)}
    assert "precision=fp32" in repr(twin)


def test_white_box_attack_runs_on_the_twin():
    from ciard_deploy.attacks import create_attack

    twin = build_twin(CONV_NET[1]())
    x = torch.from_numpy(rand(8, 4, 6, 6))
    y = twin(x).argmax(1).detach()
    x_adv = create_attack("pgd10", 0.1, seed=0).run(twin, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and (twin(x_adv).argmax(1) != y).any()


def test_topological_order_is_restored():
    model = CONV_NET[1]()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    x = rand(2, 4, 6, 6)
    np.testing.assert_allclose(twin_run(model, x), twin_run(CONV_NET[1](), x))


# --------------------------------------------------------------------------- what it cannot do
def test_unsupported_ops_are_named_up_front(tmp_path):
    model = graph([node("Relu", ["x"], "r"), node("Foo", ["r"], "f"), node("LSTM", ["f", "w", "w"], "l"),
                   helper.make_node("QLinearConv", ["l"], ["q"], domain="com.microsoft"), node("Foo", ["q"])],
                  inits={"w": rand(1, 4, 4)})
    path = tmp_path / "model.int8.onnx"
    onnx.save(model, str(path))
    with pytest.raises(TwinUnsupported) as e:
        build_twin(path)
    msg = str(e.value)
    assert isinstance(e.value, ArtifactError) and "\n" not in msg
    assert msg == ("model.int8.onnx: the twin cannot reproduce op(s) Foo, LSTM, com.microsoft.QLinearConv; white-box "
                   "attacks on this artifact are not possible (transfer and query-only only)")


def test_unsupported_settings_are_named():
    bn = graph([node("BatchNormalization", ["x", "s", "s", "s", "s"], training_mode=1)],
               inits={"s": np.ones(4, np.float32)})
    with pytest.raises(TwinUnsupported, match=r"BatchNormalization \(training_mode=1\)"):
        build_twin(bn, name="bn.onnx")
    two_outputs = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"])],
                                    "g", [helper.make_tensor_value_info("x", F32, ["N", 3])],
                                    [helper.make_tensor_value_info("a", F32, None),
                                     helper.make_tensor_value_info("b", F32, None)])
    with pytest.raises(TwinUnsupported, match="one input and one output"):
        build_twin(helper.make_model(two_outputs))


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        build_twin(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="bad.onnx"):
        build_twin(bad)
