"""Teacher loading: from a cvlab checkpoint or a state_dict; frozen, eval; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_modules import FrozenTeacher, TeacherLoadError, load_teacher
from lit_modules.nets import create_net
from tests.cli_runs import QUICKSTART, TINY_SHAPES, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("teacher") / "run"
    cli = run_cli("fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--trainer.max_epochs=1", run_dir=run)
    return cli.model, run / "checkpoints" / "last.ckpt"


def test_teacher_from_cvlab_checkpoint_is_frozen_eval_and_equal(trained) -> None:
    module, ckpt = trained
    teacher = load_teacher(ckpt)
    assert isinstance(teacher, FrozenTeacher)
    assert not teacher.training and not teacher.net.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()  # an enclosing module's .train() must not unfreeze it
    assert not teacher.net.training
    x = torch.rand(4, 3, 32, 32)  # pixels: both normalise inside, with the data's statistics
    module.eval()
    assert teacher.spec.mean == list(module.hparams.mean) and teacher.spec.mean is not None
    torch.testing.assert_close(teacher(x), module(x))
    # gradients still reach the inputs (synthesis and attacks need them)
    x.requires_grad_(True)
    teacher(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_teacher_from_plain_state_dict(tmp_path: Path) -> None:
    net = create_net("lenet5", num_classes=10, in_channels=1, image_size=32)
    path = tmp_path / "lenet.pt"
    torch.save(net.state_dict(), path)
    teacher = load_teacher({"weights": str(path), "normalization": "none"}, arch="lenet5", num_classes=10,
                           in_channels=1, image_size=32)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(teacher(x), net.eval()(x))
    with pytest.raises(TeacherLoadError, match="plain state_dict: give its architecture"):
        load_teacher(path)
    with pytest.raises(TeacherLoadError,
                       match="do not fit lenet5_half: missing .*; the closest zoo architecture is 'lenet5'"):
        load_teacher(path, arch="lenet5_half", num_classes=10, in_channels=1, image_size=32)


def test_missing_teacher_file(tmp_path: Path) -> None:
    with pytest.raises(TeacherLoadError, match="teacher checkpoint not found"):
        load_teacher(tmp_path / "nope.ckpt")


def test_truncated_checkpoint_is_a_clear_error_and_file_is_kept(trained, tmp_path: Path) -> None:
    _, ckpt = trained
    bad = tmp_path / "truncated.ckpt"
    data = ckpt.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherLoadError, match="truncated, corrupt or not a weights-only torch file"):
        load_teacher(bad)
    assert bad.stat().st_size == len(data) // 2  # nothing deleted or rewritten
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(TeacherLoadError, match="truncated, corrupt"):
        load_teacher(junk)


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(TeacherLoadError, match="weights-only"):
        load_teacher(path, arch="lenet5")


def test_config_mismatch_with_checkpoint(trained) -> None:
    _, ckpt = trained
    with pytest.raises(TeacherLoadError, match="num_classes: asked 100 but checkpoint has 10"):
        load_teacher(ckpt, num_classes=100)
