"""Supervised classifier training: teachers, baselines and evaluation networks for every method."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from cvlab.errors import CvlabError
from cvlab.task import TaskSpec, check_task, task_of
from lit_modules.nets import InputNormalization, NetSpec, create_net
from lit_modules.optim import OptimizerName, ScheduleName, build_optimizer, build_schedule

ClassLoss = Literal["ce", "focal"]


def focal_loss(logits: Tensor, targets: Tensor, gamma: float = 1.0, weight: Tensor | None = None,
               label_smoothing: float = 0.0) -> Tensor:
    """Focal loss (Lin et al., ICCV 2017, https://arxiv.org/abs/1708.02002) as the LDAM-DRW code computes it
    (Cao et al., NeurIPS 2019, https://arxiv.org/abs/1906.07413; the CBGAN classifier's recipe): with
    ``l_i = CE(logits_i, y_i)`` (class-weighted by ``weight`` when given), ``mean_i (1 - exp(-l_i))^gamma l_i``.
    ``gamma = 0`` is (weighted) cross-entropy.

    ``focal_loss(tensor([[0., 0.]]), tensor([0]), gamma=1)`` is ``0.5 * log 2``.
    """
    ce = F.cross_entropy(logits, targets, weight=weight, reduction="none", label_smoothing=label_smoothing)  # (B,)
    return ((1 - torch.exp(-ce)) ** gamma * ce).mean()


def class_balanced_weights(counts: Tensor, beta: float = 0.9999) -> Tensor:
    """Per-class weights of the "effective number of samples" (Cui et al., CVPR 2019): ``(1 - beta) /
    (1 - beta^n_k)``, normalised to sum to K. DRW switches to them late in training (LDAM-DRW).

    ``class_balanced_weights(tensor([1., 1.]))`` is ``[1, 1]``; a class with fewer samples gets more weight.
    """
    counts = counts.double().clamp_min(1)
    w = (1 - beta) / (1 - torch.pow(torch.as_tensor(beta, dtype=torch.float64), counts))
    return (w / w.sum() * counts.numel()).float()


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
        loss: ``ce`` (cross-entropy) or ``focal`` (:func:`focal_loss`, for long-tailed data).
        focal_gamma: the focal loss's gamma (1 in LDAM-DRW's code).
        drw_epoch: deferred re-weighting (DRW, Cao et al. 2019): from this epoch on, the loss weights each
            class by :func:`class_balanced_weights` of the training set's class counts (160 of 200 epochs in
            LDAM-DRW); ``None``: never.
        drw_beta: beta of the class-balanced weights (0.9999).
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
        loss: ClassLoss = "ce",
        focal_gamma: float = 1.0,
        drw_epoch: int | None = None,
        drw_beta: float = 0.9999,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = create_net(
            arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **(arch_kwargs or {})
        )
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if loss not in ("ce", "focal"):
            raise CvlabError(f"loss must be ce or focal; got {loss!r}")
        self.normalize = InputNormalization(mean, std)
        # training examples per class, for DRW (read from the datamodule at setup; not in the checkpoint)
        self.register_buffer("class_counts", torch.ones(num_classes), persistent=False)
        metric = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.train_acc = metric.clone()
        self.val_acc = metric.clone()
        self.test_acc = metric.clone()

    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(self.normalize(x))

    def setup(self, stage: str) -> None:
        task = task_of(self._trainer)
        if task is None:
            return
        hp = self.hparams
        check_task("the classifier", task, num_classes=hp.num_classes, in_channels=hp.in_channels,
                   image_size=hp.image_size)
        adopt_data_normalization(self, task)
        if hp.get("drw_epoch") is not None:
            if not task.train_class_counts:
                self.trainer.datamodule.setup("fit")  # the counts are known once the data are loaded
                task = task_of(self._trainer)
            if not task.train_class_counts:
                raise CvlabError(f"DRW needs the training images per class of {task.name}; set drw_epoch null")
            self.class_counts = torch.tensor(task.train_class_counts, dtype=torch.float32,
                                             device=self.class_counts.device)

    def class_weights(self) -> Tensor | None:
        """The loss's per-class weights now: DRW's class-balanced weights from ``drw_epoch`` on, else none."""
        hp = self.hparams
        if hp.get("drw_epoch") is None or self.current_epoch < hp.drw_epoch:
            return None
        return class_balanced_weights(self.class_counts, hp.drw_beta).to(self.class_counts.device)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        hp = self.hparams
        if hp.get("loss", "ce") == "focal":
            loss = focal_loss(logits, y, hp.focal_gamma, self.class_weights(), hp.label_smoothing)
        else:
            loss = F.cross_entropy(logits, y, weight=self.class_weights(), label_smoothing=hp.label_smoothing)
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


def adopt_data_normalization(module: L.LightningModule, task: TaskSpec) -> None:
    """A network trained here normalises with the task's statistics unless its config names its own:
    take the task's ``mean``/``std`` into the module's hyper-parameters (so the checkpoint carries
    the input contract) and its :class:`InputNormalization`."""
    hp = module.hparams
    if hp.get("mean") is None and task.mean is not None:
        hp["mean"], hp["std"] = list(task.mean), list(task.std)
        module.normalize = InputNormalization(hp["mean"], hp["std"]).to(module.device)
