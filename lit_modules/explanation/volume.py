"""Context vs object attribution volumes ("Lost in Context", Adhikari, Kumar, Mopuri, Pachamuthu, ICVGIP 2024,
arXiv 2411.02833; completed from the public code nineRishav/Lost-In-Context).

Pure functions first, then the torchmetrics ``Metric`` s the study stage syncs across devices (every state a
sum or a count, ``dist_reduce_fx="sum"``).

Notation, per image: an attribution map ``a`` ``(H, W)``, the object mask ``M`` ``(H, W)`` (1 on the object).

* ``A = minmax(ReLU(a))`` in [0, 1] (a map with no positive spread is all zero);
* object volume ``O = sum A * M``, context volume ``C = sum A - O``;
* ``O / (O + C)`` (object share of the volume), ``O / sum M`` and ``C / sum (1 - M)`` (volume per object /
  context pixel), ``O`` and ``C`` per *non-zero* pixel inside / outside the object, and the share of the non-zero
  pixels that lie inside the object;
* the uniform baseline: a flat map of the same total puts ``sum M / (H W)`` of its volume on the object (the
  object's area share), and the same volume on every pixel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

from cvlab.errors import CvlabError

#: the paper's "correct": correct in all of these variants (those present in a study)
CORRECT_VARIANTS: tuple[str, ...] = ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next")


def normalize_attribution(maps: Tensor) -> Tensor:
    """``A = minmax(ReLU(maps))`` per image: ``(B, H, W)`` -> ``(B, H, W)`` in [0, 1].

    A map whose positive part is constant (all zero, or flat) has no spread and becomes all zero."""
    a = maps.relu().flatten(1)  # (B, HW)
    lo, hi = a.amin(1, keepdim=True), a.amax(1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (a - lo) / span.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))
    return out.view_as(maps)


class Volumes(NamedTuple):
    """Per-image ``(B,)`` quantities of :func:`attribution_volumes`."""

    object_volume: Tensor  # O
    context_volume: Tensor  # C
    object_share: Tensor  # O / (O + C); 0 where the map is all zero
    object_density: Tensor  # O / sum M
    context_density: Tensor  # C / sum (1 - M)
    object_per_nonzero: Tensor  # O / #(A > 0 inside M)
    context_per_nonzero: Tensor  # C / #(A > 0 outside M)
    nonzero_inside: Tensor  # #(A > 0 inside M) / #(A > 0)
    uniform_object_share: Tensor  # sum M / (H W): a flat map's O / (O + C)
    uniform_density: Tensor  # (O + C) / (H W): a flat map's volume per pixel


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def attribution_volumes(attribution: Tensor, mask: Tensor) -> Volumes:
    """Object / context volumes of normalised maps ``attribution`` ``(B, H, W)`` (``A``, already in [0, 1])
    under object masks ``mask`` ``(B, H, W)`` (bool or {0, 1}). Ratios with an empty denominator are 0."""
    if attribution.shape != mask.shape:
        raise CvlabError(f"attribution maps {tuple(attribution.shape)} and masks {tuple(mask.shape)} differ in shape")
    a = attribution.flatten(1).double()  # (B, HW)
    m = mask.flatten(1).to(a.dtype)
    total = a.sum(1)
    o = (a * m).sum(1)
    c = total - o
    area = m.sum(1)
    hw = float(a.shape[1])
    nz = (a > 0).to(a.dtype)
    nz_in = (nz * m).sum(1)
    nz_out = nz.sum(1) - nz_in
    return Volumes(
        object_volume=o,
        context_volume=c,
        object_share=_ratio(o, total),
        object_density=_ratio(o, area),
        context_density=_ratio(c, hw - area),
        object_per_nonzero=_ratio(o, nz_in),
        context_per_nonzero=_ratio(c, nz_out),
        nonzero_inside=_ratio(nz_in, nz_in + nz_out),
        uniform_object_share=area / hw,
        uniform_density=total / hw,
    )


def background_share(mask: Tensor) -> Tensor:
    """Share of context pixels, ``1 - mean M``: ``(B, ..., H, W)`` -> ``(B,)``."""
    return 1.0 - mask.flatten(1).double().mean(1)


def background_filter(mask: Tensor, min_share: float = 0.3) -> Tensor:
    """The paper's filter: keep images whose context covers *more than* ``min_share`` of the image. ``(B,)`` bool."""
    if not 0.0 <= min_share < 1.0:
        raise CvlabError(f"the background share threshold must be in [0, 1), got {min_share}")
    m = mask.flatten(1)
    n = m.shape[1]
    context = n - m.sum(1).double()  # pixel counts: an exact 30% is not "more than 30%" despite rounding
    return context - min_share * n > 1e-9 * n


def correct_in_every_variant(predictions: Tensor, labels: Tensor) -> Tensor:
    """``predictions`` ``(B, V)`` class indices (the variants that define "correct"), ``labels`` ``(B,)`` ->
    ``(B,)`` bool: right in every one."""
    return (predictions == labels[:, None]).all(1)


def prediction_shift(p1: Tensor, p2: Tensor) -> Tensor:
    """``sum_k |CDF1_k - CDF2_k|`` between class-probability vectors ``(B, K)`` (the earth mover's distance on the
    class index line): 0 for equal vectors, at most ``K - 1``. -> ``(B,)``."""
    if p1.shape != p2.shape:
        raise CvlabError(f"probability vectors {tuple(p1.shape)} and {tuple(p2.shape)} differ in shape")
    return (p1.double().cumsum(-1) - p2.double().cumsum(-1)).abs().sum(-1)


# --- torchmetrics ---------------------------------------------------------------------------------------------
VOLUME_FIELDS: tuple[str, ...] = Volumes._fields
GROUPS: tuple[str, ...] = ("all", "correct", "incorrect")


class ContextVolume(Metric):
    """Mean :class:`Volumes` per variant and group (``all`` / ``correct`` / ``incorrect``), over kept images.

    ``update(attribution (B, V, H, W) normalised maps, mask (B, 1 or V, H, W), correct (B,) bool, keep (B,) bool)``;
    ``compute()`` -> ``{"count": (V, 3), "mean": (V, 3, F)}`` with ``F = len(VOLUME_FIELDS)`` (NaN where empty).
    States: ``sums`` ``(V, 3, F)`` and ``count`` ``(V, 3)``, float64, summed across processes."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, num_variants: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_variants = int(num_variants)
        f = len(VOLUME_FIELDS)
        self.add_state("sums", default=torch.zeros(self.num_variants, 3, f, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(self.num_variants, 3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, attribution: Tensor, mask: Tensor, correct: Tensor, keep: Tensor | None = None) -> None:
        b, v, h, w = attribution.shape
        if v != self.num_variants:
            raise CvlabError(f"ContextVolume holds {self.num_variants} variants, got maps for {v}")
        mask = mask.expand(b, v, h, w)
        vol = attribution_volumes(attribution.reshape(b * v, h, w), mask.reshape(b * v, h, w))
        vals = torch.stack(list(vol), -1).view(b, v, -1)  # (B, V, F)
        keep = torch.ones(b, dtype=torch.bool, device=attribution.device) if keep is None else keep.bool()
        groups = torch.stack([keep, keep & correct.bool(), keep & ~correct.bool()], 1).double()  # (B, 3)
        self.sums += torch.einsum("bg,bvf->vgf", groups, vals)
        self.count += groups.sum(0)[None, :].expand(v, 3)

    def compute(self) -> dict[str, Tensor]:
        n = self.count[..., None]
        mean = torch.where(n > 0, self.sums / n.clamp_min(1), torch.full_like(self.sums, float("nan")))
        return {"count": self.count, "mean": mean}


class VariantAccuracy(Metric):
    """Accuracy per variant over kept images, and the mean prediction shift from variant 0 (the original).

    ``update(predictions (B, V), labels (B,), probs (B, V, K), keep (B,) bool)``; ``compute()`` ->
    ``{"count": (), "accuracy": (V,), "shift": (V,)}``."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, num_variants: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_variants = int(num_variants)
        self.add_state("correct", default=torch.zeros(self.num_variants, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("shift", default=torch.zeros(self.num_variants, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Tensor, labels: Tensor, probs: Tensor, keep: Tensor | None = None) -> None:
        b, v = predictions.shape
        if v != self.num_variants:
            raise CvlabError(f"VariantAccuracy holds {self.num_variants} variants, got predictions for {v}")
        k = torch.ones(b, dtype=torch.float64, device=predictions.device) if keep is None else keep.double()
        self.correct += ((predictions == labels[:, None]).double() * k[:, None]).sum(0)
        ref = probs[:, :1].expand_as(probs)
        shift = prediction_shift(ref.reshape(b * v, -1), probs.reshape(b * v, -1)).view(b, v)
        self.shift += (shift * k[:, None]).sum(0)
        self.count += k.sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1)
        return {"count": self.count, "accuracy": self.correct / n, "shift": self.shift / n}
