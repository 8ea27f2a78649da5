"""Supervised classifier training: teachers, baselines and evaluation networks for every method."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from cvlab.errors import CvlabError
from lit_modules.nets import InputNormalization, NetSpec, create_net
from lit_modules.optim import OptimizerName, ScheduleName, build_optimizer, build_schedule


class ClassifierModule(L.LightningModule):
    """Train any network of the zoo on any cvlab datamodule with cross-entropy.

    The network is built from its zoo name or class path, and its input normalisation is part of the
    hyper-parameters, so a checkpoint alone is enough to rebuild it with its input contract
    (:func:`lit_modules.teacher.load_teacher`). Batches arrive as [0, 1] pixels; the module normalises
    them (pixels in, normalisation inside). Logs ``train/loss``, ``train/acc``, ``val/acc``, ``test/acc``
    (torchmetrics, synced across devices).

    Args:
        arch: a name from :func:`lit_modules.nets.available_nets`, or any ``nn.Module`` as
            ``{class_path: ..., init_args: {...}}``.
        num_classes: classes of the task (checked against the datamodule).
        in_channels: image channels (checked against the datamodule).
        image_size: input size the network is built for (checked against the datamodule).
        arch_kwargs: extra keyword arguments of the network builder.
        mean, std: the input normalisation of the network (per channel, on [0, 1] pixels); ``None``:
            the datamodule's statistics, recorded in the checkpoint at the start of training.
        optimizer: sgd, adam or adamw.
        lr, momentum, weight_decay: optimizer settings.
        lr_schedule: none, cosine or step (per optimisation step over the whole run).
        milestones: for ``step``, fractions of the run where the lr is multiplied by ``gamma``.
        label_smoothing: cross-entropy label smoothing.
        channels_last: channels-last memory format (faster convolutions on GPU).
    """

    def __init__(
        self,
        arch: NetSpec = "lenet5",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        arch_kwargs: dict[str, Any] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: ScheduleName = "cosine",
        milestones: list[float] | None = None,
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = create_net(
            arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **(arch_kwargs or {})
        )
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.normalize = InputNormalization(mean, std)
        metric = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.train_acc = metric.clone()
        self.val_acc = metric.clone()
        self.test_acc = metric.clone()

    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(self.normalize(x))

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            return
        expected = {
            "num_classes": self.hparams.num_classes,
            "in_channels": self.hparams.in_channels,
            "image_size": self.hparams.image_size,
        }
        found = {k: getattr(dm, k, v) for k, v in expected.items()}
        if found != expected:
            diff = ", ".join(f"{k}: model {expected[k]} vs data {found[k]}" for k in expected if found[k] != expected[k])
            raise CvlabError(
                f"model and data disagree ({diff}); set --model.<key> to match {type(dm).__name__}"
            )
        adopt_data_normalization(self, dm)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).softmax(-1)

    def configure_optimizers(self):
        hp = self.hparams
        opt = build_optimizer(self.net.parameters(), hp.optimizer, hp.lr, hp.momentum, hp.weight_decay)
        sched = build_schedule(opt, hp.lr_schedule, self.trainer.estimated_stepping_batches, hp.milestones, hp.gamma)
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def adopt_data_normalization(module: L.LightningModule, dm: Any) -> None:
    """A network trained here normalises with the task's statistics unless its config names its own:
    take the datamodule's ``mean``/``std`` into the module's hyper-parameters (so the checkpoint carries
    the input contract) and its :class:`InputNormalization`."""
    hp = module.hparams
    if hp.get("mean") is None and getattr(dm, "mean", None) is not None:
        hp["mean"], hp["std"] = [float(m) for m in dm.mean], [float(s) for s in dm.std]
        module.normalize = InputNormalization(hp["mean"], hp["std"]).to(module.device)
