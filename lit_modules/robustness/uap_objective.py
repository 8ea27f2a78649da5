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
- :func:`feature_activation_loss` and :func:`rescale_saturated`: the data-free objective of GD-UAP (Mopuri, Ganeshan,
  Babu, "Generalizable Data-free Objective for Crafting Universal Adversarial Perturbations", TPAMI 2018, arXiv
  1801.08092; the successor of their "Fast Feature Fool", BMVC 2017): no images and no impressions, only the
  perturbation fed through the network, whose activations it inflates at every convolutional layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_modules.robustness.attacks import AttackError, check_eps

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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


# --- the data-free objective of GD-UAP ------------------------------------------------------------------------------
def conv_layers(model: nn.Module) -> list[nn.Module]:
    """Every ``nn.Conv1d/2d/3d`` of ``model`` in module order; one-line error when there is none."""
    layers = [m for m in model.modules() if isinstance(m, CONV_TYPES)]
    if not layers:
        raise AttackError(f"{type(model).__name__} has no nn.Conv1d/2d/3d layer, which the feature-activation "
                          "objective needs (a TorchScript network hides its layers: give its class and a state_dict)")
    return layers


def feature_activation_loss(model: nn.Module, x: Tensor, rectify: bool = True) -> Tensor:
    """GD-UAP's data-free loss ``-sum_i log ||f_i(x)||_2`` per input: ``x (B, ...)`` -> ``(B,)``.

    ``f_i(x)`` is the output of the ``i``-th convolutional layer of ``model`` (forward hooks on every
    :func:`conv_layers` entry, one forward pass), rectified (``relu``) when ``rectify``, and ``||.||_2`` its L2 norm
    over all its units of one input. Minimising it inflates the activations of every layer at once (a product of
    norms, so no layer can be given up for another).

    Facts from the authors' public code (val-iisc/GD-UAP, ``classification/``) this follows:

    - the loss is ``-sum_i log(l2_loss(f_i))`` with TensorFlow's ``l2_loss(t) = sum(t^2) / 2``, i.e.
      ``-sum_i (2 log ||f_i||_2 - log 2)``: the paper's ``-log prod_i ||f_i||_2`` up to a factor 2 and a constant,
      the same minimiser and the same Adam steps (Adam is invariant to scaling the loss); this is the paper's form;
    - the layers are the convolutional layers' outputs *after their ReLU* (its ``conv_layer`` applies ``relu``; the
      pooling, normalisation and fully connected layers are left out), hence ``rectify``; the rectification is
      applied here, in the hook, so a following ``nn.ReLU(inplace=True)`` changes nothing;
    - its data-free variant feeds the perturbation alone (zeros + ``delta`` in the mean-subtracted input space; the
      caller chooses ``x``, see :class:`lit_modules.robustness.UniversalPerturbation`).

    A layer whose rectified output is all zero would give ``log 0``; its norm is floored at ``1e-12`` (finite loss;
    such a layer has a zero gradient either way).
    """
    norms: list[Tensor] = []

    def record(_module: nn.Module, _inputs: tuple[Tensor, ...], out: Tensor) -> None:
        a = out.relu() if rectify else out
        norms.append(a.flatten(1).float().norm(dim=1))  # (B,)

    handles = [m.register_forward_hook(record) for m in conv_layers(model)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return -torch.stack(norms).clamp_min(1e-12).log().sum(0)  # (layers, B) -> (B,)


def rescale_saturated(w: Tensor, prev_saturation: Tensor, threshold: float = 0.5, tol: float = 1e-5
                      ) -> tuple[Tensor, Tensor]:
    """GD-UAP's saturation rescaling: ``w (E, ...)`` in ``[-1, 1]`` (``v_e = eps_e w_e``), ``prev_saturation (E,)``
    -> ``(w', saturation (E,))``.

    The saturation ``s_e`` is the share of ``w_e``'s entries on the ball's edge (``|w| >= 1``, i.e. ``|v| = eps``);
    where ``s_e > threshold`` and ``|s_e - prev_e| < tol`` (the perturbation has stopped moving off the edge),
    ``w_e`` is halved, so the optimisation can go on inside the ball. The public code's values: threshold 0.5
    (``sat_min``), tol 1e-5 (``check``), checked after every step, the halving applied to the variable (the Adam
    state is kept). Tensor ops only: no host sync.
    """
    sat = (w.detach().abs() >= 1).flatten(1).float().mean(1)  # (E,)
    halve = (sat > threshold) & ((sat - prev_saturation).abs() < tol)
    scale = torch.where(halve, 0.5, 1.0).to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
    return w * scale, sat
