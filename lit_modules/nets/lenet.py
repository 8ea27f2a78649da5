"""LeNet-5 variants.

* ``lenet5`` / ``lenet5_half``: the MNIST teacher and student of ZSKD, "Zero-Shot Knowledge
  Distillation in Deep Networks" (Nayak et al., ICML 2019), after LeCun et al. 1998.
* ``lenet_sigmoid``: the victim of gradient-inversion attacks, "Deep Leakage from Gradients"
  (Zhu et al., NeurIPS 2019) and "iDLG: Improved Deep Leakage from Gradients" (Zhao et al., 2020):
  strided convolutions, sigmoid activations (twice differentiable), uniform init.
"""

from __future__ import annotations

from torch import Tensor, nn

from lit_modules.nets.base import ClassifierNet
from lit_modules.nets.pooling import MaxPool2x2
from lit_modules.nets.registry import register_net


class LeNet5(ClassifierNet):
    """conv(c1, 5x5) -> ReLU -> maxpool2 -> conv(c2, 5x5) -> ReLU -> maxpool2 -> fc 120 -> fc 84 -> fc K.

    With ``c1, c2 = 6, 16`` and a 1x32x32 input: 61,706 parameters (10 classes).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        conv_widths: tuple[int, int] = (6, 16),
        fc_widths: tuple[int, int] = (120, 84),
    ) -> None:
        super().__init__()
        c1, c2 = conv_widths
        f1, f2 = fc_widths
        s = ((image_size - 4) // 2 - 4) // 2  # 32 -> 28 -> 14 -> 10 -> 5;  28 -> 24 -> 12 -> 8 -> 4
        if s < 1:
            raise ValueError(f"LeNet-5 needs image_size >= 16, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5),
            nn.ReLU(inplace=True),
            MaxPool2x2(),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.ReLU(inplace=True),
            MaxPool2x2(),
            nn.Flatten(),  # (B, c2 * s * s): 400 for 32x32
        )
        self.head = nn.Sequential(
            nn.Linear(c2 * s * s, f1),
            nn.ReLU(inplace=True),
            nn.Linear(f1, f2),
            nn.ReLU(inplace=True),
        )
        self.num_features = f2
        self.fc = nn.Linear(f2, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, 84)


class LeNetSigmoid(ClassifierNet):
    """The DLG/iDLG victim: three 5x5 convs (12 channels, strides 2, 2, 1) with sigmoids, one fc.

    32x32 input: 32 -> 16 -> 8 -> 8, features 12 * 8 * 8 = 768; 28x28: 28 -> 14 -> 7 -> 7, 588.
    ``init_range`` re-initialises every weight and bias U(-r, r) (0.5 in the papers); ``None`` keeps
    PyTorch's default initialisation.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int = 12,
        init_range: float | None = 0.5,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=5, stride=2, padding=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, kernel_size=5, stride=2, padding=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, kernel_size=5, stride=1, padding=2),
            nn.Sigmoid(),
            nn.Flatten(),
        )
        s = (image_size - 1) // 2 + 1  # k5 s2 p2: ceil(n / 2)
        s = (s - 1) // 2 + 1
        self.num_features = width * s * s
        self.fc = nn.Linear(self.num_features, num_classes)
        if init_range is not None:
            self.reset_uniform(init_range)

    def reset_uniform(self, init_range: float = 0.5) -> None:
        """Every weight and bias ~ U(-init_range, init_range), as DLG's ``weights_init``."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.uniform_(m.weight, -init_range, init_range)
                if m.bias is not None:
                    nn.init.uniform_(m.bias, -init_range, init_range)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)  # (B, 12 * (H/4) * (W/4)), in (0, 1)


@register_net("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 32) -> LeNet5:
    """ZSKD's MNIST teacher (61,706 params for 1x32x32, 10 classes)."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


@register_net("lenet5_half")
def lenet5_half(num_classes: int = 10, in_channels: int = 1, image_size: int = 32) -> LeNet5:
    """ZSKD's MNIST student: conv filters halved (3, 8), FC unchanged (35,820 params)."""
    return LeNet5(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, conv_widths=(3, 8)
    )


@register_net("lenet_sigmoid")
def lenet_sigmoid(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, init_range: float | None = 0.5
) -> LeNetSigmoid:
    """The DLG/iDLG victim network."""
    return LeNetSigmoid(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, init_range=init_range
    )
