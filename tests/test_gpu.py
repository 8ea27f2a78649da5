"""CUDA check (``pytest -m gpu``, skipped without CUDA): every method's smallest config runs a few steps on
one CUDA device at the precision its config sets (bf16-mixed where set), its outputs finite and on that
device; every benchmark runs on CUDA.

Run on a GPU machine: ``uv run pytest -m gpu -q`` (with ``-s`` to see the benchmark numbers).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from experiments.cli import CvlabCLI
from experiments.command_line import as_overrides
from tests.cli_runs import REPO
from tests.test_configs import fake_root, smoke_plan, zskd_artifacts  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_SHAPES = ["--data.init_args.num_train=200", "--data.init_args.num_test=50"]
_SHAPES_TASK = ["--data.init_args.task.init_args.num_train=100", "--data.init_args.task.init_args.num_test=50"]


def _shrunk(config: str) -> list[str]:
    """The shrinking overrides tests/smoke/ gives ``config`` (as tests/test_configs.py runs it)."""
    return as_overrides(smoke_plan(config).args)


#: method -> (subcommand, configs (stacked), extra overrides); the smallest config of each method, its GPU settings kept
METHODS: dict[str, tuple[str, list[str], list[str]]] = {
    "classifier": ("fit", ["experiments/quickstart.yaml"], _SHAPES),
    "teacher_bf16": ("fit", ["experiments/teachers/cifar10_alexnet.yaml"], ["--data.init_args.batch_size=8"]),
    "dc": ("fit", ["experiments/dc/shapes/ipc1.yaml"], [*_shrunk("experiments/dc/shapes/ipc1.yaml"), *_SHAPES]),
    "idlg": ("predict", ["experiments/idlg/shapes/idlg.yaml"],
             [*_shrunk("experiments/idlg/shapes/idlg.yaml"), "--data.init_args.source.init_args.num_train=100",
              "--data.init_args.source.init_args.num_test=20"]),
    "dlg": ("predict", ["experiments/idlg/shapes/dlg.yaml"],
            [*_shrunk("experiments/idlg/shapes/dlg.yaml"), "--data.init_args.source.init_args.num_train=100",
             "--data.init_args.source.init_args.num_test=20"]),
    "zskd_synthesis_bf16": ("predict",
                            ["experiments/zskd/shapes/synthesize.yaml", "experiments/zskd/tf_port_impressions.yaml"],
                            [*_shrunk("experiments/zskd/shapes/synthesize.yaml"),
                             "--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x10"]),
    "zskd_student": ("fit", ["experiments/zskd/shapes/student.yaml"],
                     ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x10",
                      "--data.init_args.pool.init_args.folder=$CVLAB_TEST_IMPRESSIONS_3x10", *_SHAPES_TASK]),
    "transfer_set_student": ("fit", ["experiments/transfer_sets/shapes/student.yaml"],
                             ["--model.init_args.teacher=$CVLAB_TEST_TEACHER_3x10",
                              "--data.init_args.pool.init_args.size=32", *_SHAPES_TASK]),
    "lra_bf16_generator": ("fit", ["experiments/lra/mnist/lra.yaml", "experiments/lra/mnist/cpu_hour.yaml"],
                           [*_shrunk("experiments/lra/mnist/lra.yaml"),
                            "--model.init_args.teacher=$CVLAB_TEST_TEACHER_1x10"]),
}
#: methods whose config sets trainer.precision: bf16-mixed
BF16 = {"teacher_bf16", "zskd_synthesis_bf16"}
FEW_STEPS = ["--trainer.max_steps=3", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
             "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=2",
             "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
             "--run.logger=csv", "--run.test_after_fit=false"]


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


class DeviceProbe(L.Callback):
    """Record, at every step, where the module's parameters and its step outputs live and whether they are finite."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, set[str], bool]] = []

    def _record(self, pl_module: L.LightningModule, outputs: Any, where: str) -> None:
        ts = _tensors(outputs) + [p.detach() for p in pl_module.parameters()]
        self.steps.append((where, {str(t.device.type) for t in ts},
                           all(bool(torch.isfinite(t.float()).all()) for t in ts)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(pl_module, outputs, "train")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(pl_module, outputs, "predict")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_runs_on_cuda_with_finite_outputs(method: str, fake_root: Path, zskd_artifacts: dict, tmp_path: Path,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in zskd_artifacts.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CVLAB_DATA", str(fake_root))
    sub, configs, extra = METHODS[method]
    args = [*[f"--config={c}" for c in configs], *FEW_STEPS, *[os.path.expandvars(e) for e in extra],
            f"--run.dir={tmp_path / 'run'}"]
    cli = CvlabCLI(args=args, run=False)  # parse and build; the subcommand is called below, with the probe
    want = cli.trainer.precision
    probe = DeviceProbe()
    cli.trainer.callbacks.append(probe)
    getattr(cli.trainer, sub)(cli.model, datamodule=cli.datamodule)
    assert probe.steps, "no step ran"
    for where, devices, finite in probe.steps:
        assert devices == {"cuda"}, f"{where} step: tensors on {devices}"
        assert finite, f"{where} step: non-finite outputs or parameters"
    for k, v in cli.trainer.callback_metrics.items():
        assert torch.isfinite(torch.as_tensor(v, dtype=torch.float32)).all(), k
    if method in BF16:
        assert want == "bf16-mixed", f"{method}: its config asks for bf16-mixed, the trainer runs {want}"


#: each benchmark at a few-second size on CUDA
BENCHMARKS = {
    "classifier": ["--data", "cifar-like", "--pipeline", "cvlab", "--steps", "3", "--num-images", "512", "--bf16",
                   "--channels-last"],
    "dc": ["--ipc", "1", "--iters", "1", "--warmup", "1"],
    "dc-eval": ["--ipc", "1", "--nets", "1", "--epochs", "1", "--test-images", "200"],
    "idlg": ["--trials", "8", "--batch", "8", "--sequential-trials", "2", "--iterations", "2"],
    "lra": ["--iters", "1", "--batch", "64", "--bf16-generator"],
    "zskd": ["--iterations", "3", "--per-class", "2", "--bf16", "--student-steps", "3"],
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_runs_on_cuda(name: str) -> None:
    cmd = [sys.executable, "-m", "experiments.cli", "bench", name, "--device", "cuda", *BENCHMARKS[name]]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    print(out.stdout)
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.cuda.get_device_name(0) in out.stdout or "cuda" in out.stdout
