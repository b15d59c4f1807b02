"""CIFAR-style ResNets (3x3 stem, no max-pool): resnet18/34, preactresnet18, resnet56.

Adaptive average pooling makes them work at 32x32 (CIFAR), 64x64 (Tiny-ImageNet) and 8x8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ciard_deploy.models.registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    """ResNet with a 3x3 stem; ``widths`` per stage, ``blocks`` per stage."""

    def __init__(self, block: type[nn.Module], blocks: list[int], widths: list[int],
                 num_classes: int = 10, in_chans: int = 3, preact: bool = False) -> None:
        super().__init__()
        self.preact = preact
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0] if not preact else widths[-1])
        layers = []
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layers.append(self._make_layer(block, w, n, stride=1 if i == 0 else 2))
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(widths[-1], num_classes)

    def _make_layer(self, block: type[nn.Module], planes: int, n: int, stride: int) -> nn.Sequential:
        mods = []
        for s in [stride] + [1] * (n - 1):
            mods.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.preact:
            out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("resnet18", role="student (paper)")
def resnet18(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_chans)


@register_model("resnet34", role="student / teacher")
def resnet34(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ResNet(BasicBlock, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_chans)


@register_model("preactresnet18", role="student / robust teacher")
def preactresnet18(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ResNet(PreActBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_chans, preact=True)


@register_model("resnet56", role="clean teacher (paper)")
def resnet56(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ResNet(BasicBlock, [9, 9, 9], [16, 32, 64], num_classes, in_chans)


@register_model("resnet18_tiny", role="tests (real ResNet-18 code at toy width)")
def resnet18_tiny(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ResNet(BasicBlock, [1, 1, 1, 1], [8, 16, 32, 64], num_classes, in_chans)
