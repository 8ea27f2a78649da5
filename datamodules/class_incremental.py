"""Class-incremental splits of a task: step ``t`` trains on its new classes only and is evaluated on every class seen.

Split MNIST / split Fashion-MNIST: the ten classes in 2 steps of 5 or 5 steps of 2 (:func:`even_splits`), or any
partition given explicitly (:func:`check_splits`: a class repeated or dropped is a one-line error). The validation
split (held out of the training images by the task) and the test split keep the classes seen up to this step.
``real_replay`` adds that many real training images of the old classes (seeded, spread over them) to the
training set: the replay-of-real-old-data upper bound of the continual-learning experiments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cvlab.errors import CvlabError
from datamodules.base import TensorImageDataModule


class SplitError(CvlabError):
    """The class-incremental steps do not partition the task's classes."""


def check_splits(splits: list[list[int]], num_classes: int) -> None:
    """One-line error unless ``splits`` (one list of class ids per step) partitions ``0 .. num_classes - 1``."""
    flat = [c for s in splits for c in s]
    if not splits or any(not s for s in splits):
        raise SplitError(f"every class-incremental step needs at least one class, got splits {splits}")
    out = sorted({c for c in flat if not 0 <= c < num_classes})
    if out:
        raise SplitError(f"splits name classes {out} outside 0..{num_classes - 1} of the task")
    repeated = sorted({c for c in flat if flat.count(c) > 1})
    if repeated:
        raise SplitError(f"splits repeat classes {repeated}; each class must be learned in exactly one step")
    dropped = sorted(set(range(num_classes)) - set(flat))
    if dropped:
        raise SplitError(f"splits drop classes {dropped}; every one of the {num_classes} classes must be in one step")


def even_splits(num_classes: int, steps: int) -> list[list[int]]:
    """``num_classes`` classes in ``steps`` consecutive groups of equal size (10, 5 -> [[0, 1], ..., [8, 9]])."""
    if steps < 1 or num_classes % steps:
        raise SplitError(f"{num_classes} classes do not split into {steps} equal steps; give the splits explicitly")
    size = num_classes // steps
    return [list(range(i * size, (i + 1) * size)) for i in range(steps)]


def _keep(y: Tensor, classes: list[int]) -> Tensor:
    return torch.isin(y, torch.tensor(classes, dtype=y.dtype)).nonzero().squeeze(1)  # set-up only


class ClassIncrementalDataModule(TensorImageDataModule):
    """One step of a class-incremental sequence over ``task``.

    Args:
        task: the full task's datamodule (its images, validation split, statistics).
        step: which step (0-based).
        steps: equal consecutive splits (used when ``splits`` is not given).
        splits: the classes of each step, explicitly (must partition the task's classes).
        real_replay: real training images of the old classes added to this step's training set (0: none).
        batch_size, eval_batch_size, num_workers, seed: as in :class:`TensorImageDataModule`.
    """

    def __init__(
        self,
        task: TensorImageDataModule,
        step: int = 0,
        steps: int = 2,
        splits: list[list[int]] | None = None,
        real_replay: int = 0,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(data_dir=str(task.data_dir), batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, augment="none", image_size=task.image_size, seed=seed)
        self.splits = splits if splits is not None else even_splits(task.num_classes, steps)
        check_splits(self.splits, task.num_classes)
        if not 0 <= step < len(self.splits):
            raise SplitError(f"step {step} is outside the {len(self.splits)} steps of splits {self.splits}")
        if real_replay < 0:
            raise SplitError(f"real_replay must be >= 0 images, got {real_replay}")
        self.task, self.step, self.real_replay = task, step, real_replay
        self.num_classes, self.in_channels = task.num_classes, task.in_channels
        self.mean, self.std = task.mean, task.std

    @property
    def new_classes(self) -> list[int]:
        return list(self.splits[self.step])

    @property
    def old_classes(self) -> list[int]:
        return sorted(c for s in self.splits[: self.step] for c in s)

    @property
    def seen_classes(self) -> list[int]:
        return sorted(self.old_classes + self.new_classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        t = self.task
        t.setup(stage)
        new = _keep(t.train_y, self.new_classes)
        if self.real_replay and self.old_classes:
            old = _keep(t.train_y, self.old_classes)
            g = torch.Generator().manual_seed(self.seed + 7919 * self.step)
            new = torch.cat([new, old[torch.randperm(old.numel(), generator=g)[: self.real_replay]]])
        self.train_x, self.train_y = t.train_x[new], t.train_y[new]
        for split in ("val", "test"):
            x, y = getattr(t, f"{split}_x"), getattr(t, f"{split}_y")
            keep = _keep(y, self.seen_classes)
            setattr(self, f"{split}_x", x[keep])
            setattr(self, f"{split}_y", y[keep])
