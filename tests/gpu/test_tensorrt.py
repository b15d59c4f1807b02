"""TensorRT engines from the digits student: build, reload in TrtBackend, parity gates, sidecars.

These need TensorRT 10, Polygraphy and an NVIDIA GPU; everywhere else they skip and say why.
The suite's conftest hides CUDA by default, so run them in their own process with the GPU
visible:

    CUDA_VISIBLE_DEVICES=0 python -m pytest -m tensorrt tests/gpu
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ciard_deploy.runtime.trt_backend import tensorrt_status

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt]

_STATUS = tensorrt_status()
requires_tensorrt = pytest.mark.skipif(
    _STATUS != "ok", reason=f"TensorRT engines need TensorRT 10 + Polygraphy + a visible NVIDIA GPU: {_STATUS}"
                            " (with a GPU, run CUDA_VISIBLE_DEVICES=0 python -m pytest -m tensorrt tests/gpu)")


@pytest.fixture(scope="module")
def student(digits_robust_run: Path) -> Path:
    """The session's robust small_cnn on digits (tests/conftest.py), trained only when a test here runs."""
    return digits_robust_run


@requires_tensorrt
def test_engines_build_run_and_pass_their_gates(student, tmp_path):
    from ciard_deploy import export
    from ciard_deploy.runtime import open_backend
    from ciard_deploy.runtime.trt_backend import TrtBackend

    res = export.run(student, tmp_path / "trt", ["tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"], n=200,
                     max_batch=64, opt_batch=32)
    m = res.manifest
    assert m.passed, [a.parity["clean"] for a in m.artifacts]
    engines = [a for a in m.artifacts if a.format == "tensorrt"]
    assert [a.precision for a in engines] == ["fp32", "fp16", "int8"]
    for a in engines:
        sidecar = json.loads((res.out_dir / a.sidecar).read_text())
        assert sidecar["precision"] == a.precision and sidecar["engine"]["tensorrt_version"]
        assert sidecar["engine"]["gpu"] == a.engine["gpu"] != "unknown"
        assert a.engine["profile"]["max"][0] == 64
        with open_backend(res.out_dir / a.file) as b:
            assert isinstance(b, TrtBackend) and b.precision == a.precision and b.input_spec.max_batch == 64
            x = np.random.default_rng(0).random((150, 1, 8, 8), dtype=np.float32)
            assert b.predict(x).shape == (150, 10) and b.stats.calls == 3  # 64 + 64 + 22
    assert m.artifact("tensorrt-int8").engine["int8"] == "explicit (QDQ)"


@requires_tensorrt
def test_static_batch_engine_and_entropy_calibrator(student, tmp_path):
    from ciard_deploy import export
    from ciard_deploy.runtime import open_backend

    res = export.run(student, tmp_path / "static", ["tensorrt-int8"], batch=8, n=100, trt_int8="calibrator",
                     calib_n=256)
    a = res.manifest.artifact("tensorrt-int8")
    assert a.passed and a.engine["static_batch"] == 8 and a.engine["int8"].startswith("implicit")
    assert (res.out_dir / a.engine["calibration_cache"]).is_file()
    with open_backend(res.out_dir / a.file) as b:
        assert b.input_spec.batch == 8
        assert b.predict(np.zeros((13, 1, 8, 8), np.float32)).shape == (13, 10)  # 8 + (5 padded to 8)


@requires_tensorrt
def test_cli_tensorrt_fp16(student, tmp_path):
    from typer.testing import CliRunner

    from ciard_deploy.cli import app

    res = CliRunner().invoke(app, ["export", str(student), "--out", str(tmp_path / "cli"), "--tensorrt", "--fp16",
                                   "--n", "100"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "model.fp16.engine").is_file() and (tmp_path / "cli" / "model.fp16.engine.json").is_file()


@pytest.mark.skipif("TensorrtExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="this onnxruntime build has no TensorRT execution provider (needs onnxruntime-gpu with TensorRT)")
def test_onnx_on_the_tensorrt_execution_provider(student, tmp_path):
    from ciard_deploy import export

    res = export.run(student, tmp_path / "ep", ["onnx", "onnx-fp16"], n=100, provider="tensorrt")
    assert res.manifest.passed
    runtime = res.manifest.artifact("onnx-fp16").parity["runtime"]
    assert runtime["active_providers"][0] == "TensorrtExecutionProvider"
