"""Data Impressions: class similarity from a teacher's final layer and Dirichlet soft-label targets.

"Zero-Shot Knowledge Distillation in Deep Networks", Nayak, Mopuri, Shaj, Babu, Chakraborty, ICML 2019
(arXiv 1905.08114), Sec. 3.1-3.2; reused as "Data Impressions" in Nayak et al., TPAMI 2022.

* Class similarity (Sec. 3.1): rows of the final weight ``W (K, D)`` are L2-normalised, ``C = W W^T``
  (cosine similarity), min-max normalised to [0, 1] over the whole matrix.
* Image prior (not in the paper): :func:`total_variation`, the squared differences of neighbouring
  pixels, an optional smoothness term of the synthesis objective (``pixel_tv``).
* Targets (Sec. 3.2): for class ``k`` and scale ``beta``, ``alpha = beta * c_k + 1e-4`` where ``c_k`` is
  row ``k`` re-normalised to [0, 1]; ``y ~ Dir(alpha)``. The paper uses beta in {1.0, 0.1}, half each.
  The public TF code min-max re-normalises *after* multiplying by beta, which cancels beta = 0.1
  (both halves get the same concentration): ``renormalize="public_code"`` reproduces that,
  ``"paper"`` (default) keeps the paper's beta.

Everything here is pure and batched; randomness comes from an explicit seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.errors import CvlabError
from lit_modules.nets import classifier_layer

Renormalize = Literal["paper", "public_code"]


class FinalLayerError(CvlabError):
    """The teacher has no final linear layer to read the class similarity from."""


def final_linear(net: nn.Module) -> nn.Module:
    """The teacher's final linear layer (:func:`lit_modules.nets.classifier_layer`: ``get_classifier()``, else
    the last ``nn.Linear`` of the network, TorchScript included)."""
    get = getattr(net, "get_classifier", None)
    fc = get() if callable(get) else classifier_layer(net)
    weight = getattr(fc, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise FinalLayerError(
            f"teacher {type(net).__name__} has no final linear layer (found {type(fc).__name__}); ZSKD reads the "
            "class similarity from its weights: use a network whose last layer is an nn.Linear"
        )
    return fc


def _minmax(x: Tensor, dim: int | None = None) -> Tensor:
    lo = x.amin() if dim is None else x.amin(dim, keepdim=True)
    hi = x.amax() if dim is None else x.amax(dim, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def class_similarity(weight: Tensor) -> Tensor:
    """Final-layer weights ``(K, D)`` -> class similarity ``(K, K)`` in [0, 1] (ZSKD Sec. 3.1)."""
    w = F.normalize(weight.detach().float(), dim=1)  # (K, D), unit rows
    return _minmax(w @ w.T)  # cosine (K, K) -> [0, 1] over the whole matrix


def concentration(
    similarity: Tensor, classes: Tensor, betas: Tensor, renormalize: Renormalize = "paper", eps: float = 1e-4
) -> Tensor:
    """Dirichlet concentrations ``(N, K)`` for targets of class ``classes (N,)`` with scales ``betas (N,)``.

    ``paper``: ``beta * minmax(C[k]) + eps``; ``public_code``: ``minmax(beta * C[k]) + eps`` (beta cancels).
    """
    rows = similarity[classes]  # (N, K)
    b = betas.to(rows.dtype)[:, None]  # (N, 1)
    if renormalize == "paper":
        return b * _minmax(rows, dim=1) + eps
    if renormalize == "public_code":
        return _minmax(b * rows, dim=1) + eps
    raise ValueError(f"renormalize must be 'paper' or 'public_code', got {renormalize!r}")


def impression_plan(
    num_impressions: int,
    num_classes: int,
    betas: Sequence[float] = (1.0, 0.1),
    beta_split: Sequence[float] = (0.5, 0.5),
) -> tuple[Tensor, Tensor]:
    """Class and beta of each impression index: ``(classes (N,), betas (N,))``.

    Index ``i`` is class ``i % K`` (classes balanced); within a class the first ``beta_split[0]`` share
    of its impressions gets ``betas[0]``, the next share ``betas[1]``, ...
    """
    if len(betas) != len(beta_split) or not betas:
        raise CvlabError(f"betas {list(betas)} and beta_split {list(beta_split)} must be non-empty and of equal length")
    split = torch.tensor(beta_split, dtype=torch.float64)
    if (split < 0).any() or abs(float(split.sum()) - 1.0) > 1e-6:
        raise CvlabError(f"beta_split {list(beta_split)} must be non-negative and sum to 1")
    i = torch.arange(num_impressions)
    classes = i % num_classes
    per_class = -(-num_impressions // num_classes)  # ceil
    frac = (i // num_classes).double() / per_class  # position within the class, in [0, 1)
    which = torch.bucketize(frac, split.cumsum(0)[:-1], right=True)  # (N,) index into betas
    return classes, torch.tensor(betas, dtype=torch.float32)[which]


def sample_dirichlet(alpha: Tensor, seed: int) -> Tensor:
    """``y ~ Dir(alpha)`` row-wise for ``alpha (N, K)``, seeded; rows are on the simplex.

    Gamma draws underflow to 0 for tiny concentrations (``1e-4``): they are floored at the smallest
    positive float so that no row is 0 / 0.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch._standard_gamma(alpha.double().cpu())  # (N, K)
    g = g.clamp_min(torch.finfo(torch.float64).tiny)
    return (g / g.sum(1, keepdim=True)).float().to(alpha.device)


def dirichlet_targets(
    similarity: Tensor,
    num_impressions: int,
    betas: Sequence[float] = (1.0, 0.1),
    beta_split: Sequence[float] = (0.5, 0.5),
    renormalize: Renormalize = "paper",
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Soft-label targets of every impression: ``(targets (N, K), classes (N,), betas (N,))``.

    Depends only on ``(similarity, N, seed, ...)``: the same on every rank and after a resume.
    """
    classes, b = impression_plan(num_impressions, similarity.shape[0], betas, beta_split)
    alpha = concentration(similarity.cpu(), classes, b, renormalize)
    return sample_dirichlet(alpha, seed), classes, b


def total_variation(x: Tensor) -> Tensor:
    """Squared total variation of each image in ``x (B, C, H, W)``: ``sum (x[h+1, w] - x[h, w])^2 +
    sum (x[h, w+1] - x[h, w])^2`` over channels and positions, shape ``(B,)``. The smoothness prior of
    DeepInversion's ``l2`` variation term (there a mean, here a sum, so it is per impression like the CE)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).square().flatten(1).sum(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).square().flatten(1).sum(1)
    return dh + dw
