"""Knowledge-distillation losses (pure functions).

* Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015: temperature-scaled
  soft targets, weighted by ``tau^2`` so that gradients keep their size as ``tau`` changes.
* ZSKD (Nayak et al., ICML 2019, Eq. 3-4): the same loss on Data Impressions, ``tau = 20``; and the
  impression objective ``CE(y, softmax(T(x) / tau))`` for a sampled soft label ``y``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(logits: Tensor, target_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample ``-sum_k y_k log softmax(logits / tau)_k``: ``(B, K), (B, K) -> (B,)``."""
    return -(target_probs * F.log_softmax(logits / temperature, dim=-1)).sum(-1)


def kd_kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 20.0) -> Tensor:
    """``tau^2 * KL(softmax(T / tau) || softmax(S / tau))``, mean over the batch (a scalar).

    Equals ``tau^2 * CE(teacher, student)`` minus the teacher's entropy (no gradient), so it has the
    papers' gradient and is exactly zero when the student's logits equal the teacher's.
    """
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)  # (B, K)
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)  # (B, K)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B,)
    return temperature**2 * kl.mean()


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    temperature: float = 20.0,
    hard_label_weight: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(1 - w) * KD + w * CE(labels)``; returns ``(total, kd, ce)``.

    ``labels`` ``(B,)`` may hold ``-1`` where a transfer example has no label (noise, impressions,
    unrelated pools): those rows are left out of the CE term; with no labelled row CE is 0.
    """
    kd = kd_kl_loss(student_logits, teacher_logits, temperature)
    if labels is None or hard_label_weight == 0.0:
        return kd, kd, torch.zeros_like(kd)
    ce = F.cross_entropy(student_logits, labels, ignore_index=-1, reduction="sum")
    ce = ce / (labels >= 0).sum().clamp_min(1)  # mean over labelled rows, no host sync
    return (1 - hard_label_weight) * kd + hard_label_weight * ce, kd, ce
