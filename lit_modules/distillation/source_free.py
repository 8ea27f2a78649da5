"""Source-free domain adaptation: Data Impressions of the source model stand in for its source data.

"Data Impressions: Mining Deep Models to Extract Samples for Data-free Applications", Nayak, Mopuri, Jain,
Chakraborty, TPAMI 2022. The adaptation method paired with them (the reason is in
:mod:`lit_modules.distillation.adaptation_losses`): Deep CORAL feature alignment plus SHOT's information
maximisation. Each step, on a batch of unlabelled target images ``x_t`` and a batch of source samples ``x_s``
(impressions, or real source images for the reference run; ``source: null`` uses none, SHOT's IM alone):

1. **retain**: ``tau^2 KL(p_source(x_s) || p(x_s))``: the adapted network keeps the frozen source model's outputs on
   the source samples;
2. **align**: ``CORAL(f(x_s), f(x_t))`` on the penultimate features (the input of the final linear layer);
3. **adapt**: ``IM(x_t) = mean H(p(x_t)) - H(mean p(x_t))``.

The adapted network starts as a copy of the source model (architecture, weights, input normalisation). Validation
and test: accuracy on the target's labelled held-out and test images; ``test/source_only_acc`` is the frozen
source model on the same images (the no-adaptation baseline, logged by every run).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from cvlab.errors import CvlabError
from cvlab.image_log import log_image_grid
from cvlab.image_ops import to_float
from cvlab.seeding import mix_seed
from cvlab.task import check_task, task_of
from datamodules.transfer_sets import TransferPool
from lit_modules.distillation.adaptation_losses import coral_loss, information_maximization
from lit_modules.distillation.kd_loss import kd_kl_loss
from lit_modules.distillation.student import Student
from lit_modules.nets import classifier_layer
from lit_modules.teacher import TeacherArg, load_teacher


class SourceFreeAdaptation(Student):
    """Adapt a source model to the datamodule's (unlabelled) target domain (the adapted network's evaluation:
    :class:`lit_modules.distillation.student.Student`, with the source model as the reference).

    Args:
        source_model: the trained source model (a cvlab checkpoint, TorchScript, or a TeacherSpec).
        source: where the source samples come from: ``datamodules.transfer_sets.ImpressionPool`` (ours),
            ``DataModulePool`` of the source task (the real-source reference), or ``null`` (none: IM only).
        kd_weight, coral_weight, im_weight: the weights of the retain, align and adapt terms.
        temperature: tau of the retain term.
        source_batch: source samples per step.
        lr: Adam learning rate of the adapted network.
        seed: seeds the source batches.
    """

    reference_attr = "source_model"  # tested beside the adapted network: the no-adaptation baseline
    reference_key = "test/source_only_acc"

    def __init__(
        self,
        source_model: TeacherArg,
        source: TransferPool | None = None,
        kd_weight: float = 1.0,
        coral_weight: float = 1.0,
        im_weight: float = 1.0,
        temperature: float = 4.0,
        source_batch: int = 128,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["source"])
        self.source = source
        self.source_model = load_teacher(source_model)
        # the network being adapted, from the source weights and with the source model's normalisation
        net = copy.deepcopy(self.source_model.net)
        for p in net.parameters():
            p.requires_grad_(True)
        self.init_student(net, copy.deepcopy(self.source_model.normalization), self.source_model.num_classes or 10)
        fc = classifier_layer(self.net)
        if fc is None:
            raise CvlabError(f"source model {source_model} has no final linear layer: CORAL aligns its input features")
        self._features: Tensor | None = None
        fc.register_forward_pre_hook(self._keep_features)
        self.source_x: Tensor | None = None  # (N, C, H, W) pixels

    def _keep_features(self, module, inputs) -> None:
        self._features = inputs[0]  # (B, d): the final layer's input

    def setup(self, stage: str) -> None:
        task = check_task(f"source model {self.hparams.source_model}", task_of(self.trainer),
                          "adaptation keeps the label space", num_classes=self.source_model.num_classes)
        if stage == "fit" and self.source is not None and self.source_x is None:
            x, _ = self.source.load(task, self.hparams.seed)  # at the target's (= the source model's) input shape
            self.source_x = to_float(x)  # (N, C, H, W) pixels
            if self.source_x.shape[1:] != tuple(task.input_shape):
                raise CvlabError(f"source samples of shape {tuple(self.source_x.shape[1:])} do not fit the target's "
                                 f"{tuple(task.input_shape)}")

    def on_fit_start(self) -> None:
        if self.source_x is not None:
            self.source_x = self.source_x.to(self.device)
            log_image_grid(self.trainer, "adaptation/source_samples", self.source_x[:64].float().cpu(), nrow=8)

    # --- one step: retain, align, adapt ---------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x_t, _ = batch  # target labels are never used for training
        hp = self.hparams
        if self.source_x is None:  # IM only
            logits_t = self(x_t)
            kd = coral = torch.zeros((), device=self.device)
        else:  # the same source draw on every rank (seeded by the step)
            g = torch.Generator(device=self.device).manual_seed(mix_seed(hp.seed, self.global_step))
            idx = torch.randint(self.source_x.shape[0], (hp.source_batch,), generator=g, device=self.device)
            x_s = self.source_x[idx]
            logits = self(torch.cat([x_s, x_t]))  # (S + B, K), one pass: BatchNorm sees both domains
            feats = self._features
            s = x_s.shape[0]
            logits_t = logits[s:]
            with torch.no_grad():
                prev = self.source_model(x_s)
            kd = kd_kl_loss(logits[:s], prev, hp.temperature)
            coral = coral_loss(feats[:s], feats[s:])
        im, entropy, diversity = information_maximization(logits_t)
        loss = hp.kd_weight * kd + hp.coral_weight * coral + hp.im_weight * im
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/kd": kd, "train/coral": coral, "train/entropy": entropy, "train/diversity": diversity})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)
