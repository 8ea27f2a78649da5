"""The interface every classifier in the zoo shares (timm-style).

``forward(x) == get_classifier()(forward_features(x))``: methods need the penultimate features
(LRA's activation loss) and the final linear layer (ZSKD's class similarity, iDLG's label extraction).
"""

from __future__ import annotations

import torch
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


def _is_linear(m: nn.Module) -> bool:
    # a TorchScript module keeps its layers as RecursiveScriptModules that remember their class name
    return isinstance(m, nn.Linear) or getattr(m, "original_name", None) == "Linear"


def classifier_layer(net: nn.Module) -> nn.Module | None:
    """The final linear layer of a classifier: ``get_classifier()`` where the network has it (cvlab's zoo,
    timm), else the last ``nn.Linear`` registered in the module tree (torchvision's ``fc``/``classifier[-1]``,
    most hand-written nets, TorchScript files). ``None`` when there is none."""
    get = getattr(net, "get_classifier", None)
    if callable(get) and not isinstance(net, torch.jit.ScriptModule):
        fc = get()
        if isinstance(fc, nn.Linear):
            return fc
    last = None
    for m in net.modules():
        if _is_linear(m):
            last = m
    return last


def features_and_logits(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(penultimate features (B, D), logits (B, K))`` of any classifier in one forward pass.

    cvlab's :class:`ClassifierNet` gives them directly; any other network is read through a forward hook
    on its final linear layer (:func:`classifier_layer`), whose input is the features.
    """
    if isinstance(net, ClassifierNet):
        feats = net.forward_features(x)
        return feats, net.get_classifier()(feats)
    fc = classifier_layer(net)
    if fc is None or isinstance(net, torch.jit.ScriptModule):
        raise TypeError(
            f"{type(net).__name__} exposes no penultimate features (no final nn.Linear to hook"
            f"{', and TorchScript modules take no hooks' if isinstance(net, torch.jit.ScriptModule) else ''})"
        )
    seen: list[Tensor] = []
    handle = fc.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    try:
        logits = net(x)
    finally:
        handle.remove()
    return seen[-1].flatten(1), logits
