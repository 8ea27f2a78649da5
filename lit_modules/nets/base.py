"""The interface every classifier in the zoo shares (timm-style).

``forward(x) == get_classifier()(forward_features(x))``: methods need the penultimate features
(LRA's activation loss) and the final linear layer (ZSKD's class similarity, iDLG's label extraction).
"""

from __future__ import annotations

from torch import Tensor, nn


class ClassifierNet(nn.Module):
    """Base class: subclasses implement ``forward_features`` and keep the final layer in ``self.fc``."""

    fc: nn.Linear

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> penultimate features ``(B, D)``."""
        raise NotImplementedError

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))
