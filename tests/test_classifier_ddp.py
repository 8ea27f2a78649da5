"""The classifier on 2 CPU processes (DDP, gloo) equals one process on the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.cli_runs import QUICKSTART, TINY_SHAPES, read_metrics, run_cli_subprocess

# no BatchNorm (its batch statistics are per rank) and no augmentation; the single-process sampler
# draws the same permutation as DistributedSampler, so the union of the two ranks' batches is
# exactly the single process's batch.
COMMON = [
    "fit", f"--config={QUICKSTART}", *TINY_SHAPES,
    "--model.init_args.arch_kwargs={width: 8, depth: 2, norm: instancenorm}",
    "--model.init_args.optimizer=sgd", "--model.init_args.lr=0.05", "--model.init_args.momentum=0.0",
    "--data.init_args.augment=none", "--trainer.accelerator=cpu", "--run.test_after_fit=false",
    "--trainer.max_epochs=1",
]


def _params(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    # rank r takes positions r, r+2, ... of the epoch's permutation: with 25 per rank the union of
    # step k's two batches is the single process's batch k of 50.
    single = tmp_path / "single"
    r1 = run_cli_subprocess(*COMMON, f"--run.dir={single}")
    assert r1.returncode == 0, r1.stderr[-3000:]
    ddp = tmp_path / "ddp"
    r2 = run_cli_subprocess(*COMMON, "--data.init_args.batch_size=25",
                            "--trainer.devices=2", "--trainer.strategy=ddp", f"--run.dir={ddp}")
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = _params(single), _params(ddp)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=f"{k} differs between 1 and 2 processes")
    # the validation accuracy is a synced torchmetrics value: equal too
    assert read_metrics(single)["val/acc"] == pytest.approx(read_metrics(ddp)["val/acc"], abs=1e-6)
