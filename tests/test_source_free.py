"""Source-free adaptation with Data Impressions: CORAL and information maximisation, the target domain, the stage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cvlab.errors import CvlabError
from datamodules import DomainShiftDataModule, MNISTDataModule
from lit_modules.classifier import ClassifierModule
from lit_modules.distillation.adaptation_losses import coral_loss, feature_covariance, information_maximization
from tests.cli_runs import read_metrics, run_cli
from tests.fakedata import save_cvlab_checkpoint, write_mnist_idx


def test_coral_worked_answer() -> None:
    s = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # covariance [[2, 0], [0, 0]]
    t = torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # covariance [[0, 0], [0, 2]]
    torch.testing.assert_close(feature_covariance(s), torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    assert coral_loss(s, t).item() == pytest.approx((4 + 4) / (4 * 2 * 2))  # ||diag(2, -2)||_F^2 / (4 d^2)
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 6, generator=g)
    assert coral_loss(f, f + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # a shift of the mean is not penalised
    assert coral_loss(f, 2 * f).item() > 0
    torch.testing.assert_close(feature_covariance(f), torch.cov(f.T))


def test_information_maximization_worked_answers() -> None:
    loss, ent, div = information_maximization(torch.zeros(2, 2))  # uniform: H(p_i) = H(mean) = ln 2
    assert ent.item() == pytest.approx(math.log(2), abs=1e-5) and div.item() == pytest.approx(math.log(2), abs=1e-5)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    loss, ent, div = information_maximization(torch.tensor([[100.0, 0.0], [0.0, 100.0]]))  # confident, diverse
    assert ent.item() == pytest.approx(0.0, abs=1e-4) and loss.item() == pytest.approx(-math.log(2), abs=1e-4)
    loss, _, div = information_maximization(torch.tensor([[100.0, 0.0], [100.0, 0.0]]))  # confident, collapsed
    assert div.item() == pytest.approx(0.0, abs=1e-4) and loss.item() == pytest.approx(0.0, abs=1e-4)


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sf_data")
    write_mnist_idx(root, "MNIST", n_train=120, n_test=40)
    for k in (10, 100):
        m = ClassifierModule(arch="lenet5", num_classes=k, in_channels=1, image_size=32)
        save_cvlab_checkpoint(m, root / f"lenet_{k}.ckpt")
    (root / "di").mkdir()
    torch.save({"index": torch.arange(30), "image": torch.rand(30, 1, 32, 32), "target": torch.full((30, 10), 0.1)},
               root / "di" / "shard-000000000-000000029-r0.pt")
    return root


def test_inverted_domain(fake_mnist: Path) -> None:
    task = MNISTDataModule(data_dir=str(fake_mnist), image_size=32, val_size=20)
    dm = DomainShiftDataModule(MNISTDataModule(data_dir=str(fake_mnist), image_size=32, val_size=20), shift="invert")
    task.setup("fit")
    dm.setup("fit")
    for split in ("train", "val", "test"):
        torch.testing.assert_close(getattr(dm, f"{split}_x").int(), 255 - getattr(task, f"{split}_x").int())
        assert torch.equal(getattr(dm, f"{split}_y"), getattr(task, f"{split}_y"))


def test_blend_over_textures_worked() -> None:
    from datamodules.domain_shift import blend_over_textures
    from datamodules.synthetic import generate_shapes_with_backgrounds

    x = torch.tensor([0, 255, 51, 0], dtype=torch.uint8).view(1, 1, 2, 2).repeat(3, 1, 1, 1)
    _, tex = generate_shapes_with_backgrounds(3, 7, 2, background="random")
    t = tex.float().mean(1, keepdim=True)  # grey textures (3, 1, 2, 2)
    out = blend_over_textures(x, seed=7)
    # a = x / 255: black pixels become the texture, white strokes stay white, 51 (a = 0.2) is 0.2 * 51 + 0.8 * t
    torch.testing.assert_close(out.float(),
                               (0.2 * 51 + 0.8 * t).round().where(x == 51, t.round()).where(x != 255, x.float()))


def test_textured_domain_keeps_strokes_and_labels(fake_mnist: Path) -> None:
    task = MNISTDataModule(data_dir=str(fake_mnist), image_size=32, val_size=20)
    dm = DomainShiftDataModule(MNISTDataModule(data_dir=str(fake_mnist), image_size=32, val_size=20), shift="texture")
    task.setup("fit")
    dm.setup("fit")
    for split in ("train", "val", "test"):
        src, tgt = getattr(task, f"{split}_x").int(), getattr(dm, f"{split}_x").int()
        assert torch.equal(getattr(dm, f"{split}_y"), getattr(task, f"{split}_y"))
        dark, bright = src < 40, src > 215
        assert tgt[dark].float().mean() > src[dark].float().mean() + 20  # the dark background is texture now
        assert (tgt[bright] - src[bright]).abs().max() <= 41  # (1 - a) <= 40/255 of a bright pixel is texture
    assert not torch.equal(dm.train_x[:4], dm.test_x[:4])  # splits draw their own textures


def _args(root: Path, config: str, *extra: str) -> list[str]:
    return ["fit", f"--config=experiments/data_impressions/mnist/{config}.yaml",
            f"--data.init_args.task.init_args.data_dir={root}", "--data.init_args.batch_size=16",
            "--model.init_args.source_batch=8", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.log_every_n_steps=1", "--run.logger=csv", *extra]


@pytest.mark.parametrize("config", ["sfda_impressions", "sfda_im_only"])
def test_stage_adapts_from_the_source_weights(fake_mnist: Path, tmp_path: Path, config: str) -> None:
    extra = [f"--model.init_args.source.init_args.folder={fake_mnist / 'di'}"] if config == "sfda_impressions" else []
    cli = run_cli(*_args(fake_mnist, config, f"--model.init_args.source_model={fake_mnist / 'lenet_10.ckpt'}", *extra),
                  run_dir=tmp_path / "run")
    m = read_metrics(tmp_path / "run")
    assert {"test/acc", "test/source_only_acc", "train/entropy", "train/diversity"} <= m.keys()
    model = cli.model
    assert not any(p.requires_grad for p in model.source_model.parameters())  # the source model stays frozen
    assert any(p.requires_grad for p in model.net.parameters())
    moved = [not torch.equal(a, b)
             for a, b in zip(model.net.parameters(), model.source_model.net.parameters(), strict=True)]
    assert any(moved)  # the copy was adapted, the source model was not
    if config == "sfda_impressions":
        assert m["train/coral"] >= 0 and m["train/kd"] >= 0
        assert any((tmp_path / "run" / "images").glob("adaptation_source_samples_*.png"))


def test_source_model_of_other_classes_is_a_clear_error(fake_mnist: Path, tmp_path: Path) -> None:
    with pytest.raises(CvlabError, match="disagree on num_classes: 100 vs 10"):
        run_cli(*_args(fake_mnist, "sfda_im_only", f"--model.init_args.source_model={fake_mnist / 'lenet_100.ckpt'}"),
                run_dir=tmp_path / "run")


def test_real_target_as_colour_images(fake_mnist: Path) -> None:
    task = MNISTDataModule(data_dir=str(fake_mnist), image_size=32, val_size=20)
    dm = DomainShiftDataModule(MNISTDataModule(data_dir=str(fake_mnist), image_size=32, val_size=20), shift="none",
                               channels=3)
    task.setup("fit")
    dm.setup("fit")
    assert dm.in_channels == 3 and dm.input_shape == (3, 32, 32) and len(dm.mean) == 3
    assert torch.equal(dm.test_x, task.test_x.expand(-1, 3, -1, -1))  # grey repeated: MNIST for an SVHN model
