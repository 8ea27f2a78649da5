"""Data-free universal adversarial perturbations: the projection, the fooling loss, the stage, DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cvlab.errors import CvlabError
from lit_modules.classifier import ClassifierModule
from lit_modules.robustness import UniversalPerturbation
from lit_modules.robustness.uap_objective import (
    feature_activation_loss,
    fooling_loss,
    fooling_rate,
    project_linf_box,
    random_sign_noise,
    rescale_saturated,
)
from tests.cli_runs import read_metrics, run_cli, run_cli_subprocess
from tests.fakedata import save_cvlab_checkpoint, write_mnist_idx

# --- the projection ---------------------------------------------------------------------------------------------


def test_projection_worked_answer() -> None:
    x = torch.tensor([0.0, 0.5, 0.95, 1.0, 0.3])
    v = torch.tensor([-0.2, 0.3, 0.2, 0.05, -0.04])
    # box [max(-0.1, -x), min(0.1, 1 - x)] = [0, 0.1], [-0.1, 0.1], [-0.1, 0.05], [-0.1, 0], [-0.1, 0.1]
    d = project_linf_box(v, x, 0.1)
    torch.testing.assert_close(d, torch.tensor([0.0, 0.1, 0.05, 0.0, -0.04]))
    torch.testing.assert_close(x + d, torch.tensor([0.0, 0.6, 1.0, 1.0, 0.26]))


def test_projection_is_the_clamped_image_idempotent_and_nearest() -> None:
    g = torch.Generator().manual_seed(0)
    x, v = torch.rand(4, 1, 5, 5, generator=g), 0.6 * torch.randn(1, 5, 5, generator=g)
    eps = 0.2
    d = project_linf_box(v, x, eps)  # (4, 1, 5, 5): v broadcast over the batch
    assert d.shape == x.shape
    assert d.abs().max() <= eps + 1e-7 and (x + d).min() >= 0 and (x + d).max() <= 1
    torch.testing.assert_close(x + d, (x + v.clamp(-eps, eps)).clamp(0, 1))
    torch.testing.assert_close(project_linf_box(d, x, eps), d)  # a projection: applying it twice changes nothing
    # nearest point of the feasible box: no feasible random point is closer to v than d (per pixel)
    for _ in range(20):
        lo, hi = torch.maximum(torch.tensor(-eps), -x), torch.minimum(torch.tensor(eps), 1 - x)
        other = lo + (hi - lo) * torch.rand(x.shape, generator=g)
        assert ((other - v).abs() >= (d - v).abs() - 1e-7).all()


def test_projection_per_budget_tensor() -> None:
    x = torch.full((3, 1, 2, 2), 0.5)
    v = torch.ones(2, 1, 1, 2, 2)  # (E, 1, C, H, W)
    eps = torch.tensor([0.1, 0.3]).view(-1, 1, 1, 1, 1)
    d = project_linf_box(v, x.unsqueeze(0), eps)  # (E, B, C, H, W)
    assert d.shape == (2, 3, 1, 2, 2)
    torch.testing.assert_close(d[0], torch.full((3, 1, 2, 2), 0.1))
    torch.testing.assert_close(d[1], torch.full((3, 1, 2, 2), 0.3))


# --- the fooling objective -------------------------------------------------------------------------------------


def test_fooling_loss_worked_answers() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    logits3 = torch.tensor([[math.log(3.0), 0.0, 0.0]])
    # p_c = 1/2 -> -log(1/2); [log 3, 0]: p_0 = 3/4 -> -log(1/4), p_1 = 1/4 -> -log(3/4)
    torch.testing.assert_close(fooling_loss(logits, torch.tensor([0, 0, 1])),
                               torch.tensor([math.log(2.0), math.log(4.0), math.log(4 / 3)]))
    torch.testing.assert_close(fooling_loss(logits3, torch.tensor([0])), torch.tensor([math.log(5 / 2)]))  # 1 - 3/5
    # stable where the model is sure: 1 - p_c underflows in float32 but the loss does not
    sure = fooling_loss(torch.tensor([[100.0, 0.0]]), torch.tensor([0]))
    assert torch.isfinite(sure).all() and sure.item() == pytest.approx(100.0, abs=1e-4)
    assert fooling_loss(torch.tensor([[100.0, 0.0]]), torch.tensor([1])).item() == pytest.approx(0.0, abs=1e-6)
    # leading dimensions: (E, B, K) with (E, B)
    assert fooling_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3)


def test_fooling_rate_and_noise_control() -> None:
    clean = torch.tensor([0, 1, 2, 3])
    adv = torch.tensor([[0, 1, 2, 3], [1, 1, 0, 3], [1, 0, 0, 0]])
    torch.testing.assert_close(fooling_rate(clean, adv), torch.tensor([0.0, 0.5, 1.0]))
    eps = torch.tensor([0.05, 0.3])
    n = random_sign_noise((2, 1, 8, 8), eps, torch.Generator().manual_seed(0))
    torch.testing.assert_close(n.abs().amax(dim=(1, 2, 3)), eps)
    torch.testing.assert_close(n.abs().amin(dim=(1, 2, 3)), eps)  # every pixel at the budget: same Linf norm


# --- the data-free objective (GD-UAP) ----------------------------------------------------------------------------


def _conv1x1(weight: float, bias: float, relu_inplace: bool = False, layers: int = 1) -> torch.nn.Module:
    """``layers`` 1x1 convolutions (the first ``weight, bias``, the others the identity), each then ReLU, a head."""
    mods: list[torch.nn.Module] = []
    for i in range(layers):
        conv = torch.nn.Conv2d(1, 1, kernel_size=1)
        with torch.no_grad():
            conv.weight.fill_(weight if i == 0 else 1.0)
            conv.bias.fill_(bias if i == 0 else 0.0)
        mods += [conv, torch.nn.ReLU(inplace=relu_inplace)]
    return torch.nn.Sequential(*mods, torch.nn.Flatten(), torch.nn.Linear(4, 3))  # the linear head is not a conv


def test_feature_activation_loss_value_and_gradient_worked_answer() -> None:
    # f(x) = relu(2 x - 1) on x = [[1, 0.25], [0.75, 2]]: pre-activation [1, -0.5, 0.5, 3] -> a = [1, 0, 0.5, 3],
    # ||a||^2 = 1 + 0.25 + 9 = 10.25, loss = -log ||a|| = -log(10.25) / 2;
    # d loss / dx = -(1 / ||a||^2) a * da/dx = -(2 / 10.25) [1, 0, 0.5, 3] (zero where the ReLU is off)
    x = torch.tensor([[[[1.0, 0.25], [0.75, 2.0]]]], requires_grad=True)
    loss = feature_activation_loss(_conv1x1(2.0, -1.0), x)
    assert loss.shape == (1,)
    torch.testing.assert_close(loss, torch.tensor([-0.5 * math.log(10.25)]))
    (g,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(g, -(2 / 10.25) * torch.tensor([[[[1.0, 0.0], [0.5, 3.0]]]]))
    # unrectified: ||[1, -0.5, 0.5, 3]||^2 = 10.5
    torch.testing.assert_close(feature_activation_loss(_conv1x1(2.0, -1.0), x, rectify=False),
                               torch.tensor([-0.5 * math.log(10.5)]))


def test_feature_activation_loss_sums_layers_per_input_and_ignores_inplace_relu() -> None:
    x = torch.tensor([[[[1.0, 0.25], [0.75, 2.0]]], [[[0.0, 0.0], [1.0, 1.0]]]], requires_grad=True)  # (2, 1, 2, 2)
    # second layer: identity conv of a >= 0, so f_2 = f_1 and the loss doubles; image 2: a = [0, 0, 1, 1] -> -log 2
    loss = feature_activation_loss(_conv1x1(2.0, -1.0, relu_inplace=True, layers=2), x)
    torch.testing.assert_close(loss, torch.tensor([-math.log(10.25), -math.log(2.0)]))
    (g,) = torch.autograd.grad(loss[0], x)  # per input: image 2 gets no gradient from image 1's loss
    torch.testing.assert_close(g[0], -(4 / 10.25) * torch.tensor([[[1.0, 0.0], [0.5, 3.0]]]))
    assert (g[1] == 0).all()


def test_feature_activation_loss_without_conv_is_a_clear_error() -> None:
    with pytest.raises(CvlabError, match=r"^_Linear has no nn.Conv1d/2d/3d layer"):
        feature_activation_loss(_Linear(), torch.rand(1, 1, 4, 4))


def test_rescale_saturated_worked_answer() -> None:
    w = torch.tensor([[1.0, -1.0, 1.0, 0.5],    # 3/4 on the edge, as before: halved
                      [1.0, -1.0, 1.0, 0.5],    # 3/4 on the edge, was 1/4: moving, kept
                      [1.0, 0.2, 0.1, -0.5]])   # 1/4 on the edge, unchanged but below 1/2: kept
    prev = torch.tensor([0.75, 0.25, 0.25])
    w2, sat = rescale_saturated(w, prev)
    torch.testing.assert_close(sat, torch.tensor([0.75, 0.75, 0.25]))
    torch.testing.assert_close(w2, torch.cat([0.5 * w[:1], w[1:]]))


# --- the stage -------------------------------------------------------------------------------------------------


class _Linear(torch.nn.Module):
    """A hand-built 2-class model on 1x4x4 pixels: class 1 iff the mean pixel exceeds 0.5."""

    num_classes = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([torch.zeros_like(m), 20 * (m - 0.5)], dim=1)


def _module(budgets: list[float], tmp_path: Path) -> UniversalPerturbation:
    from lit_modules.teacher import TeacherSpec

    torch.save(_Linear().state_dict(), tmp_path / "linear.pth")
    spec = TeacherSpec(weights=str(tmp_path / "linear.pth"), arch={"class_path": "tests.test_uap._Linear"},
                       image_size=4, in_channels=1, num_classes=2, mean=[0.0], std=[1.0])
    return UniversalPerturbation(model=spec, budgets=budgets, lr=0.1)


def test_learned_uap_fools_stays_in_budget_and_beats_noise(tmp_path: Path) -> None:
    m = _module([0.05, 0.2], tmp_path)
    assert not any(p.requires_grad for p in m.model.parameters())  # the attacked model is frozen
    g = torch.Generator().manual_seed(0)
    x = 0.4 + 0.1 * torch.rand(64, 1, 4, 4, generator=g)  # means about 0.45 (+- 0.01): all class 0
    opt = m.configure_optimizers()
    losses = []
    for _ in range(30):  # the stage's own training_step and projection
        opt.zero_grad()
        loss = m.training_step((x, torch.zeros(64, dtype=torch.long)), 0)
        loss.backward()
        opt.step()
        m.on_train_batch_end(None, None, 0)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    v = m.perturbation.detach()
    assert (v.abs().amax(dim=(1, 2, 3)) <= m.eps + 1e-7).all()  # each v_e inside its own ball
    xp = m.perturb(x, v)
    assert xp.min() >= 0 and xp.max() <= 1
    clean = m.model(x).argmax(-1)
    rate = fooling_rate(clean, m.predict_perturbed(x, v).argmax(-1))
    noise = fooling_rate(clean, m.predict_perturbed(x, m.noise).argmax(-1))
    # eps 0.05 moves the brighter half of the images over 0.5, eps 0.2 every one; sign noise of the same norm shifts
    # the mean by eps * (mean of 16 signs), far less
    assert rate[1] == 1.0 and 0.0 < rate[0] < 1.0
    assert (rate >= noise).all() and rate[1] > noise[1]
    assert torch.allclose(v[1], torch.full_like(v[1], 0.2))  # the optimum: +eps everywhere


class _TinyConv(torch.nn.Module):
    """A 2-class conv net on 1x4x4 pixels: conv 3x3 (2 channels) -> ReLU -> mean -> linear."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, kernel_size=3, padding=1)
        self.fc = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _data_free_module(tmp_path: Path, **kwargs) -> UniversalPerturbation:
    from lit_modules.teacher import TeacherSpec

    torch.manual_seed(0)
    torch.save(_TinyConv().state_dict(), tmp_path / "conv.pth")
    spec = TeacherSpec(weights=str(tmp_path / "conv.pth"), arch={"class_path": "tests.test_uap._TinyConv"},
                       image_size=4, in_channels=1, num_classes=2, mean=[0.5], std=[0.25])
    return UniversalPerturbation(model=spec, objective="feature_activation", **kwargs)


def test_data_free_uap_inflates_activations_and_stays_in_its_ball(tmp_path: Path) -> None:
    m = _data_free_module(tmp_path, budgets=[0.05, 0.2], lr=0.1, saturation_rescale=True)
    assert m.w.abs().max() <= 1 and m.w.abs().min() > 0  # GD-UAP's start: uniform in the ball
    v = m.perturbation.detach()
    torch.testing.assert_close(m.data_free_input(v), v / 0.25)  # the perturbation alone, normalised: v / std
    opt = m.configure_optimizers()
    losses, sats = [], []
    for step in range(60):  # the stage's own step on training ticks (no images), projection and rescaling
        opt.zero_grad()
        loss = m.training_step(step, step)
        loss.backward()
        opt.step()
        m.on_train_batch_end(None, step, step)
        losses.append(loss.item())
        sats.append(m.saturation.clone())
        v = m.perturbation.detach()
        assert (v.abs().amax(dim=(1, 2, 3)) <= m.eps + 1e-7).all()  # each v_e inside its own ball, every step
    assert min(losses) < losses[0] - 1.0  # activations inflated (the loss is a sum of -log norms)
    # a 1-channel 3x3 conv's activations grow fastest at the edge of the ball: v saturates, then is halved
    sat = torch.stack(sats)  # (steps, E)
    assert (sat > 0.5).any() and ((sat[:-1] > 0.5) & (sat[1:] < 0.5)).any()


def test_data_free_uap_runs_without_the_rescaling(tmp_path: Path) -> None:
    m = _data_free_module(tmp_path, budgets=[0.1], lr=0.1)
    opt = m.configure_optimizers()
    for step in range(30):
        opt.zero_grad()
        m.training_step(step, step).backward()
        opt.step()
        m.on_train_batch_end(None, step, step)
    assert m.w.abs().max() <= 1 and (m.w.abs() == 1).float().mean() > 0.5  # pushed to the edge and kept inside
    assert (m.saturation == 0).all()  # not tracked


def test_wrong_objective_or_data_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(CvlabError, match=r"^objective must be one of fooling, feature_activation, got 'gduap'$"):
        UniversalPerturbation(model=str(tmp_path / "none.ckpt"), objective="gduap")  # checked before loading
    m = _data_free_module(tmp_path, budgets=[0.1])
    with pytest.raises(CvlabError, match=r"^objective 'feature_activation' is data-free and would ignore the "
                                         r"training images of tuple batches; use data: datamodules.data_free.Data"):
        m.training_step((torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)), 0)
    f = _module([0.1], tmp_path)
    with pytest.raises(CvlabError, match=r"^objective 'fooling' learns on images but the training data is int "
                                         r"batches \(no images\)"):
        f.training_step(0, 0)
    with pytest.raises(CvlabError, match="has no nn.Conv1d/2d/3d layer"):  # the fooling test model has no conv
        UniversalPerturbation(model=f.hparams.model, objective="feature_activation").training_step(0, 0)


@pytest.mark.parametrize("budgets", [[1.5], [-0.1], [0.1, 2.0], []])
def test_budget_outside_unit_interval_is_a_clear_error(budgets: list[float], tmp_path: Path) -> None:
    with pytest.raises(CvlabError, match=r"UAP budget must be in \[0, 1\]|budgets is empty"):
        _module(budgets, tmp_path)


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uap_data")
    write_mnist_idx(root, "MNIST", n_train=120, n_test=40)
    for k in (10, 100):
        m = ClassifierModule(arch="lenet5", num_classes=k, in_channels=1, image_size=32)
        save_cvlab_checkpoint(m, root / f"lenet_{k}.ckpt")
    (root / "di_10").mkdir()
    g = torch.Generator().manual_seed(0)
    torch.save({"index": torch.arange(40), "image": torch.rand(40, 1, 32, 32, generator=g),
                "target": torch.full((40, 10), 0.1)}, root / "di_10" / "shard-000000000-000000039-r0.pt")
    (root / "di_100").mkdir()
    torch.save({"index": torch.arange(4), "image": torch.rand(4, 1, 32, 32), "target": torch.full((4, 100), 0.01)},
               root / "di_100" / "shard-000000000-000000003-r0.pt")
    return root


def _args(root: Path, teacher: str = "lenet_10", impressions: str = "di_10") -> list[str]:
    return ["fit", "--config=experiments/data_impressions/mnist/uap_impressions.yaml",
            f"--model.init_args.model={root / f'{teacher}.ckpt'}",
            f"--data.init_args.task.init_args.data_dir={root}",
            f"--data.init_args.pool.init_args.folder={root / impressions}",
            "--model.init_args.lr=0.05", "--model.init_args.budgets=[0.1, 0.3]",
            "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--run.logger=csv"]


def test_stage_on_impressions_writes_metrics_and_images(fake_mnist: Path, tmp_path: Path) -> None:
    run_cli(*_args(fake_mnist), "--data.init_args.batch_size=10", run_dir=tmp_path / "run")
    m = read_metrics(tmp_path / "run")
    for b in ("0.1", "0.3"):
        assert 0.0 <= m[f"test/fooling_rate_{b}"] <= 1.0 and 0.0 <= m[f"test/noise_fooling_rate_{b}"] <= 1.0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    w = ckpt["state_dict"]["w"]
    assert w.abs().max() <= 1.0 and w.abs().max() > 0  # learned, and inside its ball
    images = {p.name.rsplit("_", 1)[0] for p in (tmp_path / "run" / "images").glob("*.png")}
    assert {"uap_perturbations", "uap_examples"} <= images


def _data_free_args(root: Path) -> list[str]:
    return ["fit", "--config=experiments/data_impressions/mnist/uap_data_free.yaml",
            f"--model.init_args.model={root / 'lenet_10.ckpt'}", f"--data.init_args.task.init_args.data_dir={root}",
            "--model.init_args.budgets=[0.1, 0.3]", "--data.init_args.steps_per_epoch=3",
            "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--run.logger=csv"]


def test_data_free_stage_needs_no_pool_and_writes_metrics(fake_mnist: Path, tmp_path: Path) -> None:
    run_cli(*_data_free_args(fake_mnist), run_dir=tmp_path / "run")
    m = read_metrics(tmp_path / "run")
    for b in ("0.1", "0.3"):
        assert 0.0 <= m[f"test/fooling_rate_{b}"] <= 1.0 and 0.0 <= m[f"val/fooling_rate_{b}"] <= 1.0
    w = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                   weights_only=True)["state_dict"]["w"]
    assert w.shape == (2, 1, 32, 32) and w.abs().max() <= 1.0  # inside its ball


def test_data_free_objective_with_a_pool_is_a_clear_error(fake_mnist: Path, tmp_path: Path) -> None:
    with pytest.raises(CvlabError, match="would ignore the training images of TransferSetDataModule"):
        run_cli(*_args(fake_mnist), "--model.init_args.objective=feature_activation", run_dir=tmp_path / "run")
    with pytest.raises(CvlabError, match="training data is DataFreeDataModule"):
        run_cli(*_data_free_args(fake_mnist), "--model.init_args.objective=fooling", run_dir=tmp_path / "run2")


@pytest.mark.parametrize(("teacher", "impressions"), [("lenet_100", "di_10"), ("lenet_10", "di_100")])
def test_class_count_mismatch_is_a_clear_error(fake_mnist: Path, tmp_path: Path, teacher: str,
                                               impressions: str) -> None:
    with pytest.raises(CvlabError, match="100"):
        run_cli(*_args(fake_mnist, teacher, impressions), run_dir=tmp_path / "run")


@pytest.mark.slow
def test_ddp_two_processes_match_one(fake_mnist: Path, tmp_path: Path) -> None:
    # the perturbation's gradient is all-reduced (averaged) and each rank's loss is its batch mean: 2 x 10 images
    # per step on 2 processes must take the step 20 images take on one (the ranks split the same permutation)
    single = tmp_path / "single"
    r1 = run_cli_subprocess(*_args(fake_mnist), "--data.init_args.batch_size=20", f"--run.dir={single}")
    assert r1.returncode == 0, r1.stderr[-3000:]
    ddp = tmp_path / "ddp"
    r2 = run_cli_subprocess(*_args(fake_mnist), "--data.init_args.batch_size=10", "--trainer.devices=2",
                            "--trainer.strategy=ddp", f"--run.dir={ddp}")
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]["w"]
            for d in (single, ddp))
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    ma, mb = read_metrics(single), read_metrics(ddp)
    for k in ("test/fooling_rate_0.1", "test/fooling_rate_0.3", "test/noise_fooling_rate_0.3", "val/fooling_rate_0.3"):
        assert ma[k] == pytest.approx(mb[k], abs=1e-6), k


def test_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """`cvlab bench uap` (not timed here): both UAP paths and the three continual-learning steps run."""
    from experiments.benchmarks.uap import main as bench_uap

    assert bench_uap(["--iters", "1", "--batch-size", "8", "--replay-batch", "8", "--budgets", "0.1", "0.2"]) == 0
    out = capsys.readouterr().out
    for label in ("uap step batched", "uap step loop over budgets", "cl step impression replay", "cl step lwf",
                  "cl step fine-tune"):
        assert label in out
