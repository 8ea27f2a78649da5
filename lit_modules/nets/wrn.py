"""Wide residual networks: "Wide Residual Networks" (Zagoruyko & Komodakis, BMVC 2016).

WRN-d-k: 3x3 stem with 16 channels, three stages of n = (d - 4) / 6 pre-activation blocks
(BN -> ReLU -> conv3x3 -> BN -> ReLU -> [dropout] -> conv3x3) with widths 16k, 32k, 64k and strides
1, 2, 2, 1x1-conv shortcuts where the width or stride changes, final BN -> ReLU -> global average pool.
wrn40_2 has 2,243,546 parameters for 10 classes (the usual KD teacher of DAFL / ZSKT).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lit_modules.nets.base import ClassifierNet
from lit_modules.nets.registry import register_net


class WideBasic(nn.Module):
    """Pre-activation block; the shortcut of a width/stride change takes the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout > 0:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(ClassifierNet):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        depth: int = 40,
        widen_factor: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(WideBasic(cin, w, 2 if (i > 0 and j == 0) else 1, dropout))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)  # 32x32 -> 32, 16, 8 spatial
        self.bn = nn.BatchNorm2d(cin)
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stages(self.stem(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 64k)


@register_net("wrn16_2")
def wrn16_2(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0
) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(num_classes, in_channels, image_size, depth=16, widen_factor=2, dropout=dropout)


@register_net("wrn40_2")
def wrn40_2(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0
) -> WideResNet:
    """WRN-40-2 (2,243,546 params for 10 classes)."""
    return WideResNet(num_classes, in_channels, image_size, depth=40, widen_factor=2, dropout=dropout)
