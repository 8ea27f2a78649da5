"""Batched image ops (the ground floor): transforms that run where the batch lives (GPU when training there).

Every function takes a float batch ``(B, C, H, W)`` and returns a new one; randomness comes from an
explicit ``torch.Generator`` so that a run (and a resumed run) is repeatable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def to_float(x: Tensor) -> Tensor:
    """uint8 ``(B, C, H, W)`` in [0, 255] -> float32 in [0, 1]; float input is returned unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel ``(x - mean) / std`` for a batch in [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Inverse of :func:`normalize`: back to [0, 1] pixel space (not clamped)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x * s + m


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad by ``padding`` and take a random ``H x W`` crop per sample (one gather, no loop)."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
    flat = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(b, 1, h * w)  # (B, 1, H*W)
    return xp.flatten(2).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)


def random_hflip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Flip each sample left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of a uint8 or float batch to ``size x size`` (uint8 stays uint8)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y


def dc_augment(
    x: Tensor,
    strategy: str = "crop_scale_rotate",
    generator: torch.Generator | None = None,
    crop: int = 4,
    scale: float = 0.2,
    rotate: float = 45.0,
    noise: float = 0.001,
) -> Tensor:
    """The evaluation augmentation of Dataset Condensation (Zhao et al., ICLR 2021):
    each image gets ONE transform drawn from ``strategy`` (``"_"``-separated subset of crop, scale,
    rotate, noise). crop: shift by up to ``crop`` px; scale: stretch each axis by ``1 +- scale``;
    rotate: up to ``+-rotate`` degrees; the uncovered border takes the batch's per-channel mean, as
    in the DC code. One ``affine_grid``/``grid_sample`` for the batch, no per-image loop.
    ``x``: float ``(B, C, H, W)`` (normalised space is fine).
    """
    ops = strategy.split("_")
    b, _, h, w = x.shape
    dev = x.device
    pick = torch.randint(0, len(ops), (b,), device=dev, generator=generator)
    u = lambda: torch.rand(b, device=dev, generator=generator)  # noqa: E731
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    noisy = torch.zeros(b, dtype=torch.bool, device=dev)
    for i, op in enumerate(ops):
        m = pick == i
        if op == "crop":  # integer shift in [-crop, crop) px, in normalised grid units
            shift = lambda n: (torch.floor(u() * 2 * crop) - crop) * 2 / n  # noqa: E731
            theta[:, 0, 2] = torch.where(m, shift(w), theta[:, 0, 2])
            theta[:, 1, 2] = torch.where(m, shift(h), theta[:, 1, 2])
        elif op == "scale":  # zoom factors s in [1 - scale, 1 + scale]: sample the grid at 1 / s
            theta[:, 0, 0] = torch.where(m, 1 / (1 - scale + 2 * scale * u()), theta[:, 0, 0])
            theta[:, 1, 1] = torch.where(m, 1 / (1 - scale + 2 * scale * u()), theta[:, 1, 1])
        elif op == "rotate":
            a = (u() * 2 - 1) * rotate * torch.pi / 180
            rot = torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], 1).view(b, 2, 2)
            theta[:, :, :2] = torch.where(m[:, None, None], rot.to(x.dtype), theta[:, :, :2])
        elif op == "noise":
            noisy |= m
        else:
            raise ValueError(f"unknown augmentation {op!r} in {strategy!r}; expected crop, scale, rotate, noise")
    mean = x.mean(dim=(0, 2, 3), keepdim=True)  # border fill, as the DC code
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x - mean, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + mean
    if "noise" in ops:
        out = out + noise * noisy[:, None, None, None] * torch.randn(x.shape, device=dev, generator=generator,
                                                                     dtype=x.dtype)
    return out


def random_affine(
    x: Tensor,
    scale: float = 0.0,
    translate: float = 0.0,
    rotate: float = 0.0,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random scale, translate, rotate and horizontal flip per image, in one ``affine_grid``/``grid_sample``.

    Zoom ``s ~ U(1 - scale, 1 + scale)``, shift ``~ U(-translate, translate)`` of the image size per axis,
    angle ``~ U(-rotate, rotate)`` degrees, left-right flip with probability 1/2 if ``flip``; the
    uncovered border is filled with zeros (the normalised mean when ``x`` is normalised). ZSKD
    (Nayak et al., ICML 2019) distils with these augmentations. ``x``: float ``(B, C, H, W)``.
    """
    b, dev = x.shape[0], x.device
    if scale == translate == rotate == 0 and not flip:
        return x
    u = lambda: torch.rand(b, device=dev, generator=generator) * 2 - 1  # noqa: E731  U(-1, 1), (B,)
    inv_s = 1 / (1 + scale * u())  # sample the grid at 1 / zoom
    a = u() * rotate * torch.pi / 180
    sign = (torch.where(torch.rand(b, device=dev, generator=generator) < 0.5, -1.0, 1.0) if flip
            else torch.ones(b, device=dev))
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = torch.cos(a) * inv_s * sign
    theta[:, 0, 1] = -torch.sin(a) * inv_s
    theta[:, 1, 0] = torch.sin(a) * inv_s * sign
    theta[:, 1, 1] = torch.cos(a) * inv_s
    theta[:, :, 2] = torch.stack([u(), u()], 1) * 2 * translate  # grid units: 2 = the image width
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_mix(x: Tensor, max_weight: float, generator: torch.Generator | None = None) -> Tensor:
    """Blend each image with a random partner from the same batch: ``(1 - w) x_i + w x_perm(i)``,
    ``w ~ U(0, max_weight)`` per image (the image itself stays dominant for ``max_weight <= 0.5``).

    With a teacher that labels the blended batch, ``max_weight = 0.5`` is mixup with ``alpha = 1``
    (Zhang et al., ICLR 2018): ``min(lam, 1 - lam)`` of ``lam ~ U(0, 1)`` is ``U(0, 0.5)``. Blending is
    linear, so it commutes with :func:`normalize`. ``x``: float ``(B, C, H, W)``.
    """
    if max_weight <= 0:
        return x
    b = x.shape[0]
    perm = torch.randperm(b, device=x.device, generator=generator)
    w = (torch.rand(b, device=x.device, generator=generator) * max_weight).to(x.dtype).view(b, 1, 1, 1)
    return torch.lerp(x, x[perm], w)
