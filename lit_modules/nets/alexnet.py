"""AlexNet for CIFAR-10, the teacher and student of ZSKD: "Zero-Shot Knowledge Distillation in Deep
Networks" (Nayak et al., ICML 2019), after Krizhevsky et al. 2012.

Teacher: conv widths 48-128-192-192-128, FC 512-256; student (``_half``): 24-64-96-96-64, FC 256-128.
Every conv and hidden FC is followed by batch norm and ReLU.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lit_modules.nets.base import ClassifierNet
from lit_modules.nets.registry import register_net


def _conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _pool_out(n: int) -> int:
    return (n - 3) // 2 + 1  # MaxPool2d(3, stride 2)


class AlexNetCifar(ClassifierNet):
    """conv5x5 c1 -> pool -> conv5x5 c2 -> pool -> conv3x3 c3 -> conv3x3 c4 -> conv3x3 c5 -> pool
    -> fc f1 -> fc f2 -> fc K (maxpools 3x3 stride 2: 32 -> 15 -> 7 -> 3; 28 -> 13 -> 6 -> 2)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        conv_widths: Sequence[int] = (48, 128, 192, 192, 128),
        fc_widths: Sequence[int] = (512, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = conv_widths
        f1, f2 = fc_widths
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1, 5),
            nn.MaxPool2d(3, stride=2),
            *_conv_bn_relu(c1, c2, 5),
            nn.MaxPool2d(3, stride=2),
            *_conv_bn_relu(c2, c3, 3),
            *_conv_bn_relu(c3, c4, 3),
            *_conv_bn_relu(c4, c5, 3),
            nn.MaxPool2d(3, stride=2),
            nn.Flatten(),  # (B, c5 * s * s): 128 * 3 * 3 = 1152 for 32x32
        )
        s = _pool_out(_pool_out(_pool_out(image_size)))
        if s < 1:
            raise ValueError(f"AlexNetCifar needs image_size >= 15, got {image_size}")
        self.head = nn.Sequential(
            nn.Linear(c5 * s * s, f1, bias=False),
            nn.BatchNorm1d(f1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(f1, f2, bias=False),
            nn.BatchNorm1d(f2),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.num_features = f2
        self.fc = nn.Linear(f2, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, f2)


@register_net("alexnet_cifar")
def alexnet_cifar(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0
) -> AlexNetCifar:
    """ZSKD's CIFAR-10 teacher."""
    return AlexNetCifar(num_classes, in_channels, image_size, dropout=dropout)


@register_net("alexnet_cifar_half")
def alexnet_cifar_half(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0
) -> AlexNetCifar:
    """ZSKD's CIFAR-10 student: every width halved."""
    return AlexNetCifar(
        num_classes, in_channels, image_size, (24, 64, 96, 96, 64), (256, 128), dropout=dropout
    )
