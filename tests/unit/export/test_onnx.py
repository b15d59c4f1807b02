"""The FP32 exporter's fallback and opset handling, and the FP16 graph fix-up, on tiny_cnn."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import ciard_deploy.export.onnx as onnx_export
from ciard_deploy.models import create_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny_cnn", 10, 1).eval()


def test_torchscript_fallback_when_dynamo_fails(tiny, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("torch.export could not trace this model")

    monkeypatch.setattr(onnx_export, "_dynamo_export", broken)
    warnings: list[str] = []
    proto, details = onnx_export.export_fp32(tiny, tmp_path, (1, 8, 8), opset=17, warn=warnings.append)
    assert "TorchScript" in details["tool"] and "could not trace" in details["dynamo_error"]
    assert warnings and "falling back to the TorchScript exporter" in warnings[0]
    info = onnx_export.save_onnx(proto, tmp_path / "m.onnx", {"precision": "fp32"}, 17)
    assert info["opset"] == 17 == onnx_export.default_opset(onnx.load(str(tmp_path / "m.onnx")))


def test_topological_sort_fixes_appended_cast_nodes():
    from onnx import TensorProto, helper

    relu = helper.make_node("Relu", ["x_half"], ["y"])
    cast = helper.make_node("Cast", ["x"], ["x_half"], to=TensorProto.FLOAT)  # appended last, as the fp16 converter does
    graph = helper.make_graph([relu, cast], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    onnx_export.topological_sort(model)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Cast", "Relu"]


def test_debug_info_is_stripped_and_files_are_reproducible(tiny, tmp_path):
    paths = []
    for i in range(2):
        proto, _ = onnx_export.export_fp32(tiny, tmp_path, (1, 8, 8), simplify=False)
        paths.append(tmp_path / f"m{i}.onnx")
        onnx_export.save_onnx(proto, paths[-1], {"precision": "fp32"}, 18)
    a, b = (p.read_bytes() for p in paths)
    assert a == b
    model = onnx.load(str(paths[0]))
    assert all(not n.doc_string and not n.metadata_props for n in model.graph.node)
    import onnxruntime as ort

    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    out = ort.InferenceSession(str(paths[0]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, tiny(torch.from_numpy(x)).numpy(), atol=1e-4)
