"""Target-class balanced transfer sets: Nayak, Mopuri, Chakraborty, "Effectiveness of arbitrary transfer sets for
data-free knowledge distillation", WACV 2021 (arXiv 2011.09113).

A large pool unrelated to the training data (noise, synthetic or natural images) goes through the teacher once;
of each teacher-predicted class the ``per_class`` most confident examples are kept (:func:`balance_by_confidence`).
:class:`ArbitraryTransferSetSelection` is that step as a stage of its own, run by ``cvlab predict`` over the pool
of a :class:`datamodules.transfer_sets.TransferSetDataModule`: each process predicts its share of the pool, the
shares are gathered, and global rank zero writes ``<run folder>/selection.pt`` (pool indices, teacher-predicted
class and confidence of the kept examples, the pool's size and fingerprint) and the selection statistics
(``data/...``) into ``metrics.json``. The student stage reads the file with ``data.init_args.selection``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from cvlab.artifacts import atomic_torch_save, merge_metrics
from cvlab.errors import CvlabError
from cvlab.task import task_of
from datamodules.transfer_sets import SELECTION_FILE, TransferSetDataModule, selection_record
from lit_modules.teacher import TeacherArg, check_teacher_fits_data, load_teacher


def balance_by_confidence(pred: Tensor, conf: Tensor, num_classes: int, per_class: int) -> Tensor:
    """Indices keeping the ``per_class`` most confident examples of each predicted class (fewer where a
    class has fewer), sorted. ``pred, conf: (N,)``; no loop over classes."""
    by_conf = conf.argsort(descending=True, stable=True)  # (N,)
    order = by_conf[pred[by_conf].argsort(stable=True)]  # grouped by class, most confident first
    counts = torch.bincount(pred, minlength=num_classes)  # (K,)
    first = counts.cumsum(0) - counts  # start of each class's group
    rank = torch.arange(pred.numel(), device=pred.device) - first[pred[order]]  # rank within class
    return order[rank < per_class].sort().values


def selection_stats(pred: Tensor, keep: Tensor, num_classes: int) -> dict[str, float]:
    """The predicted-class histogram of the pool ``pred (N,)`` and of the kept examples ``pred[keep]``."""
    before = torch.bincount(pred, minlength=num_classes)  # (K,)
    after = torch.bincount(pred[keep], minlength=num_classes)
    return {
        "data/pool_size": float(before.sum()), "data/transfer_size": float(after.sum()),
        "data/pool_classes_predicted": float((before > 0).sum()),
        "data/transfer_min_per_class": float(after.min()), "data/transfer_max_per_class": float(after.max()),
    }


def gather_by_index(index: Tensor, values: list[Tensor], size: int,
                    all_gather: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """Each process's ``values`` at pool positions ``index (n_r,)`` -> the pool-ordered ``(size,)`` tensors.

    ``all_gather`` is the Lightning module's (identity in one process); shares may be uneven (predict runs do
    not pad), so each is padded to the largest with index ``-1`` first. Positions no process saw raise."""
    n = all_gather(torch.tensor([index.numel()], device=index.device)).max()  # largest share
    pad = int(n) - index.numel()
    idx = torch.cat([index, index.new_full((pad,), -1)])
    got = all_gather(idx).reshape(-1)  # (R * n,)
    seen = got >= 0
    out = []
    for v in values:
        g = all_gather(torch.cat([v, v.new_zeros((pad,))])).reshape(-1)
        full = v.new_zeros((size,))
        full[got[seen]] = g[seen]
        out.append(full)
    covered = torch.zeros(size, dtype=torch.bool, device=index.device)
    covered[got[seen]] = True
    if not bool(covered.all()):
        raise CvlabError(f"the selection saw {int(covered.sum())} of the pool's {size} images; "
                         "run the predict stage over the whole pool (no limit_predict_batches)")
    return out


class ArbitraryTransferSetSelection(L.LightningModule):
    """Choose a target-class balanced transfer set from a pool with the teacher (WACV 2021), as a predict stage.

    Args:
        teacher: a cvlab checkpoint or TorchScript path, or a :class:`lit_modules.teacher.TeacherSpec`.
        per_class: examples kept per teacher-predicted class, most confident first (fewer where the pool has
            fewer of a class).

    Run ``cvlab predict`` with a :class:`datamodules.transfer_sets.TransferSetDataModule` (its pool, no
    selection); the student stage then trains on ``data.init_args.selection: <this run folder>/selection.pt``.
    """

    def __init__(self, teacher: TeacherArg, per_class: int) -> None:
        super().__init__()
        if per_class < 1:
            raise CvlabError(f"per_class is how many examples to keep per predicted class, >= 1; got {per_class}")
        self.save_hyperparameters()
        self.teacher = load_teacher(teacher)
        self._index: list[Tensor] = []
        self._pred: list[Tensor] = []
        self._conf: list[Tensor] = []

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None)
        if dm is None:
            return
        if not isinstance(dm, TransferSetDataModule):
            raise CvlabError(f"{type(self).__name__} selects from a pool: use data "
                             f"datamodules.transfer_sets.TransferSetDataModule, not {type(dm).__name__}")
        # pool images come at the task's size; the teacher resizes them to its own
        check_teacher_fits_data(self.teacher, task_of(self._trainer), resize=True)

    def on_predict_start(self) -> None:
        self._index, self._pred, self._conf = [], [], []

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, index = batch  # [0, 1] pixels (B, C, H, W); pool indices (B,)
        conf, pred = self.teacher(x).float().softmax(-1).max(-1)  # (B,), (B,)
        self._index.append(index)
        self._pred.append(pred)
        self._conf.append(conf)
        return pred

    def on_predict_epoch_end(self) -> None:
        size, fingerprint = self.trainer.datamodule.pool_fingerprint()
        device = self.device
        index = torch.cat(self._index) if self._index else torch.zeros(0, dtype=torch.long, device=device)
        pred = torch.cat(self._pred) if self._pred else torch.zeros(0, dtype=torch.long, device=device)
        conf = torch.cat(self._conf) if self._conf else torch.zeros(0, device=device)
        pred, conf = gather_by_index(index, [pred, conf], size, self.all_gather)
        if not self.trainer.is_global_zero:
            return
        pred, conf = pred.cpu(), conf.cpu()
        k, per_class = task_of(self.trainer).num_classes, self.hparams.per_class
        keep = balance_by_confidence(pred, conf, k, per_class)
        root = Path(self.trainer.default_root_dir)
        atomic_torch_save(selection_record(keep, pred[keep], conf[keep], size, fingerprint, k, per_class),
                          root / SELECTION_FILE)
        merge_metrics(root / "metrics.json", selection_stats(pred, keep, k))
