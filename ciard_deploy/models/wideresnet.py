"""WideResNet (Zagoruyko & Komodakis) in the TRADES release layout, so its checkpoints load.

The TRADES WRN-34-10 checkpoint carries an unused ``sub_block1``; this model has none and the
checkpoint loader drops those keys with a notice (see ``ciard_deploy.io``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ciard_deploy.models.registry import register_model


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.relu2(self.bn2(y)))
        return y + (x if self.equal_in_out else self.convShortcut(o))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError("WideResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("wrn-34-10", role="robust teacher (paper, TRADES)")
def wrn_34_10(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return WideResNet(34, 10, num_classes, in_chans)


@register_model("wrn-28-10", role="robust teacher")
def wrn_28_10(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return WideResNet(28, 10, num_classes, in_chans)


@register_model("wrn-16-2", role="small robust teacher (CPU studies)")
def wrn_16_2(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return WideResNet(16, 2, num_classes, in_chans)
