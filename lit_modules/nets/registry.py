"""Every network reachable by name or by class path.

``create_net("lenet5", num_classes=10, in_channels=1)`` builds a zoo network: a builder registered with
:func:`register_net` and called as ``builder(num_classes=..., in_channels=..., image_size=..., **kwargs)``.
``create_net({"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 10}})`` builds any
importable ``nn.Module`` the way LightningCLI does; ``num_classes``, ``in_channels`` and ``image_size`` are
passed only to a class whose constructor takes them under those names and whose ``init_args`` leave them out.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, Union

from torch import nn

from cvlab.errors import CvlabError

NetBuilder = Callable[..., nn.Module]
#: a zoo name, or ``{"class_path": "pkg.module.Class", "init_args": {...}}`` (LightningCLI's form)
NetSpec = Union[str, dict]


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


def import_class(class_path: str) -> type:
    """``"pkg.module.Class"`` -> the class; one readable error when it cannot be imported."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise CvlabError(f"class_path {class_path!r} is not of the form 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CvlabError(f"cannot import {module_name!r} for class_path {class_path!r}: {e}") from None
    cls = getattr(module, name, None)
    if cls is None:
        raise CvlabError(f"module {module_name!r} has no {name!r} (class_path {class_path!r})")
    return cls


def net_name(spec: NetSpec) -> str:
    """A short readable name of a network spec (the zoo name or the class path)."""
    return spec if isinstance(spec, str) else str(spec.get("class_path"))


def create_from(registry: Registry, spec: NetSpec, **shape: Any) -> nn.Module:
    """Build ``spec`` (a name in ``registry`` or ``{class_path, init_args}``) with the ``shape`` keyword
    arguments (``num_classes``, ``in_channels``, ``image_size``, ``latent_dim``, ...): a registered builder
    takes them all; an outside class only those its constructor names and ``init_args`` leaves out."""
    if isinstance(spec, str):
        return registry.get(spec)(**shape)
    if not isinstance(spec, dict) or "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
        raise CvlabError(f"a {registry.kind} is a registered name or {{class_path: ..., init_args: {{...}}}}, "
                         f"got {spec!r}")
    cls = import_class(spec["class_path"])
    init_args = dict(spec.get("init_args") or {})
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    for key, value in shape.items():
        if key in params and key not in init_args:
            init_args[key] = value
    try:
        net = cls(**init_args)
    except TypeError as e:
        raise CvlabError(f"cannot build {spec['class_path']} with init_args {init_args}: {e}") from None
    if not isinstance(net, nn.Module):
        raise CvlabError(f"{spec['class_path']} built a {type(net).__name__}, not a torch nn.Module")
    return net


def create_net(
    spec: NetSpec, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> nn.Module:
    """Build a zoo network by name, or any ``nn.Module`` by class path (see the module docstring);
    ``kwargs`` go to a zoo builder (an outside class takes its arguments from ``init_args``).

    Unknown names fail with the list of known ones; a class path that cannot be imported, or that builds
    something other than an ``nn.Module``, fails with one line.
    """
    if isinstance(spec, str):
        return NETS.get(spec)(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    if kwargs:
        spec = {**spec, "init_args": {**(spec.get("init_args") or {}), **kwargs}}
    return create_from(NETS, spec, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
