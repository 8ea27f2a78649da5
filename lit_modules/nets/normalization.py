"""Pixels in, normalisation inside: a network carries the input statistics it was trained with.

Datamodules hand every method [0, 1] pixels; each network (a teacher: the statistics it was trained on;
a network trained here: the task's) normalises them itself, so attacks, perturbations, impressions and
attributions all live in pixel space and work with any network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel for ``x (B, C, H, W)`` in [0, 1]; the identity when ``mean`` is None.

    The statistics are non-persistent buffers: they are part of a network's *input contract* (stored in
    hyper-parameters or a teacher's description), so adding normalisation changes no state_dict key.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        if mean is not None and len(mean) != len(std):
            raise ValueError(f"mean {list(mean)} and std {list(std)} have different lengths")
        self.mean_values = None if mean is None else tuple(float(m) for m in mean)
        self.std_values = None if std is None else tuple(float(s) for s in std)
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", None if mean is None else torch.tensor(self.mean_values).view(shape),
                             persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(self.std_values).view(shape),
                             persistent=False)

    @property
    def is_identity(self) -> bool:
        return self.mean is None

    def forward(self, x: Tensor) -> Tensor:
        if self.mean is None:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def inverse(self, u: Tensor) -> Tensor:
        """Normalised input -> [0, 1] pixels (not clamped)."""
        if self.mean is None:
            return u
        return u * self.std.to(u.dtype) + self.mean.to(u.dtype)

    def same_as(self, other: InputNormalization) -> bool:
        return self.mean_values == other.mean_values and self.std_values == other.std_values

    def extra_repr(self) -> str:
        return "identity" if self.mean is None else f"mean={self.mean_values}, std={self.std_values}"
