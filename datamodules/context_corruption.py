"""Corruption of the context only, or of the object only, through the object mask (ImageNet-CS, "Lost in
Context", ICVGIP 2024): ``context = corrupt(x) * (1 - M) + x * M``, ``object = corrupt(x) * M + x * (1 - M)``.

Two paths to the ImageNet-C families (Hendrycks & Dietterich 2019, severities 1-5):

* batched torch on any device for the simple ones, :data:`TORCH_CORRUPTIONS`: ``gaussian_noise``,
  ``shot_noise``, ``impulse_noise``, ``brightness``, ``contrast``, with the ``imagecorruptions`` package's
  constants (brightness and contrast equal the package's to a grey level; the noises are the same
  distributions, not the same draws);
* every family of the ``imagecorruptions`` package (PyPI), per image on numpy uint8 ``H x W x 3`` (blurs,
  weather, digital), :func:`corrupt_numpy`; three of its 19 (glass_blur, fog, gaussian_blur) call APIs that
  numpy 2 / scikit-image >= 0.19 removed (``np.float_``, ``gaussian(multichannel=True)``): they run through
  :func:`_legacy_apis`, which supplies the old names for the duration of the call.

Pixels are [0, 1] floats ``(B, 3, H, W)``; masks bool ``(B, 1, H, W)`` (True on the object).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor

from datamodules.errors import CvlabError as DataError

Region = Literal["context", "object"]

_GAUSSIAN = (0.08, 0.12, 0.18, 0.26, 0.38)
_SHOT = (60.0, 25.0, 12.0, 5.0, 3.0)
_IMPULSE = (0.03, 0.06, 0.09, 0.17, 0.27)
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)


def _gaussian_noise(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    return x + c * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _shot_noise(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    return torch.poisson(x * c, generator=g) / c


def _impulse_noise(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    # salt and pepper on each value with probability c, half salt, half pepper (skimage's random_noise "s&p")
    u = torch.rand((2, *x.shape), generator=g, device=x.device, dtype=x.dtype)
    hit, salt = u[0] < c, u[1] < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def _brightness(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    # HSV value + c, clipped: at fixed hue and saturation the rgb scales with V (a black pixel turns grey)
    v = x.amax(1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), v_new.expand_as(x))


def _contrast(x: Tensor, c: float, g: torch.Generator | None) -> Tensor:
    means = x.mean((2, 3), keepdim=True)  # per image and channel
    return (x - means) * c + means


TORCH_CORRUPTIONS: dict[str, tuple[Callable[[Tensor, float, torch.Generator | None], Tensor], tuple[float, ...]]] = {
    "gaussian_noise": (_gaussian_noise, _GAUSSIAN),
    "shot_noise": (_shot_noise, _SHOT),
    "impulse_noise": (_impulse_noise, _IMPULSE),
    "brightness": (_brightness, _BRIGHTNESS),
    "contrast": (_contrast, _CONTRAST),
}


def _check_severity(severity: int) -> None:
    if severity not in (1, 2, 3, 4, 5):
        raise DataError(f"corruption severity must be 1..5, got {severity}")


def corrupt_torch(x: Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """ImageNet-C corruption ``name`` at ``severity`` on a batch ``(B, 3, H, W)`` of [0, 1] pixels, in torch."""
    _check_severity(severity)
    if name not in TORCH_CORRUPTIONS:
        raise DataError(f"no torch path for corruption {name!r}; torch has {', '.join(TORCH_CORRUPTIONS)} "
                        "(the others run per image through imagecorruptions)")
    fn, consts = TORCH_CORRUPTIONS[name]
    return fn(x, consts[severity - 1], generator).clamp(0.0, 1.0)


#: families of imagecorruptions 1.1.2 written against numpy 1 / scikit-image < 0.19 (checked at 32 and 224 px)
LEGACY_FAMILIES = ("glass_blur", "fog", "gaussian_blur")


@contextlib.contextmanager
def _legacy_apis() -> Iterator[None]:
    """``np.float_`` (removed in numpy 2: ``np.float64``) and ``gaussian(..., multichannel=True)`` (scikit-image 0.19:
    ``channel_axis=-1``) for imagecorruptions' fog / glass_blur / gaussian_blur, restored afterwards."""
    import imagecorruptions.corruptions as ic
    import numpy as np

    modern = ic.gaussian

    def gaussian(image, *args, multichannel=None, **kwargs):
        if multichannel:
            kwargs.setdefault("channel_axis", -1)
        return modern(image, *args, **kwargs)

    had_float_ = "float_" in np.__dict__
    ic.gaussian = gaussian
    if not had_float_:
        np.float_ = np.float64
    try:
        yield
    finally:
        ic.gaussian = modern
        if not had_float_:
            del np.float_


def corrupt_numpy(x: Tensor, name: str, severity: int) -> Tensor:
    """Any ``imagecorruptions`` family, per image (numpy, CPU): ``(B, 3, H, W)`` [0, 1] -> the same shape,
    quantised to uint8 levels as the package works."""
    _check_severity(severity)
    import numpy as np
    from imagecorruptions import corrupt, get_corruption_names

    names = get_corruption_names("all")
    if name not in names:
        raise DataError(f"unknown corruption {name!r}; imagecorruptions has {', '.join(names)}")
    imgs = (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with _legacy_apis() if name in LEGACY_FAMILIES else contextlib.nullcontext():
        out = [np.asarray(corrupt(im, corruption_name=name, severity=severity)).astype(np.float32)[: im.shape[0],
               : im.shape[1]] for im in imgs]
    return (torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 255.0).clamp(0, 1).to(x.device, x.dtype)


def corrupt_region(x: Tensor, mask: Tensor, name: str, severity: int, region: Region = "context",
                   generator: torch.Generator | None = None) -> Tensor:
    """Corrupt only the context (``region="context"``: ``corrupt * (1 - M) + x * M``) or only the object.

    The torch path serves :data:`TORCH_CORRUPTIONS`, the ``imagecorruptions`` package the rest."""
    if mask.shape[0] != x.shape[0] or mask.shape[-2:] != x.shape[-2:]:
        raise DataError(f"masks {tuple(mask.shape)} do not match images {tuple(x.shape)}")
    if region not in ("context", "object"):
        raise DataError(f"region must be 'context' or 'object', got {region!r}")
    c = corrupt_torch(x, name, severity, generator) if name in TORCH_CORRUPTIONS else corrupt_numpy(x, name, severity)
    inside = mask.bool().expand_as(x)
    return torch.where(inside if region == "object" else ~inside, c, x)
