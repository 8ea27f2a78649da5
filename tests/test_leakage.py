"""DLG / iDLG: label extraction, the batched L-BFGS, reconstruction, the attack stage (1 and 2 processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvlab.artifacts import load_shards
from experiments.cli import main as cvlab
from lit_modules.leakage.batched_optim import batched_lbfgs
from lit_modules.leakage.gradient_leakage import (
    StackedVictims,
    VictimAssumptionError,
    attack_objective,
    check_label_extraction_assumptions,
    extract_labels_from_gradients,
)
from lit_modules.nets import ClassifierNet, create_net
from tests.conftest import REPO
from tests.fakedata import write_mnist_idx


def victims(n: int, channels: int = 1, size: int = 8, classes: int = 10, seed: int = 0) -> StackedVictims:
    torch.manual_seed(seed)
    return StackedVictims.from_nets([create_net("lenet_sigmoid", classes, channels, size) for _ in range(n)])


# --- label extraction --------------------------------------------------------------------------------
@pytest.mark.parametrize("classes,channels", [(10, 1), (100, 3)])
def test_label_extraction_is_exact_on_random_victims_and_images(classes: int, channels: int) -> None:
    torch.manual_seed(1)
    for trial in range(25):  # plain autograd on one network: independent of the batched machinery
        net = create_net("lenet_sigmoid", classes, channels, 16, init_range=0.5)
        x, y = torch.rand(1, channels, 16, 16), torch.randint(0, classes, (1,))
        g = torch.autograd.grad(F.cross_entropy(net(x), y), net.fc.weight)[0]
        assert extract_labels_from_gradients(g).item() == y.item()
    v = victims(40, channels, 16, classes, seed=2)  # and batched over 40 trials
    y = torch.randint(0, classes, (40, 1))
    shared = v.gradients(torch.rand(40, 1, channels, 16, 16), F.one_hot(y, classes).float())
    fc = shared[list(v.params).index(v.fc_weight)]
    assert torch.equal(extract_labels_from_gradients(fc), y)


def test_label_extraction_counts_distinct_classes_of_a_batch() -> None:
    rows = torch.tensor([[-3.0, 1.0, -1.0, 2.0], [0.5, -2.0, 1.0, 1.0]])  # sums of (K=4, D=1) gradients
    labels = extract_labels_from_gradients(rows[..., None], batch_size=2)
    assert labels.tolist() == [[0, 2], [1, 1]]  # two negative rows; one negative row repeated


class _TanhNet(ClassifierNet):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
        self.fc = nn.Linear(16, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_bad_victims_fail_with_a_clear_error() -> None:
    x = torch.randn(4, 1, 8, 8)
    conv_only = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())  # logits from a conv: no final linear layer
    with pytest.raises(VictimAssumptionError, match="no final linear layer"):
        check_label_extraction_assumptions(conv_only, x)
    with pytest.raises(VictimAssumptionError, match="negative activations"):
        check_label_extraction_assumptions(_TanhNet(), x)
    check_label_extraction_assumptions(create_net("lenet_sigmoid", 10, 1, 8), x)  # the papers' victim passes


# --- the batched L-BFGS --------------------------------------------------------------------------------
def test_batched_lbfgs_is_torch_lbfgs_per_trial() -> None:
    g = torch.Generator().manual_seed(0)
    T, P = 5, 6
    A = torch.randn(T, P, P, generator=g, dtype=torch.float64)
    A = A @ A.transpose(1, 2) / P + 0.1 * torch.eye(P, dtype=torch.float64)
    c = torch.randn(T, P, generator=g, dtype=torch.float64)

    def f(x: torch.Tensor, i: int) -> torch.Tensor:  # convex, not quadratic
        return 0.5 * x @ A[i] @ x + torch.logsumexp(x * c[i], 0) + 0.1 * (x**4).sum()

    def objective(z: torch.Tensor, ids: torch.Tensor):
        z = z.detach().requires_grad_(True)
        loss = torch.stack([f(z[n], int(i)) for n, i in enumerate(ids)])
        return loss.detach(), torch.autograd.grad(loss.sum(), z)[0]

    z0 = 2 * torch.randn(T, P, generator=g, dtype=torch.float64)
    for steps, history, max_iter in [(3, 100, 20), (6, 3, 4)]:  # (6, 3, 4): the history ring wraps
        res = batched_lbfgs(objective, z0, steps=steps, history_size=history, max_iter=max_iter,
                            stop_loss=-1e9, sync_every=3)  # syncs (and drops finished trials) often
        for i in range(T):
            x = z0[i].clone().requires_grad_(True)
            opt = torch.optim.LBFGS([x], lr=1, history_size=history, max_iter=max_iter)

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = f(x, i)
                loss.backward()
                return loss

            for _ in range(steps):
                opt.step(closure)
            torch.testing.assert_close(res.z[i], x.detach(), rtol=0, atol=1e-12)
            torch.testing.assert_close(res.loss[i], f(x.detach(), i), rtol=0, atol=1e-12)


# --- reconstruction -------------------------------------------------------------------------------------
def _attack(v: StackedVictims, x: torch.Tensor, y: torch.Tensor, method: str, steps: int,
            z0: torch.Tensor | None = None, max_iter: int = 20):
    T, B = y.shape
    shared = v.gradients(x, F.one_hot(y, 10).to(x.dtype))
    labels = extract_labels_from_gradients(shared[list(v.params).index(v.fc_weight)], B)
    objective = attack_objective(v, shared, tuple(x.shape[1:]), method, labels, 10)
    if z0 is None:
        z0 = torch.randn(T, x[0].numel() + (B * 10 if method == "dlg" else 0),
                         generator=torch.Generator().manual_seed(0))
    return batched_lbfgs(objective, z0.to(x.dtype), steps=steps, max_iter=max_iter, stop_loss=1e-10), labels


def test_idlg_reconstructs_one_image_on_a_tiny_victim() -> None:
    v = victims(1, size=8)
    x, y = torch.rand(1, 1, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([[4]])
    res, labels = _attack(v, x, y, "idlg", steps=30)
    assert labels.item() == 4
    mse = ((res.z.view_as(x) - x) ** 2).mean()
    assert mse < 1e-3, f"mse {mse:.3g}"
    assert res.curve[0, -1] < 1e-3 * res.curve[0, 0]  # the gradient distance fell


@pytest.mark.parametrize("method", ["idlg", "dlg"])
def test_batched_trials_equal_the_same_trials_one_at_a_time(method: str) -> None:
    v = victims(3, size=8, seed=5)
    v.params = {k: p.double() for k, p in v.params.items()}
    v.base = v.base.double()  # float64: L-BFGS without line search amplifies float32 rounding (DLG most)
    x = torch.rand(3, 1, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.tensor([[1], [7], [7]])
    z0 = torch.randn(3, 64 + (10 if method == "dlg" else 0), generator=torch.Generator().manual_seed(6))
    together, _ = _attack(v, x, y, method, steps=1, z0=z0, max_iter=4)
    for i in range(3):
        one = slice(i, i + 1)
        alone, _ = _attack(v.select(torch.tensor([i])), x[one], y[one], method, steps=1, z0=z0[one], max_iter=4)
        torch.testing.assert_close(together.z[i], alone.z[0], rtol=1e-7, atol=1e-9)
        assert together.evals[i] == alone.evals[0] and together.steps[i] == alone.steps[0]


# --- the attack stage through the CLI --------------------------------------------------------------------
def _predict_args(data: Path, run: Path, method: str = "idlg") -> list[str]:
    return ["predict", "--config", f"experiments/idlg/mnist/{method}.yaml", "--run.dir", str(run),
            "--data.init_args.source.init_args.data_dir", str(data), "--data.init_args.num_trials", "5",
            "--data.init_args.trials_per_batch", "2", "--model.init_args.iterations", "3",
            "--model.init_args.max_iter", "2"]


def test_attack_stage_writes_shards_metrics_and_grid_and_resumes(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path / "data")
    run = tmp_path / "run"
    cvlab(_predict_args(tmp_path / "data", run))
    r = load_shards(run / "shards")
    assert r["index"].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(r["pred_label"], r["label"])  # iDLG's extracted labels
    assert r["original"].dtype == torch.uint8 and r["reconstruction"].shape == (5, 1, 1, 28, 28)
    assert r["curve"][:, -1].median() < 0.8 * r["curve"][:, 0].median()  # the gradient distance falls
    m = json.loads((run / "metrics.json").read_text())
    assert m["attack/label_acc"] == 1.0 and m["attack/num_trials"] == 5
    assert {"attack/mse_mean", "attack/psnr_mean", "attack/success_rate"} <= set(m)
    assert list((run / "images").glob("attack_originals_over_reconstructions*.png"))
    (last := sorted((run / "shards").glob("shard-*.pt"))[-1]).unlink()  # a killed run: redo what is missing
    cvlab(_predict_args(tmp_path / "data", run))
    assert last.exists() and torch.equal(load_shards(run / "shards")["mse"], r["mse"])


@pytest.mark.slow
def test_two_process_ddp_writes_disjoint_shards_with_the_single_process_results(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = {}
    for n in (1, 2):
        runs[n] = tmp_path / f"run{n}"
        extra = (["--trainer.accelerator", "cpu", "--trainer.devices", str(n)]
                 + (["--trainer.strategy", "ddp"] if n == 2 else []))
        cmd = [sys.executable, "-m", "experiments", *_predict_args(tmp_path / "data", runs[n], "dlg"), *extra]
        subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600)
    by_rank = {r: set() for r in ("r0", "r1")}
    for f in (runs[2] / "shards").glob("shard-*.pt"):
        by_rank[f.stem[-2:]] |= set(torch.load(f, weights_only=True)["index"].tolist())
    assert by_rank["r0"] and by_rank["r1"] and by_rank["r0"] | by_rank["r1"] == set(range(5))
    one, two = load_shards(runs[1] / "shards"), load_shards(runs[2] / "shards")  # repeats from DDP padding dropped
    assert torch.equal(one["index"], two["index"]) and torch.equal(one["label"], two["label"])
    assert torch.equal(one["pred_label"], two["pred_label"])
    torch.testing.assert_close(one["mse"], two["mse"], rtol=1e-3, atol=1e-6)
    m1, m2 = (json.loads((runs[n] / "metrics.json").read_text()) for n in (1, 2))
    assert m1["attack/num_trials"] == m2["attack/num_trials"] == 5
