"""``ciard inspect`` on any ONNX file: a QDQ graph built by hand with onnx.helper (numbers checked by
hand), a real exported digits model and its onnxruntime INT8 QDQ quantization, external data, and the
bad inputs (not ONNX, truncated, external data missing or outside the folder), through the library and
the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ciard_deploy.errors import ArtifactError
from ciard_deploy.export.inspection import inspect_artifact
from ciard_deploy.export.onnx_summary import summarize_onnx
from ciard_deploy.export.quantize import quantize_qdq

pytestmark = pytest.mark.unit


def qdq_model() -> onnx.ModelProto:
    """x[batch, 4] -> Q/DQ -> MatMul with an int8 weight (4x3) through DQ -> Add bias -> y[batch, 3]."""
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(np.arange(12, dtype=np.int8).reshape(4, 3), "w_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(np.ones(3, np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"]),
        helper.make_node("MatMul", ["x_dq", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "bias"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "handmade_qdq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="handmade",
                              producer_version="0.1")
    helper.set_model_props(model, {"author": "a test", "license": "none"})
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("handmade") / "qdq.onnx"
    onnx.save(qdq_model(), str(p))
    return p


def test_a_handmade_qdq_graph_summarized_by_hand(handmade):
    x = np.ones((2, 4), np.float32)
    y = ort.InferenceSession(str(handmade), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert y.shape == (2, 3)  # a real graph: onnxruntime runs it
    s = summarize_onnx(handmade)
    assert s["inputs"] == [{"name": "x", "type": "float", "shape": ["batch", 4]}]
    assert s["outputs"] == [{"name": "y", "type": "float", "shape": ["batch", 3]}]
    assert s["opsets"] == {"ai.onnx": 17} and s["ir_version"] == onnx.IR_VERSION
    assert s["producer"] == "handmade 0.1" and s["graph"] == "handmade_qdq"
    assert s["ops"] == {"DequantizeLinear": 2, "Add": 1, "MatMul": 1, "QuantizeLinear": 1} and s["nodes"] == 5
    assert s["qdq_nodes"] == 3
    w = s["weights"]
    # int8: w_q 12 + x_zp 1 + w_zp 1 = 14 values, 14 bytes; float: 2 scales + 3 bias = 5 values, 20 bytes
    assert w["initializers"] == 6 and w["elements"] == 19 and w["bytes"] == 34
    assert w["by_type"] == {"float": {"count": 3, "elements": 5, "bytes": 20},
                            "int8": {"count": 3, "elements": 14, "bytes": 14}}
    assert w["quantized"]["share_of_elements"] == pytest.approx(14 / 19)
    assert w["quantized"]["share_of_bytes"] == pytest.approx(14 / 34)
    assert s["metadata"] == {"author": "a test", "license": "none"} and s["external_data"] is None
    assert s["file_bytes"] == handmade.stat().st_size


def test_inspect_any_onnx_file_keeps_ciard_sections_for_its_own(handmade, untrained_digits_onnx, tmp_path):
    rep = inspect_artifact(handmade)
    assert rep["kind"] == "onnx" and rep["metadata"] == {} and rep["onnx"]["qdq_nodes"] == 3
    assert rep["mismatches"] == [] and "no ciard metadata" in rep["problems"][0]
    ciard = inspect_artifact(untrained_digits_onnx["onnx"])
    assert ciard["metadata"]["arch"] == "small_cnn" and ciard["manifest_entry"] is not None
    s = ciard["onnx"]
    assert s["opsets"]["ai.onnx"] == ciard["metadata"]["opset"]
    assert len(s["inputs"]) == 1 and s["inputs"][0]["type"] == "float" and s["inputs"][0]["shape"][1:] == [1, 8, 8]
    assert isinstance(s["inputs"][0]["shape"][0], str)  # the dynamic batch by its name
    assert s["outputs"][0]["shape"][1:] == [10] and s["ops"]["Conv"] >= 2 and s["qdq_nodes"] == 0
    assert s["weights"]["quantized"]["elements"] == 0 and s["weights"]["by_type"]["float"]["bytes"] > 0
    assert s["metadata"]["ciard.arch"] == '"small_cnn"'
    # the same model quantized by onnxruntime (INT8 QDQ, weights stored int8)
    q = tmp_path / "model.int8.onnx"
    quantize_qdq(untrained_digits_onnx["onnx"], q, np.random.default_rng(0).random((16, 1, 8, 8), np.float32))
    sq = summarize_onnx(q)
    assert sq["qdq_nodes"] == sq["ops"]["QuantizeLinear"] + sq["ops"]["DequantizeLinear"] > 0
    share = sq["weights"]["quantized"]
    assert share["share_of_elements"] > 0.9 and 0 < share["share_of_bytes"] < share["share_of_elements"]
    assert sq["weights"]["bytes"] < s["weights"]["bytes"] / 2  # int8 weights: under half the fp32 bytes


def test_external_data_is_checked_never_followed_outside(tmp_path):
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save(qdq_model(), str(d / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.weights", size_threshold=0)
    s = summarize_onnx(d / "m.onnx")
    assert s["external_data"] == {"files": ["m.weights"], "bytes": (d / "m.weights").stat().st_size}
    assert s["weights"]["bytes"] == 34 and s["weights"]["quantized"]["elements"] == 14
    (d / "m.weights").rename(d / "moved.weights")
    with pytest.raises(ArtifactError, match=r"m\.onnx: external data file m\.weights \(initializer '.*'\) not found"):
        inspect_artifact(d / "m.onnx")
    hostile = qdq_model()
    onnx.external_data_helper.convert_model_to_external_data(hostile, location="../outside.bin", size_threshold=0)
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    with open(d / "hostile.onnx", "wb") as f:
        f.write(hostile.SerializeToString())  # onnx.save would write the data file; only the model is needed
    with pytest.raises(ArtifactError, match=r"'\.\./outside\.bin', which is not a file inside"):
        summarize_onnx(d / "hostile.onnx")


@pytest.mark.parametrize("content", ["text", "truncated", "empty"])
def test_bad_onnx_files_are_one_artifact_error(handmade, tmp_path, content):
    bad = tmp_path / "bad.onnx"
    data = handmade.read_bytes()
    bad.write_bytes({"text": b"just some notes, not a model\n", "truncated": data[: len(data) // 2],
                     "empty": b""}[content])
    with pytest.raises(ArtifactError, match=r"bad\.onnx") as e:
        inspect_artifact(bad)
    assert "\n" not in str(e.value)


def test_cli_inspect_any_onnx_table_json_and_bad_input(handmade, tmp_path, invoke, assert_one_line_error):
    res = invoke("inspect", handmade)
    assert res.exit_code == 0, res.output
    for needle in ("x: float [batch, 4]", "QuantizeLinear 1", "3 QuantizeLinear/DequantizeLinear", "73.7% of weight",
                   "handmade 0.1", "author", "ai.onnx 17"):
        assert needle in res.stdout, (needle, res.stdout)
    res = invoke("inspect", handmade, "--json", "-")
    assert res.exit_code == 0
    rep = json.loads(res.stdout)
    assert rep["onnx"]["ops"]["DequantizeLinear"] == 2 and rep["onnx"]["inputs"][0]["shape"] == ["batch", 4]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(handmade.read_bytes()[:40])
    out = tmp_path / "bad.json"
    assert_one_line_error(invoke("inspect", bad, "--json", out), 2, "bad.onnx")
    assert not out.exists()


NO_ONNX = """
import importlib.abc, json, sys

class NoOnnx(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(f"import of {name} blocked (a device install without onnx)")
        return None

sys.meta_path.insert(0, NoOnnx())
from ciard_deploy.export.inspection import inspect_artifact
print(json.dumps(inspect_artifact(sys.argv[1])["onnx"]))
"""


def test_a_device_without_onnx_gets_the_interface_from_onnxruntime(handmade, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "no_onnx.py"
    script.write_text(NO_ONNX)
    proc = subprocess.run([sys.executable, str(script), str(handmade)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    assert s["source"] == "onnxruntime" and s["producer"] == "handmade"
    assert s["inputs"] == [{"name": "x", "type": "float", "shape": ["batch", 4]}]
    assert s["metadata"] == {"author": "a test", "license": "none"} and s["ops"] is None
    assert "pip install onnx" in s["notes"][0]
