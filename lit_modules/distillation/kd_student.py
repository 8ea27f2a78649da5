"""Distil a frozen teacher into a student on any transfer set: Data Impressions, noise, synthetic or
natural pools (balanced or not), or the real training data.

* ZSKD: Nayak, Mopuri, Shaj, Babu, Chakraborty, ICML 2019 (arXiv 1905.08114), Sec. 3.3: KD on the
  Data Impressions only, ``tau = 20``, Adam, with scale/translate/rotate/flip augmentation.
* Arbitrary transfer sets: Nayak, Mopuri, Chakraborty, WACV 2021 (arXiv 2011.09113): the same KD on
  a target-class balanced pool chosen by the selection stage (:mod:`.transfer_set_selection`).

The teacher labels every (augmented) training batch on the fly; the student is validated on real images
held out of the teacher's task's training set and tested once, after fit, on its test split. Batches are
[0, 1] pixels: the teacher applies its own input contract, the student normalises with the task's
statistics (recorded in its hyper-parameters). A student checkpoint is itself a teacher for
:func:`lit_modules.teacher.load_teacher` (same ``arch``/``net.`` layout and contract as ClassifierModule).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cvlab.errors import CvlabError
from cvlab.image_ops import random_affine, random_mix
from lit_modules.distillation.kd_loss import distillation_loss
from lit_modules.distillation.student import Student, create_student_net, teacher_handshake
from lit_modules.nets import InputNormalization, NetSpec
from lit_modules.optim import OptimizerName, ScheduleName
from lit_modules.teacher import TeacherArg, load_teacher


class KDStudent(Student):
    """Temperature-scaled KD from a frozen teacher checkpoint into a fresh student (network, normalisation,
    evaluation: :class:`lit_modules.distillation.student.Student`).

    Args:
        teacher: the teacher: a cvlab checkpoint or TorchScript path, or a
            :class:`lit_modules.teacher.TeacherSpec` (weights, architecture, input contract, key map).
        arch, arch_kwargs: the student: a zoo name (ZSKD: ``lenet5_half``, ``alexnet_cifar_half``) or any
            ``nn.Module`` as ``{class_path: ..., init_args: {...}}``.
        num_classes, in_channels, image_size: the student's classes and input shape; ``None`` takes the
            teacher's (its contract). Batches of another size are resized on the device.
        mean, std: the student's input normalisation; ``None``: the datamodule's statistics.
        temperature: KD temperature tau (ZSKD: 20); the KD term is weighted by tau^2.
        hard_label_weight: weight ``w`` of cross-entropy on labels where the transfer set has them
            (``(1 - w) KD + w CE``); 0 is pure KD, as in ZSKD.
        optimizer, lr, weight_decay, lr_schedule: ZSKD uses Adam, lr 1e-3.
        aug_scale, aug_translate, aug_rotate, aug_flip: batched augmentation of each training batch
            (zoom +-scale, shift +-translate of the size, +-rotate degrees, left-right flip), applied
            before both networks see it.
        aug_mix: after the affine augmentation, blend each image with a random partner of its batch
            at a weight ``~ U(0, aug_mix)`` (:func:`cvlab.image_ops.random_mix`; 0.5 is mixup with
            alpha 1; not in ZSKD). The teacher labels the blend; a hard label stays the dominant image's.
    """

    def __init__(
        self,
        teacher: TeacherArg,
        arch: NetSpec = "lenet5_half",
        arch_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        in_channels: int | None = None,
        image_size: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        temperature: float = 20.0,
        hard_label_weight: float = 0.0,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: ScheduleName = "none",
        aug_scale: float = 0.0,
        aug_translate: float = 0.0,
        aug_rotate: float = 0.0,
        aug_flip: bool = False,
        aug_mix: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= aug_mix <= 0.5:
            raise CvlabError(f"aug_mix is the partner's largest blend weight, in [0, 0.5]; got {aug_mix}")
        self.save_hyperparameters()
        self.teacher = load_teacher(teacher)
        hp = self.hparams
        teacher_handshake(hp, self.teacher)  # the student's shape: the teacher's unless given
        self.init_student(create_student_net(hp), InputNormalization(mean, std), hp.num_classes, hp.image_size)

    def setup(self, stage: str) -> None:
        self.check_student_task("the student")

    def augment(self, x: Tensor) -> Tensor:
        hp = self.hparams
        g = torch.Generator(device=x.device)
        g.manual_seed(hash((hp.seed, self.global_rank, self.global_step)) % (2**62))  # same after resume
        x = random_affine(x, hp.aug_scale, hp.aug_translate, hp.aug_rotate, hp.aug_flip, g)
        return random_mix(x, hp.aug_mix, g)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # [0, 1] pixels (B, C, H, W); labels (B,), -1 where the transfer set has none
        x = self.augment(x)
        with torch.no_grad():
            t = self.teacher(x)  # (B, K)
        loss, kd, ce = distillation_loss(self(x), t, y, self.hparams.temperature, self.hparams.hard_label_weight)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/kd", kd)
        if self.hparams.hard_label_weight:
            self.log("train/ce", ce)
        return loss
