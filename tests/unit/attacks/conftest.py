"""Fixtures for the attack tests: a random tiny model and a tiny model trained on digits (< 1 s)."""

from __future__ import annotations

import pytest
import torch

from ciard_deploy.models import create_model


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    """An untrained tiny_cnn for 1x8x8 inputs, in train mode (attacks must not leave it changed)."""
    torch.manual_seed(0)
    return create_model("tiny_cnn", 10, in_chans=1)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 random 1x8x8 images with exact 0s and 1s (so clamping is exercised) and labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 8, 8, generator=g)
    x[:, :, 0, :] = 0.0
    x[:, :, -1, :] = 1.0
    y = torch.randint(0, 10, (8,), generator=g)
    return x, y


@pytest.fixture(scope="session")
def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    from ciard_deploy.data.digits import load_digits_split

    return load_digits_split("test").tensors()


@pytest.fixture(scope="session")
def trained_tiny(train_on_digits) -> torch.nn.Module:
    """tiny_cnn trained 4 epochs on digits with Adam, lr 1e-2 (about 0.2 s; ~98 % test accuracy)."""
    return train_on_digits("tiny_cnn", lr=1e-2)
