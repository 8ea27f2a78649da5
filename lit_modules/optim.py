"""Optimizer and learning-rate schedule from a few typed config values (shared by every module)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["none", "cosine", "step", "multistep", "cyclic"]


def build_optimizer(
    params: Iterable[nn.Parameter],
    name: OptimizerName = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """SGD (Nesterov off), Adam or AdamW."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected sgd, adam or adamw")


def build_schedule(
    optimizer: torch.optim.Optimizer,
    name: ScheduleName,
    total_steps: int,
    milestones: list[float] | None = None,
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step schedule. ``milestones`` are fractions of ``total_steps`` (``step``: [0.5]).

    ``cyclic`` is the one-cycle (triangular) schedule of Wong, Rice and Kolter's fast adversarial training
    (ICLR 2020, arXiv 2001.03994): the lr rises linearly from 0 to the optimizer's lr at the fraction
    ``milestones[0]`` of the run (default 0.4: Wong's ``epochs * 2 // 5`` of 10 epochs), then falls linearly to
    0 at the end; see :func:`cyclic_factor`.
    """
    total_steps = max(1, total_steps)
    if name == "cyclic":
        peak = milestones[0] if milestones else 0.4
        if not 0.0 < peak < 1.0:
            raise ValueError(f"the cyclic schedule's peak (milestones[0]) must be in (0, 1), got {peak}")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cyclic_factor(step, total_steps, peak))
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if name in ("step", "multistep"):
        fractions = milestones if milestones else [0.5]
        steps = [max(1, int(f * total_steps)) for f in fractions]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma)
    raise ValueError(f"unknown lr schedule {name!r}; expected none, cosine, step, multistep or cyclic")


def cyclic_factor(step: int, total_steps: int, peak: float = 0.4) -> float:
    """The lr multiplier of optimisation step ``step`` (0-based) of ``total_steps`` under the one-cycle schedule.

    As Wong et al.'s code, the step's position is taken after it, ``t = (step + 1) / total_steps``, and the
    factor is ``t / peak`` up to the peak, then ``(1 - t) / (1 - peak)``: with 1000 steps and peak 0.4, step 0
    gets 0.0025, step 399 gets 1.0, step 699 gets 0.5 and the last step 0.0.
    """
    t = min(1.0, (step + 1) / max(1, total_steps))
    return t / peak if t <= peak else max(0.0, (1.0 - t) / (1.0 - peak))
