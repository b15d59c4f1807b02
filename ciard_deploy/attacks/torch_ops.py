"""Torch tensor helpers every white-box attack and the attack interface share: frozen eval mode, L-inf
projection, input checks, seeded generators. Imports nothing of the attacks (so ``attacks.base`` can use
them without a cycle)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Runs ``model`` in eval mode with parameters that need no gradient, then restores both.

    Every submodule's ``training`` flag and every parameter's ``requires_grad`` are put back
    as they were (a model with frozen BatchNorm layers stays that way), even on error.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Projects ``x_adv`` onto the L-inf ball of radius ``eps`` around ``x``, then onto [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    """Validates what every attack takes: float NCHW images in [0, 1] and int64 labels."""
    if x.ndim != 4:
        raise ValueError(f"images must be NCHW, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got dtype {x.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"labels must be 1-D with one label per image, got {tuple(y.shape)} for {len(x)} images")
    if y.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {y.dtype}")
    if len(x) and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError("images must lie in [0, 1] (normalization belongs inside the model)")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))
