"""Optimizer and learning-rate schedule from a few typed config values (shared by every module)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["none", "cosine", "step", "multistep"]


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
    """A per-step schedule. ``milestones`` are fractions of ``total_steps`` (``step``: [0.5])."""
    total_steps = max(1, total_steps)
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if name in ("step", "multistep"):
        fractions = milestones if milestones else [0.5]
        steps = [max(1, int(f * total_steps)) for f in fractions]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma)
    raise ValueError(f"unknown lr schedule {name!r}; expected none, cosine, step or multistep")
