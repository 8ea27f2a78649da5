"""The student core shared by KD, LRA, source-free adaptation and class-incremental learning
(:mod:`lit_modules.distillation.student`): the teacher handshake, the data check and normalisation adoption,
``forward`` and the evaluation metrics, with worked answers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from cvlab.errors import CvlabError
from cvlab.task import TaskMismatchError, TaskSpec
from lit_modules import LRA
from lit_modules.classifier import ClassifierModule
from lit_modules.distillation import ClassIncrementalLearner, KDStudent, SourceFreeAdaptation
from lit_modules.distillation.impression_replay import ImpressionRecipe
from lit_modules.distillation.lra_losses import GeneratorLossWeights
from lit_modules.distillation.student import (
    ImageSizeMismatchError,
    Student,
    create_student_net,
    legacy_fields,
    resize_to,
    teacher_handshake,
)
from lit_modules.nets import InputNormalization
from lit_modules.teacher import load_teacher
from tests.fakedata import save_cvlab_checkpoint


class _FirstPixels(nn.Module):
    """Logits = the first ``k`` pixels of each image: predictions chosen by hand."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, : self.k]


class _AlwaysZero(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.tensor([1.0, 0.0, 0.0]).expand(x.shape[0], 3)


class _Toy(Student):
    def __init__(self, num_classes: int = 3, in_channels: int = 1, image_size: int = 2,
                 mean: list[float] | None = None, std: list[float] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.teacher = _AlwaysZero()
        self.init_student(_FirstPixels(num_classes), InputNormalization(mean, std), num_classes, image_size)


class _DataModule:
    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    @property
    def task_spec(self) -> TaskSpec:
        return self.spec


def _with_task(module: Student, spec: TaskSpec) -> Student:
    module._trainer = SimpleNamespace(datamodule=_DataModule(spec))
    return module


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    m = ClassifierModule(arch="lenet5", num_classes=10, in_channels=1, image_size=32, mean=[0.5], std=[0.25])
    return save_cvlab_checkpoint(m, tmp_path_factory.mktemp("teacher") / "lenet.ckpt")


# --- the handshake with the teacher ------------------------------------------------------------------------------
def test_handshake_takes_the_teachers_shape_where_the_config_gives_none(teacher_ckpt: Path) -> None:
    hp: dict[str, Any] = {"num_classes": None, "in_channels": None, "image_size": 16}
    teacher_handshake(hp, load_teacher(str(teacher_ckpt)))
    assert hp == {"num_classes": 10, "in_channels": 1, "image_size": 16}  # a given size is kept (KD resizes)


def test_handshake_class_mismatch_is_one_line(teacher_ckpt: Path) -> None:
    for probe in (False, True):
        with pytest.raises(CvlabError, match=r"has 10 classes but the student is configured for 5$"):
            teacher_handshake({"num_classes": 5, "in_channels": None, "image_size": None},
                              load_teacher(str(teacher_ckpt)), probe=probe)


def test_handshake_probe_rejects_inputs_the_teacher_cannot_take(teacher_ckpt: Path) -> None:
    with pytest.raises(ImageSizeMismatchError, match="cannot take the generator's 3x32x32 images"):
        teacher_handshake({"num_classes": None, "in_channels": 3, "image_size": None},
                          load_teacher(str(teacher_ckpt)), probe=True)


def test_student_net_is_the_configured_architecture() -> None:
    net = create_student_net({"arch": "lenet5", "arch_kwargs": None, "num_classes": 7, "in_channels": 3,
                              "image_size": 32})
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


# --- the data check and the normalisation ------------------------------------------------------------------------
def test_the_task_normalisation_is_adopted_when_the_config_names_none() -> None:
    spec = TaskSpec(num_classes=3, in_channels=1, image_size=2, mean=(0.5,), std=(0.25,), name="toy")
    m = _with_task(_Toy(), spec)
    assert m.check_student_task("the toy") is spec
    assert m.hparams.mean == [0.5] and m.hparams.std == [0.25]  # recorded: the checkpoint carries the contract
    x = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    assert m(x).tolist() == [[2.0, 0.0, -2.0]]  # (x - 0.5) / 0.25 of the first three pixels


def test_a_configured_normalisation_is_kept() -> None:
    spec = TaskSpec(num_classes=3, in_channels=1, image_size=2, mean=(0.5,), std=(0.25,), name="toy")
    m = _with_task(_Toy(mean=[0.0], std=[0.5]), spec)
    m.check_student_task("the toy")
    assert m.hparams.mean == [0.0] and m(torch.ones(1, 1, 2, 2)).tolist() == [[2.0, 2.0, 2.0]]


@pytest.mark.parametrize(("spec", "message"), [
    (TaskSpec(num_classes=5, in_channels=1, image_size=2, name="five"),
     "the toy and the data disagree on num_classes: 3 vs 5 (five); set --model.init_args.num_classes to 5"),
    (TaskSpec(num_classes=3, in_channels=3, image_size=2, name="rgb"),
     "the toy and the data disagree on in_channels: 1 vs 3 (rgb); set --model.init_args.in_channels to 3"),
])
def test_a_task_mismatch_is_one_line(spec: TaskSpec, message: str) -> None:
    with pytest.raises(TaskMismatchError) as e:
        _with_task(_Toy(), spec).check_student_task("the toy")
    assert str(e.value) == message


def test_image_size_is_checked_only_when_asked() -> None:
    spec = TaskSpec(num_classes=3, in_channels=1, image_size=4, name="big")
    _with_task(_Toy(), spec).check_student_task("the toy")  # KD and LRA: resized / checked by the system
    with pytest.raises(TaskMismatchError, match="disagree on image_size: 2 vs 4"):
        _with_task(_Toy(), spec).check_student_task("the toy", image_size=True)


def test_without_a_datamodule_nothing_is_checked() -> None:
    m = _Toy()
    assert m.check_student_task("the toy") is None and m.hparams.mean is None


# --- forward and the metrics ----------------------------------------------------------------------------------
def test_resize_to_keeps_a_batch_of_the_right_size_and_resizes_others() -> None:
    x = torch.rand(2, 1, 4, 4)
    assert resize_to(x, 4) is x and resize_to(x, None) is x
    assert torch.allclose(resize_to(torch.full((1, 1, 4, 4), 0.3), 2), torch.full((1, 1, 2, 2), 0.3))
    assert _Toy()(x).shape == (2, 3)  # 4x4 batches reach the 2x2 network resized


def _batch() -> tuple[Tensor, Tensor]:
    # logits are the first three pixels: predictions 0, 1, 2, 0, 1, 1 against labels 0, 1, 2, 1, 1, 0
    pred = torch.tensor([0, 1, 2, 0, 1, 1])
    x = torch.zeros(6, 1, 2, 2)
    x.view(6, 4)[torch.arange(6), pred] = 1.0
    return x, torch.tensor([0, 1, 2, 1, 1, 0])


NO_TRAINER = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # steps called by hand


@NO_TRAINER
def test_test_metrics_equal_a_hand_computation() -> None:
    m = _Toy()
    x, y = _batch()
    m.test_step((x[:4], y[:4]), 0)  # two batches: the metrics accumulate
    m.test_step((x[4:], y[4:]), 1)
    assert m.test_acc.compute().item() == pytest.approx(4 / 6)  # samples 0, 1, 2, 4 right
    # per class (recall): class 0: 1 of 2 (samples 0, 5); class 1: 2 of 3 (1, 3, 4); class 2: 1 of 1
    assert m.test_class_acc.compute().tolist() == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert m.test_reference_acc.compute().item() == pytest.approx(2 / 6)  # the teacher says 0: right on 0 and 5


@NO_TRAINER
def test_validation_accuracy_is_accumulated_then_reset() -> None:
    m = _Toy()
    x, y = _batch()
    m.validation_step((x[:3], y[:3]), 0)
    m.validation_step((x[3:], y[3:]), 1)
    assert m.log_validation_accuracy().item() == pytest.approx(4 / 6)
    m.validation_step((x[3:4], y[3:4]), 0)  # a new validation: only sample 3 (wrong)
    assert m.log_validation_accuracy().item() == 0.0


# --- every system is a Student; its checkpoint keeps the keys of older ones ---------------------------------------
@pytest.mark.parametrize("cls", [KDStudent, LRA, SourceFreeAdaptation, ClassIncrementalLearner])
def test_the_four_systems_share_the_core(cls: type) -> None:
    assert issubclass(cls, Student)
    for name in ("forward", "validation_step", "test_step"):
        if cls is not ClassIncrementalLearner:  # it evaluates over the classes seen so far
            assert getattr(cls, name) is getattr(Student, name), (cls.__name__, name)


def test_a_student_checkpoint_is_a_teacher(teacher_ckpt: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = KDStudent(teacher=str(teacher_ckpt), arch="lenet5_half", mean=[0.5], std=[0.25])
    assert {k.split(".")[0] for k in s.state_dict()} == {"net", "teacher"}  # the layout of older students
    t = load_teacher(str(save_cvlab_checkpoint(s, tmp_path / "student.ckpt")))
    x = torch.rand(3, 1, 32, 32)
    assert torch.equal(t(x), s(x))


# --- grouped arguments: checkpoints of the flat arguments keep their values ---------------------------------------
def test_legacy_fields_worked_answer() -> None:
    old = {"weight_one_hot": 2.0, "betas": [1.0], "lr": 0.1}
    assert legacy_fields(old, {"weight_one_hot": "one_hot", "betas": "betas", "gone": "x"}) == {"one_hot": 2.0,
                                                                                                "betas": (1.0,)}


def test_an_old_class_incremental_checkpoint_keeps_its_impression_recipe() -> None:
    m = ClassIncrementalLearner()
    assert m.impressions == ImpressionRecipe()
    m.on_load_checkpoint({"hyper_parameters": {"impression_iterations": 30, "betas": [2.0], "label_smoothing": 0.0}})
    assert m.impressions == ImpressionRecipe(iterations=30, betas=(2.0,))
    assert m.hparams.impressions["iterations"] == 30 and m.hparams.impressions["betas"] == [2.0]


def test_an_old_lra_checkpoint_keeps_its_generator_loss_weights(teacher_ckpt: Path) -> None:
    m = LRA(teacher=str(teacher_ckpt), batch_size=8, latent_dim=8, generator_kwargs={"widths": [8, 4]},
            generator_loss={"activation": 0.0})  # a dict, as a checkpoint's hyper-parameters give it
    assert m.loss_weights == GeneratorLossWeights(activation=0.0)
    m.on_load_checkpoint({"hyper_parameters": {"weight_one_hot": 2.0, "weight_activation": 0.5}})
    assert m.loss_weights == GeneratorLossWeights(one_hot=2.0, activation=0.5)
    assert m.hparams.generator_loss == {"one_hot": 2.0, "balance": 5.0, "activation": 0.5, "disagreement": 1.0}
