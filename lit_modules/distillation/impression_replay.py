"""Class-incremental learning without old data: replay Data Impressions of the previous step's network.

"Data Impressions: Mining Deep Models to Extract Samples for Data-free Applications", Nayak, Mopuri, Jain,
Chakraborty, TPAMI 2022: a network that learns new classes forgets the old ones; with no old data kept, the
previous step's network is mined for Data Impressions of the old classes and distilled into the current one on
them while it learns the new classes from their data. One ``cvlab fit`` per step (``previous`` = the last step's
checkpoint; the pipelines chain the steps). Per step:

1. **mine** (``distill: impressions``): Dirichlet soft labels over the *old* classes from the similarity of the
   previous network's old-class weights, and impressions optimised to produce them under its old-class logits
   (:func:`lit_modules.distillation.data_impressions.dirichlet_targets`,
   :func:`lit_modules.distillation.zskd.synthesize`; the TF-port recipe by default, as in the ZSKD pipelines);
2. **learn and retain**: start from the previous weights; minimise cross-entropy on the new data over the classes
   seen so far, plus on a batch of impressions ``kd_weight * tau^2 KL`` between the previous and the current
   network's old-class outputs and ``replay_ce_weight *`` cross-entropy over the seen classes against the previous
   network's old class (without it the old classes lose every real image to the new ones: 0% old accuracy on split
   MNIST, 2 steps) (:func:`lit_modules.distillation.class_incremental.class_incremental_loss`).

The baselines are settings of the same module: ``distill: none`` is fine-tuning (the lower bound); ``distill: new``
distils on the new data itself (LwF, Li & Hoiem, ECCV 2016); ``distill: none`` with the datamodule's
``real_replay`` adds real old images to the cross-entropy (the upper bound). Validation and test report the
accuracy over the classes seen so far (prediction restricted to them), on the old and the new classes apart:
``{val,test}/acc``, ``/old_acc``, ``/new_acc``.

Under DDP the replay batch is drawn from a generator seeded by the step count, the same on every rank: with the
gradient averaged, 2 processes on half batches of new data take the single process's step.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from cvlab.artifacts import merge_metrics
from cvlab.errors import CvlabError
from cvlab.image_log import log_image_grid
from cvlab.seeding import mix_seed
from cvlab.task import task_of
from datamodules.class_incremental import ClassIncrementalDataModule
from lit_modules.distillation.class_incremental import class_incremental_loss, seen_logits
from lit_modules.distillation.data_impressions import class_similarity, dirichlet_targets, final_linear
from lit_modules.distillation.student import Student, create_student_net, legacy_fields
from lit_modules.distillation.zskd import initial_images, synthesize
from lit_modules.nets import InputNormalization, NetSpec
from lit_modules.optim import OptimizerName, ScheduleName
from lit_modules.teacher import FrozenTeacher, load_teacher


class OldNewAccuracy(Metric):
    """Accuracy on the old classes, the new classes and all of them; sum-reduced ``correct (2,)``, ``total (2,)``."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=torch.zeros(2), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(2), dist_reduce_fx="sum")

    def update(self, pred: Tensor, y: Tensor, is_new: Tensor) -> None:  # (B,), (B,), (B,) bool
        i = is_new.long()
        self.correct.index_add_(0, i, (pred == y).float())
        self.total.index_add_(0, i, torch.ones_like(pred, dtype=torch.float))

    def compute(self) -> dict[str, Tensor]:
        acc = self.correct / self.total.clamp_min(1)
        return {"old_acc": acc[0], "new_acc": acc[1], "acc": self.correct.sum() / self.total.sum().clamp_min(1)}


@dataclass(frozen=True)
class ImpressionRecipe:
    """How the previous network's Data Impressions are mined: the TF-port recipe of
    ``experiments/zskd/tf_port_impressions.yaml`` (300 -> 200 ``iterations`` of Adam at ``lr`` with an ``l2`` pixel
    penalty, softmax ``temperature``) and the paper's Dirichlet concentrations ``betas`` 1.0 / 0.1, half each
    (``beta_split``)."""

    iterations: int = 200
    lr: float = 3.0
    l2: float = 1e-3
    temperature: float = 20.0
    betas: tuple[float, ...] = (1.0, 0.1)
    beta_split: tuple[float, ...] = (0.5, 0.5)

    def as_hparams(self) -> dict[str, Any]:
        """Plain values for the hyper-parameters (lists: YAML- and weights-only-safe)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


#: the flat arguments that ``impressions`` groups (old checkpoints still carry them)
LEGACY_IMPRESSIONS = {"impression_iterations": "iterations", "impression_lr": "lr", "impression_l2": "l2",
                      "impression_temperature": "temperature", "betas": "betas", "beta_split": "beta_split"}


class ClassIncrementalLearner(Student):
    """One class-incremental step: a student over all classes (:class:`lit_modules.distillation.student.Student`:
    network, normalisation, optimizer; evaluated over the classes seen so far); its checkpoint is a teacher.

    Args:
        previous: the previous step's checkpoint (any cvlab classifier of the same classes); required after step 0.
        distill: what the previous network is distilled on: ``impressions`` (ours), ``new`` (LwF), ``none``.
        kd_weight, temperature: weight and tau of the distillation term (tau^2 KL over the old classes).
        replay_ce_weight: weight of the cross-entropy (over the seen classes) of each impression against the previous
            network's old class for it (``distill: impressions`` only; 0: distillation alone).
        num_impressions: Data Impressions mined from the previous network per step.
        replay_batch: impressions per training step.
        impressions: the impression recipe (:class:`ImpressionRecipe`), e.g.
            ``--model.init_args.impressions.iterations=50``.
        seed: seeds the impressions and the replay batches.
        arch, num_classes, in_channels, image_size, arch_kwargs, mean, std: the network over all classes and its
            input normalisation (``None``: the task's statistics), as :class:`lit_modules.classifier.ClassifierModule`.
        optimizer, lr, momentum, weight_decay, lr_schedule, milestones, gamma: its optimizer and per-step schedule.
        channels_last: channels-last memory format (faster convolutions on GPU).
    """

    reference_attr = None  # evaluated on old and new classes apart (OldNewAccuracy), with no reference network

    def __init__(
        self,
        previous: str | None = None,
        distill: Literal["impressions", "new", "none"] = "impressions",
        kd_weight: float = 1.0,
        temperature: float = 2.0,
        replay_ce_weight: float = 1.0,
        num_impressions: int = 1000,
        replay_batch: int = 128,
        impressions: ImpressionRecipe = ImpressionRecipe(),
        seed: int = 0,
        arch: NetSpec = "lenet5",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        arch_kwargs: dict | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: ScheduleName = "none",
        milestones: list[float] | None = None,
        gamma: float = 0.1,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["impressions"])
        if isinstance(impressions, dict):  # from a checkpoint's hyper-parameters
            impressions = ImpressionRecipe(**impressions)
        self.impressions = impressions
        self.hparams["impressions"] = impressions.as_hparams()
        self.init_student(create_student_net(self.hparams, channels_last), InputNormalization(mean, std), num_classes,
                          image_size, channels_last)
        self.val_old_new, self.test_old_new = OldNewAccuracy(), OldNewAccuracy()
        self.previous: FrozenTeacher | None = None
        self.replay_x: Tensor | None = None  # (N, C, H, W) impressions, pixels
        self.replay_logits: Tensor | None = None  # (N, K) the previous network's logits on them

    # --- set-up: the step's classes and the previous network ------------------------------------------------
    def setup(self, stage: str) -> None:
        self.check_student_task("the class-incremental learner", image_size=True)
        dm = self.trainer.datamodule
        if not isinstance(dm, ClassIncrementalDataModule):
            raise CvlabError(
                f"ClassIncrementalLearner needs datamodules.ClassIncrementalDataModule, got {type(dm).__name__}")
        hp, k = self.hparams, self.hparams.num_classes
        seen = torch.zeros(k, dtype=torch.bool)
        seen[dm.seen_classes] = True
        self.register_buffer("seen", seen, persistent=False)  # (K,)
        self.register_buffer("old", torch.tensor(dm.old_classes, dtype=torch.long), persistent=False)  # (O,)
        self.register_buffer("new", torch.tensor(dm.new_classes, dtype=torch.long), persistent=False)
        if dm.step > 0 and hp.previous is None:
            raise CvlabError(f"step {dm.step} learns classes {dm.new_classes} after {dm.old_classes}: give "
                             "--model.init_args.previous=<the last step's checkpoint>")
        if dm.step == 0 and hp.previous is not None:
            raise CvlabError("step 0 has no old classes: leave --model.init_args.previous unset")
        if hp.previous is None or self.previous is not None:
            return
        prev = load_teacher(hp.previous)
        if prev.num_classes != k:
            raise CvlabError(f"previous network {hp.previous} has {prev.num_classes} classes but this learner and "
                             f"its task have {k}; its impressions would not be of these classes")
        self.previous = prev
        if stage == "fit":  # continue from the previous weights (a resumed step then loads its own checkpoint)
            self.net.load_state_dict(prev.net.state_dict())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        legacy = legacy_fields(checkpoint.get("hyper_parameters", {}), LEGACY_IMPRESSIONS)
        if legacy:  # a checkpoint of the flat impression_* arguments (before impressions)
            self.impressions = replace(self.impressions, **legacy)
            self.hparams["impressions"] = self.impressions.as_hparams()

    def on_fit_start(self) -> None:
        if self.previous is None:
            return
        self.previous.to(self.device)
        if self.hparams.distill == "impressions" and self.replay_x is None:
            self.replay_x, self.replay_logits = self.mine_impressions()

    def _old_logits_fn(self):
        prev, old = self.previous, self.old
        return lambda u: prev.forward_normalized(u).index_select(1, old)  # (B, O): the old classes only

    def mine_impressions(self) -> tuple[Tensor, Tensor]:
        """Data Impressions ``(N, C, H, W)`` of the old classes from the previous network, and its logits ``(N, K)``."""
        hp, prev, t0 = self.hparams, self.previous, time.perf_counter()
        old = self.old
        sim = class_similarity(final_linear(prev).weight.index_select(0, old))  # (O, O)
        recipe = self.impressions
        targets, classes, _ = dirichlet_targets(sim, hp.num_impressions, list(recipe.betas), list(recipe.beta_split),
                                                "paper", hp.seed)
        shape = prev.input_shape or tuple(task_of(self.trainer).input_shape)
        u0 = initial_images(torch.arange(hp.num_impressions), shape, "gaussian", hp.seed).to(self.device)
        fn = self._old_logits_fn()
        with torch.inference_mode(False), torch.enable_grad():
            u, _ = synthesize(fn, u0, targets.to(self.device), recipe.iterations, recipe.lr, recipe.temperature,
                              pixel_l2=recipe.l2)
        with torch.no_grad():
            x = prev.normalization.inverse(u).clamp(0, 1)  # stored as pixels in [0, 1], as the synthesis stage does
            logits = prev(x)  # (N, K)
            agree = (logits.index_select(1, old).argmax(-1) == targets.to(self.device).argmax(-1)).float().mean()
        stats = {"impressions/teacher_agrees_with_target": agree.item(), "impressions/wall_s": time.perf_counter() - t0}
        if self.trainer.is_global_zero:  # (self.log is not allowed in on_fit_start)
            merge_metrics(Path(self.trainer.default_root_dir) / "metrics.json", stats)
            for logger in self.loggers:
                logger.log_metrics(stats, step=0)
        per = 8
        pick = torch.cat([(classes == c).nonzero().squeeze(1)[:per] for c in range(len(old))])  # set-up, once
        log_image_grid(self.trainer, "impressions/old_classes", x[pick.to(x.device)].float().cpu(), nrow=per,
                       caption=f"Data Impressions of old classes {self.old.tolist()}, one row per class")
        return x, logits

    # --- one step: learn the new classes, retain the old ----------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        hp = self.hparams
        logits = self(x)  # (B, K)
        kd_logits = prev_logits = kd_labels = None
        if self.previous is not None and hp.distill == "new":  # LwF: the previous network's outputs on new data
            kd_logits = logits
            with torch.no_grad():
                prev_logits = self.previous(x)
        elif self.replay_x is not None:  # Data Impressions of the old classes, the same draw on every rank
            g = torch.Generator(device=self.device).manual_seed(mix_seed(hp.seed, self.global_step))
            idx = torch.randint(self.replay_x.shape[0], (hp.replay_batch,), generator=g, device=self.device)
            kd_logits, prev_logits = self(self.replay_x[idx]), self.replay_logits[idx]
            # (R,) the previous network's old class
            kd_labels = self.old[prev_logits.index_select(1, self.old).argmax(-1)]
        loss, ce, kd = class_incremental_loss(logits, y, self.seen, kd_logits, prev_logits,
                                              self.old if self.old.numel() else None, hp.temperature, hp.kd_weight,
                                              kd_labels, hp.replay_ce_weight)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce", ce)
        self.log("train/kd", kd)
        return loss

    # --- evaluation over the classes seen so far ----------------------------------------------------------
    def _evaluate(self, batch: tuple[Tensor, Tensor], metric: OldNewAccuracy) -> None:
        x, y = batch
        pred = seen_logits(self(x), self.seen).argmax(-1)
        metric.update(pred, y, torch.isin(y, self.new))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_old_new)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_old_new)

    def _log_old_new(self, metric: OldNewAccuracy, stage: str) -> None:
        for name, value in metric.compute().items():
            if name == "old_acc" and self.old.numel() == 0:
                continue  # step 0: no old classes
            self.log(f"{stage}/{name}", value, prog_bar=name == "acc")
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_old_new(self.val_old_new, "val")

    def on_test_epoch_end(self) -> None:
        self._log_old_new(self.test_old_new, "test")
