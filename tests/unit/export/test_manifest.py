"""Manifest round trip, loading errors, hash checks, ONNX metadata_props codec."""

from __future__ import annotations

import json

import pytest

from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.export.inspection import inspect_artifact
from ciard_deploy.export.manifest import ArtifactRecord, Manifest, check_files, load_manifest, set_onnx_metadata
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.runtime.ort_backend import read_onnx_metadata

pytestmark = pytest.mark.unit


def tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["input"], ["logits"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    set_onnx_metadata(model, {"arch": "relu", "precision": "fp32", "classes": ["a", "b"], "eps": None})
    onnx.save(model, str(path))
    return path


def make_manifest(folder):
    f = tiny_onnx(folder / "model.onnx")
    rec = ArtifactRecord(name="onnx", file="model.onnx", format="onnx", precision="fp32", runtime="onnxruntime",
                         sha256=sha256_file(f), size=f.stat().st_size, status="passed", opset=18,
                         parity={"clean": {"top1_agreement": 1.0, "threshold": 0.999}})
    return Manifest(source={"sha256": "0" * 64, "checkpoint": "x"}, model={"arch": "relu"},
                    reference={"clean_acc": 1.0, "attacks": {}}, thresholds={"fp32": 0.999}, options={},
                    artifacts=[rec])


def test_round_trip_and_hash_check(tmp_path):
    m = make_manifest(tmp_path)
    m.write(tmp_path)
    back = load_manifest(tmp_path)
    assert back.to_dict() == m.to_dict() and back.passed and back.status == "passed"
    assert back.artifact("model.onnx").name == back.artifact("onnx").name == "onnx"
    with pytest.raises(ArtifactError, match="lists no artifact"):
        back.artifact("model.int8.onnx")
    assert check_files(back, tmp_path) == []
    (tmp_path / "model.onnx").write_bytes((tmp_path / "model.onnx").read_bytes()[:-1] + b"\x00")
    assert "sha256" in check_files(back, tmp_path)[0]
    (tmp_path / "model.onnx").unlink()
    assert "missing" in check_files(back, tmp_path)[0]


def test_failed_artifact_fails_the_manifest(tmp_path):
    m = make_manifest(tmp_path)
    m.artifacts[0].status = "failed"
    assert not m.passed and m.to_dict()["status"] == "failed"


@pytest.mark.parametrize("content, needle", [(None, "no export manifest"), ("{not json", "not valid JSON"),
                                             ('{"schema": "other"}', "not a ciard export manifest"),
                                             ('{"schema": "ciard-export-manifest/1"}', "missing the key")])
def test_bad_manifests_are_artifact_errors(tmp_path, content, needle):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ArtifactError, match=needle):
        load_manifest(tmp_path)


def test_onnx_metadata_codec(tmp_path):
    f = tiny_onnx(tmp_path / "m.onnx")
    meta, raw = read_onnx_metadata(f)
    assert meta == {"arch": "relu", "precision": "fp32", "classes": ["a", "b"]}
    assert json.loads(raw["ciard.classes"]) == ["a", "b"]
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ArtifactError):
        read_onnx_metadata(tmp_path / "broken.onnx")


def test_inspect_folder_file_and_bad_paths(tmp_path):
    make_manifest(tmp_path).write(tmp_path)
    rep = inspect_artifact(tmp_path)
    assert rep["kind"] == "manifest" and rep["problems"] == []
    rep = inspect_artifact(tmp_path / "model.onnx")
    assert rep["kind"] == "onnx" and rep["metadata"]["arch"] == "relu" and rep["manifest_entry"]["status"] == "passed"
    assert rep["problems"] == []
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError):
        inspect_artifact(tmp_path / "notes.txt")
    with pytest.raises(ArtifactError):
        inspect_artifact(tmp_path / "nothing.onnx")
