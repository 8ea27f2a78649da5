"""Every network reachable by name: ``create_net("lenet5", num_classes=10, in_channels=1)``.

A builder is registered with :func:`register_net` and called as
``builder(num_classes=..., in_channels=..., image_size=..., **kwargs)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from cvlab.errors import CvlabError

NetBuilder = Callable[..., nn.Module]


class Registry:
    """Builders reachable by name, for one kind of network (classifiers, generators)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, NetBuilder] = {}

    def register(self, name: str) -> Callable[[NetBuilder], NetBuilder]:
        """Decorator: make a builder reachable by ``name`` (lower-case, dashes allowed)."""

        def deco(fn: NetBuilder) -> NetBuilder:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._builders[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._builders)

    def get(self, name: str) -> NetBuilder:
        """The builder of ``name``; unknown names fail with the list of known ones."""
        try:
            return self._builders[name]
        except KeyError:
            raise CvlabError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None


NETS = Registry("network")
register_net = NETS.register


def available_nets() -> list[str]:
    return NETS.names()


def create_net(
    name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> nn.Module:
    """Build a registered network. Unknown names fail with the list of known ones."""
    return NETS.get(name)(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
