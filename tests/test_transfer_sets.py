"""Arbitrary transfer sets: noise / datamodule pools, target-class balancing, KD with real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules import MNISTDataModule, ShapesDataModule
from datamodules.transfer_sets import (
    DataModulePool,
    NoisePool,
    TransferSetDataModule,
    TransferSetError,
    match_channels,
)
from experiments.cli import CvlabCLI
from lit_modules.distillation.transfer_set_selection import balance_by_confidence
from tests.test_zskd import save_teacher


def test_balancing_keeps_the_most_confident_equal_number_per_class() -> None:
    pred = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 0, 2])
    conf = torch.tensor([0.9, 0.5, 0.3, 0.8, 0.7, 0.95, 0.1, 0.6, 0.2, 0.4])
    keep = balance_by_confidence(pred, conf, 3, per_class=2)
    assert torch.bincount(pred[keep], minlength=3).tolist() == [2, 2, 2]
    assert keep.tolist() == [0, 3, 4, 5, 7, 9]  # class 0: .95, .9; class 1: .7, .6; class 2: .8, .4
    few = balance_by_confidence(pred, conf, 4, per_class=3)  # class 3 was never predicted: keeps none
    assert torch.bincount(pred[few], minlength=4).tolist() == [3, 3, 3, 0]


def test_balancing_a_large_random_pool_gives_equal_counts() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 10, (5000,), generator=g) ** 2 % 10  # a skewed class histogram
    conf = torch.rand(5000, generator=g)
    keep = balance_by_confidence(pred, conf, 10, per_class=50)
    counts = torch.bincount(pred[keep], minlength=10)
    assert set(counts[torch.bincount(pred, minlength=10) >= 50].tolist()) == {50}


def test_noise_pools_and_channel_matching() -> None:
    task = MNISTDataModule(image_size=32)
    x, y = NoisePool("uniform", 200).load(task, seed=0)
    assert x.shape == (200, 1, 32, 32) and x.dtype == torch.uint8 and (y == -1).all()
    xg, _ = NoisePool("gaussian", 2000).load(task, seed=0)
    z = task.normalize(xg.float() / 255)  # N(0, 1) in the task's normalised space (before clamping)
    assert abs(z.median().item()) < 0.1
    assert torch.equal(NoisePool("uniform", 5).load(task, 1)[0], NoisePool("uniform", 5).load(task, 1)[0])
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert (match_channels(rgb, 1).shape == (2, 1, 4, 4)
            and match_channels(match_channels(rgb, 1), 3).shape == (2, 3, 4, 4))


def test_datamodule_pool_resizes_and_drops_foreign_labels() -> None:
    task = MNISTDataModule(image_size=32)
    pool = DataModulePool(ShapesDataModule(num_train=100, num_test=20, image_size=28), max_size=30)
    x, y = pool.load(task, seed=0)
    assert x.shape == (30, 1, 32, 32) and x.dtype == torch.uint8 and (y == -1).all()


def test_cifar10_pool_for_a_grey_task_is_the_channel_mean_of_its_training_images(tmp_path: Path) -> None:
    """CIFAR-10 as the arbitrary pool of an MNIST teacher (experiments/transfer_sets/cifar10/pipeline_grey_pool.yaml):
    each pool image is round(mean of R, G, B) of a training image (the validation hold-out excluded), 32 px."""
    from datamodules import CIFAR10DataModule
    from datamodules.vision import UnofficialDataWarning
    from tests.fakedata import write_cifar

    write_cifar(tmp_path, 10, n_train=40, n_test=10)
    source = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10)
    task = MNISTDataModule(data_dir=str(tmp_path), image_size=32)
    with pytest.warns(UnofficialDataWarning):  # generated files are not the official release
        x, y = DataModulePool(source).load(task, seed=0)
    rgb = source.train_x  # (30, 3, 32, 32) uint8, after the hold-out
    assert x.shape == (30, 1, 32, 32) and x.dtype == torch.uint8 and (y == -1).all()
    assert torch.equal(x, rgb.float().mean(1, keepdim=True).round().to(torch.uint8))
    px = rgb[:1, :, :1, :1].clone()
    px[..., 0, 0] = torch.tensor([10, 20, 31], dtype=torch.uint8)  # mean 20.33 -> 20
    assert match_channels(px, 1).flatten().tolist() == [20]


def test_balancing_needs_a_selection() -> None:
    with pytest.raises(TransferSetError, match="selection"):
        TransferSetDataModule(ShapesDataModule(), NoisePool(), balance="confidence")


def _stage_args(config: str, command: str, teacher: Path, run: Path, *extra: str) -> list[str]:
    return [command, "--config", f"experiments/transfer_sets/shapes/{config}.yaml", f"--run.dir={run}",
            "--run.logger=csv", f"--model.init_args.teacher={teacher}", "--data.init_args.task.init_args.num_train=100",
            "--data.init_args.task.init_args.num_test=50", "--data.init_args.batch_size=32",
            "--trainer.enable_progress_bar=false", *extra]


def _student_args(teacher: Path, run: Path, *extra: str) -> list[str]:
    return _stage_args("student", "fit", teacher, run, "--trainer.max_epochs=1", *extra)


def test_balanced_noise_transfer_set_through_the_teacher(tmp_path: Path) -> None:
    """The selection stage (cvlab predict) then the student on its selection.pt, as the pipeline runs them."""
    teacher = save_teacher(tmp_path / "t.ckpt")
    select = tmp_path / "select"
    CvlabCLI(args=_stage_args("select", "predict", teacher, select, "--data.init_args.pool.init_args.size=3000",
                              "--model.init_args.per_class=5"))
    run = tmp_path / "bal"
    cli = CvlabCLI(args=_student_args(teacher, run, "--data.init_args.pool.init_args.size=3000",
                                      "--data.init_args.balance=confidence",
                                      f"--data.init_args.selection={select}/selection.pt"))
    dm = cli.datamodule
    pool, _ = NoisePool("uniform", 3000).load(dm.task, seed=0)
    with torch.no_grad():
        counts = torch.bincount(cli.model.teacher(dm.train_x.float() / 255).argmax(-1), minlength=10)
        available = torch.bincount(cli.model.teacher(pool.float() / 255).argmax(-1), minlength=10)
    assert counts.max() == 5 and torch.equal(counts, available.clamp(max=5))  # equal, where the pool has enough
    m = json.loads((select / "metrics.json").read_text())
    assert m["data/transfer_max_per_class"] == 5 and m["data/pool_size"] == 3000
    assert m["data/transfer_size"] == dm.train_x.shape[0] == available.clamp(max=5).sum()
    assert "test/acc" in json.loads((run / "metrics.json").read_text())
    unbal = CvlabCLI(args=_student_args(teacher, tmp_path / "unbal", "--data.init_args.pool.init_args.size=200"))
    assert unbal.datamodule.train_x.shape[0] == 200  # the control keeps the pool as it is


def test_kd_with_real_data_and_hard_labels(tmp_path: Path) -> None:
    teacher = save_teacher(tmp_path / "t.ckpt")
    run = tmp_path / "real"
    CvlabCLI(args=["fit", "--config", "experiments/zskd/shapes/student_real.yaml", f"--run.dir={run}",
                   "--run.logger=csv",
                   f"--model.init_args.teacher={teacher}", "--model.init_args.hard_label_weight=0.5",
                   "--data.init_args.num_train=200", "--data.init_args.num_test=50", "--data.init_args.batch_size=50",
                   "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"])
    m = json.loads((run / "metrics.json").read_text())
    assert m["train/ce"] > 0 and 0 <= m["test/acc"] <= 1


def _pipeline_students(path: str) -> tuple[dict, list[dict]]:
    """A transfer-set pipeline's spec and its student stages, after checking that every student trains the configs'
    15,700 steps whatever its set's size and validates every 157 steps (a balanced set of 2,000 images would
    otherwise validate every 16 steps)."""
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / path).read_text())
    students = [s for s in spec["stages"] if s["name"].endswith("balanced")]
    assert {(s["args"]["trainer.max_steps"], s["args"]["trainer.max_epochs"], s["args"]["trainer.val_check_interval"],
             s["args"]["trainer.check_val_every_n_epoch"]) for s in students} == {(15700, -1, 157, None)}
    return spec, students


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_pipeline_trains_both_arms_equal_steps_and_records_each_pools_difference(dataset: str) -> None:
    """Every pool's balanced and unbalanced students train the same number of steps, whatever the balanced set's
    size; the record of ``--seeds 3`` holds balanced minus unbalanced per seed and the selection's size, and splits
    into one row per pool (``stage_records(prefix=True)``) whose command runs that pool with its teacher."""
    from cvlab.records import record_from_seeds, stage_records

    path = f"experiments/transfer_sets/{dataset}/pipeline.yaml"
    spec, students = _pipeline_students(path)
    pools = sorted({s["name"].rsplit("_", 1)[0] for s in students})
    assert len(students) == 2 * len(pools) == 8
    per_seed = {
        seed: {"teacher": {"test/acc": 0.99},
               **{f"{p}_unbalanced": {"test/acc": 0.5 + 0.01 * seed} for p in pools},
               **{f"{p}_balanced": {"test/acc": 0.6 + 0.02 * seed} for p in pools},
               **{f"{p}_select": {"data/transfer_size": 20000.0 - seed, "data/pool_classes_predicted": 10.0}
                  for p in pools}}
        for seed in range(3)}
    rec = record_from_seeds(spec, per_seed, f"cvlab run {path} --seeds 3")
    assert rec.section == "03-transfer-sets"
    for p in pools:
        assert rec.values[f"{p}:balanced-unbalanced"] == pytest.approx([0.1, 0.11, 0.12])
        assert rec.values[f"{p}_select:data/transfer_size"] == [20000.0, 19999.0, 19998.0]
    rows = stage_records(rec, {"natural": "natural pool"}, [], prefix=True, needs=("teacher",))
    assert set(rows[0].values) == {"unbalanced:test/acc", "balanced:test/acc", "balanced-unbalanced",
                                   "select:data/transfer_size", "select:data/pool_classes_predicted"}
    only = rows[0].command.split(" --only ")[1].split()
    assert only[0] == "teacher" and sorted(only[1:]) == ["natural_balanced", "natural_select", "natural_unbalanced"]


def test_grey_cifar10_pool_pipeline_trains_equal_steps_and_records_each_teachers_difference() -> None:
    """The grey CIFAR-10 pool pipeline: each teacher's balanced and unbalanced students train the same steps and
    validate by steps; its record holds balanced minus unbalanced per teacher and splits into one row per teacher
    whose command runs that teacher's four stages."""
    from cvlab.records import record_from_seeds, stage_records

    path = "experiments/transfer_sets/cifar10/pipeline_grey_pool.yaml"
    spec, students = _pipeline_students(path)
    assert len(students) == 4
    per_seed = {
        seed: {**{f"{t}_teacher": {"test/acc": 0.9} for t in ("mnist", "fashion")},
               **{f"{t}_unbalanced": {"test/acc": 0.5 + 0.01 * seed} for t in ("mnist", "fashion")},
               "mnist_balanced": {"test/acc": 0.7}, "fashion_balanced": {"test/acc": 0.4},
               **{f"{t}_select": {"data/transfer_size": 15000.0, "data/pool_classes_predicted": 9.0}
                  for t in ("mnist", "fashion")}}
        for seed in range(2)}
    rec = record_from_seeds(spec, per_seed, f"cvlab run {path} --seeds 2")
    assert rec.section == "03-transfer-sets"
    assert rec.values["mnist:balanced-unbalanced"] == pytest.approx([0.2, 0.19])
    assert rec.values["fashion:balanced-unbalanced"] == pytest.approx([-0.1, -0.11])
    rows = stage_records(rec, {"mnist": "MNIST teacher", "fashion": "Fashion-MNIST teacher"}, [], prefix=True)
    assert rows[1].values["balanced-unbalanced"] == pytest.approx([-0.1, -0.11])
    assert rows[1].values["teacher:test/acc"] == [0.9, 0.9]
    assert sorted(rows[0].command.split(" --only ")[1].split()) == [
        "mnist_balanced", "mnist_select", "mnist_teacher", "mnist_unbalanced"]
