"""Fixtures for the attack tests: a random tiny model and a tiny model trained on digits (< 1 s)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

from ciard_deploy.models import create_model


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread, then back: on a shared 2-core machine two OpenMP threads competing with
    other processes make small ops 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


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
def trained_tiny() -> torch.nn.Module:
    """tiny_cnn trained 4 epochs on digits with Adam (about 0.2 s; ~98 % test accuracy)."""
    from ciard_deploy.data.digits import DIGITS_INFO, load_digits_split

    x, y = load_digits_split("train").tensors()
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 10, in_chans=1, mean=DIGITS_INFO.mean, std=DIGITS_INFO.std)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    with one_thread():
        for _ in range(4):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                b = perm[i:i + 64]
                loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model.eval()
