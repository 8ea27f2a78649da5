"""Callbacks that keep a run honest: stop on a non-finite loss, make resume exact."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

from cvlab.errors import CvlabError


class NonFiniteLossError(CvlabError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(L.Callback):
    """Raise :class:`NonFiniteLossError` naming the step and the loss as soon as it is not finite.

    Checked every ``every_n_steps`` steps (each check is one device-to-host sync). Checkpoints that
    were already written stay; the last good one is named in the message.
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
            ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none yet"
            raise NonFiniteLossError(
                f"loss became {loss.detach().float().cpu().tolist()} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}, batch {batch_idx}); lower the learning rate or check the data; "
                f"last good checkpoint: {ckpt}"
            )


class RngStateCheckpoint(L.Callback):
    """Store the torch / numpy / python random states in checkpoints and restore them on resume.

    With the epoch-seeded samplers and step-seeded augmentation, this makes a run resumed from
    ``last.ckpt`` follow the same random stream (dropout, random init of fresh networks, noise) as an
    uninterrupted one.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": torch.from_numpy(np.frombuffer(np.array(np.random.get_state()[1], dtype=np.uint32).tobytes(), dtype=np.uint8).copy()),
            "numpy_pos": int(np.random.get_state()[2]),
            "python": [float(x) if isinstance(x, float) else x for x in random.getstate()[1]],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
        np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
        random.setstate((3, tuple(state["python"]), None))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
