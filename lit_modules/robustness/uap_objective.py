"""The math of universal adversarial perturbations (UAPs): the projection, the fooling objective, the fooling rate.

A UAP is one perturbation ``v (C, H, W)`` added to every image (Moosavi-Dezfooli et al., CVPR 2017,
arXiv 1610.08401). Data-free UAPs from Data Impressions: Nayak, Mopuri, Jain, Chakraborty, TPAMI 2022
(the impressions stand in for the training images the UAP is usually learned on).

- :func:`project_linf_box`: the Euclidean projection of ``v`` onto ``{d : ||d||_inf <= eps, 0 <= x + d <= 1}``.
  Both sets are boxes, so their intersection is the box ``[max(-eps, -x), min(eps, 1 - x)]`` and the projection is
  a clamp to it; ``x + project_linf_box(v, x, eps) == clamp(x + clamp(v, -eps, eps), 0, 1)``.
- :func:`fooling_loss`: ``-log(1 - p_c(x + v))`` with ``c`` the model's own prediction on the clean image, the
  fooling loss of Mopuri et al.'s NAG (CVPR 2018) and AAA (ECCV 2018), which craft UAPs from class impressions.
- :func:`fooling_rate`: the share of images whose predicted label changes, the UAP literature's measure.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_modules.robustness.attacks import AttackError, check_eps


def check_budgets(budgets: list[float]) -> None:
    """Every Linf budget must be in [0, 1] (a fraction of the pixel range); one-line error otherwise."""
    if not budgets:
        raise AttackError("budgets is empty; give at least one Linf budget in [0, 1], e.g. [0.1, 0.2, 0.3]")
    for b in budgets:
        check_eps(b, "UAP budget")


def project_linf_box(v: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
    """Project a perturbation ``v`` onto the Linf ball of radius ``eps`` intersected with ``x + v in [0, 1]``.

    ``v`` broadcasts against ``x`` (a universal ``(C, H, W)`` or per-budget ``(E, 1, C, H, W)`` against a batch
    ``(B, C, H, W)``); ``eps`` is a float or a tensor broadcasting like ``v``. Returns the per-image perturbation
    actually applied, of the broadcast shape: inside ``[-eps, eps]`` and with ``x + d`` inside [0, 1].
    """
    lo = torch.maximum(torch.as_tensor(-eps, dtype=x.dtype, device=x.device), -x)
    hi = torch.minimum(torch.as_tensor(eps, dtype=x.dtype, device=x.device), 1 - x)
    return torch.maximum(torch.minimum(v, hi), lo)


def fooling_loss(logits: Tensor, clean_pred: Tensor) -> Tensor:
    """``-log(1 - softmax(logits)_c)`` per image, ``c = clean_pred``: ``logits (..., K)``, ``clean_pred (...)``
    -> ``(...)``.

    Why this objective: it needs no labels (impressions have none in hard form; the model's own clean prediction is
    what a fooling rate measures against), and unlike maximising the cross-entropy of ``c`` it is bounded on the
    images already fooled (at most ``log 2`` once ``c`` is no longer the top class, falling to 0 as ``p_c -> 0``), so
    the one shared perturbation keeps working on the images not yet fooled instead of pushing the fooled ones
    further. Computed stably as ``logsumexp(z) - logsumexp(z_{j != c})``.
    """
    logits = logits.float()
    others = logits.scatter(-1, clean_pred.unsqueeze(-1), float("-inf"))  # (..., K) with z_c removed
    return logits.logsumexp(-1) - others.logsumexp(-1)


def fooling_rate(clean_pred: Tensor, adv_pred: Tensor) -> Tensor:
    """Share of images whose prediction changed: ``clean_pred (B,)``, ``adv_pred (..., B)`` -> ``(...)``."""
    return (adv_pred != clean_pred).float().mean(-1)


def random_sign_noise(shape: tuple[int, ...], eps: Tensor, generator: torch.Generator) -> Tensor:
    """The same-norm control: ``eps_e * sign(N(0, 1))`` of ``shape (E, C, H, W)``, Linf norm exactly ``eps_e``."""
    signs = torch.randn(shape, generator=generator).sign()  # (E, C, H, W), zero with probability 0
    return eps.view(-1, *([1] * (len(shape) - 1))).cpu() * signs
