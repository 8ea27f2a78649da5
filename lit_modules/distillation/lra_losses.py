"""Losses of adversarial data-free KD as used by LRA (pure functions).

Patel, Mopuri, Qiu, "Learning to Retain while Acquiring: Combating Distribution-Shift in Adversarial
Data-Free Knowledge Distillation", CVPR 2023 (https://arxiv.org/abs/2302.14290), Sec. 3 and its public
code. The generator terms are DAFL's (Chen et al., ICCV 2019, Eq. 2-5) plus a teacher-student
disagreement term; the student imitates the teacher's logits with an L1 loss (DFAD, Fang et al. 2019).

Generator loss (weights from the paper's config: 1, 5, 0.1, 1)::

    L_G = w_oh * one_hot(T(x)) + w_ie * class_balance(T(x)) + w_a * activation(features_T(x))
          + w_adv * disagreement(S(x), T(x))

All functions reduce to a scalar and are differentiable in their first argument(s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def one_hot_loss(teacher_logits: Tensor) -> Tensor:
    """DAFL's one-hot loss: ``CE(T(x), argmax T(x))``, mean over the batch. ``(B, K) -> ()``.

    Low when the teacher is confident on every generated image.
    """
    return F.cross_entropy(teacher_logits, teacher_logits.detach().argmax(-1))


def class_balance_loss(teacher_logits: Tensor, log_base: float = 10.0) -> Tensor:
    """DAFL's information-entropy loss ``sum_k pbar_k log pbar_k`` with ``pbar = mean_b softmax(T(x_b))``.

    ``(B, K) -> ()``; minimal (``-log K``) when the batch covers the classes evenly. ``log_base`` 10
    is what DAFL's and LRA's code compute (``torch.log10``): the paper's weight 5 is for that base.
    """
    pbar = F.softmax(teacher_logits, dim=-1).mean(0)  # (K,)
    return (pbar * torch.log(pbar)).sum() / math.log(log_base)


def activation_loss(teacher_features: Tensor) -> Tensor:
    """DAFL's activation loss ``-mean |f_T(x)|`` over the teacher's penultimate features ``(B, D) -> ()``."""
    return -teacher_features.abs().mean()


def js_disagreement_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 3.0,
    prob_clamp: tuple[float, float] = (0.01, 0.99),
) -> Tensor:
    """``1 - JS(softmax(S / tau), softmax(T / tau))``: minimising it makes the generator seek images on
    which student and teacher disagree. ``(B, K), (B, K) -> ()``, in [0, 1].

    As in LRA's public code (``JS_divergence``): probabilities and their midpoint ``M`` are clamped to
    ``prob_clamp``, and each KL term ``sum M log(M / P)`` is averaged over batch *and* classes
    (``nn.KLDivLoss``'s default ``mean`` reduction), i.e. ``JS / K`` per sample; the paper's
    weight 1 is for that scale.
    """
    p = F.softmax(teacher_logits / temperature, dim=-1)
    q = F.softmax(student_logits / temperature, dim=-1)
    lo, hi = prob_clamp
    m = (0.5 * (p + q)).clamp(lo, hi)
    p, q = p.clamp(lo, hi), q.clamp(lo, hi)
    js = 0.5 * (m * (m.log() - p.log())).mean() + 0.5 * (m * (m.log() - q.log())).mean()
    return 1.0 - js.clamp(0.0, 1.0)


def l1_kd_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """The student's imitation loss: ``mean |S(x) - T(x)|`` over batch and classes. ``(B, K), (B, K) -> ()``.

    A mean over rows, so the loss of a concatenated batch is the row-weighted mean of its parts (the
    meta update relies on it). Zero when the logits are equal.
    """
    return F.l1_loss(student_logits, teacher_logits.detach())


@dataclass(frozen=True)
class GeneratorLossWeights:
    """Weights of the generator's terms (LRA config: one-hot 1, information entropy 5, activation 0.1,
    disagreement 1)."""

    one_hot: float = 1.0
    balance: float = 5.0
    activation: float = 0.1
    disagreement: float = 1.0


def generator_loss(
    teacher_logits: Tensor,
    teacher_features: Tensor,
    student_logits: Tensor,
    weights: GeneratorLossWeights = GeneratorLossWeights(),
    temperature: float = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of the four terms on one generated batch; returns ``(total, {term: value})``.

    The disagreement term compares the student with the *detached* teacher logits (as the public code).
    """
    terms = {
        "one_hot": one_hot_loss(teacher_logits),
        "balance": class_balance_loss(teacher_logits),
        "activation": activation_loss(teacher_features),
        "disagreement": js_disagreement_loss(student_logits, teacher_logits.detach(), temperature),
    }
    total = (
        weights.one_hot * terms["one_hot"]
        + weights.balance * terms["balance"]
        + weights.activation * terms["activation"]
        + weights.disagreement * terms["disagreement"]
    )
    return total, terms


# --- generative replay (the paper's second memory variant) ---------------------------------------------
def latent_prior_loss(z: Tensor) -> Tensor:
    """Keep a batch of latents ``(B, D)`` near N(0, I): ``mse(var_b z, 1) + mse(mean_b z, 0)`` over the D
    dimensions (unbiased variance over the batch; a batch of one has variance 0, a constant term).
    ``(B, D) -> ()``; 0 when every dimension has mean 0 and variance 1 over the batch."""
    var = z.var(0, correction=min(1, z.shape[0] - 1))
    return F.mse_loss(var, torch.ones_like(var)) + F.mse_loss(z.mean(0), torch.zeros_like(var))


def gaussian_kl(mu: Tensor, log_var: Tensor) -> Tensor:
    """``KL(N(mu, exp(log_var)) || N(0, I))`` summed over dimensions, mean over the batch. ``(B, D), (B, D) -> ()``."""
    return (-0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(-1)).mean()


def reconstruction_loss(
    x_rec: Tensor, x: Tensor, t_rec: Tensor, t: Tensor, mu: Tensor, log_var: Tensor, kl_weight: float = 1e-5
) -> Tensor:
    """The memory generator's objective (an encoder -> memory generator auto-encoder on generated images):
    ``mean|x_rec - x| + mean|T(x_rec) - T(x)| + kl_weight * KL(q(z|x) || N(0, I))``; the images and teacher
    logits of the target ``x`` are constants. Weights as LRA's public code (1, 1, 1e-5)."""
    return F.l1_loss(x_rec, x.detach()) + F.l1_loss(t_rec, t.detach()) + kl_weight * gaussian_kl(mu, log_var)


def adam_first_step(x: Tensor, grad: Tensor, lr: float, eps: float = 1e-8) -> Tensor:
    """One step of a freshly created Adam (any betas, no weight decay): its bias-corrected moments are
    ``g`` and ``g^2``, so the step is ``x - lr * g / (|g| + eps)``. How the memory latents are refined
    (LRA's public code builds a new Adam for them and steps it once)."""
    return x - lr * grad / (grad.abs() + eps)
