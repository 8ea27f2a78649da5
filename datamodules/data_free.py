"""The data side of data-free training: a fixed number of steps per epoch, the task's real data for evaluation.

Methods that make their own training inputs (a generator in adversarial data-free KD, LRA) have no
training set. :class:`DataFreeDataModule` gives Lightning's loop ``steps_per_epoch`` training "batches"
per epoch (each is just the step's index in the epoch: the module generates the data), and the
teacher's task (any cvlab image datamodule) supplies the validation split (held out of its training
images: the method never trains on them), the test split, the image shape and the normalisation.
"""

from __future__ import annotations

from collections.abc import Iterator

from datamodules.base import TensorImageDataModule
from datamodules.data_root import resolve_data_dir


class StepTicks:
    """``0, 1, ..., n - 1``: one tick per training step. Not a DataLoader, so under DDP every rank sees
    all ``n`` ticks (an epoch is ``n`` steps whatever the number of devices)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


class DataFreeDataModule(TensorImageDataModule):
    """``steps_per_epoch`` generated-data steps per epoch; validation on ``task``'s validation split (its
    held-out training images; its test split only under ``val_size: 0``), test on its test split.

    Args:
        task: the teacher's datamodule, e.g. ``{class_path: datamodules.MNISTDataModule, init_args:
            {image_size: 32}}``; its validation and test splits, image shape, classes and normalisation
            are used.
        steps_per_epoch: training steps per epoch (LRA: generator steps; its public code runs
            ``36 * (1024 // batch)`` = 72 per epoch at batch 512).
        data_dir: overrides ``task``'s data root when given (so ``--data.init_args.data_dir`` works).
        eval_batch_size: batch size of the test-set evaluation.
    """

    def __init__(
        self,
        task: TensorImageDataModule,
        steps_per_epoch: int = 72,
        data_dir: str | None = None,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if data_dir is not None:
            task.data_dir = resolve_data_dir(data_dir)
        super().__init__(data_dir=str(task.data_dir), batch_size=eval_batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, augment="none", image_size=task.image_size, seed=task.seed)
        self.task = task
        self.steps_per_epoch = steps_per_epoch
        self.num_classes, self.in_channels = task.num_classes, task.in_channels
        self.mean, self.std = task.mean, task.std

    def prepare_data(self) -> None:
        self.task.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.test_x is not None:
            return
        self.task.setup(stage)
        self.test_x, self.test_y = self.task.test_x, self.task.test_y
        self.val_x, self.val_y = self.task.val_x, self.task.val_y

    def train_dataloader(self) -> StepTicks:
        return StepTicks(self.steps_per_epoch)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, int):  # a training tick: nothing to transform
            return batch
        return super().on_after_batch_transfer(batch, dataloader_idx)
