"""SLURM requeue: what Lightning's auto-requeue leaves behind once a run has finished."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class DropFinishedHpcCheckpoints(L.Callback):
    """Delete ``hpc_ckpt_*.ckpt`` from the run folder when training ends normally.

    On SIGUSR1, Lightning's SLURM environment (``auto_requeue``) saves ``hpc_ckpt_<n>.ckpt`` in the
    run folder and requeues the job; the requeued run resumes (cvlab: ``--ckpt_path=last``, the last
    epoch end) and finishes. The hpc checkpoint is then stale, and Lightning would still load it for any
    later ``trainer.test/validate/predict(model)`` on SLURM with ``ckpt_path=None`` (its SLURM rule
    prefers an hpc checkpoint), so the test after fit would score the preempted weights, not the final
    ones. ``last.ckpt`` holds the final state.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            for path in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"):
                path.unlink(missing_ok=True)
