"""Callbacks that keep a run honest: stop on a non-finite or diverged loss, make resume exact."""

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

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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


class DivergedLossError(CvlabError):
    """The training loss stayed far above its starting level."""


class StopOnDivergence(L.Callback):
    """Raise :class:`DivergedLossError` when the loss stays above ``factor`` times its starting level
    (the loss of the run's first step, before any update) for ``window`` consecutive steps.

    A run whose learning rate is far too large does not always reach NaN: its loss can sit at 1e11
    with chance accuracy, which :class:`StopOnNonFiniteLoss` never sees. The streak of steps over the
    threshold is counted on the device; it is read on the host every ``min(window, 10)`` steps.
    ``factor <= 0`` turns the check off. The starting level travels in checkpoints, so a resumed run
    keeps the level of its first step.
    """

    def __init__(self, factor: float = 100.0, window: int = 20) -> None:
        if window < 1:
            raise CvlabError(f"divergence window must be at least 1 step, got {window}")
        self.factor = float(factor)
        self.window = int(window)
        self.start: float | None = None
        self._streak: torch.Tensor | None = None  # () int, consecutive steps over the threshold
        self._hit: torch.Tensor | None = None  # () bool, a streak reached the window since the last read

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.factor <= 0:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() == 0:
            return
        loss = loss.detach().float().mean()
        if self.start is None:
            self.start = float(loss)  # one sync, once per run
            return
        if self.start <= 0:  # a loss that starts at or below zero has no level to diverge from
            return
        over = (loss > self.factor * self.start).to(torch.int64)
        self._streak = over if self._streak is None else (self._streak.to(over.device) + 1) * over
        hit = self._streak >= self.window  # sticky until read: a streak between two reads is not missed
        self._hit = hit if self._hit is None else self._hit.to(hit.device) | hit
        if trainer.global_step % min(self.window, 10) == 0 and bool(self._hit):
            ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none yet"
            raise DivergedLossError(
                f"loss diverged: {float(loss):.3g} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}) "
                f"stayed above {self.factor:g} x its starting level {self.start:.3g} for {self.window} steps in a row; "
                "lower the learning rate (or set --run.divergence_factor 0 to turn this check off); "
                f"last checkpoint: {ckpt}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = state.get("start")


class RngStateCheckpoint(L.Callback):
    """Store the torch / numpy / python random states in checkpoints and restore them on resume.

    With the epoch-seeded samplers and step-seeded augmentation, this makes a run resumed from
    ``last.ckpt`` follow the same random stream (dropout, random init of fresh networks, noise) as an
    uninterrupted one.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": torch.from_numpy(
                np.frombuffer(np.array(np.random.get_state()[1], dtype=np.uint32).tobytes(), dtype=np.uint8).copy()
            ),
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
