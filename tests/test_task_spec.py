"""The data contract (cvlab.task): every datamodule publishes a TaskSpec; systems check it in one line."""

from __future__ import annotations

import pytest
import torch

from cvlab.errors import CvlabError
from cvlab.task import TaskMismatchError, TaskSpec, check_task, task_of, task_spec
from datamodules import ShapesDataModule
from datamodules.context_variants import ShapesContextDataModule
from datamodules.transfer_sets import ImpressionTargets, NoisePool
from datamodules.trials import TrialsDataModule


def _shapes(**kw) -> ShapesDataModule:
    return ShapesDataModule(num_train=200, num_test=50, batch_size=20, **kw)


def test_an_image_datamodule_publishes_its_task_and_counts_once_set_up() -> None:
    dm = _shapes()
    spec = task_spec(dm)
    assert (spec.num_classes, spec.in_channels, spec.image_size) == (10, 3, 32)
    assert spec.mean == tuple(dm.mean) and spec.input_shape == (3, 32, 32) and spec.name == "ShapesDataModule"
    assert spec.train_class_counts == ()  # not loaded yet
    dm.setup("fit")
    counts = task_spec(dm).train_class_counts
    assert list(counts) == torch.bincount(dm.train_y, minlength=10).tolist() and sum(counts) == dm.train_y.numel()


def test_wrapping_datamodules_publish_the_task_they_wrap() -> None:
    task = _shapes(image_size=28)
    assert task_spec(ImpressionTargets(task, num_impressions=10)) == task_spec(task)
    assert task_spec(TrialsDataModule(task, num_trials=4)) == task_spec(task)
    ctx = task_spec(ShapesContextDataModule(num_images=20, image_size=32))
    assert (ctx.num_classes, ctx.in_channels, ctx.image_size) == (10, 3, 32)


def test_check_task_names_the_key_both_values_and_the_fix() -> None:
    spec = TaskSpec(num_classes=10, in_channels=1, image_size=32, mean=(0.1307,), std=(0.3081,), name="MNIST")
    assert check_task("the student", spec, num_classes=10, in_channels=1, image_size=None) is spec
    with pytest.raises(TaskMismatchError) as e:
        check_task("the student", spec, num_classes=10, in_channels=3)
    msg = str(e.value)
    assert msg == ("the student and the data disagree on in_channels: 3 vs 1 (MNIST); "
                   "set --model.init_args.in_channels to 1") and "\n" not in msg


def test_a_bad_spec_or_a_datamodule_without_one_is_one_line() -> None:
    with pytest.raises(CvlabError, match="mean has 3 values for 1 channels"):
        TaskSpec(num_classes=10, in_channels=1, image_size=28, mean=(0.5, 0.5, 0.5), std=(0.5,))
    with pytest.raises(CvlabError, match="2 class names for 3 classes"):
        TaskSpec(num_classes=3, in_channels=1, image_size=28, class_names=("a", "b"))

    class Bare:  # a datamodule that publishes nothing
        num_classes = 10

    with pytest.raises(CvlabError, match="Bare publishes no task spec"):
        task_spec(Bare())
    assert task_of(None) is None


def test_a_noise_pool_draws_from_the_task_spec_alone() -> None:
    spec = task_spec(_shapes(image_size=16))
    x, y = NoisePool("gaussian", 8).load(spec, seed=0)
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.uint8 and (y == -1).all()
