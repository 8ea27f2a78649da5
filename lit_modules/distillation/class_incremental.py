"""The math of class-incremental learning without old data (Data Impressions, Nayak et al., TPAMI 2022).

At step ``t`` a network over all ``K`` classes learns the new classes ``N_t`` from their data while the classes seen
before, ``O_t = N_0 + ... + N_{t-1}``, are kept by distilling the previous step's network on inputs that stand in
for the old data: its Data Impressions (ours), the new data itself (LwF, Li & Hoiem, ECCV 2016), or nothing
(fine-tuning, the lower bound). Replaying real old images (the upper bound) adds them to the cross-entropy instead.

- :func:`check_splits`: the steps' classes partition ``0 .. K-1`` (no class repeated, none dropped), and
  :func:`even_splits`: ``K`` classes in ``steps`` equal groups (split MNIST: 2 x 5 or 5 x 2), from
  :mod:`datamodules.class_incremental`, which makes the steps' data.
- :func:`class_incremental_loss`:
  ``CE_seen(new) + mu * CE_seen(x_kd, prev's old class) + lambda * tau^2 KL(p_prev^old(x_kd) || p^old(x_kd))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.class_incremental import check_splits, even_splits
from lit_modules.distillation.kd_loss import kd_kl_loss

__all__ = ["check_splits", "class_incremental_loss", "even_splits", "seen_logits"]


def seen_logits(logits: Tensor, seen: Tensor) -> Tensor:
    """Logits ``(B, K)`` with the classes not seen yet (``seen (K,)`` False) set to -inf: softmax over the seen ones."""
    return logits.masked_fill(~seen, float("-inf"))


def class_incremental_loss(
    logits: Tensor,
    labels: Tensor,
    seen: Tensor,
    kd_logits: Tensor | None = None,
    prev_logits: Tensor | None = None,
    old: Tensor | None = None,
    temperature: float = 2.0,
    kd_weight: float = 1.0,
    kd_labels: Tensor | None = None,
    kd_ce_weight: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(total, ce, kd)``.

    ``ce``: cross-entropy of ``logits (B, K)`` against ``labels (B,)`` over the classes seen so far (``seen (K,)``
    bool; the classes of later steps take no part). ``kd``: on the distillation inputs, the current network's
    logits ``kd_logits (R, K)`` against the previous network's ``prev_logits (R, K)``, both restricted to the old
    classes ``old`` (a long tensor of class ids: an index, no host sync), as ``tau^2 KL``
    (:func:`lit_modules.distillation.kd_loss.kd_kl_loss`; zero when they agree).
    ``total = ce + kd_weight * kd``; without distillation inputs ``kd`` is 0. With ``kd_labels (R,)`` (the previous
    network's old class for each distillation input) the distillation inputs also enter the cross-entropy over the
    seen classes with weight ``kd_ce_weight``, and ``ce`` is the sum of both cross-entropies: replaying impressions
    as labelled old-class data is what makes the old classes compete with the new ones (the KL over the old classes
    alone keeps their relative outputs but lets every new class outscore them).
    """
    ce = F.cross_entropy(seen_logits(logits, seen), labels)
    if kd_logits is None or kd_logits.shape[0] == 0 or old is None:
        kd = torch.zeros_like(ce)
    else:
        kd = kd_kl_loss(kd_logits.index_select(1, old), prev_logits.index_select(1, old), temperature)
        if kd_labels is not None and kd_ce_weight:
            ce = ce + kd_ce_weight * F.cross_entropy(seen_logits(kd_logits, seen), kd_labels)
    return ce + kd_weight * kd, ce, kd
