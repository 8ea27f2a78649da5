"""Reductions across processes for methods that compute their own gradients (functional calls outside the
DDP-wrapped module: LRA's meta step, the GAN players). Each is the identity in a single process.

Ground floor: imports nothing of cvlab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

#: a reduction over ranks of a list of tensors (gradients), returning the reduced list
Reduce = Callable[[list[Tensor]], list[Tensor]]


def no_reduce(tensors: list[Tensor]) -> list[Tensor]:
    """One process: nothing to average."""
    return tensors


def all_reduce_mean(tensors: list[Tensor]) -> list[Tensor]:
    """Average ``tensors`` over all ranks with one flat all-reduce (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
