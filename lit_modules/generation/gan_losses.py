"""GAN losses and the two players' gradient steps, as functions on explicit networks.

Losses on discriminator logits ``real (B,)`` and ``fake (B,)`` (``softplus(-x) = -log sigmoid(x)``):

- ``ns`` (non-saturating, Goodfellow et al. 2014): D ``softplus(-r) + softplus(f)``; G ``softplus(-f)``.
- ``hinge`` (Lim & Ye 2017; Miyato et al. 2018): D ``relu(1 - r) + relu(1 + f)``; G ``-f``.
- ``relativistic`` (the *paired* relativistic standard GAN, Jolicoeur-Martineau, ICLR 2019; CBGAN's loss, the
  public code's ``adv_loss: "rel"``): the i-th real image is paired with the i-th generated one,
  D ``mean_i softplus(-(r_i - f_i))``; G ``mean_i softplus(-(f_i - r_i))``. Needs ``B_real == B_fake``.
  Until issue 40 this name meant the average form below: checkpoints and configs written before then that say
  ``relativistic`` were trained with ``relativistic_average`` and now resume / rerun with the paired form.
- ``relativistic_average`` (relativistic average standard GAN, same paper): D ``softplus(-(r - mean f)) +
  softplus(f - mean r)``; G ``softplus(-(f - mean r)) + softplus(r - mean f)``.

Distributed: gradients are taken with :func:`torch.autograd.grad` on the *unwrapped* networks (never
through DDP's wrapper, so neither player's parameters are "unused" in the other's step) and averaged over
devices by ``reduce`` (e.g. :func:`lit_modules.distillation.lra_update.all_reduce_mean`); with per-sample
(or per-pair) losses (``ns``, ``hinge``, ``relativistic``) and no batch statistics in G this is exactly one
process on the global batch (tested). ``relativistic_average``'s batch means, like BatchNorm, are per device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.distributed import Reduce, no_reduce

GanLoss = Literal["ns", "hinge", "relativistic", "relativistic_average"]
GAN_LOSSES: tuple[str, ...] = ("ns", "hinge", "relativistic", "relativistic_average")
RELATIVISTIC: tuple[str, ...] = ("relativistic", "relativistic_average")  # G's loss needs D's logits on real images


def discriminator_loss(kind: GanLoss, real: Tensor, fake: Tensor) -> Tensor:
    """The discriminator's loss (a scalar) from its logits on real ``(B,)`` and generated ``(B,)`` images."""
    if kind == "ns":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "relativistic":
        _check_pairs(real, fake)
        return F.softplus(-(real - fake)).mean()  # pairs: (B,) - (B,)
    if kind == "relativistic_average":
        return F.softplus(-(real - fake.mean())).mean() + F.softplus(fake - real.mean()).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {', '.join(GAN_LOSSES)}")


def generator_loss(kind: GanLoss, fake: Tensor, real: Tensor | None = None) -> Tensor:
    """The generator's adversarial loss; the relativistic losses also need the logits on real images."""
    if kind == "ns":
        return F.softplus(-fake).mean()
    if kind == "hinge":
        return -fake.mean()
    if kind in RELATIVISTIC:
        if real is None:
            raise ValueError(f"the {kind} generator loss needs the discriminator's logits on real images")
        if kind == "relativistic":
            _check_pairs(real, fake)
            return F.softplus(-(fake - real)).mean()
        return F.softplus(-(fake - real.mean())).mean() + F.softplus(real - fake.mean()).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {', '.join(GAN_LOSSES)}")


def _check_pairs(real: Tensor, fake: Tensor) -> None:
    if real.shape != fake.shape:
        raise ValueError(f"the paired relativistic loss needs as many real as generated logits; got "
                         f"{tuple(real.shape)} real and {tuple(fake.shape)} generated (use equal batches, or "
                         "relativistic_average)")


def trainable(net: nn.Module) -> list[Tensor]:
    return [p for p in net.parameters() if p.requires_grad]


def discriminator_gradients(D: nn.Module, x_real: Tensor, x_fake: Tensor, kind: GanLoss,
                            reduce: Reduce = no_reduce) -> tuple[Tensor, list[Tensor]]:
    """(loss, gradients of D's trainable parameters) for one discriminator step. Real and generated images go
    through D in one forward (one spectral-norm power iteration per step, as one batch)."""
    logits = D(torch.cat([x_real, x_fake.detach()]))  # (2B,)
    real, fake = logits.split([x_real.shape[0], x_fake.shape[0]])
    loss = discriminator_loss(kind, real, fake)
    return loss.detach(), reduce(list(torch.autograd.grad(loss, trainable(D))))


def generator_gradients(G: nn.Module, D: nn.Module, z: Tensor, x_real: Tensor | None, kind: GanLoss,
                        regularizer: Callable[[Tensor], Tensor] | None = None,
                        reduce: Reduce = no_reduce) -> tuple[Tensor, Tensor, list[Tensor], Tensor]:
    """One generator step: ``(adversarial loss, regulariser term, gradients of G's parameters, G(z) detached)``.

    ``regularizer(x_fake)`` returns the (already weighted) extra term of the generator loss, e.g. CBGAN's
    ``lambda * sum_k w_k pbar_k log pbar_k``. D's parameters take no gradient here.
    """
    x_fake = G(z)
    if kind in RELATIVISTIC:
        logits = D(torch.cat([x_real, x_fake]))
        real, fake = logits.split([x_real.shape[0], x_fake.shape[0]])
    else:
        real, fake = None, D(x_fake)
    adv = generator_loss(kind, fake, real)
    reg = regularizer(x_fake) if regularizer is not None else adv.new_zeros(())
    grads = torch.autograd.grad(adv + reg, trainable(G))
    return adv.detach(), reg.detach(), reduce(list(grads)), x_fake.detach()


def set_grads(params: list[Tensor], grads: list[Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * net`` on parameters; buffers (BatchNorm statistics) copied.
    ``decay = 0`` copies ``net``."""
    ema_p, net_p = list(ema.parameters()), list(net.parameters())
    torch._foreach_lerp_(ema_p, net_p, 1.0 - decay)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)
