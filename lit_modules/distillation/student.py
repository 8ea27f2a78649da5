"""The student core: what every system of the distillation family that trains one classifier shares.

KD (:class:`~lit_modules.distillation.kd_student.KDStudent`), LRA (:class:`~lit_modules.distillation.lra.LRA`),
source-free adaptation (:class:`~lit_modules.distillation.source_free.SourceFreeAdaptation`) and class-incremental
learning (:class:`~lit_modules.distillation.impression_replay.ClassIncrementalLearner`) each train a *student*: a
network with its input normalisation, fed [0, 1] pixels, evaluated on the real validation and test images of its
task. :class:`Student` owns that block; a system adds only its algorithm (its ``training_step`` and its set-up).

- the network and its normalisation: :meth:`Student.init_student` (``self.net``, ``self.normalize``: the checkpoint
  keys ``net.*`` of every older student checkpoint, so a student checkpoint is itself a teacher for
  :func:`lit_modules.teacher.load_teacher`);
- the shape handshake with a frozen teacher: :func:`teacher_handshake` (the student's classes and input shape are the
  teacher's unless configured; a disagreement is one line);
- the data check: :meth:`Student.check_student_task` (the task's classes and channels, one line on a mismatch) and
  the task's normalisation statistics when the config names none;
- ``forward``: [0, 1] pixels of any size -> the student's logits (resized on the device to its ``image_size``);
- evaluation: ``val/acc``; ``test/acc``, the frozen reference network's accuracy on the same images
  (``test/teacher_acc``, or the key a system names) and the per-class test accuracy ``test/acc_class/<k>``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import Tensor, nn

from cvlab.errors import CvlabError
from cvlab.image_ops import resize
from cvlab.task import TaskSpec, check_task, task_of
from lit_modules.classifier import adopt_data_normalization
from lit_modules.nets import InputNormalization, create_net
from lit_modules.optim import build_optimizer, build_schedule
from lit_modules.teacher import FrozenTeacher, shape_from_teacher

__all__ = ["ImageSizeMismatchError", "Student", "create_student_net", "legacy_fields", "resize_to",
           "teacher_handshake"]


class ImageSizeMismatchError(CvlabError):
    """The teacher, the generator and the data disagree about the image shape."""


def resize_to(x: Tensor, size: int | None) -> Tensor:
    """``x (B, C, H, W)`` resized to ``(B, C, size, size)`` by :func:`cvlab.image_ops.resize`; unchanged when it
    already has that size or ``size`` is None."""
    return x if size is None else resize(x, size)


def teacher_handshake(hparams: Any, teacher: FrozenTeacher, probe: bool = False) -> None:
    """Complete and check the student's shape against its teacher, in place on ``hparams``.

    ``num_classes``, ``in_channels`` and ``image_size`` left ``None`` become the teacher's (its contract). The
    teacher's classes must be the student's: read from its contract, or with ``probe`` from its output on a zero
    batch of the student's input shape (which must then fit the teacher: LRA's generator feeds both networks the
    same images; a network that cannot take them raises :class:`ImageSizeMismatchError`).
    """
    shape_from_teacher(hparams, teacher)
    spec = teacher.spec
    k, c, s = hparams["num_classes"], hparams["in_channels"], hparams["image_size"]
    have = spec.num_classes
    if probe:
        try:
            with torch.no_grad():
                have = teacher(torch.zeros(2, c, s, s)).shape[-1]
        except RuntimeError as e:
            raise ImageSizeMismatchError(
                f"the teacher {spec.weights} cannot take the generator's {c}x{s}x{s} images "
                f"({str(e).strip().splitlines()[0]}); set the teacher's image_size / in_channels to what it was "
                "trained on"
            ) from None
    if have is not None and have != k:
        raise CvlabError(f"teacher {spec.weights} has {have} classes but the student is configured for {k}")


def create_student_net(hparams: Any, channels_last: bool = False) -> nn.Module:
    """The student network of ``hparams`` (``arch``, ``arch_kwargs``, ``num_classes``, ``in_channels``,
    ``image_size``): a zoo name or any ``nn.Module`` as ``{class_path: ..., init_args: ...}``, freshly initialised
    (from the global RNG, as every older student)."""
    net = create_net(hparams["arch"], num_classes=hparams["num_classes"], in_channels=hparams["in_channels"],
                     image_size=hparams["image_size"], **(hparams.get("arch_kwargs") or {}))
    return net.to(memory_format=torch.channels_last) if channels_last else net


def legacy_fields(hparams: dict[str, Any], old_names: dict[str, str]) -> dict[str, Any]:
    """The fields of an argument group that an older checkpoint kept as flat hyper-parameters: ``{field: value}``
    for each ``old_names`` entry (old name -> field) present in ``hparams`` (lists become tuples); empty when none.

    ``legacy_fields({"weight_one_hot": 2.0, "lr": 0.1}, {"weight_one_hot": "one_hot"})`` is ``{"one_hot": 2.0}``.
    """
    return {field: tuple(hparams[old]) if isinstance(hparams[old], list) else hparams[old]
            for old, field in old_names.items() if old in hparams}


class Student(L.LightningModule):
    """A LightningModule that trains one student network (see the module docstring).

    A subclass calls :meth:`init_student` in its ``__init__`` (after ``save_hyperparameters``) and
    :meth:`check_student_task` in its ``setup``; it inherits ``forward``, the validation and test steps, the
    per-class test accuracy and the student's optimizer, and writes its own ``training_step``.

    Class attributes:
        reference_attr: the attribute holding the frozen network tested beside the student (``teacher``; the
            source model in adaptation; ``None``: none).
        reference_key: the metric its test accuracy is logged as.
    """

    reference_attr: str | None = "teacher"
    reference_key: str = "test/teacher_acc"

    # --- construction -----------------------------------------------------------------------------------
    def init_student(self, net: nn.Module, normalize: InputNormalization, num_classes: int,
                     image_size: int | None = None, channels_last: bool = False) -> None:
        """Own the student ``net`` and its input ``normalize`` and create the evaluation metrics over
        ``num_classes``. Batches of another size than ``image_size`` are resized (``None``: never);
        ``channels_last`` feeds the network channels-last inputs."""
        self.net = net
        self.normalize = normalize
        self._student_image_size = image_size
        self._channels_last_input = channels_last
        acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc, self.test_acc, self.test_reference_acc = acc.clone(), acc.clone(), acc.clone()
        self.test_class_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes, average=None)

    @property
    def reference(self) -> nn.Module | None:
        """The frozen network whose test accuracy is logged beside the student's (``reference_attr``)."""
        return None if self.reference_attr is None else getattr(self, self.reference_attr, None)

    def check_student_task(self, owner: str, image_size: bool = False, adopt_normalization: bool = True,
                           hint: str | None = None) -> TaskSpec | None:
        """Check the task's ``num_classes`` and ``in_channels`` (and ``image_size`` when asked) against the
        hyper-parameters (one line naming ``owner`` on a mismatch), and take the task's normalisation statistics
        when the config names none. Returns the task (``None`` without a datamodule)."""
        task = task_of(self._trainer)
        if task is None:
            return None
        hp = self.hparams
        keys = {"num_classes": hp.get("num_classes"), "in_channels": hp.get("in_channels")}
        if image_size:
            keys["image_size"] = hp.get("image_size")
        check_task(owner, task, *([hint] if hint else []), **keys)
        if adopt_normalization:
            adopt_data_normalization(self, task)
        return task

    # --- the student's logits ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """The student's logits ``(B, K)`` of [0, 1] pixels ``x (B, C, H, W)`` (resized to its input size)."""
        x = resize_to(x, self._student_image_size)
        if self._channels_last_input:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(self.normalize(x))

    # --- evaluation on the task's real images ----------------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc.update(self(x), y)

    def on_validation_epoch_end(self) -> None:
        self.log_validation_accuracy()

    def log_validation_accuracy(self) -> Tensor:
        """Log ``val/acc`` (reduced over processes) and return it; the metric starts afresh."""
        acc = self.val_acc.compute()
        self.val_acc.reset()
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)
        return acc

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.test_acc(out, y)
        self.test_class_acc.update(out, y)
        self.log("test/acc", self.test_acc)
        reference = self.reference
        if reference is not None:
            self.test_reference_acc(reference(x), y)
            self.log(self.reference_key, self.test_reference_acc)

    def on_test_epoch_end(self) -> None:
        # which classes transfer: a zero-shot student can miss a whole class the teacher knows
        per_class = self.test_class_acc.compute()  # (K,), reduced over processes
        self.test_class_acc.reset()
        self.log_dict({f"test/acc_class/{k}": a for k, a in enumerate(per_class)})

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The student's class probabilities ``(B, K)``."""
        return self(batch[0]).softmax(-1)

    # --- the student's optimizer ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """The student's optimizer from the hyper-parameters ``optimizer``, ``lr``, ``weight_decay`` (and
        ``momentum`` where the system has it) with the per-step ``lr_schedule`` (and ``milestones``, ``gamma``);
        a key the system lacks takes :func:`lit_modules.optim.build_optimizer`'s / ``build_schedule``'s default."""
        hp = self.hparams
        opt = build_optimizer(self.net.parameters(), hp.optimizer, hp.lr, weight_decay=hp.weight_decay,
                              **{k: hp[k] for k in ("momentum",) if k in hp})
        sched = build_schedule(opt, hp.lr_schedule, self.trainer.estimated_stepping_batches,
                               **{k: hp[k] for k in ("milestones", "gamma") if k in hp})
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
