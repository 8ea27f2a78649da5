"""The MNIST CNN of Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks" (ICLR 2018,
arXiv 1706.06083), as in their public MNIST challenge model: two 5x5 'same' convolutions (32, 64 channels),
each followed by ReLU and 2x2 max-pooling, then FC 1024 and the classifier."""

from __future__ import annotations

from torch import Tensor, nn

from lit_modules.nets.base import ClassifierNet
from lit_modules.nets.pooling import MaxPool2x2
from lit_modules.nets.registry import register_net


class MadryMNISTNet(ClassifierNet):
    """conv(32, 5x5, same) -> ReLU -> maxpool2 -> conv(64, 5x5, same) -> ReLU -> maxpool2 -> fc 1024 -> ReLU -> fc K.

    28x28 input: 28 -> 14 -> 7, features 64 * 7 * 7 = 3136 -> 1024 (3,274,634 parameters for 10 classes).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: int = 32,
                 hidden: int = 1024) -> None:
        super().__init__()
        s = image_size // 4
        if s < 1:
            raise ValueError(f"the Madry CNN needs image_size >= 4, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            MaxPool2x2(),
            nn.Conv2d(width, 2 * width, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            MaxPool2x2(),
            nn.Flatten(),  # (B, 2 * width * s * s)
            nn.Linear(2 * width * s * s, hidden),
            nn.ReLU(inplace=True),
        )
        self.num_features = hidden
        self.fc = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)  # (B, 1024)


@register_net("madry_mnist")
def madry_mnist(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: int = 32,
                hidden: int = 1024) -> MadryMNISTNet:
    """Madry et al.'s MNIST challenge CNN (3,274,634 params for 1x28x28, 10 classes)."""
    return MadryMNISTNet(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width,
                         hidden=hidden)
