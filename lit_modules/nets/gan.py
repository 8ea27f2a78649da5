"""GAN generators and discriminators for 28 / 32 px images (CBGAN, UAI 2021, and its baselines).

``sndcgan``: the DCGAN of Miyato et al. ("Spectral Normalization for GANs", ICLR 2018,
https://arxiv.org/abs/1802.05957) as in PyTorch-StudioGAN / CBGAN's public code::

    G: z -> linear -> (8w, s0, s0) -> BN ReLU -> [deconv4x4 s2 -> BN ReLU] x n -> conv3x3 C -> tanh
    D: [conv3x3 s1 -> LReLU(0.1) -> conv4x4 s2 -> LReLU(0.1)] widths w, 2w, 4w -> conv3x3 8w -> LReLU -> linear 1

``resnet_gan``: the SNGAN ResNet (same paper, appendix): G with ``n`` up-sampling residual blocks, D with
an optimised first block, down-sampling residual blocks, ReLU, global sum pooling and a linear head.

Sizes: ``s0 = image_size / 8`` and three up-samplings for 32 px, ``image_size / 4`` and two for 28 px.
Spectral norm is on the discriminator only (CBGAN's code), weights are orthogonally initialised
(``init="ortho"``, the public code's), the generator's BatchNorm can be turned off (``norm="none"``: its
batch statistics are per device under DDP). Generators output [0, 1] pixels (``(tanh + 1) / 2``) and
discriminators take [0, 1] pixels and map them to [-1, 1] inside (pixels in, normalisation inside).
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.errors import CvlabError
from lit_modules.nets.generator import register_generator
from lit_modules.nets.registry import NetSpec, Registry, create_from

DISCRIMINATORS = Registry("discriminator")
register_discriminator = DISCRIMINATORS.register
Init = Literal["ortho", "normal", "default"]
GenNorm = Literal["batchnorm", "none"]


def available_discriminators() -> list[str]:
    return DISCRIMINATORS.names()


def create_discriminator(name: NetSpec = "sndcgan", in_channels: int = 3, image_size: int = 32,
                         **kwargs: Any) -> nn.Module:
    """Build a discriminator ``images (B, C, S, S) in [0, 1] -> logits (B,)``: a registered name or
    ``{class_path, init_args}``."""
    if isinstance(name, str):
        return DISCRIMINATORS.get(name)(in_channels=in_channels, image_size=image_size, **kwargs)
    spec = {**name, "init_args": {**(name.get("init_args") or {}), **kwargs}} if kwargs else name
    return create_from(DISCRIMINATORS, spec, in_channels=in_channels, image_size=image_size)


def _upsamplings(image_size: int) -> tuple[int, int]:
    """(start size, number of x2 up-samplings): 32 -> (4, 3), 28 -> (7, 2)."""
    if image_size % 8 == 0 and image_size >= 8:
        return image_size // 8, 3
    if image_size % 4 == 0 and image_size >= 4:
        return image_size // 4, 2
    raise CvlabError("GAN networks make images whose size is a multiple of 4 (28 or 32 px); "
                     f"got image_size {image_size}")


def init_weights(net: nn.Module, init: Init) -> None:
    """Orthogonal (``ortho``), N(0, 0.02) (``normal``) or PyTorch's (``default``) init of every conv / linear
    weight, biases 0. Call before spectral norm is applied."""
    if init == "default":
        return
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if init == "ortho":
                nn.init.orthogonal_(m.weight)
            else:
                nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def apply_spectral_norm(net: nn.Module) -> nn.Module:
    """Spectral normalisation (one power iteration per forward) on every conv and linear layer."""
    for name, m in list(net.named_children()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            setattr(net, name, nn.utils.parametrizations.spectral_norm(m))
        else:
            apply_spectral_norm(m)
    return net


def _bn(c: int, norm: GenNorm) -> nn.Module:
    return nn.BatchNorm2d(c) if norm == "batchnorm" else nn.Identity()


class SNDCGANGenerator(nn.Module):
    """DCGAN generator: ``(B, latent_dim) -> (B, C, S, S)`` in [0, 1] (see the module docstring).

    Args:
        latent_dim: size of z (128 in CBGAN).
        out_channels: C.
        image_size: S, 28 or 32 (any multiple of 4).
        width: w; the channels go 8w at the start, halving at each up-sampling (64 in the paper).
        norm: ``batchnorm`` (the paper's) or ``none``.
        init: weight initialisation (``ortho``: CBGAN's).
    """

    def __init__(self, latent_dim: int = 128, out_channels: int = 3, image_size: int = 32, width: int = 64,
                 norm: GenNorm = "batchnorm", init: Init = "ortho") -> None:
        super().__init__()
        self.latent_dim, self.out_channels, self.image_size = latent_dim, out_channels, image_size
        self.s0, n_up = _upsamplings(image_size)
        c = 8 * width
        self.c0 = c
        self.linear = nn.Linear(latent_dim, c * self.s0 * self.s0)
        layers: list[nn.Module] = [_bn(c, norm), nn.ReLU()]
        for _ in range(n_up):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1), _bn(c // 2, norm), nn.ReLU()]
            c //= 2
        layers += [nn.Conv2d(c, out_channels, 3, 1, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        init_weights(self, init)

    def forward(self, z: Tensor) -> Tensor:
        h = self.linear(z).view(z.shape[0], self.c0, self.s0, self.s0)  # (B, 8w, s0, s0)
        return (self.body(h) + 1) / 2  # (B, C, S, S) pixels in [0, 1]


class SNDCGANDiscriminator(nn.Module):
    """DCGAN discriminator with spectral norm: ``(B, C, S, S)`` pixels -> ``(B,)`` logits.

    Args:
        in_channels: C.
        image_size: S (any; the head pools globally).
        width: w (64 in the paper).
        spectral_norm: on every layer (the paper's).
        init: weight initialisation.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, width: int = 64, spectral_norm: bool = True,
                 init: Init = "ortho") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c, 3, 1, 1), nn.LeakyReLU(0.1), nn.Conv2d(c, c, 4, 2, 1), nn.LeakyReLU(0.1)]
            c_in = c
        layers += [nn.Conv2d(c_in, 8 * width, 3, 1, 1), nn.LeakyReLU(0.1)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(8 * width, 1)
        init_weights(self, init)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x * 2 - 1)  # (B, 8w, S/8, S/8)
        return self.head(h.sum((2, 3))).squeeze(1)  # global sum pooling -> (B,)


class _GBlock(nn.Module):
    """Up-sampling residual block: BN ReLU up conv3x3 BN ReLU conv3x3, plus up conv1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, norm: GenNorm) -> None:
        super().__init__()
        self.bn1, self.bn2 = _bn(c_in, norm), _bn(c_out, norm)
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class _DBlock(nn.Module):
    """Down-sampling residual block (``first``: the optimised block without the leading ReLU)."""

    def __init__(self, c_in: int, c_out: int, down: bool, first: bool = False) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if (c_in != c_out or down) else None
        self.down, self.first = down, first

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        s = x
        if self.down:
            h = F.avg_pool2d(h, 2)
        if self.shortcut is not None:
            s = self.shortcut(F.avg_pool2d(s, 2) if (self.first and self.down) else s)
            if self.down and not self.first:
                s = F.avg_pool2d(s, 2)
        return h + s


class ResNetGANGenerator(nn.Module):
    """SNGAN ResNet generator: ``(B, latent_dim) -> (B, C, S, S)`` in [0, 1] (width w: 256 in SNGAN)."""

    def __init__(self, latent_dim: int = 128, out_channels: int = 3, image_size: int = 32, width: int = 256,
                 norm: GenNorm = "batchnorm", init: Init = "ortho") -> None:
        super().__init__()
        self.latent_dim, self.out_channels, self.image_size, self.width = latent_dim, out_channels, image_size, width
        self.s0, n_up = _upsamplings(image_size)
        self.linear = nn.Linear(latent_dim, width * self.s0 * self.s0)
        self.blocks = nn.Sequential(*[_GBlock(width, width, norm) for _ in range(n_up)])
        self.bn = _bn(width, norm)
        self.out = nn.Conv2d(width, out_channels, 3, 1, 1)
        init_weights(self, init)

    def forward(self, z: Tensor) -> Tensor:
        h = self.blocks(self.linear(z).view(z.shape[0], self.width, self.s0, self.s0))
        return (self.out(F.relu(self.bn(h))).tanh() + 1) / 2  # (B, C, S, S) pixels in [0, 1]


class ResNetGANDiscriminator(nn.Module):
    """SNGAN ResNet discriminator: ``(B, C, S, S)`` pixels -> ``(B,)`` logits (width w: 128 in SNGAN)."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, width: int = 128, spectral_norm: bool = True,
                 init: Init = "ortho") -> None:
        super().__init__()
        self.blocks = nn.Sequential(_DBlock(in_channels, width, down=True, first=True),
                                    _DBlock(width, width, down=True),
                                    _DBlock(width, width, down=False), _DBlock(width, width, down=False))
        self.head = nn.Linear(width, 1)
        init_weights(self, init)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.blocks(x * 2 - 1))
        return self.head(h.sum((2, 3))).squeeze(1)


@register_generator("sndcgan")
def sndcgan_generator(latent_dim: int = 128, out_channels: int = 3, image_size: int = 32, **kwargs: Any) -> nn.Module:
    return SNDCGANGenerator(latent_dim=latent_dim, out_channels=out_channels, image_size=image_size, **kwargs)


@register_generator("resnet_gan")
def resnet_gan_generator(latent_dim: int = 128, out_channels: int = 3, image_size: int = 32,
                         **kwargs: Any) -> nn.Module:
    return ResNetGANGenerator(latent_dim=latent_dim, out_channels=out_channels, image_size=image_size, **kwargs)


@register_discriminator("sndcgan")
def sndcgan_discriminator(in_channels: int = 3, image_size: int = 32, **kwargs: Any) -> nn.Module:
    return SNDCGANDiscriminator(in_channels=in_channels, image_size=image_size, **kwargs)


@register_discriminator("resnet_gan")
def resnet_gan_discriminator(in_channels: int = 3, image_size: int = 32, **kwargs: Any) -> nn.Module:
    return ResNetGANDiscriminator(in_channels=in_channels, image_size=image_size, **kwargs)
