"""Transfer sets for data-free knowledge distillation.

* :class:`ImpressionTargets`: the indices of the Data Impressions still to synthesize (predict stage).
* Pools of transfer images: :class:`ImpressionPool` (synthesized shards, ZSKD, Nayak et al. ICML 2019),
  :class:`NoisePool` (uniform / Gaussian noise), :class:`DataModulePool` (any cvlab datamodule: the
  embedded shapes as a synthetic pool, another dataset as a natural pool, or the task's own data).
* :class:`TransferSetDataModule`: a pool for training, the teacher's task for evaluation (validation
  on its held-out training images, test on its test split), and optional target-class balancing (Nayak, Mopuri,
  Chakraborty, "Effectiveness of arbitrary transfer sets for data-free knowledge distillation", WACV 2021,
  arXiv 2011.09113): the selection stage
  (:class:`lit_modules.distillation.ArbitraryTransferSetSelection`, ``cvlab predict`` over this datamodule's
  pool) writes ``selection.pt``, and ``balance: confidence`` with ``selection: <that file>`` trains on the
  examples it kept; ``balance: none`` is the unbalanced control. The datamodule never runs a network.

Pools yield pixel-space images (uint8, or float for impressions) and labels, ``-1`` where a pool has
none; the datamodule normalises them with the task's statistics, as the teacher saw its data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from cvlab.artifacts import UNREADABLE_TORCH_FILE, load_shards, pending_indices, shard_folder
from cvlab.errors import CvlabError
from cvlab.image_ops import denormalize, resize
from cvlab.task import TaskSpec, task_spec
from datamodules.base import TensorImageDataModule


class TransferSetError(CvlabError):
    """A transfer set does not fit the teacher's task."""


#: the selection stage's artifact in its run folder
SELECTION_FILE = "selection.pt"
#: the ``kind`` entry that marks a file as a transfer-set selection
SELECTION_KIND = "cvlab.transfer_set_selection/1"


def pool_fingerprint(x: Tensor, y: Tensor) -> str:
    """A short SHA-256 of a pool's images ``(N, C, H, W)`` and labels ``(N,)``: same pool, same fingerprint."""
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return h.hexdigest()[:16]


def selection_record(index: Tensor, pred: Tensor, conf: Tensor, pool_size: int, fingerprint: str,
                     num_classes: int, per_class: int) -> dict[str, object]:
    """What ``selection.pt`` holds: the kept pool ``index (M,)`` (ascending), the teacher-predicted class
    ``pred (M,)`` and confidence ``conf (M,)`` of each, and the pool it was chosen from."""
    return {"kind": SELECTION_KIND, "index": index.long(), "pred": pred.long(), "conf": conf.float(),
            "pool_size": int(pool_size), "pool_fingerprint": fingerprint, "num_classes": int(num_classes),
            "per_class": int(per_class)}


def read_selection(path: str | Path, pool_size: int, fingerprint: str) -> Tensor:
    """The ascending pool indices of a selection file, checked against the pool ``(pool_size, fingerprint)``
    it is applied to; one line when the file is missing, unreadable or was chosen from another pool."""
    path = Path(path)
    if not path.is_file():
        raise TransferSetError(f"selection file not found: {path}; run the selection stage "
                               "(cvlab predict with lit_modules.distillation.ArbitraryTransferSetSelection) first")
    try:
        r = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_TORCH_FILE as e:
        raise TransferSetError(f"selection file {path} is truncated or not a torch file ({type(e).__name__}); "
                               "delete it and run the selection stage again") from None
    if not isinstance(r, dict) or r.get("kind") != SELECTION_KIND:
        raise TransferSetError(f"{path} is not a transfer-set selection (no kind {SELECTION_KIND!r}); "
                               "give the selection.pt of an ArbitraryTransferSetSelection run")
    if r["pool_size"] != pool_size or r["pool_fingerprint"] != fingerprint:
        raise TransferSetError(
            f"selection {path} was chosen from another pool ({r['pool_size']} images, fingerprint "
            f"{r['pool_fingerprint']}) than this one ({pool_size}, {fingerprint}); run the selection stage with "
            "this datamodule's pool and seed"
        )
    index = r["index"]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= pool_size):
        raise TransferSetError(f"selection {path} has indices outside its pool of {pool_size}; it is corrupt")
    return index


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
        balance: ``confidence`` trains on the target-class balanced examples of ``selection`` (WACV 2021);
            ``none`` on the pool as it is (the unbalanced control).
        selection: with ``balance: confidence``, the ``selection.pt`` that the selection stage
            (:class:`lit_modules.distillation.ArbitraryTransferSetSelection`) wrote for this same pool and seed.
        batch_size, eval_batch_size, num_workers, seed: as in :class:`TensorImageDataModule`.

    ``predict`` yields the whole pool in order as ``(images, pool indices)``: what the selection stage reads.
    """

    def __init__(
        self,
        task: TensorImageDataModule,
        pool: TransferPool,
        balance: Literal["none", "confidence"] = "none",
        selection: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(data_dir=str(task.data_dir), batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, augment="none", image_size=task.image_size, seed=seed)
        if balance == "confidence" and not selection:
            raise TransferSetError("balance: confidence trains on a selection: set --data.init_args.selection to the "
                                   "selection.pt of the selection stage (ArbitraryTransferSetSelection)")
        if balance == "none" and selection:
            raise TransferSetError(f"selection {selection} is given but balance is none; set balance: confidence to "
                                   "train on it, or drop the selection for the unbalanced control")
        self.task, self.pool, self.balance, self.selection = task, pool, balance, selection
        self.num_classes, self.in_channels = task.num_classes, task.in_channels
        self.mean, self.std = task.mean, task.std
        self._pool_fingerprint: tuple[int, str] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        self.task.setup(stage)
        self.test_x, self.test_y = self.task.test_x, self.task.test_y
        self.val_x, self.val_y = self.task.val_x, self.task.val_y  # the test split only under val_size 0
        x, y = self.pool.load(self.task, self.seed)
        if self.selection:
            keep = read_selection(self.selection, *self._fingerprint(x, y))  # (M,) ascending pool indices
            x, y = x[keep], y[keep]
        self.train_x, self.train_y = x, y

    def _fingerprint(self, x: Tensor, y: Tensor) -> tuple[int, str]:
        self._pool_fingerprint = (x.shape[0], pool_fingerprint(x, y))
        return self._pool_fingerprint

    def pool_fingerprint(self) -> tuple[int, str]:
        """``(size, fingerprint)`` of the whole pool (before any selection), as stored in a selection file."""
        self.setup("predict")
        if self._pool_fingerprint is None:
            self._fingerprint(self.train_x, self.train_y)
        return self._pool_fingerprint

    def predict_dataloader(self) -> DataLoader:
        """The whole pool in order, as ``(uint8 images, pool indices)`` batches of ``eval_batch_size``."""
        if self.selection:
            raise TransferSetError("the selection stage predicts over the whole pool: drop data.init_args.selection "
                                   "(and balance) from its config")
        self.setup("predict")
        return self._loader(self.train_x, torch.arange(self.train_x.shape[0]), train=False)


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
