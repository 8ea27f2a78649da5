"""LRA (issue 4): the generator, the generator and KD losses with worked answers, the meta gradient
against hand-computed closed forms, the memory, checkpoint/resume, bad input, DDP and the CLI."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.func import functional_call

from cvlab.distributed import all_reduce_mean
from datamodules import CvlabError, MNISTDataModule
from datamodules.data_free import DataFreeDataModule
from lit_modules import LRA
from lit_modules.classifier import ClassifierModule
from lit_modules.distillation.lra import ImageSizeMismatchError
from lit_modules.distillation.lra_losses import (
    activation_loss,
    adam_first_step,
    class_balance_loss,
    gaussian_kl,
    generator_loss,
    js_disagreement_loss,
    l1_kd_loss,
    latent_prior_loss,
    one_hot_loss,
    reconstruction_loss,
)
from lit_modules.distillation.lra_memory import CyclicMemory
from lit_modules.distillation.lra_update import kd_gradients, meta_gradients, student_gradients
from lit_modules.nets import LatentEncoder, create_generator, create_net
from lit_modules.nets.generator import upsample2x_conv3x3
from tests.cli_runs import KillAtEpoch, SimulatedKill, read_metrics, run_cli
from tests.conftest import REPO
from tests.fakedata import save_cvlab_checkpoint, write_mnist_idx

TINY_GEN = {"widths": [8, 4]}


def save_teacher(path: Path, arch: str = "lenet5", in_channels: int = 1, image_size: int = 32, seed: int = 0) -> Path:
    """A random cvlab teacher checkpoint as ClassifierModule writes it."""
    torch.manual_seed(seed)
    m = ClassifierModule(arch=arch, num_classes=10, in_channels=in_channels, image_size=image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_cvlab_checkpoint(m, path)
    return path


def _mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(s, t.detach())


# --- the generator ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 1), (28, 3), (32, 3)])
def test_generator_shapes_and_normalised_output(size: int, channels: int) -> None:
    g = create_generator("dafl", latent_dim=16, out_channels=channels, image_size=size, widths=(8, 4))
    x = g(torch.randn(32, 16))
    assert x.shape == (32, channels, size, size)
    # the last BatchNorm (affine=False) puts each channel at mean 0, variance var / (var + eps) <= 1 over the batch
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(channels), atol=1e-4, rtol=0)
    var = x.var((0, 2, 3), unbiased=False)
    assert ((var > 0.8) & (var <= 1 + 1e-4)).all(), var


def test_fused_upsample_conv_equals_upsample_then_conv() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 7, requires_grad=True)
    w = torch.randn(4, 5, 3, 3, requires_grad=True)
    b = torch.randn(4)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
    out = upsample2x_conv3x3(x, w, b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g_ref = torch.autograd.grad(ref.square().sum(), (x, w))
    g_out = torch.autograd.grad(out.square().sum(), (x, w))
    for a, r in zip(g_out, g_ref):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
    # the whole generator: fused and plain give the same images from the same weights
    plain = create_generator("dafl", 16, 3, 32, widths=(8, 4))
    fused = create_generator("dafl", 16, 3, 32, widths=(8, 4), fused_upsample=True)
    fused.load_state_dict(plain.state_dict())
    z = torch.randn(6, 16)
    torch.testing.assert_close(fused(z), plain(z), atol=1e-4, rtol=1e-4)


def test_generator_bad_size_and_unknown_name_fail_clearly() -> None:
    with pytest.raises(CvlabError, match="multiple of 4"):
        create_generator("dafl", 16, 1, 30)
    with pytest.raises(CvlabError, match="unknown generator 'nope'; available: dafl"):
        create_generator("nope")


# --- loss terms: worked answers ------------------------------------------------------------------------------
def test_one_hot_loss_worked_answer() -> None:
    t = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4), argmax 1
    assert one_hot_loss(t).item() == pytest.approx(math.log(4 / 3), rel=1e-6)


def test_class_balance_loss_worked_answers() -> None:
    even = torch.tensor([[5.0, 0.0], [0.0, 5.0]])  # pbar = (1/2, 1/2) exactly: sum pbar log10 pbar = -log10 2
    assert class_balance_loss(even).item() == pytest.approx(-math.log10(2), rel=1e-6)
    one_class = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])  # pbar = (3/4, 1/4)
    want = 0.75 * math.log10(0.75) + 0.25 * math.log10(0.25)
    assert class_balance_loss(one_class).item() == pytest.approx(want, rel=1e-6)
    assert class_balance_loss(one_class, log_base=math.e).item() == pytest.approx(want * math.log(10), rel=1e-6)
    assert class_balance_loss(even).item() < class_balance_loss(one_class).item()  # balance is rewarded


def test_activation_loss_worked_answer() -> None:
    assert activation_loss(torch.tensor([[1.0, -2.0], [3.0, -4.0]])).item() == pytest.approx(-2.5)


def test_js_disagreement_worked_answers() -> None:
    t = torch.tensor([[3 * math.log(3.0), 0.0]])  # at tau 3: P = (3/4, 1/4)
    assert js_disagreement_loss(t.clone(), t).item() == pytest.approx(1.0)  # agreement: JS 0, loss 1
    s = torch.tensor([[0.0, 0.0]])  # Q = (1/2, 1/2); M = (5/8, 3/8); KL terms averaged over the K = 2 entries
    kl_mp = 0.5 * (0.625 * math.log(0.625 / 0.75) + 0.375 * math.log(0.375 / 0.25))
    kl_mq = 0.5 * (0.625 * math.log(0.625 / 0.5) + 0.375 * math.log(0.375 / 0.5))
    assert js_disagreement_loss(s, t).item() == pytest.approx(1 - 0.5 * (kl_mp + kl_mq), rel=1e-6)
    assert js_disagreement_loss(s, t).item() == pytest.approx(js_disagreement_loss(t, s).item(), rel=1e-6)


def test_l1_kd_and_generator_loss_weights() -> None:
    assert l1_kd_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])).item() == pytest.approx(1.5)
    assert l1_kd_loss(torch.ones(3, 4), torch.ones(3, 4)).item() == 0.0
    torch.manual_seed(0)
    t, f, s = torch.randn(6, 4), torch.randn(6, 5), torch.randn(6, 4)
    total, terms = generator_loss(t, f, s)
    want = terms["one_hot"] + 5 * terms["balance"] + 0.1 * terms["activation"] + terms["disagreement"]
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(terms["activation"], -f.abs().mean())


# --- the meta gradient: closed forms on a linear student ---------------------------------------------------------
def test_generative_replay_losses_worked_answers() -> None:
    # per dimension over the batch: (1, -1) mean 0 var 2; (1, 3) mean 2 var 2 -> mse(var, 1) = 1, mse(mean, 0) = 2
    assert latent_prior_loss(torch.tensor([[1.0, 1.0], [-1.0, 3.0]])).item() == pytest.approx(3.0)
    # KL(N((1, 0), diag(1, 2)) || N(0, I)) = 0.5 * (1 + 1) + 0.5 * (2 - 1 - log 2) = 1.5 - 0.5 log 2 ...
    # per the formula:
    # -0.5 * [(1 + 0 - 1 - 1) + (1 + log 2 - 0 - 2)] = 1 - 0.5 log 2
    kl = gaussian_kl(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]]))
    assert kl.item() == pytest.approx(1 - 0.5 * math.log(2.0))
    x_rec, x = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)  # L1 1
    t_rec, t = torch.zeros(1, 2), torch.tensor([[1.0, 3.0]])  # L1 2
    zero = torch.zeros(1, 1)
    assert reconstruction_loss(x_rec, x, t_rec, t, zero, zero).item() == pytest.approx(3.0)
    # KL of N(2, 1) is 2; weight 0.5 adds 1
    assert reconstruction_loss(x_rec, x, t_rec, t, torch.tensor([[2.0]]), zero,
                               kl_weight=0.5).item() == pytest.approx(4.0)


def test_adam_first_step_is_a_fresh_adam_step() -> None:
    torch.manual_seed(0)
    z, g = torch.randn(4, 6), torch.randn(4, 6)
    p = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.02)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(adam_first_step(z, g, 0.02), p.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_latent_encoder_shapes_and_seeded_sampling(size: int, channels: int) -> None:
    enc = LatentEncoder(latent_dim=5, in_channels=channels)
    x = torch.randn(3, channels, size, size)
    z1, mu, log_var = enc(x, generator=torch.Generator().manual_seed(1))
    z2, _, _ = enc(x, generator=torch.Generator().manual_seed(1))
    assert z1.shape == mu.shape == log_var.shape == (3, 5) and torch.equal(z1, z2)
    eps = torch.randn((3, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z1, mu + torch.exp(0.5 * log_var) * eps)


def _linear_problem(seed: int = 0):
    torch.manual_seed(seed)
    D, K, N, M = 5, 3, 6, 4
    net = nn.Linear(D, K, bias=False)
    x_new, x_mem = torch.randn(N, D), torch.randn(M, D)
    t_new, t_mem = torch.randn(N, K), torch.randn(M, K)
    return net, x_new, x_mem, t_new, t_mem


def _grads(net, x_new, x_mem, t_new, t_mem, mode, lr, wd, loss_fn=l1_kd_loss, retain_weight=1.0):
    params = dict(net.named_parameters())
    return meta_gradients(net, params, {}, x_new, t_new, x_mem, t_mem, mode, lr, wd, loss_fn,
                          retain_weight=retain_weight).grads["weight"]


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_meta_gradient_matches_the_hand_computed_second_order_form(wd: float) -> None:
    """Linear student S(x) = x W^T with MSE KD, L(W; X, T) = |X W^T - T|^2 / (n K):
    grad L = 2/(nK) (X W^T - T)^T X and the Hessian acts as H[V] = 2/(nK) V X^T X, so
    dJ/dW = g_kd(W) + (1 - a l) v - a * 2/(N K) v X_new^T X_new,  v = grad L_mem(W'),
    W' = W - a (grad L_new(W) + l W)."""
    net, xn, xm, tn, tm = _linear_problem()
    W, a = net.weight.detach(), 0.9
    N, K = tn.shape

    def grad(W_, X, T):
        return 2.0 / (X.shape[0] * K) * (X @ W_.T - T).T @ X

    W1 = W - a * (grad(W, xn, tn) + wd * W)
    v = grad(W1, xm, tm)
    g_kd = grad(W, torch.cat([xn, xm]), torch.cat([tn, tm]))
    hess_v = 2.0 / (N * K) * v @ xn.T @ xn
    second = g_kd + (1 - a * wd) * v - a * hess_v
    first = g_kd + (1 - a * wd) * v
    torch.testing.assert_close(_grads(net, xn, xm, tn, tm, "second_order", a, wd, _mse), second, atol=1e-5, rtol=1e-5)
    # first order = the same with the second-order (Hessian) term removed
    torch.testing.assert_close(_grads(net, xn, xm, tn, tm, "first_order", a, wd, _mse), first, atol=1e-5, rtol=1e-5)
    assert (second - first).abs().max() > 1e-3  # the Hessian term is really there
    # retain_weight w scales the whole retention part: g_kd + w ((1 - a l) v - a H v)
    w = 0.25
    weighted = g_kd + w * ((1 - a * wd) * v - a * hess_v)
    torch.testing.assert_close(_grads(net, xn, xm, tn, tm, "second_order", a, wd, _mse, w), weighted,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_grads(net, xn, xm, tn, tm, "second_order", a, wd, _mse, 0.0), g_kd,
                               atol=1e-5, rtol=1e-5)


def test_meta_gradient_with_l1_kd_has_no_second_order_term_on_a_linear_student() -> None:
    """With L1 KD, grad L = 1/(nK) sign(X W^T - T)^T X is piecewise constant: H = 0 on a linear student."""
    net, xn, xm, tn, tm = _linear_problem(1)
    W, a, wd = net.weight.detach(), 0.9, 5e-4
    K = tn.shape[1]

    def grad(W_, X, T):
        return (X @ W_.T - T).sign().T @ X / (X.shape[0] * K)

    W1 = W - a * (grad(W, xn, tn) + wd * W)
    want = grad(W, torch.cat([xn, xm]), torch.cat([tn, tm])) + (1 - a * wd) * grad(W1, xm, tm)
    torch.testing.assert_close(_grads(net, xn, xm, tn, tm, "second_order", a, wd), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_grads(net, xn, xm, tn, tm, "first_order", a, wd), want, atol=1e-6, rtol=1e-5)


def _reference_meta(net: nn.Module, xn, xm, tn, tm, lr: float, wd: float, second: bool) -> dict[str, torch.Tensor]:
    """The paper's update written as its public code does it: differentiate J through theta'."""
    params = dict(net.named_parameters())
    inner = l1_kd_loss(functional_call(net, params, (xn,)), tn)
    g = torch.autograd.grad(inner, list(params.values()), create_graph=second)
    adapted = {n: p - lr * (gi + wd * p) for (n, p), gi in zip(params.items(), g)}
    retain = l1_kd_loss(functional_call(net, adapted, (xm,)), tm)
    kd = l1_kd_loss(functional_call(net, params, (torch.cat([xn, xm]),)), torch.cat([tn, tm]))
    return dict(zip(params, torch.autograd.grad(retain + kd, list(params.values()))))


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("mode", ["first_order", "second_order"])
def test_meta_gradient_equals_differentiating_through_the_inner_step(batchnorm: bool, mode: str) -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [nn.Tanh(), nn.Linear(8, 4)]
    net = nn.Sequential(*layers).train()
    xn, xm, tn, tm = torch.randn(10, 6), torch.randn(4, 6), torch.randn(10, 4), torch.randn(4, 4)
    ours = meta_gradients(net, dict(net.named_parameters()), dict(net.named_buffers()), xn, tn, xm, tm, mode, 0.9, 5e-4)
    ref = _reference_meta(copy.deepcopy(net), xn, xm, tn, tm, 0.9, 5e-4, mode == "second_order")
    for n in ref:
        torch.testing.assert_close(ours.grads[n], ref[n], atol=1e-5, rtol=1e-4)
    assert ours.retain is not None and ours.acquire is not None


def test_empty_memory_is_plain_kd_and_meta_none_is_kd_on_new_and_memory() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    p = dict(net.named_parameters())
    xn, xm, tn, tm = torch.randn(10, 6), torch.randn(4, 6), torch.randn(10, 4), torch.randn(4, 4)
    plain = kd_gradients(net, p, {}, xn, tn)
    for mode in ("none", "first_order", "second_order"):
        out = student_gradients(net, p, {}, xn, tn, None, None, mode)  # empty memory: plain KD, as the paper
        for n in p:
            torch.testing.assert_close(out.grads[n], plain.grads[n])
        assert out.retain is None
    replay = student_gradients(net, p, {}, xn, tn, xm, tm, "none")
    want = kd_gradients(net, p, {}, torch.cat([xn, xm]), torch.cat([tn, tm]))
    for n in p:
        torch.testing.assert_close(replay.grads[n], want.grads[n])


def test_student_updates_lower_the_kd_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    teacher, student = create_net("lenet5", 10, 1, 32).eval(), create_net("lenet5_half", 10, 1, 32)
    xn, xm = torch.randn(32, 1, 32, 32), torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        tn, tm = teacher(xn) * 5, teacher(xm) * 5
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    p = dict(student.named_parameters())
    first = None
    for _ in range(15):
        out = student_gradients(student, p, {}, xn, tn, xm, tm, "second_order", 0.9, 5e-4)
        first = out.kd if first is None else first
        for n, t in p.items():
            t.grad = out.grads[n]
        opt.step()
    assert torch.isfinite(out.kd) and out.kd < 0.8 * first


# --- memory -------------------------------------------------------------------------------------------------------
def test_cyclic_memory_order_overwrite_sampling_and_state() -> None:
    mem = CyclicMemory(3)
    assert len(mem) == 0 and mem.sample(0) is None
    for i in range(4):  # the 4th push overwrites slot 0 (the oldest)
        mem.push(torch.full((2, 1, 2, 2), float(i)))
    assert len(mem) == 3 and mem.pos == 1
    assert [mem.images[s, 0, 0, 0, 0].item() for s in range(3)] == [3.0, 1.0, 2.0]
    assert {mem.sample(s)[0, 0, 0, 0].item() for s in range(40)} == {1.0, 2.0, 3.0}
    assert torch.equal(mem.sample(5), mem.sample(5))  # seeded
    other = CyclicMemory(3)
    other.load_state_dict(mem.state_dict())
    assert other.pos == 1 and len(other) == 3 and torch.equal(other.images, mem.images)
    with pytest.raises(CvlabError, match="3 slots but memory_slots is 5"):
        CyclicMemory(5).load_state_dict(mem.state_dict())


# --- the module ----------------------------------------------------------------------------------------------------
def _fake_mnist(root: Path) -> Path:
    write_mnist_idx(root, "MNIST", n_train=20, n_test=40)
    return root


def _dm(root: Path, steps: int = 2) -> DataFreeDataModule:
    return DataFreeDataModule(MNISTDataModule(data_dir=str(root), image_size=32), steps_per_epoch=steps,
                              eval_batch_size=20)


def _module(teacher: Path | dict, **kw) -> LRA:
    args = dict(teacher=teacher if isinstance(teacher, dict) else str(teacher), batch_size=8, student_steps=2,
                latent_dim=8, generator_kwargs=TINY_GEN, memory_slots=2, memory_push_every_n_epochs=1,
                image_every_n_epochs=1)
    args.update(kw)
    return LRA(**args)


def _trainer(root: Path, epochs: int, **kw) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, logger=False, default_root_dir=root, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1, **kw)


def test_teacher_is_frozen_and_stays_in_eval_mode(tmp_path: Path) -> None:
    m = _module(save_teacher(tmp_path / "t.ckpt"))
    m.train()
    assert not m.teacher.training and all(not p.requires_grad for p in m.teacher.parameters())
    assert m.net.training and m.generator.training


def test_memory_and_retention_state_survive_checkpoint_and_resume(tmp_path: Path) -> None:
    teacher, data = save_teacher(tmp_path / "t.ckpt"), _fake_mnist(tmp_path / "data")
    probe = dict(probe_epochs=[0, 1, 2], probe_size=4)  # the retention probe (issue 37) resumes too
    L.seed_everything(0)
    straight = _module(teacher, **probe)
    _trainer(tmp_path / "a", 3, enable_checkpointing=False).fit(straight, datamodule=_dm(data))

    L.seed_everything(0)
    first = _module(teacher, **probe)  # the same run (3 epochs: same cosine schedule), killed at the start of epoch 2
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b" / "checkpoints", save_last=True)
    with pytest.raises(SimulatedKill):
        _trainer(tmp_path / "b", 3, callbacks=[ckpt, KillAtEpoch(2)]).fit(first, datamodule=_dm(data))
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    mem = saved["lra"]["memory"]
    assert mem["count"] == 2 and mem["pos"] == 0 and mem["images"].shape == (2, 1, 1, 32, 32)
    assert torch.equal(mem["images"], first.memory.images)  # content and slot order as in the run

    assert saved["lra"]["probe"]["taken"] == [0, 1] and saved["lra"]["probe"]["images"].shape == (2, 4, 1, 32, 32)
    resumed = _module(teacher, **probe)
    _trainer(tmp_path / "b", 3,
             callbacks=[ModelCheckpoint(dirpath=tmp_path / "b" / "checkpoints", save_last=True)]).fit(
        resumed, datamodule=_dm(data), ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    assert resumed.probe.taken == straight.probe.taken == [0, 1, 2]
    torch.testing.assert_close(resumed.probe.images, straight.probe.images, rtol=0, atol=0)
    assert torch.equal(resumed.probe.labels, straight.probe.labels) and resumed.probe.acc == straight.probe.acc
    # 3 pushes into 2 slots: slot 0 holds the 3rd push, slot 1 the 2nd, next write goes to slot 1
    assert (resumed.memory.count, resumed.memory.pos) == (straight.memory.count, straight.memory.pos) == (2, 1)
    torch.testing.assert_close(resumed.memory.images, straight.memory.images, rtol=0, atol=0)
    assert resumed.acc_curve == straight.acc_curve and [s for s, _ in resumed.acc_curve] == [2, 4, 6]
    for (n, a), b in zip(resumed.net.state_dict().items(), straight.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_generative_replay_trains_the_memory_generator_and_replays_it(tmp_path: Path) -> None:
    teacher, data = save_teacher(tmp_path / "t.ckpt"), _fake_mnist(tmp_path / "data")
    L.seed_everything(0)
    m = _module(teacher, replay="generator", memory_generator_updates=1, memory_slots=0)
    before = copy.deepcopy(m.memory_generator.state_dict())
    seen: list[int] = []
    real_student_step = m.student_step

    def spy(step, k, opt):  # records the memory batch size each student step replays
        seen.append(-1 if m._replay(step, k) is None else m._replay(step, k).shape[0])
        return real_student_step(step, k, opt)

    m.student_step = spy
    _trainer(tmp_path / "a", 2, enable_checkpointing=False).fit(m, datamodule=_dm(data))
    assert m.memory_generator_steps == 2 * 2 * 1  # epochs x generator steps x updates
    assert seen[0] == -1 and all(n == m.memory_per_push for n in seen[1:])  # empty until the first update
    changed = [n for n, v in m.memory_generator.state_dict().items() if not torch.equal(v, before[n])]
    assert "l1.weight" in changed
    assert len(m.memory) == 0  # no buffer
    x = m.memory_samples(0, 0)
    assert x.shape == (m.memory_per_push, 1, 32, 32) and torch.isfinite(x).all()


def test_generative_replay_state_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    teacher, data = save_teacher(tmp_path / "t.ckpt"), _fake_mnist(tmp_path / "data")
    kw = dict(replay="generator", memory_generator_updates=2, memory_slots=0)
    L.seed_everything(0)
    straight = _module(teacher, **kw)
    _trainer(tmp_path / "a", 3, enable_checkpointing=False).fit(straight, datamodule=_dm(data))

    L.seed_everything(0)
    first = _module(teacher, **kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b" / "checkpoints", save_last=True)
    with pytest.raises(SimulatedKill):
        _trainer(tmp_path / "b", 3, callbacks=[ckpt, KillAtEpoch(2)]).fit(first, datamodule=_dm(data))
    resumed = _module(teacher, **kw)
    _trainer(tmp_path / "b", 3,
             callbacks=[ModelCheckpoint(dirpath=tmp_path / "b" / "checkpoints", save_last=True)]).fit(
        resumed, datamodule=_dm(data), ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    assert resumed.memory_generator_steps == straight.memory_generator_steps == 3 * 2 * 2
    for name in ("net", "memory_generator", "encoder"):
        for (n, a), b in zip(getattr(resumed, name).state_dict().items(),
                             getattr(straight, name).state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}.{n}")


def test_generator_takes_the_teachers_input_contract_and_the_data_must_match(tmp_path: Path) -> None:
    teacher = save_teacher(tmp_path / "t.ckpt", image_size=32)
    m = _module(teacher)  # no shape in the config: the teacher's contract gives it
    assert (m.hparams.num_classes, m.hparams.in_channels, m.hparams.image_size) == (10, 1, 32)
    assert m.generate(torch.randn(2, 8)).shape == (2, 1, 32, 32)
    # a plain state_dict with a contract that its network cannot take fails before any step
    plain = tmp_path / "plain.pt"
    torch.save(create_net("lenet5", 10, 1, 32).state_dict(), plain)
    with pytest.raises(ImageSizeMismatchError, match="cannot take the generator's 3x32x32 images"):
        _module({"weights": str(plain), "arch": "lenet5", "num_classes": 10, "in_channels": 1, "image_size": 32,
                 "mean": [0.5], "std": [0.5]},
                in_channels=3)
    # the datamodule's images must be the generator's size too
    data = _fake_mnist(tmp_path / "data")
    dm = DataFreeDataModule(MNISTDataModule(data_dir=str(data), image_size=28), steps_per_epoch=1)
    with pytest.raises(ImageSizeMismatchError, match="MNISTDataModule gives 28x28|DataFreeDataModule gives 28x28"):
        _trainer(tmp_path / "r", 1).fit(_module(teacher), datamodule=dm)


def test_bad_options_fail_clearly(tmp_path: Path) -> None:
    teacher = save_teacher(tmp_path / "t.ckpt")
    with pytest.raises(CvlabError, match="needs memory_slots >= 1"):
        _module(teacher, memory_slots=0, meta="second_order")
    with pytest.raises(CvlabError, match="memory_per_push must be in"):
        _module(teacher, memory_per_push=100)
    with pytest.raises(CvlabError, match="retain_weight must be >= 0"):
        _module(teacher, retain_weight=-1.0)
    _module(teacher, memory_slots=0, meta="none")  # plain adversarial DFKD without replay is fine
    with pytest.raises(CvlabError, match="replay must be buffer or generator"):
        _module(teacher, replay="vae")
    with pytest.raises(CvlabError, match=r"memory_generator_updates must be in \[1, student_steps=2\]"):
        _module(teacher, replay="generator", memory_generator_updates=3)
    _module(teacher, memory_slots=0, replay="generator", memory_generator_updates=2)  # needs no buffer


def test_cli_fit_on_fake_mnist_logs_retention_images_and_memory(tmp_path: Path) -> None:
    data, teacher = _fake_mnist(tmp_path / "data"), save_teacher(tmp_path / "t.ckpt")
    run = tmp_path / "run"
    run_cli("fit", "--config=experiments/lra/mnist/lra.yaml", f"--model.init_args.teacher={teacher}",
            f"--data.init_args.data_dir={data}", "--model.init_args.batch_size=8", "--model.init_args.student_steps=2",
            "--model.init_args.latent_dim=8", "--model.init_args.generator_kwargs={widths: [8, 4]}",
            "--model.init_args.memory_push_every_n_epochs=1", "--data.init_args.steps_per_epoch=2",
            "--data.init_args.eval_batch_size=20", "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--run.logger=csv", run_dir=run)
    m = read_metrics(run)
    for key in ("val/acc", "test/acc", "test/teacher_acc", "retention/drops", "retention/drop_total", "train/kd",
                "train/retain", "train/g_balance", "retention/probe_acc", "retention/probe_acc/e0"):  # probe: epoch 0
        assert key in m and math.isfinite(m[key]), key
    assert m["fit/steps"] == 6  # generator steps
    curve = __import__("json").loads((run / "retention_curve.json").read_text())
    assert curve["generator_step"] == [2, 4, 6] and len(curve["acc"]) == 3
    assert list((run / "images").glob("lra_generated_*.png")) and list((run / "images").glob("retention_curve_*.png"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["lra"]["memory"]["count"] == 3  # pushed at the end of epochs 0, 1, 2


# --- distributed -----------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for mode in ("none", "first_order", "second_order"):
            params = _one_update(mode, rank, world)
            torch.save(params, Path(out_dir) / f"{mode}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _one_update(mode: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """One LRA student update (gradients + the module's SGD step) on this rank's share of a fixed global batch."""
    torch.manual_seed(0)
    net = create_net("lenet5_half", 10, 1, 32)
    teacher = create_net("lenet5", 10, 1, 32).eval()
    xn, xm = torch.randn(8, 1, 32, 32), torch.randn(4, 1, 32, 32)  # global batch: 8 new + 4 memory
    with torch.no_grad():
        tn, tm = teacher(xn) * 3, teacher(xm) * 3
    bn, bm = 8 // world, 4 // world
    xn, tn = xn[rank * bn : (rank + 1) * bn], tn[rank * bn : (rank + 1) * bn]
    xm, tm = xm[rank * bm : (rank + 1) * bm], tm[rank * bm : (rank + 1) * bm]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    p = dict(net.named_parameters())
    for _ in range(2):  # two steps: momentum buffers are exercised too
        out = student_gradients(net, p, {}, xn, tn, xm, tm, mode, 0.9, 5e-4, reduce=all_reduce_mean)
        for n, t in p.items():
            t.grad = out.grads[n]
        opt.step()
    return {n: t.detach().clone() for n, t in p.items()}


@pytest.mark.slow
def test_two_process_ddp_student_update_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for mode in ("none", "first_order", "second_order"):
        one = _one_update(mode)
        for rank in (0, 1):
            two = torch.load(tmp_path / f"{mode}_rank{rank}.pt", weights_only=True)
            for n in one:
                torch.testing.assert_close(two[n], one[n], rtol=1e-5, atol=1e-6, msg=f"{mode} rank {rank} {n}")


@pytest.mark.slow
def test_two_process_ddp_cli_run_trains_and_gathers_memory_from_both_ranks(tmp_path: Path) -> None:
    data, teacher = _fake_mnist(tmp_path / "data"), save_teacher(tmp_path / "t.ckpt")
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "experiments.cli", "fit", "--config", "experiments/lra/mnist/lra.yaml",
           f"--model.init_args.teacher={teacher}", f"--data.init_args.data_dir={data}",
           "--model.init_args.batch_size=8", "--model.init_args.student_steps=2", "--model.init_args.latent_dim=8",
           "--model.init_args.generator_kwargs={widths: [8, 4]}", "--model.init_args.memory_push_every_n_epochs=1",
           "--data.init_args.steps_per_epoch=2", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
           "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.enable_progress_bar=false",
           "--run.logger=csv", f"--run.dir={run}"]
    subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, timeout=600)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    mem = ckpt["lra"]["memory"]
    assert mem["count"] == 2 and mem["images"].shape == (10, 2, 1, 32, 32)  # 1 image per push from each of 2 ranks
    assert math.isfinite(read_metrics(run)["test/acc"])


@pytest.mark.slow
def test_two_process_ddp_cli_run_with_generative_replay(tmp_path: Path) -> None:
    data, teacher = _fake_mnist(tmp_path / "data"), save_teacher(tmp_path / "t.ckpt")
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "experiments.cli", "fit", "--config", "experiments/lra/mnist/lra.yaml",
           "--config", "experiments/lra/generative_replay.yaml", f"--model.init_args.teacher={teacher}",
           f"--data.init_args.data_dir={data}", "--model.init_args.batch_size=8", "--model.init_args.student_steps=2",
           "--model.init_args.latent_dim=8", "--model.init_args.generator_kwargs={widths: [8, 4]}",
           "--model.init_args.memory_generator_updates=1", "--data.init_args.steps_per_epoch=2",
           "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
           "--trainer.enable_progress_bar=false", "--run.logger=csv", f"--run.dir={run}"]
    subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, timeout=600)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["lra"]["memory_generator_steps"] == 2 * 2 * 1
    assert any(k.startswith("memory_generator.") for k in ckpt["state_dict"])
    assert math.isfinite(read_metrics(run)["test/acc"])
    assert list((run / "images").glob("lra_memory_*.png"))


def test_the_old_class_path_still_names_lra() -> None:
    """Configs and checkpoints written before the rename name ``lit_modules.distillation.AdversarialKD``."""
    from lit_modules.distillation import LRA, AdversarialKD

    assert AdversarialKD is LRA
    import importlib

    assert getattr(importlib.import_module("lit_modules.distillation.lra"), "AdversarialKD") is LRA
