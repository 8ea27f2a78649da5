"""Adversarial attacks in pixel space: small typed functions on ``(model, x, y)``.

``model`` is any ``Callable[[Tensor], Tensor]`` mapping [0, 1] pixels ``(B, C, H, W)`` to logits ``(B, K)``
with its input normalisation inside (a :class:`lit_modules.ClassifierModule`, a
:class:`lit_modules.FrozenTeacher`); every attack returns adversarial pixels of ``x``'s shape, inside the
attack's eps ball around ``x`` and inside [0, 1].

- :func:`fgsm`: Goodfellow et al., ICLR 2015 (arXiv 1412.6572), x + eps * sign(grad); true or predicted
  labels (Kurakin et al. 2017's "label leaking" fix), fixed or per-sample random eps in (0, eps_max].
- :func:`rfgsm`: Tramer et al., ICLR 2018 (arXiv 1705.07204): a random sign step of alpha, then FGSM of eps - alpha.
- :func:`ifgsm` (alias :func:`bim`): Kurakin et al. 2017 (arXiv 1607.02533): PGD-Linf from x, no random start.
- :func:`pgd`: Madry et al., ICLR 2018 (arXiv 1706.06083): random start, projected steps, Linf or L2,
  restarts (per sample, the restart that fools the model, else the one of highest loss).
- :func:`mifgsm`: Dong et al., CVPR 2018 (arXiv 1710.06081): momentum over L1-normalised gradients.
- :func:`sign_noise`: the control, a random sign pattern of FGSM's norm (no gradient).
- :func:`transfer`: craft on one model, evaluate on another (gray-box and black-box attacks).

The registry: every attack by name, built from one :class:`Budget` (``make_attack("pgd", eps=0.3, steps=40,
alpha=0.01)`` is ``functools.partial(pgd, eps=0.3, steps=40, alpha=0.01, ...)``, a batched ``(model, x, y) ->
x_adv``); the gray-box report, the severity report and adversarial training all build their attacks here, and an
unknown name fails with one line listing the known ones.

Every attack crafts with the model in eval mode and restores every submodule's mode after
(:func:`crafting`), so BatchNorm statistics and dropout never change; it computes gradients with respect
to the input only (``torch.autograd.grad``), so the parameters' ``.grad`` is left alone; it turns gradients
on (``torch.enable_grad``), so it works inside ``validation_step``/``test_step`` under
``Trainer(inference_mode=False)``; under bf16 autocast the loss is taken in fp32. Batched: no per-sample loops.
The step loops make no host synchronisation; the input checks (eps, pixel range, logits shape) make one per call
(``check=False`` skips the pixel-range one, for callers whose data is [0, 1] by contract).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvlab.errors import CvlabError
from lit_modules.nets.registry import Registry

Model = Callable[[Tensor], Tensor]
Norm = Literal["linf", "l2"]
Attack = Callable[[Model, Tensor, Tensor], Tensor]


class AttackError(CvlabError):
    """An attack was given something it cannot work with."""


@contextmanager
def crafting(model: Model) -> Iterator[None]:
    """Eval mode and gradients on while crafting; every submodule's train/eval flag restored after."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if torch.is_inference_mode_enabled():
        raise AttackError("attacks need gradients, but inference mode is on; run the Trainer with inference_mode=False")
    try:
        for m, _ in modes:
            m.training = False
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def check_eps(eps: float, name: str = "eps") -> None:
    if not 0.0 <= float(eps) <= 1.0:
        raise AttackError(f"{name} must be in [0, 1] (a fraction of the pixel range; 8/255 = {8 / 255:.4f}), got {eps}")


def check_pixels(x: Tensor) -> None:
    """One host sync: ``x`` must be [0, 1] pixels (normalisation belongs inside the model)."""
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)
    if lo < 0.0 or hi > 1.0:
        raise AttackError(
            f"attacks take [0, 1] pixels, got values in [{lo:.3g}, {hi:.3g}]; pass un-normalised images "
            "(the model normalises inside)"
        )


def _logits(model: Model, x: Tensor) -> Tensor:
    out = model(x)
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        found = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise AttackError(
            f"the model must return logits (B, K) = ({x.shape[0]}, K) for a batch of {x.shape[0]} images, got {found}"
        )
    return out


def _loss_grad(model: Model, x_adv: Tensor, y: Tensor) -> Tensor:
    """d sum-CE / d x_adv (per image, the gradient of its own loss); the parameters' ``.grad`` is untouched."""
    x_adv = x_adv.detach().requires_grad_(True)
    loss = F.cross_entropy(_logits(model, x_adv).float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_adv)
    return grad


def _prepare(model: Model, x: Tensor, y: Tensor | None, eps: float, check: bool) -> tuple[Tensor, Tensor]:
    check_eps(eps)
    if check:
        check_pixels(x)
    x = x.detach()
    if y is None:  # predicted labels: no label leaking (Kurakin et al. 2017)
        y = _logits(model, x).argmax(-1)
    return x, y.detach()


def _per_sample(v: Tensor) -> Tensor:
    return v.flatten(1)


def _l2_norm(v: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped to broadcast over ``v``: ``(B, 1, 1, 1)``."""
    return _per_sample(v).norm(p=2, dim=1).view(-1, *([1] * (v.ndim - 1)))


def project(x: Tensor, x_adv: Tensor, eps: float | Tensor, norm: Norm = "linf") -> Tensor:
    """Project ``x_adv`` onto the ``norm`` ball of radius ``eps`` around ``x``, then onto [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = (delta.clamp(-eps, eps) if not isinstance(eps, Tensor)
                 else torch.maximum(torch.minimum(delta, eps), -eps))
    else:
        n = _l2_norm(delta)
        delta = delta * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def fgsm(
    model: Model,
    x: Tensor,
    y: Tensor | None,
    eps: float,
    random_eps: bool = False,
    generator: torch.Generator | None = None,
    check: bool = True,
) -> Tensor:
    """Fast Gradient Sign Method: ``clip(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``.

    Args:
        y: true labels ``(B,)``, or ``None`` for the model's predicted labels.
        eps: the Linf budget in pixel units, in [0, 1] (``eps_max`` when ``random_eps``).
        random_eps: per-sample eps drawn uniformly from (0, eps] (the random-eps FGSM of adversarial training).
    """
    with crafting(model):
        x, y = _prepare(model, x, y, eps, check)
        grad = _loss_grad(model, x, y)
        step: float | Tensor = eps
        if random_eps:
            u = torch.rand(x.shape[0], device=x.device, generator=generator)
            step = (eps * (1.0 - u)).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1) in (0, eps]
        return (x + step * grad.sign()).clamp(0.0, 1.0)


def rfgsm(
    model: Model, x: Tensor, y: Tensor | None, eps: float, alpha: float | None = None,
    generator: torch.Generator | None = None, check: bool = True,
) -> Tensor:
    """R+FGSM: ``x' = x + alpha * sign(N(0, I))``, then FGSM of ``eps - alpha`` from ``x'`` (alpha default eps/2)."""
    alpha = eps / 2 if alpha is None else alpha
    check_eps(alpha, "alpha")
    if alpha > eps:
        raise AttackError(f"R+FGSM needs alpha <= eps, got alpha {alpha} > eps {eps}")
    with crafting(model):
        x, y = _prepare(model, x, y, eps, check)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x1 = (x + alpha * noise.sign()).clamp(0.0, 1.0)
        grad = _loss_grad(model, x1, y)
        return project(x, x1 + (eps - alpha) * grad.sign(), eps)


def _random_start(x: Tensor, eps: float, norm: Norm, generator: torch.Generator | None) -> Tensor:
    if norm == "linf":
        # the same draw as torchattacks.PGD: one uniform_ over x's shape
        noise = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
        return (x + noise).clamp(0.0, 1.0)
    # a uniform radius along a Gaussian direction (torchattacks.PGDL2's start)
    d = torch.empty_like(x).normal_(generator=generator)
    r = torch.empty(x.shape[0], *([1] * (x.ndim - 1)), device=x.device,
                    dtype=x.dtype).uniform_(0, 1, generator=generator)
    return (x + d * r / _l2_norm(d) * eps).clamp(0.0, 1.0)


def _steps(
    model: Model, x: Tensor, y: Tensor, x_adv: Tensor, eps: float, alpha: float, steps: int, norm: Norm,
    score: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``steps`` projected gradient steps from ``x_adv``; returns (adversarial, its score for picking among
    restarts: CE + 1e6 if misclassified, or ``None`` without ``score``: one forward pass saved)."""
    for _ in range(steps):
        grad = _loss_grad(model, x_adv, y)
        if norm == "linf":
            direction = grad.sign()
        else:
            direction = grad / (_l2_norm(grad) + 1e-10)
        x_adv = project(x, x_adv + alpha * direction, eps, norm)
    if not score:
        return x_adv, None
    with torch.no_grad():
        logits = _logits(model, x_adv).float()
        return x_adv, F.cross_entropy(logits, y, reduction="none") + 1e6 * (logits.argmax(-1) != y)


def pgd(
    model: Model,
    x: Tensor,
    y: Tensor | None,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    norm: Norm = "linf",
    random_start: bool = True,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    check: bool = True,
) -> Tensor:
    """Projected gradient descent on the CE loss (Madry et al. 2018).

    Args:
        eps: radius of the ball (Linf: pixel units in [0, 1]; L2: Euclidean norm of the perturbation).
        alpha: step size (Linf: times sign(grad); L2: times grad / ||grad||); default ``2.5 * eps / steps``.
        steps: gradient steps per restart.
        random_start: start from a uniform point in the ball (Linf) or a random point in it (L2).
        restarts: independent random starts, run together as one batch of ``restarts * B`` images; per sample
            the result is the restart's adversarial that is misclassified with the highest loss, else the one of
            highest loss (the first on ties; only with ``random_start``).
    """
    if norm not in ("linf", "l2"):
        raise AttackError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if norm == "linf":
        check_eps(eps)
    elif eps < 0:
        raise AttackError(f"the L2 radius eps must be >= 0, got {eps}")
    if steps < 1 or restarts < 1:
        raise AttackError(f"PGD needs steps >= 1 and restarts >= 1, got steps {steps}, restarts {restarts}")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    with crafting(model):
        x, y = _prepare(model, x, y, min(eps, 1.0) if norm == "l2" else eps, check)
        runs = restarts if random_start else 1
        if runs == 1:
            start = _random_start(x, eps, norm, generator) if random_start else x.clone()
            return _steps(model, x, y, start, eps, alpha, steps, norm, score=False)[0]
        # all restarts as one batch of R * B images (the starts drawn restart by restart, as R sequential runs)
        starts = torch.cat([_random_start(x, eps, norm, generator) for _ in range(runs)])  # (R * B, C, H, W)
        x_adv, score = _steps(model, x.repeat(runs, *([1] * (x.ndim - 1))), y.repeat(runs), starts, eps, alpha,
                              steps, norm)
        pick = score.view(runs, -1).argmax(0)  # (B,): per image the first restart of the highest score
        return x_adv.view(runs, *x.shape)[pick, torch.arange(x.shape[0], device=x.device)]


def ifgsm(
    model: Model, x: Tensor, y: Tensor | None, eps: float, steps: int = 10, alpha: float | None = None,
    check: bool = True,
) -> Tensor:
    """Iterative FGSM / BIM: PGD-Linf from ``x`` (no random start), step ``alpha`` (default ``eps / steps``)."""
    return pgd(model, x, y, eps, alpha=eps / steps if alpha is None else alpha, steps=steps,
               random_start=False, check=check)


bim = ifgsm


def mifgsm(
    model: Model, x: Tensor, y: Tensor | None, eps: float, steps: int = 10, decay: float = 1.0,
    alpha: float | None = None, check: bool = True,
) -> Tensor:
    """Momentum I-FGSM: ``g <- decay * g + grad / mean|grad|``, ``x <- proj(x + alpha * sign(g))``."""
    alpha = eps / steps if alpha is None else alpha
    with crafting(model):
        x, y = _prepare(model, x, y, eps, check)
        x_adv, g = x.clone(), torch.zeros_like(x)
        for _ in range(steps):
            grad = _loss_grad(model, x_adv, y)
            g = decay * g + grad / _per_sample(grad).abs().mean(1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))
            x_adv = project(x, x_adv + alpha * g.sign(), eps)
        return x_adv


def transfer(attack: Attack, source: Model, target: Model, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Craft with ``attack(source, x, y)``, evaluate on ``target``: (adversarial pixels, target logits (B, K)).

    ``attack`` is any of this module's functions with its budget bound, e.g.
    ``functools.partial(fgsm, eps=0.3)``.
    """
    x_adv = attack(source, x, y)
    with torch.no_grad():
        was = [(m, m.training) for m in target.modules()] if isinstance(target, nn.Module) else []
        for m, _ in was:
            m.training = False
        try:
            logits = _logits(target, x_adv)
        finally:
            for m, mode in was:
                m.training = mode
    return x_adv, logits


def sign_noise(model: Model, x: Tensor, y: Tensor | None, eps: float, generator: torch.Generator | None = None,
               check: bool = True) -> Tensor:
    """The control: ``clip(x + eps * sign(N(0, I)), 0, 1)``, the same norm as an FGSM step, no gradient."""
    check_eps(eps)
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return (x.detach() + eps * noise.sign()).clamp(0.0, 1.0)


# --- the registry ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """What an attack may spend: ``eps`` (Linf, [0, 1] pixels), ``steps`` and ``alpha`` (iterative attacks; alpha
    ``None``: each attack's default), ``restarts`` (PGD), ``random_eps`` (FGSM: per-image eps in (0, eps]) and the
    ``generator`` of the random draws (PGD's start, the noise control, random eps). An attack reads only its own."""

    eps: float
    steps: int = 10
    alpha: float | None = None
    restarts: int = 1
    random_eps: bool = False
    generator: torch.Generator | None = None


ATTACKS = Registry("attack")  # name -> (Budget -> Attack); true labels, or predicted ones with y = None


@ATTACKS.register("fgsm")
def _fgsm(b: Budget) -> Attack:
    if b.random_eps:
        return functools.partial(fgsm, eps=b.eps, random_eps=True, generator=b.generator, check=False)
    return functools.partial(fgsm, eps=b.eps, check=False)


@ATTACKS.register("rfgsm")
def _rfgsm(b: Budget) -> Attack:
    return functools.partial(rfgsm, eps=b.eps, alpha=b.alpha, generator=b.generator, check=False)


@ATTACKS.register("ifgsm")
def _ifgsm(b: Budget) -> Attack:
    return functools.partial(ifgsm, eps=b.eps, steps=b.steps, alpha=b.alpha, check=False)


@ATTACKS.register("pgd")
def _pgd(b: Budget) -> Attack:
    return functools.partial(pgd, eps=b.eps, steps=b.steps, alpha=b.alpha, restarts=b.restarts,
                             generator=b.generator, check=False)


@ATTACKS.register("mifgsm")
def _mifgsm(b: Budget) -> Attack:
    return functools.partial(mifgsm, eps=b.eps, steps=b.steps, alpha=b.alpha, check=False)


@ATTACKS.register("noise")
def _noise(b: Budget) -> Attack:
    return functools.partial(sign_noise, eps=b.eps, generator=b.generator, check=False)


def attack_names() -> list[str]:
    """Every attack :func:`make_attack` builds."""
    return ATTACKS.names()


def check_attack_names(names: list[str], extra: tuple[str, ...] = ()) -> None:
    """One line naming the unknown attacks in ``names`` and the known ones (the registry's, plus ``extra``)."""
    known = [*attack_names(), *extra]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AttackError(f"unknown attacks {unknown}; available: {', '.join(known)}")


def make_attack(name: str, eps: float, **budget: object) -> Attack:
    """The attack ``name`` with its budget bound (see :class:`Budget` for the keywords): a batched
    ``(model, x, y) -> x_adv`` on [0, 1] pixels (``y`` ``None``: the model's predicted labels)."""
    if name not in ATTACKS.names():
        raise AttackError(f"unknown attack {name!r}; available: {', '.join(attack_names())}")
    check_eps(eps)
    return ATTACKS.get(name)(Budget(eps=eps, **budget))  # type: ignore[arg-type]
