"""ResNets for 32x32 inputs: "Deep Residual Learning for Image Recognition" (He et al., CVPR 2016).

* ``resnet20/32/44/56``: the paper's CIFAR networks (Sec. 4.2): 3x3 stem with 16 channels, three
  stages of n BasicBlocks (widths 16-32-64, depth 6n+2), option-A shortcuts (stride-2 subsampling and
  zero-padded channels, no parameters). resnet20 has 269,722 parameters for 10 classes.
* ``resnet18/34``: the ImageNet layouts adapted to CIFAR as in the DAFL / LRA code (and kuangliu's
  pytorch-cifar): 3x3 stem with 64 channels and no maxpool, widths 64-128-256-512, 1x1-conv
  projection shortcuts. resnet18 has ~11.17M parameters for 10 classes.

Global average pooling makes every network accept any input size (28x28 included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lit_modules.nets.base import ClassifierNet
from lit_modules.nets.registry import register_net


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad the new channels."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = cout - cin

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        lo = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))  # (B, cout, H/s, W/s)


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if shortcut == "A":
                self.shortcut = PadShortcut(cin, cout, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(ClassifierNet):
    """3x3 stem (no maxpool) -> stages of BasicBlocks (first stage stride 1, the rest stride 2)
    -> global average pool -> fc."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        blocks: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"{len(blocks)} stages of blocks but {len(widths)} widths")
        self.stem = nn.Sequential(conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, w, stride, shortcut))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)  # 32x32 -> 32, 16, 8 (, 4) spatial per stage
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.stages(self.stem(x)))  # (B, widths[-1])


def _he_cifar(depth: int, num_classes: int, in_channels: int, image_size: int) -> ResNetCifar:
    n = (depth - 2) // 6
    return ResNetCifar(num_classes, in_channels, image_size, (n, n, n), (16, 32, 64), shortcut="A")


@register_net("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNetCifar:
    """He et al. CIFAR ResNet-20 (269,722 params for 10 classes)."""
    return _he_cifar(20, num_classes, in_channels, image_size)


@register_net("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNetCifar:
    """He et al. CIFAR ResNet-32 (464,154 params for 10 classes)."""
    return _he_cifar(32, num_classes, in_channels, image_size)


@register_net("resnet44")
def resnet44(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNetCifar:
    """He et al. CIFAR ResNet-44."""
    return _he_cifar(44, num_classes, in_channels, image_size)


@register_net("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNetCifar:
    """He et al. CIFAR ResNet-56."""
    return _he_cifar(56, num_classes, in_channels, image_size)


@register_net("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNetCifar:
    """CIFAR ResNet-18 (DAFL / LRA teacher; ~11.17M params for 10 classes)."""
    return ResNetCifar(num_classes, in_channels, image_size, (2, 2, 2, 2), (64, 128, 256, 512), shortcut="B")


@register_net("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNetCifar:
    """CIFAR ResNet-34 (DAFL teacher; ~21.3M params for 10 classes)."""
    return ResNetCifar(num_classes, in_channels, image_size, (3, 4, 6, 3), (64, 128, 256, 512), shortcut="B")
