"""Fixtures of the CLI unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny_cnn saved as a ciard checkpoint for digits (eps 0.1): the CLI's wiring needs no accuracy."""
    import torch

    from ciard_deploy.data import get_dataset_info
    from ciard_deploy.checkpoints import CheckpointMeta, save_checkpoint
    from ciard_deploy.models import create_model

    d = tmp_path_factory.mktemp("ck")
    info = get_dataset_info("digits")
    torch.manual_seed(0)
    m = create_model("tiny_cnn", 10, 1, info.mean, info.std)
    save_checkpoint(d / "tiny", m, CheckpointMeta("tiny_cnn", 10, info.input_shape, info.mean, info.std, "digits",
                                                  info.classes, eps=0.1))
    return d / "tiny.safetensors"
