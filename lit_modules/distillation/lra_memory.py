"""LRA's memory of generated images (the "retain" half of Learning to Retain while Acquiring): a cyclic buffer of
generated batches, replayed one slot at a time. Generative replay (a frozen copy of an earlier generator instead of
stored images) is :class:`lit_modules.distillation.LRA`'s ``replay: generator``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cvlab.errors import CvlabError


class CyclicMemory:
    """LRA's memory of generated images: ``slots`` batches; a push overwrites the oldest slot (cyclic
    position), a replay reads one filled slot chosen at random.

    ``images`` is ``(slots, n, C, H, W)`` once the first batch is pushed. ``state_dict`` holds plain
    tensors and ints (a ``weights_only`` checkpoint loads it).
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.images: Tensor | None = None
        self.count = 0  # filled slots
        self.pos = 0  # the slot the next push writes

    def __len__(self) -> int:
        return self.count

    def push(self, x: Tensor) -> None:
        """Store ``x`` ``(n, C, H, W)`` (detached) in the next slot."""
        if self.slots < 1:
            return
        if self.images is None:
            self.images = x.new_zeros((self.slots, *x.shape))
        if x.shape != self.images.shape[1:]:
            raise ValueError(f"memory slots hold {tuple(self.images.shape[1:])}, got a batch of {tuple(x.shape)}")
        self.images[self.pos] = x.detach()
        self.pos = (self.pos + 1) % self.slots
        self.count = min(self.count + 1, self.slots)

    def sample(self, seed: int) -> Tensor | None:
        """One filled slot chosen uniformly by ``seed`` (host-side draw: no device sync); ``None`` if empty."""
        if self.count == 0:
            return None
        g = torch.Generator().manual_seed(seed)
        return self.images[int(torch.randint(self.count, (1,), generator=g))]

    def to(self, device: torch.device) -> CyclicMemory:
        if self.images is not None:
            self.images = self.images.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"slots": self.slots, "count": self.count, "pos": self.pos,
                "images": None if self.images is None else self.images.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["slots"] != self.slots:
            raise CvlabError(f"the checkpoint's memory has {state['slots']} slots but memory_slots is {self.slots}")
        self.count, self.pos, self.images = int(state["count"]), int(state["pos"]), state["images"]
