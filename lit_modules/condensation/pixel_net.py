"""A zoo network with its input normalisation inside: what condensation matches with and evaluates on.

Dataset Condensation keeps its images in [0, 1] pixel space like every other method; each network it
builds (the matching network, the inner-loop network, the evaluation networks, herding's feature
network) normalises its own input with the task's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_modules.nets import InputNormalization, NetSpec, create_net, features_and_logits


class PixelNet(nn.Module):
    """``net(normalize(x))`` for ``x`` in [0, 1]; ``forward_features`` gives the penultimate features."""

    def __init__(self, net: nn.Module, normalize: InputNormalization) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))

    def forward_features(self, x: Tensor) -> Tensor:
        return features_and_logits(self.net, self.normalize(x))[0]


def create_pixel_net(arch: NetSpec, num_classes: int, in_channels: int, image_size: int,
                     mean: Sequence[float] | None, std: Sequence[float] | None, **kwargs: Any) -> PixelNet:
    """:func:`lit_modules.nets.create_net` with :class:`InputNormalization` ``(mean, std)`` in front (the
    identity when ``mean`` is None). It draws the same random numbers as ``create_net``: the same seed gives
    the same weights."""
    return PixelNet(create_net(arch, num_classes, in_channels, image_size, **kwargs), InputNormalization(mean, std))


def pixel_preconditioner(std: Sequence[float] | None, in_channels: int) -> Tensor:
    """``std ** 2`` per channel, ``(1, C, 1, 1)`` (ones without statistics).

    With ``u = (x - mean) / std`` the gradient in pixel space is ``g_x = g_u / std``; an SGD step of
    ``lr`` on ``u`` is the step ``lr * std ** 2 * g_x`` on ``x``. Scaling the pixel gradient by this
    factor before SGD (momentum included: its buffer is then ``std`` times the normalised one) makes a
    pixel-space update equal the normalised-space update of the same ``lr``.
    """
    s = torch.ones(in_channels) if std is None else torch.tensor([float(v) for v in std])
    return (s * s).view(1, -1, 1, 1)
