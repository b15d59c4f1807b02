"""MobileNetV2 for CIFAR (stride 1 stem and first stages, as in the common CIFAR port).

Activation: ReLU6 as in the MobileNetV2 paper, or ReLU (``activation="relu"``) as in the kuangliu-style CIFAR
port that the CIARD reference code trains; the weights are the same either way (a recipe's ``activation``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ciard_deploy.models.registry import register_model

#: activation name -> function (``options.catalog.ACTIVATIONS`` lists the names a recipe may give)
ACTIVATION_FNS: dict[str, Callable] = {"relu6": F.relu6, "relu": F.relu}

# (expansion, out_planes, num_blocks, stride)
CIFAR_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int, act: Callable = F.relu6) -> None:
        super().__init__()
        self.stride = stride
        self.act = act
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0, activation: str = "relu6") -> None:
        super().__init__()
        if activation not in ACTIVATION_FNS:
            raise ValueError(f"MobileNetV2 activation {activation!r}: use {' or '.join(ACTIVATION_FNS)}")
        self.activation = activation
        act = self.act = ACTIVATION_FNS[activation]

        def w(c: int) -> int:
            return max(8, int(c * width))

        self.conv1 = nn.Conv2d(in_chans, w(32), 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w(32))
        layers, in_planes = [], w(32)
        for expansion, out, n, stride in CIFAR_CFG:
            for s in [stride] + [1] * (n - 1):
                layers.append(InvertedResidual(in_planes, w(out), expansion, s, act))
                in_planes = w(out)
        self.layers = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(in_planes, w(1280), 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w(1280))
        self.linear = nn.Linear(w(1280), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = self.act(self.bn2(self.conv2(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("mobilenetv2", role="student (paper)")
def mobilenetv2(num_classes: int = 10, in_chans: int = 3, activation: str = "relu6") -> nn.Module:
    return MobileNetV2(num_classes, in_chans, activation=activation)


@register_model("mobilenetv2_tiny", role="tests (real MobileNetV2 code at toy width)")
def mobilenetv2_tiny(num_classes: int = 10, in_chans: int = 3, activation: str = "relu6") -> nn.Module:
    return MobileNetV2(num_classes, in_chans, width=0.25, activation=activation)
