"""Networks that are not in cvlab's zoo, as a user brings them: plain ``nn.Module``s with their own layer names,
reachable by class path (``{class_path: experiments.examples.outside_nets.TanhLeNet5}``).

- :class:`TanhLeNet5`: the classic LeNet-5 (LeCun et al. 1998) on 28x28 MNIST: tanh, average pooling,
  ``c1 s2 c3 s4 f5 f6 f7`` layer names, trained on pixels scaled to [-1, 1] (mean 0.5, std 0.5).
- :class:`BNLeNet5`: a LeNet-5 with BatchNorm after each convolution, on 32x32 images.
"""

from __future__ import annotations

from torch import Tensor, nn


class TanhLeNet5(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5, padding=2)  # 28x28 -> 28x28
        self.s2 = nn.AvgPool2d(2)
        self.c3 = nn.Conv2d(6, 16, 5)  # 14x14 -> 10x10
        self.s4 = nn.AvgPool2d(2)
        self.f5 = nn.Linear(16 * 5 * 5, 120)
        self.f6 = nn.Linear(120, 84)
        self.f7 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.s2(self.c1(x).tanh())
        x = self.s4(self.c3(x).tanh())
        x = self.f6(self.f5(x.flatten(1)).tanh()).tanh()
        return self.f7(x)


class BNLeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),  # 32 -> 14
            nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 14 -> 5
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                        nn.Linear(84, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class ClassicLeNet5(nn.Module):
    """A classic LeNet-5 as copied from someone else's repository: 28x28 inputs (conv1 padded by 2), ReLU, max
    pooling, layers ``conv1 conv2 fc1 fc2 fc3``, trained on pixels normalised with MNIST's statistics (mean 0.1307,
    std 0.3081). The "outside teacher" of docs/RESULTS.md, "Any network as a teacher"."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)  # 28 -> 28, pool -> 14
        self.conv2 = nn.Conv2d(6, 16, 5)  # 14 -> 10, pool -> 5
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc2(self.relu(self.fc1(x.flatten(1)))))
        return self.fc3(x)

