"""A tiny ONNX model (tiny_cnn on 1x8x8 inputs, seeded random weights) exported once per session
with the project's own exporter, plus the torch model it came from and a ciard checkpoint of it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch

    from ciard_deploy.data import get_dataset_info
    from ciard_deploy.export.onnx import export_fp32, save_onnx
    from ciard_deploy.checkpoints import CheckpointMeta, save_checkpoint
    from ciard_deploy.models import create_model

    d = tmp_path_factory.mktemp("tiny_runtime")
    info = get_dataset_info("digits")
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 10, 1, info.mean, info.std).eval()
    meta = {"arch": "tiny_cnn", "num_classes": 10, "precision": "fp32", "format": "onnx",
            "classes": list(info.classes)}
    paths: dict[str, Path] = {}
    for name, batch in (("dynamic", "dynamic"), ("static4", 4)):
        proto, _ = export_fp32(model, d, (1, 8, 8), opset=18, batch=batch, simplify=False)
        paths[name] = d / f"tiny_{name}.onnx"
        save_onnx(proto, paths[name], meta, 18)
    ckpt = save_checkpoint(d / "tiny", model, CheckpointMeta("tiny_cnn", 10, info.input_shape, info.mean, info.std,
                                                             "digits", info.classes, eps=0.1))
    return {"model": model, "onnx": paths["dynamic"], "onnx_static4": paths["static4"], "checkpoint": ckpt, "dir": d}


@pytest.fixture
def images():
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.random((10, 1, 8, 8), dtype=np.float32)
