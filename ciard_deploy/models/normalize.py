"""Normalization inside the model: every model takes float32 NCHW pixels in [0, 1]."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """Wraps ``net`` so that ``forward(x) = net((x - mean) / std)``.

    mean/std are buffers: they travel with the state dict and are baked into ONNX exports,
    so attacks and exported graphs see raw pixels and eps means the same thing everywhere.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std must have the same length")
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)
