"""Transfer sets for data-free knowledge distillation.

* :class:`ImpressionTargets`: the indices of the Data Impressions still to synthesize (predict stage).
* Pools of transfer images: :class:`ImpressionPool` (synthesized shards, ZSKD, Nayak et al. ICML 2019),
  :class:`NoisePool` (uniform / Gaussian noise), :class:`DataModulePool` (any cvlab datamodule: the
  embedded shapes as a synthetic pool, another dataset as a natural pool, or the task's own data).
* :class:`TransferSetDataModule`: a pool for training, the teacher's task for evaluation (validation
  on its held-out training images, test on its test split), and optional target-class balancing (Nayak, Mopuri,
  Chakraborty, "Effectiveness of arbitrary transfer sets for data-free knowledge distillation", WACV 2021,
  arXiv 2011.09113): the
  pool goes through the teacher and an equal number of its most confident examples is kept per
  teacher-predicted class; ``balance: none`` is the unbalanced control.

Pools yield pixel-space images (uint8, or float for impressions) and labels, ``-1`` where a pool has
none; the datamodule normalises them with the task's statistics, as the teacher saw its data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from cvlab.artifacts import load_shards, pending_indices, shard_folder
from cvlab.errors import CvlabError
from cvlab.image_ops import denormalize, resize, to_float
from cvlab.task import TaskSpec, task_spec
from datamodules.base import TensorImageDataModule


class TransferSetError(CvlabError):
    """A transfer set does not fit the teacher's task."""


def balance_by_confidence(pred: Tensor, conf: Tensor, num_classes: int, per_class: int) -> Tensor:
    """Indices keeping the ``per_class`` most confident examples of each predicted class (fewer where a
    class has fewer), sorted. ``pred, conf: (N,)``; no loop over classes."""
    by_conf = conf.argsort(descending=True, stable=True)  # (N,)
    order = by_conf[pred[by_conf].argsort(stable=True)]  # grouped by class, most confident first
    counts = torch.bincount(pred, minlength=num_classes)  # (K,)
    first = counts.cumsum(0) - counts  # start of each class's group
    rank = torch.arange(pred.numel(), device=pred.device) - first[pred[order]]  # rank within class
    return order[rank < per_class].sort().values


def as_task_spec(task: TaskSpec | TensorImageDataModule) -> TaskSpec:
    """A task's spec, given the spec or a datamodule that publishes one."""
    return task if isinstance(task, TaskSpec) else task_spec(task)


def match_channels(x: Tensor, channels: int) -> Tensor:
    """``(N, C, H, W)`` -> ``(N, channels, H, W)``: grey by channel mean, colour by repeating grey."""
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 1:
        y = x.float().mean(1, keepdim=True)
        return y.round_().to(torch.uint8) if x.dtype == torch.uint8 else y
    if c == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    raise TransferSetError(f"cannot convert {c}-channel pool images to the task's {channels} channels")


class TransferPool:
    """A source of transfer images. :meth:`load` returns pixel-space images for a task (its
    :class:`cvlab.task.TaskSpec`, or a datamodule that publishes one) ``(N, C, H, W)`` (uint8 or float) and
    labels ``(N,)`` (``-1`` where unknown)."""

    def load(self, task: TaskSpec | TensorImageDataModule, seed: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class NoisePool(TransferPool):
    """Random noise: ``uniform`` pixels U(0, 1), or ``gaussian`` N(0, 1) in the task's normalised space
    (per-channel mean and std of its data), clamped to [0, 1]; stored as uint8."""

    def __init__(self, kind: Literal["uniform", "gaussian"] = "uniform", size: int = 60000) -> None:
        self.kind, self.size = kind, size

    def load(self, task: TaskSpec | TensorImageDataModule, seed: int) -> tuple[Tensor, Tensor]:
        task = as_task_spec(task)
        g = torch.Generator().manual_seed(seed)
        shape = (self.size, *task.input_shape)
        if self.kind == "uniform":
            x = torch.rand(shape, generator=g)
        else:
            x = denormalize(torch.randn(shape, generator=g), task.mean, task.std)
        x = (x.clamp_(0, 1) * 255).round_().to(torch.uint8)
        return x, torch.full((self.size,), -1, dtype=torch.long)


class DataModulePool(TransferPool):
    """The images of another cvlab datamodule, resized and channel-matched to the task.

    Args:
        source: e.g. ``datamodules.ShapesDataModule`` (synthetic) or ``datamodules.CIFAR10DataModule``
            (natural); the task's own datamodule with ``keep_labels`` is "KD with real data".
        split: which split of ``source`` to take.
        max_size: a seeded random subset of at most this many images.
        keep_labels: keep the source's labels (only meaningful when they are the task's classes).
    """

    def __init__(
        self, source: TensorImageDataModule, split: Literal["train", "test"] = "train",
        max_size: int | None = None, keep_labels: bool = False,
    ) -> None:
        self.source, self.split, self.max_size, self.keep_labels = source, split, max_size, keep_labels

    def load(self, task: TaskSpec | TensorImageDataModule, seed: int) -> tuple[Tensor, Tensor]:
        task = as_task_spec(task)
        self.source.setup("fit")
        x = self.source.train_x if self.split == "train" else self.source.test_x
        y = self.source.train_y if self.split == "train" else self.source.test_y
        if self.max_size is not None and self.max_size < x.shape[0]:
            keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[: self.max_size]
            x, y = x[keep], y[keep]
        x = resize(match_channels(x, task.in_channels), task.image_size)
        return x, (y.clone() if self.keep_labels else torch.full_like(y, -1))


class ImpressionPool(TransferPool):
    """Data Impressions from the shards of a synthesis run (``<run folder>/shards``), in pixel space."""

    def __init__(self, folder: str, max_size: int | None = None) -> None:
        self.folder, self.max_size = folder, max_size

    def load(self, task: TaskSpec | TensorImageDataModule, seed: int) -> tuple[Tensor, Tensor]:
        task = as_task_spec(task)
        if not Path(self.folder).is_dir():
            raise TransferSetError(f"impression folder not found: {self.folder} (run the synthesis stage first)")
        r = load_shards(self.folder)
        x, target = r["image"], r["target"]
        if target.shape[1] != task.num_classes:
            raise TransferSetError(
                f"impressions in {self.folder} are for {target.shape[1]} classes but the task "
                f"{task.name} has {task.num_classes}; synthesize them with this task's teacher"
            )
        if x.shape[1] != task.in_channels:
            raise TransferSetError(f"impressions in {self.folder} have {x.shape[1]} channels, the task {task.name} "
                                   f"has {task.in_channels}; synthesize them with a teacher of this task")
        x = resize(x, task.image_size)  # impressions at the teacher's size -> the student's
        if self.max_size is not None and self.max_size < x.shape[0]:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[: self.max_size]]
        return x, torch.full((x.shape[0],), -1, dtype=torch.long)


class TransferSetDataModule(TensorImageDataModule):
    """Train on a transfer pool; validate on the task's held-out training images, test on its test split.

    Args:
        task: the teacher's datamodule (its validation split, test split, image shape and normalisation
            are used; its ``val_size`` sets the validation split, 0 validates on its test split).
        pool: where the training images come from.
        balance: ``confidence`` keeps ``per_class`` most confident examples per teacher-predicted class
            (WACV 2021); ``none`` keeps the pool as it is (the unbalanced control).
        per_class: examples per class when balancing.
        batch_size, eval_batch_size, num_workers, seed: as in :class:`TensorImageDataModule`.
    """

    def __init__(
        self,
        task: TensorImageDataModule,
        pool: TransferPool,
        balance: Literal["none", "confidence"] = "none",
        per_class: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(data_dir=str(task.data_dir), batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, augment="none", image_size=task.image_size, seed=seed)
        if balance == "confidence" and not per_class:
            raise TransferSetError("balance: confidence needs per_class (examples kept per predicted class)")
        self.task, self.pool, self.balance, self.per_class = task, pool, balance, per_class
        self.num_classes, self.in_channels = task.num_classes, task.in_channels
        self.mean, self.std = task.mean, task.std
        self.selection_stats: dict[str, float] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        self.task.setup(stage)
        self.test_x, self.test_y = self.task.test_x, self.task.test_y
        self.val_x, self.val_y = self.task.val_x, self.task.val_y  # the test split only under val_size 0
        self.train_x, self.train_y = self.pool.load(self.task, self.seed)

    @torch.no_grad()
    def select_with_teacher(self, teacher: Callable[[Tensor], Tensor], device: torch.device) -> None:
        """Pass the pool through ``teacher`` and, when balancing, keep ``per_class`` per predicted class.
        Records the predicted-class histogram in :attr:`selection_stats` either way."""
        self.setup("fit")
        preds, confs = [], []
        for i in range(0, self.train_x.shape[0], self.eval_batch_size):
            x = to_float(self.train_x[i : i + self.eval_batch_size].to(device))  # pixels: the teacher normalises
            p = teacher(x).float().softmax(-1)  # (B, K)
            c, k = p.max(-1)
            preds.append(k.cpu())
            confs.append(c.cpu())
        pred, conf = torch.cat(preds), torch.cat(confs)
        before = torch.bincount(pred, minlength=self.num_classes)
        if self.balance == "confidence":
            keep = balance_by_confidence(pred, conf, self.num_classes, self.per_class)
            self.train_x, self.train_y, pred = self.train_x[keep], self.train_y[keep], pred[keep]
        after = torch.bincount(pred, minlength=self.num_classes)
        self.selection_stats = {
            "data/pool_size": float(before.sum()), "data/transfer_size": float(after.sum()),
            "data/pool_classes_predicted": float((before > 0).sum()),
            "data/transfer_min_per_class": float(after.min()), "data/transfer_max_per_class": float(after.max()),
        }


class ImpressionTargets(L.LightningDataModule):
    """Indices ``0 .. num_impressions - 1`` of the Data Impressions to synthesize, ``batch_size`` per step.

    Indices already stored by the run's shard writer are skipped, so a killed run resumes where it
    stopped. The task datamodule gives the image shape and normalisation (its data is not loaded).

    Args:
        task: the teacher's datamodule, e.g. ``datamodules.MNISTDataModule`` with ``image_size: 32``.
        num_impressions: impressions in all (ZSKD: 24,000 MNIST, 48,000 Fashion-MNIST, 40,000 CIFAR-10).
        batch_size: impressions optimised together per device (ZSKD: 100).
    """

    def __init__(self, task: TensorImageDataModule, num_impressions: int = 24000, batch_size: int = 100) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["task"])
        self.task, self.num_impressions, self.batch_size = task, num_impressions, batch_size

    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.task.input_shape

    @property
    def task_spec(self) -> TaskSpec:
        """The teacher's task's spec: impressions are of its classes, shape and normalisation."""
        return self.task.task_spec

    def fingerprint(self) -> dict[str, object]:
        return {"data.task": type(self.task).__name__, "data.input_shape": list(self.input_shape),
                "data.num_impressions": self.num_impressions}

    def predict_dataloader(self) -> DataLoader:
        todo = pending_indices(shard_folder(self.trainer), self.num_impressions)
        return DataLoader(todo, batch_size=self.batch_size, shuffle=False)
