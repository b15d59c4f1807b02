"""Small CNNs: real code at toy size, for digits, tests and CPU studies."""

from __future__ import annotations

import torch
from torch import nn

from ciard_deploy.models.registry import register_model


class SmallCNN(nn.Module):
    """conv-bn-relu x2, max-pool, conv-bn-relu x2, global average pool, linear.

    Works on any input size >= 2x2 (8x8 digits, 32x32 CIFAR, 64x64 Tiny-ImageNet).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_chans, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model("small_cnn", role="digits student / CPU studies")
def small_cnn(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return SmallCNN(num_classes, in_chans, width=32)


@register_model("small_cnn_wide", role="digits teacher / CPU studies")
def small_cnn_wide(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return SmallCNN(num_classes, in_chans, width=64)


@register_model("tiny_cnn", role="unit tests")
def tiny_cnn(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return SmallCNN(num_classes, in_chans, width=8)
