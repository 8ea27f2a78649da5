"""Write every run's final metrics to ``<run_dir>/metrics.json`` with flat ``stage/metric`` keys."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch

from cvlab.artifacts import merge_metrics


class MetricsJsonWriter(L.Callback):
    """On rank 0, after fit, validate and test: merge ``trainer.callback_metrics`` into metrics.json.

    Keys are the logged names (``train/loss``, ``val/acc``, ``test/acc``...); values are floats.
    ``fit/wall_s`` records the wall time of ``fit``, summed over a killed run and its resumes (the
    time so far travels in each checkpoint).
    """

    def __init__(self, run_dir: str) -> None:
        self.path = Path(run_dir) / "metrics.json"
        self._t0: float | None = None
        self._before_s = 0.0  # fit wall time of the runs this one resumes

    def _fit_wall_s(self) -> float:
        return self._before_s + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def state_dict(self) -> dict[str, float]:
        return {"fit_wall_s": self._fit_wall_s()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._before_s = float(state.get("fit_wall_s", 0.0))

    def _write(self, trainer: L.Trainer, extra: dict[str, float] | None = None) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        out: dict[str, float] = {}
        for k, v in trainer.callback_metrics.items():
            v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                out[k] = float(v)
        out.update(extra or {})
        merge_metrics(self.path, out)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, {"fit/wall_s": self._fit_wall_s(), "fit/epochs": float(trainer.current_epoch),
                              "fit/steps": float(trainer.global_step)})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)
