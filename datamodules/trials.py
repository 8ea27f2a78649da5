"""Independent trials over a real dataset, for predict-style attacks (gradient leakage).

Trial ``i`` takes ``images_per_trial`` examples chosen by ``i`` alone (a seeded permutation of the split),
so a trial's inputs do not depend on the number of devices or on which trials were already done.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cvlab.artifacts import pending_indices, shard_folder
from cvlab.task import TaskSpec
from datamodules.base import TensorImageDataModule


class TrialDataset(Dataset):
    """``i -> (trial index, uint8 images (B, C, H, W), labels (B,))`` for the trial indices given."""

    def __init__(self, trials: Tensor, images: Tensor, labels: Tensor, images_per_trial: int, seed: int) -> None:
        self.trials = trials
        self.images, self.labels = images, labels
        self.B = images_per_trial
        self.order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.trials.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        t = self.trials[i]
        pick = self.order[(t * self.B + torch.arange(self.B)) % self.order.shape[0]]
        return t, self.images[pick], self.labels[pick]


class TrialsDataModule(L.LightningDataModule):
    """``num_trials`` trials drawn from ``source`` (any cvlab image datamodule), ``trials_per_batch`` per step.

    Trials already stored by the run's shard writer (a callback with ``resolve_folder``, e.g.
    :class:`cvlab.artifacts.ShardWriter`) are skipped, so a killed run resumes where it stopped.

    Args:
        source: the dataset, e.g. ``{class_path: datamodules.MNISTDataModule}``.
        num_trials: independent trials (1000 in iDLG).
        trials_per_batch: trials optimised together in one vectorised step, per device.
        images_per_trial: the victim's batch size (1 in the papers).
        split: which split the private examples come from.
        seed: seeds the choice of examples.
    """

    def __init__(
        self,
        source: TensorImageDataModule,
        num_trials: int = 1000,
        trials_per_batch: int = 100,
        images_per_trial: int = 1,
        split: Literal["train", "test"] = "train",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["source"])
        self.source = source
        self.num_trials = num_trials
        self.trials_per_batch = trials_per_batch
        self.images_per_trial = images_per_trial
        self.split = split
        self.seed = seed

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def task_spec(self) -> TaskSpec:
        """The source dataset's spec: the victims' images and labels are its."""
        return self.source.task_spec

    def setup(self, stage: str | None = None) -> None:
        self.source.setup(stage)

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        trials = pending_indices(shard_folder(self.trainer), self.num_trials)
        train = self.split == "train"
        x = self.source.train_x if train else self.source.test_x
        y = self.source.train_y if train else self.source.test_y
        ds = TrialDataset(trials, x, y, self.images_per_trial, self.seed)
        return DataLoader(ds, batch_size=self.trials_per_batch, shuffle=False)
