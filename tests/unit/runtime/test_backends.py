"""onnxruntime and torch backends on a real (tiny) exported model; routing by suffix; missing runtimes."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ciard_deploy.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, ArtifactError, BackendUnavailable, UsageError
from ciard_deploy.runtime import GRADIENTS, SCORES, available_backends, backend_for, open_backend
from ciard_deploy.runtime.ort_backend import OrtBackend
from ciard_deploy.runtime.torch_backend import TorchBackend

pytestmark = pytest.mark.unit
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_ort_backend_matches_torch_and_reads_metadata(tiny_artifacts, images):
    with open_backend(tiny_artifacts["onnx"]) as b:
        assert isinstance(b, OrtBackend) and b.name == "onnxruntime"
        assert b.capabilities == frozenset({SCORES})
        assert b.input_spec.shape == (1, 8, 8) and b.input_spec.batch == "dynamic"
        assert b.precision == "fp32" and b.metadata["arch"] == "tiny_cnn" and b.num_classes == 10
        out = b.predict(images)
    assert out.shape == (10, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out, torch_logits(tiny_artifacts["model"], images), atol=1e-4)
    assert b.describe()["stats"]["images"] == 10


def test_static_batch_onnx_splits_and_pads(tiny_artifacts, images):
    b = open_backend(tiny_artifacts["onnx_static4"])
    assert b.input_spec.batch == 4
    out = b.predict(images)  # 10 images through a batch-4 graph: 4 + 4 + (2 padded to 4)
    assert b.stats.calls == 3
    np.testing.assert_allclose(out, torch_logits(tiny_artifacts["model"], images), atol=1e-4)
    b.close()


def test_torch_backend_is_the_reference_with_gradients(tiny_artifacts, images):
    b = open_backend(tiny_artifacts["checkpoint"])
    assert isinstance(b, TorchBackend) and GRADIENTS in b.capabilities
    np.testing.assert_allclose(b.predict(images), torch_logits(tiny_artifacts["model"], images), atol=1e-5)
    g = b.loss_gradient(images, np.arange(10) % 10)
    assert g.shape == images.shape and g.dtype == np.float32 and np.abs(g).sum() > 0


def test_routing_by_suffix(tiny_artifacts, tmp_path):
    assert backend_for("a.onnx").name == "onnxruntime"
    assert backend_for("a.engine").name == backend_for("a.PLAN").name == "tensorrt"
    assert backend_for("a.safetensors").name == backend_for(tmp_path).name == "torch"
    with pytest.raises(UsageError, match="cannot tell which runtime"):
        backend_for("model.tflite")
    with pytest.raises(ArtifactError, match="not found"):
        open_backend(tmp_path / "missing.onnx")


def test_truncated_onnx_is_an_artifact_error(tiny_artifacts, tmp_path):
    data = tiny_artifacts["onnx"].read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError) as exc:
        open_backend(bad)
    assert exc.value.exit_code == EXIT_BAD_INPUT and "\n" not in str(exc.value)


def test_unknown_provider_is_usage_error(tiny_artifacts):
    with pytest.raises(UsageError, match="provider"):
        open_backend(tiny_artifacts["onnx"], provider="npu")


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="this onnxruntime has the CUDA provider; the missing-provider path cannot be shown here")
def test_missing_cuda_provider_is_exit_3(tiny_artifacts):
    with pytest.raises(BackendUnavailable) as exc:
        open_backend(tiny_artifacts["onnx"], provider="cuda")
    assert exc.value.exit_code == EXIT_ENVIRONMENT and "onnxruntime-gpu" in str(exc.value)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here; its absence cannot be shown")
def test_missing_tensorrt_is_exit_3(tmp_path):
    engine = tmp_path / "model.fp16.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(BackendUnavailable) as exc:
        open_backend(engine)
    msg = str(exc.value)
    assert exc.value.exit_code == EXIT_ENVIRONMENT and "pip install" in msg and "\n" not in msg
    status = available_backends()
    assert status["tensorrt"].startswith("unavailable:")


def test_available_backends_reports_each_runtime():
    status = available_backends()
    assert status["onnxruntime"] == "ok" and status["torch"] == "ok"
    assert {"tensorrt", "onnxruntime-cuda", "onnxruntime-tensorrt"} <= set(status)
    assert all(v == "ok" or v.startswith("unavailable: ") for v in status.values())
