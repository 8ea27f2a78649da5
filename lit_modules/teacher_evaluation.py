"""Evaluate a teacher: its accuracy on a task's test (or validation) split, overall and per class.

Any teacher form works (a cvlab checkpoint, a class path with a weight file and its contract, a TorchScript
file), loaded by :func:`lit_modules.teacher.load_teacher`, so its contract is checked at import; before any
batch runs, the contract is checked against the data (channels, classes, image size). ``cvlab test`` with
``experiments/teachers/evaluate.yaml``::

    uv run cvlab test --config experiments/teachers/evaluate.yaml --model.init_args.teacher=TEACHER.ckpt
"""

from __future__ import annotations

import lightning as L
import torchmetrics
from torch import Tensor

from cvlab.task import task_of
from lit_modules.teacher import TeacherArg, check_teacher_fits_data, load_teacher


class TeacherEvaluation(L.LightningModule):
    """A frozen teacher's accuracy on real images: ``test/acc`` (micro), ``test/acc_class/<k>`` and
    ``test/images`` (``val/...`` under ``cvlab validate``). Nothing is trained.

    Args:
        teacher: a cvlab checkpoint or TorchScript path, or a :class:`lit_modules.teacher.TeacherSpec`
            mapping (weights, architecture, input contract, key map).
        resize: feed images of another size than the teacher's contract resized to it (bilinear,
            antialiased); ``False`` refuses a size mismatch before any batch runs.
    """

    def __init__(self, teacher: TeacherArg, resize: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.teacher = load_teacher(teacher)
        k = self.teacher.num_classes
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=k, average="micro")
        self.class_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=k, average=None)
        self.images = torchmetrics.SumMetric()

    def setup(self, stage: str) -> None:
        task = task_of(self._trainer)
        if task is not None and check_teacher_fits_data(self.teacher, task, self.hparams.resize):
            s, d = self.teacher.spec.image_size, task.image_size
            if self.trainer.is_global_zero:
                print(f"cvlab: {task.name}'s {d}x{d} images are resized to the teacher's {s}x{s}", flush=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.teacher(x)  # [0, 1] pixels (B, C, H, W) -> logits (B, K), through the teacher's contract

    def _update(self, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        logits = self(x)
        self.acc.update(logits, y)
        self.class_acc.update(logits, y)
        self.images.update(y.new_tensor(y.shape[0]).float())

    def _report(self, split: str) -> None:
        per_class = self.class_acc.compute()  # (K,), reduced over processes
        self.log_dict({f"{split}/acc": self.acc.compute(), f"{split}/images": self.images.compute(),
                       **{f"{split}/acc_class/{k}": a for k, a in enumerate(per_class)}})
        for metric in (self.acc, self.class_acc, self.images):
            metric.reset()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._update(batch)

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._update(batch)

    def on_validation_epoch_end(self) -> None:
        self._report("val")
