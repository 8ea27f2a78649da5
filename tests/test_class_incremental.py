"""Class-incremental learning with Data Impression replay: splits, the loss, the datamodule, the stage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cvlab.errors import CvlabError
from datamodules import ClassIncrementalDataModule, MNISTDataModule, check_splits, even_splits
from lit_modules.classifier import ClassifierModule
from lit_modules.distillation.class_incremental import class_incremental_loss
from tests.cli_runs import read_metrics, run_cli, run_cli_subprocess
from tests.fakedata import save_cvlab_checkpoint, write_mnist_idx


def test_even_splits_worked_answers() -> None:
    assert even_splits(10, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert even_splits(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    with pytest.raises(CvlabError, match="do not split into 3 equal steps"):
        even_splits(10, 3)


@pytest.mark.parametrize(("splits", "message"), [
    ([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9]], r"repeat classes \[4\]"),
    ([[0, 1, 2, 3], [5, 6, 7, 8, 9]], r"drop classes \[4\]"),
    ([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]], r"classes \[10\] outside 0..9"),
    ([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], []], "at least one class"),
])
def test_bad_splits_are_clear_errors(splits: list[list[int]], message: str) -> None:
    with pytest.raises(CvlabError, match=message):
        check_splits(splits, 10)
    check_splits([[3, 1], [0, 2]], 4)  # any partition in any order is fine


def test_loss_worked_answer() -> None:
    # 3 classes; seen {0, 1} (class 2 comes later), old {0}... with old {0, 1} for the KD term
    logits = torch.tensor([[0.0, 0.0, 5.0]])
    seen = torch.tensor([True, True, False])
    total, ce, kd = class_incremental_loss(logits, torch.tensor([0]), seen)
    assert ce.item() == pytest.approx(math.log(2.0))  # class 2's logit 5 takes no part
    assert kd.item() == 0.0 and total.item() == pytest.approx(math.log(2.0))
    # KD over the old classes only, tau = 1: previous [3/4, 1/4], current [1/2, 1/2] -> KL = 3/4 ln 3/2 + 1/4 ln 1/2
    cur = torch.tensor([[0.0, 0.0, 9.0]])
    prev = torch.tensor([[math.log(3.0), 0.0, -7.0]])
    old = torch.tensor([0, 1])
    total, ce, kd = class_incremental_loss(logits, torch.tensor([0]), seen, cur, prev, old, temperature=1.0,
                                           kd_weight=0.5)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd.item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(math.log(2.0) + 0.5 * kl, rel=1e-5)
    # impressions replayed as labelled old-class data too: + CE over the seen classes of [0, 0 | 9 unseen] vs class 1
    total, ce, kd = class_incremental_loss(logits, torch.tensor([0]), seen, cur, prev, old, temperature=1.0,
                                           kd_weight=0.5, kd_labels=torch.tensor([1]), kd_ce_weight=2.0)
    assert ce.item() == pytest.approx(math.log(2.0) + 2 * math.log(2.0), rel=1e-5)
    assert total.item() == pytest.approx(3 * math.log(2.0) + 0.5 * kl, rel=1e-5)
    # tau 2 weighs the KL by tau^2; equal old-class outputs give exactly 0 whatever the other classes do
    _, _, kd2 = class_incremental_loss(logits, torch.tensor([0]), seen, cur, prev, old, temperature=2.0)
    p, q = torch.tensor([3.0, 1.0]).sqrt(), torch.tensor([1.0, 1.0])
    p, q = p / p.sum(), q / q.sum()
    assert kd2.item() == pytest.approx(4 * (p * (p / q).log()).sum().item(), rel=1e-5)
    _, _, kd0 = class_incremental_loss(logits, torch.tensor([0]), seen, torch.tensor([[1.0, 2.0, 30.0]]),
                                       torch.tensor([[1.0, 2.0, -30.0]]), old)
    assert kd0.item() == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cl_data")
    write_mnist_idx(root, "MNIST", n_train=200, n_test=60)
    m = ClassifierModule(arch="lenet5", num_classes=100, in_channels=1, image_size=32)
    save_cvlab_checkpoint(m, root / "lenet_100.ckpt")
    return root


def test_datamodule_keeps_new_classes_for_training_and_seen_ones_for_evaluation(fake_mnist: Path) -> None:
    task = MNISTDataModule(data_dir=str(fake_mnist), image_size=32, val_size=20)
    dm = ClassIncrementalDataModule(task, step=1, steps=5)
    dm.setup("fit")
    assert dm.new_classes == [2, 3] and dm.old_classes == [0, 1] and dm.seen_classes == [0, 1, 2, 3]
    assert (set(dm.train_y.tolist()) <= {2, 3}
            and len(dm.train_y) == torch.isin(task.train_y, torch.tensor([2, 3])).sum())
    assert set(dm.test_y.tolist()) <= {0, 1, 2, 3} and set(dm.val_y.tolist()) <= {0, 1, 2, 3}
    assert len(dm.test_y) == torch.isin(task.test_y, torch.tensor([0, 1, 2, 3])).sum()
    replay = ClassIncrementalDataModule(MNISTDataModule(data_dir=str(fake_mnist), image_size=32, val_size=20),
                                        step=1, steps=5, real_replay=7)
    replay.setup("fit")
    assert len(replay.train_y) == len(dm.train_y) + 7 and (torch.isin(replay.train_y, torch.tensor([0, 1]))).sum() == 7
    with pytest.raises(CvlabError, match="repeat classes"):
        ClassIncrementalDataModule(task, splits=[[0, 1, 2, 3, 4, 5], [5, 6, 7, 8, 9]])
    with pytest.raises(CvlabError, match="step 5 is outside"):
        ClassIncrementalDataModule(task, step=5, steps=5)


def _args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config=experiments/data_impressions/mnist/cl_step.yaml",
            f"--data.init_args.task.init_args.data_dir={root}", "--data.init_args.batch_size=32",
            "--model.init_args.num_impressions=20", "--model.init_args.impressions.iterations=5",
            "--model.init_args.replay_batch=8", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1", "--run.logger=csv", *extra]


@pytest.fixture(scope="module")
def step0(fake_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cl_step0") / "run"
    run_cli(*_args(fake_mnist, "--trainer.max_epochs=3"), run_dir=run)
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("distill", ["impressions", "new"])
def test_step_starts_from_the_previous_network_and_distils_on_its_outputs(fake_mnist: Path, step0: Path, tmp_path: Path,
                                                                         distill: str) -> None:
    # one optimisation step: the KD term is measured before the update, when the network IS the previous one, so it
    # is exactly 0 (wrong start weights or wrong stored logits would make it positive); after more steps it is not
    run_cli(*_args(fake_mnist, "--data.init_args.step=1", f"--model.init_args.previous={step0}",
                   f"--model.init_args.distill={distill}", "--trainer.max_steps=1"), run_dir=tmp_path / "one")
    m = read_metrics(tmp_path / "one")
    assert m["train/kd"] == pytest.approx(0.0, abs=1e-6)
    assert {"test/acc", "test/old_acc", "test/new_acc"} <= m.keys()
    run_cli(*_args(fake_mnist, "--data.init_args.step=1", f"--model.init_args.previous={step0}",
                   f"--model.init_args.distill={distill}", "--trainer.max_epochs=2", "--model.init_args.lr=0.01"),
            run_dir=tmp_path / "more")
    assert read_metrics(tmp_path / "more")["train/kd"] > 1e-6
    if distill == "impressions":
        assert any((tmp_path / "more" / "images").glob("impressions_old_classes_*.png"))


def test_step_zero_metrics_have_no_old_classes(step0: Path) -> None:
    m = read_metrics(step0.parents[1])
    assert "test/old_acc" not in m and m["test/acc"] == m["test/new_acc"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--data.init_args.step=1"], "give --model.init_args.previous"),
    (["--data.init_args.step=1", "--model.init_args.previous={root}/lenet_100.ckpt"], "has 100 classes"),
])
def test_bad_input_is_a_clear_error(fake_mnist: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(CvlabError, match=message):
        run_cli(*_args(fake_mnist, *[e.format(root=fake_mnist) for e in extra]), run_dir=tmp_path / "run")


def test_bad_split_on_the_command_line_is_one_line(fake_mnist: Path, tmp_path: Path) -> None:
    r = run_cli_subprocess(*_args(fake_mnist, "--data.init_args.splits=[[0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9]]"),
                           f"--run.dir={tmp_path / 'run'}")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == \
        "cvlab: error: splits repeat classes [4]; each class must be learned in exactly one step"


@pytest.mark.slow
def test_ddp_two_processes_match_one(fake_mnist: Path, step0: Path, tmp_path: Path) -> None:
    # the impressions are mined identically on each rank and the replay draw is seeded by the step (the same on both
    # ranks); the new-data batches split the same permutation: 2 x 16 on 2 processes must equal 32 on one
    common = _args(fake_mnist, "--data.init_args.step=1", f"--model.init_args.previous={step0}",
                   "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--model.init_args.lr=0.01")
    from tests.cli_runs import run_cli_subprocess as run

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r1 = run(*common, "--data.init_args.batch_size=32", f"--run.dir={single}")
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run(*common, "--data.init_args.batch_size=16", "--trainer.devices=2", "--trainer.strategy=ddp",
             f"--run.dir={ddp}")
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
            for d in (single, ddp))
    before = torch.load(step0, map_location="cpu", weights_only=True)["state_dict"]
    assert any(not torch.equal(a[k], before[k]) for k in before if k.startswith("net."))
    for k in (k for k in a if k.startswith("net.")):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=f"{k} differs between 1 and 2 processes")
    ma, mb = read_metrics(single), read_metrics(ddp)
    for k in ("test/acc", "test/old_acc", "test/new_acc"):
        assert ma[k] == pytest.approx(mb[k], abs=1e-6), k
