"""Every network reachable by name: ``create_net("lenet5", num_classes=10, in_channels=1)``.

A builder is registered with :func:`register_net` and called as
``builder(num_classes=..., in_channels=..., image_size=..., **kwargs)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from datamodules.errors import CvlabError

NetBuilder = Callable[..., nn.Module]
_NETS: dict[str, NetBuilder] = {}


def register_net(name: str) -> Callable[[NetBuilder], NetBuilder]:
    """Decorator: make a builder reachable by ``name`` (lower-case, dashes allowed)."""

    def deco(fn: NetBuilder) -> NetBuilder:
        if name in _NETS:
            raise ValueError(f"network {name!r} registered twice")
        _NETS[name] = fn
        return fn

    return deco


def available_nets() -> list[str]:
    return sorted(_NETS)


def create_net(
    name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> nn.Module:
    """Build a registered network. Unknown names fail with the list of known ones."""
    try:
        builder = _NETS[name]
    except KeyError:
        raise CvlabError(f"unknown network {name!r}; available: {', '.join(available_nets())}") from None
    return builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
