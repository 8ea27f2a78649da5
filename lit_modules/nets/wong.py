"""The small MNIST CNN of Wong, Rice and Kolter, "Fast is better than free: revisiting adversarial training"
(ICLR 2020, arXiv 2001.03994; public code locuslab/fast_adversarial, ``mnist/train_mnist.py``): two 4x4
stride-2 convolutions (16, 32 channels) and FC 100. Its RS-FGSM training reaches about 88-89% under PGD-50 x 10
restarts at MNIST's eps 0.3 in 10 epochs."""

from __future__ import annotations

from torch import Tensor, nn

from lit_modules.nets.base import ClassifierNet
from lit_modules.nets.registry import register_net


class WongMNISTNet(ClassifierNet):
    """conv(16, 4x4, s2, p1) -> ReLU -> conv(32, 4x4, s2, p1) -> ReLU -> flatten -> fc 100 -> ReLU -> fc K.

    28x28 input: 28 -> 14 -> 7, features 32 * 7 * 7 = 1568 -> 100 (166,406 parameters for 1x28x28, 10 classes).
    Like every zoo net it takes normalised input; the module that owns it carries the normalisation
    (Wong et al. feed [0, 1] pixels: ``mean: [0.0], std: [1.0]`` reproduces that).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 100) -> None:
        super().__init__()
        s = (image_size // 2) // 2  # each 4x4 / stride 2 / pad 1 convolution halves the side (floor)
        if s < 1:
            raise ValueError(f"Wong et al.'s MNIST CNN needs image_size >= 4, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),  # (B, 32 * s * s)
            nn.Linear(32 * s * s, hidden),
            nn.ReLU(),
        )
        self.num_features = hidden
        self.fc = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)  # (B, hidden)


@register_net("wong_mnist")
def wong_mnist(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 100) -> WongMNISTNet:
    """Wong et al.'s fast-AT MNIST CNN (166,406 params for 1x28x28, 10 classes)."""
    return WongMNISTNet(num_classes=num_classes, in_channels=in_channels, image_size=image_size, hidden=hidden)
