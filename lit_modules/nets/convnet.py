"""The ConvNet of dataset condensation: "Dataset Condensation with Gradient Matching"
(Zhao, Mopuri & Bilen, ICLR 2021), after Gidaris & Komodakis 2018.

``depth`` blocks of conv3x3 (pad 1) -> norm -> activation -> pool 2x2, then one linear layer on the
flattened map. With the defaults (width 128, depth 3, instance norm, ReLU, average pooling) a 32x32
input gives 128 x 4 x 4 = 2048 features. A 28x28 input (MNIST) is padded to 32 by the first conv
(padding 3), as the DC code does, so it yields the same 2048 features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.errors import CvlabError
from lit_modules.nets.base import ClassifierNet
from lit_modules.nets.pooling import AvgPool2x2, MaxPool2x2
from lit_modules.nets.registry import register_net

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTS = ("relu", "sigmoid", "leakyrelu")
POOLINGS = ("avgpooling", "maxpooling", "none")


def _check(kind: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CvlabError(f"convnet {kind} must be one of {', '.join(allowed)}; got {value!r}")


def _norm(norm: str, c: int, h: int, w: int) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm2d(c, affine=True)
    if norm == "layernorm":
        return nn.LayerNorm([c, h, w], elementwise_affine=True)
    if norm == "instancenorm":
        return nn.GroupNorm(c, c, affine=True)  # instance norm with affine params, as in DC
    if norm == "groupnorm":
        return nn.GroupNorm(4, c, affine=True)
    return nn.Identity()


def _act(act: str) -> nn.Module:
    if act == "sigmoid":
        return nn.Sigmoid()
    if act == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    return nn.ReLU(inplace=True)


class FewChannelConv2d(nn.Conv2d):
    """The first conv (few input channels) of ConvNet: ``nn.Conv2d`` with the same parameters, whose
    CPU forward is ``unfold`` + one matmul.

    oneDNN has no fast kernel for a 1- or 3-channel input: at the DC real-gradient shape (256 MNIST
    images, 1 -> 128 channels) its forward and weight gradient are 2-3x slower than the matmul form,
    whose weight gradient is a batched matmul (docs/PERFORMANCE.md, Dataset Condensation). The same
    numbers up to float summation order; other devices use the regular convolution.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        n, _, h, w = x.shape
        (kh, kw), (ph, pw), (sh, sw) = self.kernel_size, self.padding, self.stride
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (n, c*kh*kw, ho*wo)
        if torch.compiler.is_compiling() or self.bias is None:
            out = torch.matmul(self.weight.flatten(1), cols)  # (n, out, ho*wo)
            if self.bias is not None:
                out = out + self.bias[:, None]
        else:  # eager: the bias fused into one batched matmul (2.2x faster than matmul + add)
            out = torch.baddbmm(self.bias[None, :, None], self.weight.flatten(1).expand(n, -1, -1), cols)
        return out.view(n, self.out_channels, ho, wo)


class ConvNet(ClassifierNet):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        act: str = "relu",
        pooling: str = "avgpooling",
    ) -> None:
        super().__init__()
        _check("norm", norm, NORMS)
        _check("act", act, ACTS)
        _check("pooling", pooling, POOLINGS)
        if depth < 1:
            raise CvlabError(f"convnet depth must be >= 1; got {depth}")
        layers: list[nn.Module] = []
        c, s = in_channels, image_size
        for d in range(depth):
            pad = 3 if (d == 0 and image_size == 28) else 1  # 28 -> 32 on the first conv
            conv = FewChannelConv2d if c <= 4 else nn.Conv2d  # same parameters; see FewChannelConv2d
            layers.append(conv(c, width, kernel_size=3, padding=pad))
            c, s = width, s + 2 * pad - 2
            if norm != "none":
                layers.append(_norm(norm, c, s, s))
            layers.append(_act(act))
            if pooling != "none":
                layers.append(AvgPool2x2() if pooling == "avgpooling" else MaxPool2x2())
                s //= 2
            if s < 1:
                raise CvlabError(f"convnet depth {depth} pools a {image_size}px image to nothing")
        layers.append(nn.Flatten())  # (B, width * s * s)
        self.features = nn.Sequential(*layers)
        self.num_features = c * s * s
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)


@register_net("convnet")
def convnet(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    width: int = 128,
    depth: int = 3,
    norm: str = "instancenorm",
    act: str = "relu",
    pooling: str = "avgpooling",
) -> ConvNet:
    """DC's ConvNet-3 (width 128, instance norm, ReLU, average pooling) unless told otherwise."""
    return ConvNet(num_classes, in_channels, image_size, width, depth, norm, act, pooling)
