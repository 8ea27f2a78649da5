"""Run the ``cvlab`` CLI in-process (fast) or as a subprocess (DDP), for tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from experiments.cli import CvlabCLI

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"

#: a quickstart shrunk to seconds: 400 generated images, 2 epochs
TINY_SHAPES = [
    "--data.init_args.num_train=400",
    "--data.init_args.num_test=100",
    "--data.init_args.batch_size=50",
    "--model.init_args.arch_kwargs={width: 8, depth: 2, norm: batchnorm}",
    "--trainer.max_epochs=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--run.logger=csv",
]


def run_cli(*args: str, run_dir: Path | None = None) -> CvlabCLI:
    argv = list(args) + ([f"--run.dir={run_dir}"] if run_dir is not None else [])
    return CvlabCLI(args=argv)


def run_cli_subprocess(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout
    )


def read_metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


class SimulatedKill(RuntimeError):
    pass


import lightning as L  # noqa: E402


class KillAtEpoch(L.Callback):
    """Raise at the start of ``epoch`` (as if the job was killed there)."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise SimulatedKill(f"simulated kill at epoch {self.epoch}")
