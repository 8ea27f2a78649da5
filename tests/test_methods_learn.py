"""Tests that fail when a method is broken (issue 20, item 3): not "the metric exists and lies in [0, 1]"
but "the method learns what a working method learns" on tiny tasks with known answers, and the
schedules and counters the papers' claims rest on, against worked values.

The task is *stripes*: 1 x 16 x 16 images, class ``k`` of 4 a bright horizontal band (rows ``4k .. 4k+3``)
on noise. The known teacher is linear: its logit ``k`` is the band's mean brightness (times a scale), so
it labels the task perfectly and gives a definite soft target for any image, noise included.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.base import TensorImageDataModule
from datamodules.transfer_sets import NoisePool, TransferSetDataModule
from lit_modules.condensation.dc import PAPER_LOOPS, DatasetCondensation
from lit_modules.condensation.dc_eval import EvalRecipe, train_and_test
from lit_modules.distillation.kd_loss import kd_kl_loss
from lit_modules.distillation.kd_student import KDStudent
from lit_modules.distillation.transfer_set_selection import ArbitraryTransferSetSelection

K, SIZE = 4, 16


class StripeTeacher(nn.Module):
    """Logit ``k`` = ``scale`` x (mean of band ``k`` - mean of the image), on [0, 1] pixels."""

    def __init__(self, num_classes: int = K, scale: float = 40.0) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("bands", torch.arange(SIZE) // (SIZE // num_classes))  # (H,): row -> band

    def forward(self, x: Tensor) -> Tensor:
        rows = x.mean((1, 3))  # (B, H)
        onehot = F.one_hot(self.bands, K).float()  # (H, K)
        band = rows @ onehot / onehot.sum(0)  # (B, K)
        return self.scale * (band - rows.mean(1, keepdim=True))


class TinyStudent(nn.Module):
    """A linear student: enough for a linear teacher, fast on 2 cores."""

    def __init__(self, num_classes: int = K, in_channels: int = 1, image_size: int = SIZE) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels * image_size * image_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


def stripes(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` stripe images (uint8 ``(n, 1, 16, 16)``) and their labels, balanced and seeded."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.6
    rows = torch.arange(SIZE)
    band = (rows[None, :] // (SIZE // K)) == y[:, None]  # (n, H)
    x = torch.where(band[:, None, :, None], x + 0.4, x)
    return (x * 255).round().to(torch.uint8), y


class StripesDataModule(TensorImageDataModule):
    """The stripes task as a cvlab datamodule (generated; nothing read from disk)."""

    num_classes, in_channels, native_size = K, 1, SIZE
    mean, std = (0.5,), (0.3,)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        return stripes(400 if train else 200, seed=0 if train else 1)


def save_stripe_teacher(path: Path) -> dict:
    torch.save(StripeTeacher().state_dict(), path)
    return {"weights": str(path), "arch": {"class_path": "tests.test_methods_learn.StripeTeacher"},
            "num_classes": K, "in_channels": 1, "image_size": SIZE, "normalization": "none"}


def _student(teacher: dict, **kw) -> KDStudent:
    torch.manual_seed(0)
    return KDStudent(teacher=teacher, arch={"class_path": "tests.test_methods_learn.TinyStudent"},
                     temperature=4.0, lr=1e-2, **kw)


def _fit_and_test(model: L.LightningModule, dm: L.LightningDataModule, root: Path, epochs: int) -> dict[str, float]:
    trainer = L.Trainer(max_epochs=epochs, logger=False, default_root_dir=root, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=dm)
    return {k: float(v) for k, v in trainer.test(model, datamodule=dm, verbose=False)[0].items()}


def _kd_on(model: KDStudent, x: Tensor) -> float:
    with torch.no_grad():
        return float(kd_kl_loss(model(x), model.teacher(x), model.hparams.temperature))


def test_the_stripe_teacher_knows_the_task() -> None:
    x, y = stripes(200, seed=1)
    assert (StripeTeacher()(x.float() / 255).argmax(-1) == y).all()


def test_kd_student_lowers_its_kd_loss_and_learns_the_task(tmp_path: Path) -> None:
    """Pure KD (no labels) from the known teacher: the KD loss on held-out images falls to a fraction of
    its start and the student beats chance (0.25) by far. A KD loss that gave no gradient, or a student
    fed the wrong targets, stays near chance."""
    model = _student(save_stripe_teacher(tmp_path / "t.pt"))
    dm = StripesDataModule(batch_size=50, val_size=40, seed=0)
    dm.setup("fit")
    held_out = dm.test_x.float() / 255
    before = _kd_on(model, held_out)
    m = _fit_and_test(model, dm, tmp_path, epochs=4)
    after = _kd_on(model, held_out)
    assert after < 0.5 * before, (before, after)
    assert m["test/acc"] > 0.9 and m["test/teacher_acc"] == 1.0


def test_transfer_set_student_learns_from_a_balanced_noise_pool(tmp_path: Path) -> None:
    """Arbitrary transfer sets: uniform noise, balanced by the teacher's confidence, is enough for a
    student to learn the teacher's task (the teacher is linear, so its soft labels on noise carry it)."""
    teacher = save_stripe_teacher(tmp_path / "t.pt")
    pool = dict(task=StripesDataModule(val_size=40), pool=NoisePool("uniform", 2000), batch_size=50)
    select = L.Trainer(logger=False, default_root_dir=tmp_path / "select", enable_progress_bar=False,
                       enable_model_summary=False, accelerator="cpu", devices=1)
    select.predict(ArbitraryTransferSetSelection(teacher, per_class=200), datamodule=TransferSetDataModule(**pool),
                   return_predictions=False)  # the selection stage writes select/selection.pt
    model = _student(teacher)
    dm = TransferSetDataModule(**pool, balance="confidence", selection=str(tmp_path / "select" / "selection.pt"))
    m = _fit_and_test(model, dm, tmp_path, epochs=5)
    assert torch.bincount(model.teacher(dm.train_x.float() / 255).argmax(-1), minlength=K).tolist() == [200] * K
    assert m["test/acc"] > 0.9, m


def test_dc_evaluation_protocol_reaches_full_accuracy_on_a_separable_set() -> None:
    """DC's protocol (fresh nets trained by SGD with the step schedule) on 5 stripe images per class:
    every net classifies the 200 test images perfectly; untrained nets score about chance."""
    x, y = stripes(20, seed=2)
    tx, ty = stripes(200, seed=3)
    px = lambda u: u.float() / 255  # noqa: E731  ([0, 1] pixels; each network normalises its own input)
    arch, norm = {"class_path": "tests.test_methods_learn.TinyStudent"}, {"mean": [0.5], "std": [0.3]}
    acc = train_and_test(px(x), y, px(tx), ty, arch, K, num_nets=3, recipe=EvalRecipe(epochs=20, batch_size=10),
                         **norm)
    assert acc.shape == (3,) and (acc == 1.0).all(), acc
    untrained = train_and_test(px(x), y, px(tx), ty, arch, K, num_nets=3, recipe=EvalRecipe(epochs=0), **norm)
    assert (untrained < 0.6).all(), untrained


def test_dc_evaluation_lr_schedule_worked_values() -> None:
    r = EvalRecipe()  # the paper's 300 epochs at 0.01, lr / 10 for the second half
    assert [r.lr_at(e) for e in (0, 149)] == [0.01, 0.01]
    assert [r.lr_at(e) for e in (150, 299)] == pytest.approx([0.001, 0.001])
    r = EvalRecipe(epochs=1000, lr=0.02)  # DC's MNIST setting with augmentation
    assert r.lr_at(499) == 0.02 and r.lr_at(500) == pytest.approx(0.002)
    assert EvalRecipe(epochs=5).lr_at(1) == 0.01 and EvalRecipe(epochs=5).lr_at(2) == pytest.approx(0.001)


@pytest.mark.parametrize(("ipc", "outer", "inner"), [(1, 1, 1), (10, 10, 50), (20, 20, 25), (30, 30, 20),
                                                     (40, 40, 15), (50, 50, 10)])
def test_dc_outer_inner_schedule_per_ipc_is_the_public_codes(ipc: int, outer: int, inner: int) -> None:
    """``(outer_loop, inner_loop)`` per images-per-class, as DC's public ``get_loops``; the module takes them."""
    assert PAPER_LOOPS[ipc] == (outer, inner)
    m = DatasetCondensation(ipc=ipc, image_size=SIZE, num_classes=2, arch="convnet")
    assert (m.outer_loop, m.inner_loop) == (outer, inner)
    m = DatasetCondensation(ipc=ipc, image_size=SIZE, num_classes=2, arch="convnet", outer_loop=3, inner_loop=0)
    assert (m.outer_loop, m.inner_loop) == (3, 0)  # an explicit schedule wins, 0 inner steps included


def test_lra_drop_count_and_total_on_a_hand_made_accuracy_curve(tmp_path: Path) -> None:
    """LRA's headline claim is fewer and smaller accuracy drops. On the curve
    0.50, 0.70, 0.65, 0.80, 0.72, 0.72, 0.90, 0.60 the drops are 0.70->0.65, 0.80->0.72 and 0.90->0.60:
    3 drops, total 0.05 + 0.08 + 0.30 = 0.43, largest 0.30 (an equal value is no drop)."""
    from tests.test_lra import _module, save_teacher

    m = _module(save_teacher(tmp_path / "t.ckpt"))
    curve = [0.50, 0.70, 0.65, 0.80, 0.72, 0.72, 0.90, 0.60]
    for step, acc in enumerate(curve):
        m.record_accuracy(10 * step, acc)
    s = m.retention_summary()
    assert s["drops"] == 3
    assert s["drop_total"] == pytest.approx(0.43) and s["max_drop"] == pytest.approx(0.30)
    assert s["generator_step"] == [0, 10, 20, 30, 40, 50, 60, 70] and s["acc"] == curve


# --- the validation split (issue 20, item 1) -----------------------------------------------------------
def test_validation_count_worked_values() -> None:
    from datamodules.base import validation_count

    assert validation_count(None, 5000, 60000) == 5000  # MNIST: 5,000 of 60,000
    assert validation_count(None, 5000, 12406) == 1240  # a default count is at most a tenth
    assert validation_count(None, 5000, 60) == 6 and validation_count(None, 5000, 5) == 1
    assert validation_count(None, 0.1, 10000) == 1000 and validation_count(0.25, 5000, 10) == 2
    assert validation_count(0, 5000, 60000) == 0 and validation_count(300, 5000, 60000) == 300
    assert validation_count(300.0, 5000, 60000) == 300  # the CLI parses "--data.init_args.val_size 300" as 300.0
    from cvlab.errors import CvlabError

    for bad in (60, 1.0, -1, 1.5):
        with pytest.raises(CvlabError, match="val_size"):
            validation_count(bad, 5000, 60)


def test_validation_is_held_out_of_training_by_default_and_seeded() -> None:
    dm = StripesDataModule(seed=4)
    dm.setup("fit")
    assert dm.val_count == 40 and dm.train_x.shape[0] == 360  # the default: a tenth of 400
    assert not set(dm.val_indices.tolist()) & set(dm.train_indices.tolist())
    assert dm.val_x is not dm.test_x and not torch.equal(dm.val_x[:10], dm.test_x[:10])
    again = StripesDataModule(seed=4)
    again.setup("fit")
    assert torch.equal(again.val_indices, dm.val_indices)
    other = StripesDataModule(seed=5)
    other.setup("fit")
    assert not torch.equal(other.val_indices, dm.val_indices)
    old = StripesDataModule(val_size=0)  # the old protocol, on request only
    old.setup("fit")
    assert old.val_x is old.test_x and old.train_x.shape[0] == 400


def test_a_long_tail_keeps_its_profile_and_validates_on_left_out_images() -> None:
    from datamodules import ShapesDataModule

    dm = ShapesDataModule(num_train=1000, num_test=50, imbalance_factor=10, image_size=16, seed=0)
    dm.setup("fit")
    counts = torch.bincount(dm.train_y, minlength=10).tolist()
    assert counts[0] == 100 and counts[-1] == 10 and counts == sorted(counts, reverse=True)
    assert dm.val_count == sum(counts) // 10 and not set(dm.val_indices.tolist()) & set(dm.train_indices.tolist())


def test_data_free_and_transfer_set_modules_validate_on_the_tasks_held_out_images() -> None:
    from datamodules.data_free import DataFreeDataModule

    for dm in (DataFreeDataModule(StripesDataModule()),
               TransferSetDataModule(StripesDataModule(), NoisePool("uniform", 10))):
        dm.setup("fit")
        assert torch.equal(dm.val_x, dm.task.val_x) and dm.task.val_count == 40
        assert dm.test_x is dm.task.test_x and dm.val_x.shape[0] != dm.test_x.shape[0]
