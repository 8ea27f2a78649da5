"""A progress line per epoch where there is no progress bar (pipeline stages, logs, batch jobs)."""

from __future__ import annotations

import time

import lightning as L


def epoch_line(epoch: int, max_epochs: int | None, metrics: dict[str, float], seconds: float) -> str:
    """``cvlab: epoch 3/20: train/loss 0.4121, val/acc 0.9310 (14 s)``: the epoch (1-based), the
    training loss and the validation metrics logged so far, and the time since fit began."""
    total = f"/{max_epochs}" if max_epochs is not None and max_epochs > 0 else ""
    shown = [f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k == "train/loss" or k.startswith("val/")]
    return f"cvlab: epoch {epoch + 1}{total}" + (f": {', '.join(shown)}" if shown else "") + f" ({seconds:.0f} s)"


class EpochLine(L.Callback):
    """Print :func:`epoch_line` at the end of every training epoch (rank 0); one host sync per epoch."""

    def __init__(self) -> None:
        self._t0: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        seconds = time.perf_counter() - (self._t0 or time.perf_counter())
        print(epoch_line(trainer.current_epoch, trainer.max_epochs, metrics, seconds), flush=True)
