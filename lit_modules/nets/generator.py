"""Image generators for adversarial data-free distillation.

``dafl``: the generator of DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019,
https://arxiv.org/abs/1904.01186), as used by LRA (Patel, Mopuri, Qiu, "Learning to Retain while
Acquiring", CVPR 2023, https://arxiv.org/abs/2302.14290)::

    z (latent_dim) -> linear -> BN -> upsample x2 -> conv3x3 128 -> BN -> LReLU(0.2)
                   -> upsample x2 -> conv3x3 64 -> BN -> LReLU(0.2) -> conv3x3 C -> tanh -> BN(affine=False)

Images are ``image_size`` pixels square (``image_size // 4`` before the two upsamplings: 28 -> 7,
32 -> 8), grey (C = 1) or colour (C = 3). The last BatchNorm puts every channel at zero mean, unit
variance over the batch, i.e. in the normalised space the classifiers see.

Speed: ``fused_upsample`` computes ``upsample x2 (nearest) -> conv3x3`` as four 2x2 convolutions on
the small image, one per output phase, interleaved (:func:`upsample2x_conv3x3`): the same numbers as
the two ops in sequence (to float rounding, tested) with 4/9 of the multiply-adds. The parameters are
the ordinary 3x3 kernels, so checkpoints do not depend on it. Off by default: on our CPU (oneDNN,
channels-last) the small 2x2 convolutions and the interleaving copy ate the saving (docs/PERFORMANCE.md);
``channels_last`` is what pays there.

Generators are built by name with :func:`create_generator` (``available_generators()`` lists them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.errors import CvlabError
from lit_modules.nets.registry import NetSpec, Registry, create_from

GENERATORS = Registry("generator")
register_generator = GENERATORS.register


def available_generators() -> list[str]:
    return GENERATORS.names()


def create_generator(
    name: NetSpec = "dafl", latent_dim: int = 1000, out_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> nn.Module:
    """Build a generator ``z (B, latent_dim) -> images (B, out_channels, image_size, image_size)``: a registered
    name, or any ``nn.Module`` as ``{class_path, init_args}`` (given the shape arguments its constructor names)."""
    if isinstance(name, str):
        return GENERATORS.get(name)(latent_dim=latent_dim, out_channels=out_channels, image_size=image_size, **kwargs)
    spec = {**name, "init_args": {**(name.get("init_args") or {}), **kwargs}} if kwargs else name
    return create_from(GENERATORS, spec, latent_dim=latent_dim, out_channels=out_channels, image_size=image_size)


def _phase_kernels(weight: Tensor) -> list[Tensor]:
    """3x3 kernels ``(O, I, 3, 3)`` -> the four 2x2 kernels of ``conv3x3(upsample2x_nearest(x))``.

    Output pixel ``(2i + a, 2j + b)`` reads upsampled rows ``2i + a - 1 .. 2i + a + 1``, i.e. small-image
    rows ``{i - 1, i}`` (a = 0: kernel rows ``[w0, w1 + w2]``) or ``{i, i + 1}`` (a = 1: ``[w0 + w1, w2]``);
    likewise for columns. Returned in phase order ``(a, b) = (0, 0), (0, 1), (1, 0), (1, 1)``.
    """
    w0, w1, w2 = weight[:, :, 0], weight[:, :, 1], weight[:, :, 2]  # rows, each (O, I, 3)
    rows = (torch.stack([w0, w1 + w2], 2), torch.stack([w0 + w1, w2], 2))  # (O, I, 2, 3) for a = 0, 1
    out = []
    for r in rows:
        c0, c1, c2 = r[..., 0], r[..., 1], r[..., 2]
        out.append(torch.stack([c0, c1 + c2], -1))  # b = 0: columns {j - 1, j}
        out.append(torch.stack([c0 + c1, c2], -1))  # b = 1: columns {j, j + 1}
    return out


def upsample2x_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``, computed
    as four 2x2 convolutions on ``x`` (one per output phase): ``(B, I, H, W) -> (B, O, 2H, 2W)``."""
    B, _, H, W = x.shape
    xp = F.pad(x, (1, 1, 1, 1))  # (B, I, H + 2, W + 2)
    k = _phase_kernels(weight)
    y = [F.conv2d(xp[:, :, a : a + H + 1, b : b + W + 1], k[2 * a + b], bias) for a in (0, 1) for b in (0, 1)]
    y = torch.stack([torch.stack(y[0:2], -1), torch.stack(y[2:4], -1)], 3)  # (B, O, H, 2, W, 2)
    return y.reshape(B, weight.shape[0], 2 * H, 2 * W)


class UpsampleConv(nn.Conv2d):
    """Nearest upsampling x2 followed by a 3x3 convolution (padding 1); ``fused`` computes both at once."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1)
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return upsample2x_conv3x3(x, self.weight, self.bias)
        return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))


class DAFLGenerator(nn.Module):
    """The DAFL generator (see the module docstring): ``(B, latent_dim) -> (B, C, S, S)``, S = ``image_size``.

    Args:
        latent_dim: size of z (1000 in LRA).
        out_channels: image channels C (1 grey, 3 colour).
        image_size: S, a multiple of 4 (28 or 32 for the papers' datasets).
        widths: channels after the linear layer / first conv and of the second conv (128, 64).
        bn_eps: epsilon of the two inner BatchNorms. DAFL's code writes ``BatchNorm2d(128, 0.8)``, whose
            second positional argument is ``eps``, so 0.8 is what the published generators use.
        init_range: weights of every conv and linear layer ~ U(-r, r), biases 0 (LRA's public code:
            0.08); ``None`` keeps PyTorch's default initialisation.
        spectral_norm: spectral normalisation on the convolutions (LRA's public generator has it;
            DAFL and the paper's description do not).
        fused_upsample: compute ``upsample -> conv`` with :func:`upsample2x_conv3x3` (same result, 4/9 of
            the multiply-adds; not faster on our CPU).
        channels_last: run the convolutions in channels-last memory format (faster on CPU and GPU).
    """

    def __init__(
        self,
        latent_dim: int = 1000,
        out_channels: int = 3,
        image_size: int = 32,
        widths: tuple[int, int] = (128, 64),
        bn_eps: float = 0.8,
        init_range: float | None = 0.08,
        spectral_norm: bool = False,
        fused_upsample: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if image_size % 4 or image_size < 4:
            raise CvlabError(
                f"the DAFL generator makes images whose size is a multiple of 4 (two x2 upsamplings); got "
                f"image_size {image_size} (MNIST-like data: 28 or 32; CIFAR/SVHN: 32)"
            )
        c1, c2 = widths
        self.latent_dim, self.out_channels, self.image_size = latent_dim, out_channels, image_size
        self.init_size = image_size // 4  # 28 -> 7, 32 -> 8
        self.channels_last = channels_last
        self.l1 = nn.Linear(latent_dim, c1 * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(c1)
        self.conv1 = UpsampleConv(c1, c1, fused_upsample)
        self.bn1 = nn.BatchNorm2d(c1, eps=bn_eps)
        self.conv2 = UpsampleConv(c1, c2, fused_upsample)
        self.bn2 = nn.BatchNorm2d(c2, eps=bn_eps)
        self.conv3 = nn.Conv2d(c2, out_channels, kernel_size=3, padding=1)
        self.bn3 = nn.BatchNorm2d(out_channels, affine=False)
        if init_range is not None:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.uniform_(m.weight, -init_range, init_range)
                    nn.init.zeros_(m.bias)
        if spectral_norm:
            for name in ("conv1", "conv2", "conv3"):
                setattr(self, name, nn.utils.parametrizations.spectral_norm(getattr(self, name)))

    def forward(self, z: Tensor) -> Tensor:
        h = self.l1(z).view(z.shape[0], -1, self.init_size, self.init_size)  # (B, 128, S/4, S/4)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.bn0(h)
        h = F.leaky_relu(self.bn1(self.conv1(h)), 0.2)  # (B, 128, S/2, S/2)
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.2)  # (B, 64, S, S)
        return self.bn3(torch.tanh(self.conv3(h)))  # (B, C, S, S), zero mean / unit variance per channel


@register_generator("dafl")
def dafl(latent_dim: int = 1000, out_channels: int = 3, image_size: int = 32, **kwargs: Any) -> DAFLGenerator:
    """DAFL / LRA generator (see :class:`DAFLGenerator` for the keyword arguments)."""
    return DAFLGenerator(latent_dim=latent_dim, out_channels=out_channels, image_size=image_size, **kwargs)


class LatentEncoder(nn.Module):
    """The encoder of LRA's generative replay: ``(B, C, S, S) -> (z, mu, log_var)``, each ``(B, latent_dim)``.

    conv3x3 C -> 64, BN, LReLU(0.2); conv3x3 64 -> 128 stride 2, BN, LReLU(0.2); conv3x3 128 -> 128 stride 2,
    BN; average-pooled to 4 x 4 (2048 features, as the public code's at 32 px, for any ``image_size``);
    two linear heads for the mean and log-variance of q(z | x); ``z = mu + exp(log_var / 2) * eps``. Weights
    ~ U(-init_range, init_range), biases 0, as the generators. ``eps`` is drawn from ``generator`` when
    given (seeded, resumable runs).
    """

    def __init__(self, latent_dim: int = 1000, in_channels: int = 3, widths: tuple[int, int] = (64, 128),
                 init_range: float | None = 0.08) -> None:
        super().__init__()
        c1, c2 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.LeakyReLU(0.2),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.LeakyReLU(0.2),
            nn.Conv2d(c2, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.fc_mu = nn.Linear(c2 * 16, latent_dim)
        self.fc_log_var = nn.Linear(c2 * 16, latent_dim)
        if init_range is not None:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.uniform_(m.weight, -init_range, init_range)
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        h = self.features(x)
        mu, log_var = self.fc_mu(h), self.fc_log_var(h)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * log_var) * eps, mu, log_var
