"""Target domains made offline from a task: the same images under a fixed pixel-space shift.

``invert``: ``x -> 1 - x`` (MNIST -> inverted MNIST: white digits on black become black on white), the offline
domain pair of the source-free adaptation experiments (Data Impressions, TPAMI 2022). The training split is the
unlabelled target data of an adaptation method (labels are kept only so that evaluation can use them); validation
and test are the task's held-out and test images, shifted the same way.
"""

from __future__ import annotations

from typing import Literal

from datamodules.base import TensorImageDataModule


class DomainShiftDataModule(TensorImageDataModule):
    """``task``'s splits under ``shift``; image shape, classes and statistics stay the task's.

    Args:
        task: the source task's datamodule (its splits, validation split included).
        shift: ``invert`` (``1 - x`` on [0, 1] pixels, ``255 - x`` on the stored uint8).
        batch_size, eval_batch_size, num_workers, seed: as in :class:`TensorImageDataModule`.
    """

    def __init__(self, task: TensorImageDataModule, shift: Literal["invert"] = "invert", batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(data_dir=str(task.data_dir), batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, augment="none", image_size=task.image_size, seed=seed)
        self.task, self.shift = task, shift
        self.num_classes, self.in_channels = task.num_classes, task.in_channels
        self.mean, self.std = task.mean, task.std

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        t = self.task
        t.setup(stage)
        for split in ("train", "val", "test"):
            x = getattr(t, f"{split}_x")
            setattr(self, f"{split}_x", 255 - x if x.dtype.is_floating_point is False else 1 - x)
            setattr(self, f"{split}_y", getattr(t, f"{split}_y"))
