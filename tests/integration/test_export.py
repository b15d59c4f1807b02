"""`export.run` and `ciard export` on a small_cnn student really trained on digits.

The session's robust small_cnn (``digits_robust_run`` in tests/conftest.py, trained by the real
trainer), one FP32+FP16+INT8 export shared by most tests (120 parity images, mixed calibration on
128 training images), one FP32 export at opset 17. Each artifact is re-opened here in a fresh
onnxruntime session, independent of the exporter's own check. onnxruntime runs on one thread, as
torch does for the whole session (conftest): a 2-thread pool stalls on a shared 2-core machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from ciard_deploy import export
from ciard_deploy.errors import GateFailed
from ciard_deploy.fingerprint import sha256_file

pytestmark = pytest.mark.integration
EPS = 0.15  # the eps the session student was trained at (its checkpoint metadata)
N = 120
runner = CliRunner()


@pytest.fixture(scope="session")
def student(digits_robust_run: Path) -> Path:
    """The session's robust small_cnn (tests/conftest.py: the real trainer, PGD-AT at eps 0.15)."""
    return digits_robust_run


@pytest.fixture(scope="session")
def exported(student: Path, tmp_path_factory: pytest.TempPathFactory) -> export.ExportResult:
    out = tmp_path_factory.mktemp("exports") / "digits"
    return export.run(student, out, ["onnx", "onnx-fp16", "onnx-int8"], n=N, calib="mixed", calib_n=128, threads=1)


def fresh_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- the artifacts
def test_every_artifact_runs_in_an_independent_session(exported):
    x = np.random.default_rng(1).random((7, 1, 8, 8), dtype=np.float32)
    assert [a.file for a in exported.manifest.artifacts] == ["model.onnx", "model.fp16.onnx", "model.int8.onnx"]
    for a in exported.manifest.artifacts:
        sess = fresh_session(exported.out_dir / a.file)
        (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
        assert inp.name == "input" and inp.type == "tensor(float)" and inp.shape[1:] == [1, 8, 8]
        assert not isinstance(inp.shape[0], int)  # dynamic batch
        assert out.name == "logits" and out.type == "tensor(float)"
        for k in (1, 7):
            logits = sess.run(None, {"input": x[:k]})[0]
            assert logits.shape == (k, 10) and logits.dtype == np.float32 and np.isfinite(logits).all()


def test_agreement_meets_each_precision_threshold(exported, student):
    from ciard_deploy.data import create_dataset
    from ciard_deploy.model_loader import load_model

    m = exported.manifest
    assert m.passed and m.status == "passed"
    model, _ = load_model(student)
    x, _ = create_dataset("digits", "test", n=N, seed=0).tensors()
    with torch.no_grad():
        ref = model(x).numpy()
    thresholds = {"fp32": 0.999, "fp16": 0.99, "int8": 0.97}
    for a in m.artifacts:
        p = a.parity["clean"]
        assert a.status == "passed" and p["n"] == N and p["threshold"] == thresholds[a.precision]
        assert p["top1_agreement"] >= thresholds[a.precision]
        # independently of the exporter's own check:
        out = fresh_session(exported.out_dir / a.file).run(None, {"input": x.numpy()})[0]
        assert (out.argmax(1) == ref.argmax(1)).mean() >= thresholds[a.precision]
        assert "adversarial" in a.parity and a.parity["adversarial"]["attack"] == f"pgd20@{EPS:g}"
    fp32 = m.artifact("onnx").parity["clean"]
    assert fp32["max_abs_diff"] < 1e-3


def test_int8_is_at_least_3x_smaller(exported):
    m = exported.manifest
    fp32, int8 = m.artifact("model.onnx").size, m.artifact("model.int8.onnx").size
    assert fp32 / int8 >= 3.0, f"small_cnn FP32 {fp32} B vs INT8 {int8} B"
    assert m.artifact("model.fp16.onnx").size < 0.6 * fp32


def test_manifest_hashes_match_files_and_metadata_travels(exported, student):
    folder = exported.out_dir
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk == exported.manifest.to_dict()
    assert export.check_files(export.load_manifest(folder), folder) == []
    for a in on_disk["artifacts"]:
        f = folder / a["file"]
        assert a["sha256"] == sha256_file(f) and a["size"] == f.stat().st_size
        model = onnx.load(str(f))
        assert [i.version for i in model.opset_import if i.domain in ("", "ai.onnx")] == [18] == [a["opset"]]
        props = {p.key: json.loads(p.value) for p in model.metadata_props if p.key.startswith("ciard.")}
        assert props["ciard.precision"] == a["precision"] and props["ciard.arch"] == "small_cnn"
        assert props["ciard.input_spec"]["shape"] == ["dynamic", 1, 8, 8] and props["ciard.eps"] == EPS
        assert props["ciard.normalization"]["mean"] == [0.305]
    src = on_disk["source"]
    assert src["sha256"] == sha256_file(student / "student_best.safetensors")
    assert src["recipe_file_sha256"] == sha256_file(student / "recipe.yaml")
    assert src["recipe_hash"] == json.loads((student / "summary.json").read_text())["recipe_hash"]
    assert on_disk["versions"]["onnxruntime"] == ort.__version__ and "torch" in on_disk["versions"]
    assert sorted(os.listdir(folder)) == ["manifest.json", "model.fp16.onnx", "model.int8.onnx", "model.onnx"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # staging cleaned up


def test_reference_metrics_and_calibration_are_recorded(exported, student):
    from ciard_deploy.export.quantize import build_calibration_set
    from ciard_deploy.model_loader import load_model

    m = exported.manifest
    ref = m.reference
    assert ref["n"] == N and ref["backend"] == "torch" and 0.9 <= ref["clean_acc"] <= 1.0
    assert 0.0 <= ref["attacks"][f"pgd20@{EPS:g}"]["robust_acc"] < ref["clean_acc"]
    assert "measured by ciard export" in ref["origin"]
    calib = m.artifact("onnx-int8").calibration
    assert calib == m.calibration
    assert calib["source"] == "mixed" and calib["n"] == 128 and calib["adversarial_fraction"] == 0.5
    assert calib["attack"] == f"pgd20@{EPS:g}" and calib["method"] == "minmax" and calib["split"] == "train"
    model, _ = load_model(student)
    _, again = build_calibration_set(model, "digits", "mixed", 128, 0, EPS, "pgd20")
    assert again["sha256"] == calib["sha256"]  # the recorded hash identifies the set


def test_opset_17_is_converted_and_verified(student, tmp_path):
    res = export.run(student, tmp_path / "op17", ["onnx"], opset=17, n=60, reference_attack=None, threads=1)
    a = res.manifest.artifact("onnx")
    model = onnx.load(str(res.path("onnx")))
    assert [i.version for i in model.opset_import if i.domain == ""] == [17] == [a.opset]
    assert a.passed and res.manifest.reference["attacks"] == {}
    # the dynamo exporter writes opset >= 18 only; the file says how 17 was reached, never silently
    how = a.exporter.get("opset_converted_from") == 18 or "TorchScript" in a.exporter["tool"]
    assert how, a.exporter
    if "TorchScript" in a.exporter["tool"]:
        assert any("opset 18 to 17" in w for w in res.manifest.warnings)


def test_gate_failure_keeps_artifact_and_marks_it_failed(student, tmp_path, monkeypatch):
    from ciard_deploy.runtime.ort_backend import OrtBackend

    original = OrtBackend._predict
    monkeypatch.setattr(OrtBackend, "_predict", lambda self, x: np.roll(original(self, x), 1, axis=1))  # a broken runtime
    out = tmp_path / "broken"
    with pytest.raises(GateFailed) as exc:
        export.run(student, out, ["onnx"], n=60, reference_attack=None, threads=1)
    assert exc.value.exit_code == 1 and "model.onnx" in str(exc.value)
    m = export.load_manifest(out)
    assert m.status == "failed" and m.artifacts[0].status == "failed" and (out / "model.onnx").is_file()
    assert m.artifacts[0].parity["clean"]["top1_agreement"] < 0.5

    res = runner.invoke(_app(), ["export", str(student), "--out", str(tmp_path / "cli_broken"), "--onnx", "--n", "60",
                                 "--threads", "1", "--force"])
    assert res.exit_code == 1, res.output
    assert "export check failed" in res.output and (tmp_path / "cli_broken" / "manifest.json").is_file()


# --------------------------------------------------------------------------- the CLI
def _app():
    from ciard_deploy.cli import app

    return app


def assert_one_line_error(res, code: int, *needles: str) -> None:
    out = res.output
    assert res.exit_code == code, out
    assert "Traceback" not in out
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    for n in needles:
        assert n in lines[0], out


def test_cli_export_and_inspect(student, tmp_path):
    out = tmp_path / "cli"
    res = runner.invoke(_app(), ["export", str(student), "--out", str(out), "--onnx", "--n", "60", "--threads", "1",
                                 "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    assert "model.onnx" in res.output and "passed" in res.output
    assert json.loads((tmp_path / "m.json").read_text())["status"] == "passed"
    res = runner.invoke(_app(), ["inspect", str(out)])
    assert res.exit_code == 0 and "model.onnx" in res.output and "warning" not in res.output
    res = runner.invoke(_app(), ["inspect", str(out / "model.onnx")])
    assert res.exit_code == 0 and "small_cnn" in res.output and "input_spec" in res.output
    # the same output again without --force: refused, nothing touched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = runner.invoke(_app(), ["export", str(student), "--out", str(out), "--onnx"])
    assert_one_line_error(res, 2, "--force")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.fixture
def corrupt_checkpoint(student, tmp_path):
    d = tmp_path / "corrupt"
    d.mkdir()
    data = (student / "student_best.safetensors").read_bytes()
    (d / "student_best.safetensors").write_bytes(data[: len(data) // 2])
    (d / "student_best.json").write_text((student / "student_best.json").read_text())
    return d


@pytest.mark.parametrize("case", ["not_a_run", "text_file", "corrupt", "unknown_dataset", "exists",
                                  "unwritable", "bad_batch", "bad_threshold", "bad_calib"])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(case, student, corrupt_checkpoint, tmp_path):
    out = tmp_path / "out"
    source, flags, needle = str(student), ["--onnx"], ""
    if case == "not_a_run":
        (tmp_path / "empty").mkdir()
        source, needle = str(tmp_path / "empty"), "neither a run dir with a checkpoint"
    elif case == "text_file":
        (tmp_path / "notes.txt").write_text("hello")
        source, needle = str(tmp_path / "notes.txt"), "notes.txt"
    elif case == "corrupt":
        source, needle = str(corrupt_checkpoint), "corrupt"
    elif case == "unknown_dataset":
        flags, needle = ["--int8", "--dataset", "cifar11"], "cifar11"
    elif case == "exists":
        out.mkdir()
        (out / "model.onnx").write_text("mine")
        needle = "--force"
    elif case == "unwritable":
        (tmp_path / "afile").write_text("x")
        out, needle = tmp_path / "afile" / "sub", "cannot write"
    elif case == "bad_batch":
        flags, needle = ["--onnx", "--batch", "big"], "--batch"
    elif case == "bad_threshold":
        flags, needle = ["--int8", "--min-agreement-int8", "97"], "--min-agreement-int8"
    elif case == "bad_calib":
        flags, needle = ["--int8", "--calib", "noisy"], "--calib"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    res = runner.invoke(_app(), ["export", source, "--out", str(out), *flags, "--n", "30"])
    assert_one_line_error(res, 2, needle)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing overwritten
    if case == "exists":
        assert (out / "model.onnx").read_text() == "mine"


def test_cli_tensorrt_without_tensorrt_is_exit_3(student, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be shown")
    res = runner.invoke(_app(), ["export", str(student), "--out", str(tmp_path / "trt"), "--tensorrt"])
    assert res.exit_code == 3, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "TensorRT" in lines[0] and "pip install" in lines[0]
    assert not (tmp_path / "trt").exists()
