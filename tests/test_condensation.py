"""Dataset Condensation (issues 5, 34): the distance, batched class gradients, class-balanced pixel draws, the
pixel-space update, the module, DDP, the evaluation callback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from cvlab.image_ops import dc_augment
from datamodules import CvlabError
from datamodules.class_balanced import ClassBalancedImages, class_image_source
from datamodules.synthetic import ShapesDataModule
from lit_modules.condensation import CondensationEvaluation
from lit_modules.condensation.dc import DatasetCondensation, load_condensed
from lit_modules.condensation.dc_eval import EvalRecipe, herding_subset, train_and_test
from lit_modules.condensation.gradient_matching import (
    RealGradients,
    check_matchable,
    class_gradients,
    class_gradients_loop,
    gradient_match_distance,
)
from lit_modules.condensation.pixel_net import create_pixel_net, pixel_preconditioner
from lit_modules.nets import create_net

REPO = Path(__file__).resolve().parents[1]
TINY = {"width": 8, "depth": 2}
S = 8  # image size of the unit tests


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_net("convnet", 3, 1, S, width=4, depth=2)


def _params(net: nn.Module) -> tuple[dict, dict]:
    return {n: p.detach() for n, p in net.named_parameters()}, dict(net.named_buffers())


# --- the distance ------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["ours", "mse", "cos"])
def test_distance_is_zero_for_identical_gradients(metric):
    g = [torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(10, 7)]
    assert gradient_match_distance(g, [t.clone() for t in g], metric).abs().item() < 1e-5


def test_distance_worked_example():
    # a weight (2 output rows) and a bias; rows: cos((1,0),(1,0)) = 1 -> 0, cos((0,1),(1,0)) = 0 -> 1
    syn = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([5.0, -5.0])]
    real = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0.0, 0.0])]
    assert gradient_match_distance(syn, real, "ours").item() == pytest.approx(1.0, abs=1e-5)  # bias ignored
    assert gradient_match_distance(syn, real, "mse").item() == pytest.approx(2.0 + 50.0)
    # whole vectors (1,0,0,1,5,-5) . (1,0,1,0,0,0) = 1; norms sqrt(52), sqrt(2)
    assert gradient_match_distance(syn, real, "cos").item() == pytest.approx(1 - 1 / (52**0.5 * 2**0.5), abs=1e-5)
    batched = gradient_match_distance([s[None].repeat(3, *[1] * s.dim()) for s in syn],
                                      [r[None].repeat(3, *[1] * r.dim()) for r in real], "ours", batched=True)
    assert batched.item() == pytest.approx(3.0, abs=1e-5)  # summed over 3 classes


# --- per-class gradients -------------------------------------------------------------------------------
def test_batched_class_matching_equals_per_class_loop():
    net = _tiny_net()
    p, b = _params(net)
    x_real, y_real = torch.randn(3, 16, 1, S, S), torch.arange(3)[:, None].expand(3, 16)
    x_syn = torch.randn(3, 2, 1, S, S, requires_grad=True)
    y_syn = torch.arange(3)[:, None].expand(3, 2)
    gr_v, gr_l = class_gradients(net, p, b, x_real, y_real), class_gradients_loop(net, p, b, x_real, y_real, False)
    for k in gr_v:
        torch.testing.assert_close(gr_v[k], gr_l[k], rtol=1e-4, atol=1e-6)
    d_v = gradient_match_distance(class_gradients(net, p, b, x_syn, y_syn), gr_v, batched=True)
    d_l = gradient_match_distance(class_gradients_loop(net, p, b, x_syn, y_syn, True), gr_l, batched=True)
    (g_v,) = torch.autograd.grad(d_v, x_syn)
    (g_l,) = torch.autograd.grad(d_l, x_syn)
    torch.testing.assert_close(d_v, d_l, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_v, g_l, rtol=1e-3, atol=1e-6)


def test_real_gradient_engine_modes_and_chunks_agree_and_bf16_stays_close():
    net = _tiny_net()
    p, b = _params(net)
    x, y = torch.randn(3, 10, 1, S, S), torch.arange(3)[:, None].expand(3, 10)
    ref = class_gradients_loop(net, p, b, x, y, False)
    for mode in ("loop", "batched"):
        for chunk in (None, 4, 5, 64):  # whole batch, uneven (4 + 4 + 2), even, larger than the batch
            got = RealGradients(net, mode, chunk=chunk)(p, b, x, y)
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
    bf = RealGradients(net, "loop", bf16=True)(p, b, x, y)
    for k, g in ref.items():
        assert bf[k].dtype == torch.float32
        if g.dim() > 2:  # conv weights (K, out, in, kh, kw): what the distance compares, row by row
            assert torch.nn.functional.cosine_similarity(bf[k].flatten(2), g.flatten(2), dim=-1).min() > 0.97


def test_real_gradient_chunks_refuse_training_mode_batchnorm_and_bad_sizes():
    x, y = torch.randn(3, 10, 1, S, S), torch.arange(3)[:, None].expand(3, 10)
    bn = create_net("convnet", 3, 1, S, width=4, depth=2, norm="batchnorm").train()
    with pytest.raises(CvlabError, match="BatchNorm in training mode"):
        RealGradients(bn, "loop", chunk=4)(*_params(bn), x, y)
    RealGradients(bn.eval(), "loop", chunk=4)(*_params(bn), x, y)  # eval-mode BatchNorm: allowed
    with pytest.raises(CvlabError, match="positive"):
        RealGradients(bn, "loop", chunk=0)


@pytest.mark.slow
def test_compiled_real_gradients_equal_eager():
    net = _tiny_net()
    p, b = _params(net)
    x, y = torch.randn(3, 16, 1, S, S), torch.arange(3)[:, None].expand(3, 16)
    eager, compiled = RealGradients(net, "loop"), RealGradients(net, "loop", compile=True)
    for seed in range(2):  # a second network's parameters reuse the compiled code
        torch.manual_seed(seed)
        p = {n: torch.randn_like(v) * 0.3 for n, v in p.items()}
        got, ref = compiled(p, b, x, y), eager(p, b, x, y)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


def test_module_class_modes_give_the_same_images(tmp_path):
    out = {}
    for mode in ("loop", "batched"):
        L.seed_everything(0)
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path / mode,
                            enable_progress_bar=False)
        model = _module(ipc=2, outer_loop=2, inner_loop=1, class_mode=mode)
        trainer.fit(model, datamodule=_shapes())
        out[mode] = model.images.detach()
    torch.testing.assert_close(out["loop"], out["batched"], rtol=1e-3, atol=1e-4)


def _inner_update(**kw) -> torch.Tensor:
    """The parameter change of one ``train_net`` call (3 inner epochs on a random ipc-2 set)."""
    model = _module(ipc=2, outer_loop=2, inner_loop=3, **kw)
    with torch.no_grad():
        model.images.copy_(torch.randn(model.images.shape, generator=torch.Generator().manual_seed(0)))
    net = model._fresh_net(0)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    model.train_net(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5), (0, 0))
    return torch.cat([p.detach().flatten() for p in net.parameters()]) - before


def test_bf16_inner_training_stays_close_to_fp32():
    ref, bf16 = _inner_update(), _inner_update(bf16_inner=True)
    assert ref.abs().sum() > 0 and not torch.equal(ref, bf16)  # it trained, and autocast took effect
    assert torch.nn.functional.cosine_similarity(ref, bf16, dim=0) > 0.99
    torch.testing.assert_close(bf16, ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


@pytest.mark.slow
def test_compiled_inner_training_equals_eager():
    torch.testing.assert_close(_inner_update(compile_inner=True), _inner_update(), rtol=1e-4, atol=1e-6)


def test_distance_gradients_reach_the_synthetic_images():
    net = _tiny_net()
    p, b = _params(net)
    g_real = class_gradients(net, p, b, torch.randn(3, 8, 1, S, S), torch.arange(3)[:, None].expand(3, 8))
    x_syn = torch.randn(3, 1, 1, S, S, requires_grad=True)
    d = gradient_match_distance(class_gradients(net, p, b, x_syn, torch.arange(3)[:, None]), g_real, batched=True)
    (g,) = torch.autograd.grad(d, x_syn)
    assert torch.isfinite(g).all() and (g.flatten(1).abs().sum(1) > 0).all()  # every class's image moves


def test_a_few_outer_iterations_lower_the_matching_loss():
    torch.manual_seed(0)
    x_real, y_real = torch.randn(3, 16, 1, S, S), torch.arange(3)[:, None].expand(3, 16)
    x_syn = torch.randn(3, 1, 1, S, S, requires_grad=True)
    opt = torch.optim.SGD([x_syn], lr=0.1, momentum=0.5)

    def loss_over_nets() -> torch.Tensor:  # the expected matching loss over 2 fixed random nets
        total = 0.0
        for s in range(2):
            net = _tiny_net(s)
            p, b = _params(net)
            g_real = class_gradients(net, p, b, x_real, y_real)
            total = total + gradient_match_distance(class_gradients(net, p, b, x_syn, torch.arange(3)[:, None]), g_real,
                                                    batched=True)
        return total

    first = loss_over_nets()
    for _ in range(5):
        opt.zero_grad()
        loss_over_nets().backward()
        opt.step()
    assert loss_over_nets().item() < 0.9 * first.item()


# --- bad input ----------------------------------------------------------------------------------------
class _NoParams(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10]


def test_architecture_without_parameters_fails_clearly(monkeypatch: pytest.MonkeyPatch):
    from lit_modules.nets import registry

    monkeypatch.setitem(registry.NETS._builders, "dc_test_noparams", lambda **kw: _NoParams())  # only for this test
    with pytest.raises(CvlabError, match="no trainable parameters"):
        check_matchable(_NoParams())
    with pytest.raises(CvlabError, match="no trainable parameters"):
        DatasetCondensation(arch="dc_test_noparams")


def _shapes(n=60) -> ShapesDataModule:
    return ShapesDataModule(num_train=n, num_test=30, image_size=16, batch_size=16)


def _module(**kw) -> DatasetCondensation:
    args = dict(ipc=1, in_channels=3, image_size=16, arch_kwargs=TINY, batch_real=4)
    args.update(kw)
    return DatasetCondensation(**args)


def _evaluation(**kw) -> CondensationEvaluation:
    args = dict(num_nets=2, epochs=1, test_size=10, baselines=["random", "herding"], herding_pool=5)
    args.update(kw)
    return CondensationEvaluation(**args)


def test_ipc_larger_than_a_class_fails_clearly(tmp_path):
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(CvlabError, match="ipc 50 is larger than the .* real training images of class"):
        trainer.fit(_module(ipc=50, outer_loop=1, inner_loop=1), datamodule=_shapes())


# --- the module -----------------------------------------------------------------------------------------
def test_module_condenses_saves_and_evaluates(tmp_path):
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, callbacks=[_evaluation()])
    dm, model = _shapes(), _module(ipc=2, outer_loop=2, inner_loop=1)
    trainer.fit(model, datamodule=dm)
    saved = load_condensed(tmp_path / "condensed.pt")
    assert saved["images"].shape == (20, 3, 16, 16) and saved["labels"].tolist() == [k // 2 for k in range(20)]
    assert saved["step"] == 3 and saved["config"]["ipc"] == 2 and saved["space"] == "pixels"
    assert saved["mean"] == list(dm.task_spec.mean) and model.hparams.std == list(dm.task_spec.std)
    torch.testing.assert_close(saved["images"], model.images.detach())  # pixels, what the networks see
    assert list((tmp_path / "images").glob("condense_images_*.png"))
    out = trainer.test(model, datamodule=dm, verbose=False)[0]
    for key in ("eval/acc_mean", "eval/acc_std", "eval/random_convnet_acc_mean", "eval/herding_convnet_acc_mean"):
        assert 0 <= out[key] <= 100


def test_evaluation_protocol_is_seeded_and_repeatable():
    x, y = torch.randn(6, 1, S, S), torch.arange(3).repeat_interleave(2)
    tx, ty = torch.randn(20, 1, S, S), torch.randint(0, 3, (20,))
    r = EvalRecipe(epochs=3, augment="crop_scale_rotate")
    a = train_and_test(x, y, tx, ty, "convnet", 3, {"width": 4, "depth": 2}, num_nets=2, recipe=r, seed=1)
    b = train_and_test(x, y, tx, ty, "convnet", 3, {"width": 4, "depth": 2}, num_nets=2, recipe=r, seed=1)
    assert a.shape == (2,) and torch.equal(a, b)


@pytest.mark.parametrize("other", [dict(parallel="vmap"), dict(parallel="loop", compile=True)],
                         ids=["vmap", "compiled"])
def test_evaluation_per_network_loop_equals_the_vmapped_step(other):
    """The CPU loop over networks (eager or compiled) trains the same networks as one vmapped step."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, S, S, generator=g), torch.arange(3).repeat_interleave(2)
    tx, ty = torch.randn(200, 1, S, S, generator=g), torch.randint(0, 3, (200,), generator=g)
    kw = {"width": 4, "depth": 2}
    loop = train_and_test(x, y, tx, ty, "convnet", 3, kw, num_nets=3, recipe=EvalRecipe(epochs=4, parallel="loop"),
                          seed=2)
    alt = train_and_test(x, y, tx, ty, "convnet", 3, kw, num_nets=3, recipe=EvalRecipe(epochs=4, **other), seed=2)
    assert torch.equal(loop, alt), (loop, alt)
    assert EvalRecipe().mode(torch.device("cpu")) == "loop" and EvalRecipe().mode(torch.device("cuda")) == "vmap"


def test_evaluation_options_are_checked():
    with pytest.raises(CvlabError, match="parallel"):
        EvalRecipe(parallel="threads")
    with pytest.raises(CvlabError, match="compile"):
        EvalRecipe(parallel="vmap", compile=True)
    with pytest.raises(CvlabError, match="parallel"):
        _evaluation(parallel="threads")
    with pytest.raises(CvlabError, match="evaluate nothing"):
        _evaluation(condensed=False, baselines=[])
    with pytest.raises(CvlabError, match="unknown evaluation baseline"):
        _evaluation(baselines=["kmeans"])


def test_old_evaluation_arguments_name_their_new_place():
    """The evaluation's arguments left the system (issue 34): an old key is one line naming the callback."""
    with pytest.raises(CvlabError, match=r"eval_num_nets moved .* `num_nets` of .*CondensationEvaluation"):
        _module(eval_num_nets=3)
    with pytest.raises(CvlabError, match="has no argument 'bogus'"):
        _module(bogus=1)
    assert set(DatasetCondensation.moved_args) >= {"eval_epochs", "eval_archs", "herding_pool", "whole_nets"}


def test_evaluation_can_skip_the_condensed_set(tmp_path):
    """condensed=False evaluates only the baselines (adding one to a finished run)."""
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, callbacks=[_evaluation(condensed=False, baselines=["random"])])
    out = trainer.test(_module(outer_loop=1, inner_loop=1), datamodule=_shapes(), verbose=False)[0]
    assert "eval/random_convnet_acc_mean" in out
    assert not any(k.startswith("eval/dc_") or k == "eval/acc_mean" for k in out), out


def test_dc_augment_keeps_shape_and_identity_when_no_strategy_moves():
    x = torch.rand(8, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    out = dc_augment(x, "crop_scale_rotate_noise", g)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(dc_augment(x, "scale", g, scale=0.0), x, atol=1e-5, rtol=0)


def test_herding_picks_the_example_nearest_the_class_mean():
    feats = torch.tensor([[0.0], [1.0], [10.0], [5.0], [6.0], [100.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    # class 0 mean 11/3 -> nearest is 1.0 (index 1); class 1 mean 37 -> nearest is 6.0 (index 4)
    assert herding_subset(feats, y, 1, 2).tolist() == [1, 4]


def test_dc_configs_parse():
    import yaml

    files = sorted((REPO / "experiments" / "dc").glob("*/*.yaml"))
    assert len(files) >= 15
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        if "stages" in cfg:  # a pipeline (pipeline_ipc1.yaml): its stage configs are among the files
            continue
        assert cfg["model"]["class_path"] == "lit_modules.condensation.DatasetCondensation", f


# --- pixels in, normalisation inside (issue 34) ------------------------------------------------------------
def test_class_balanced_draw_worked_example():
    """9 images (image i is all 25 * i) of classes 2 0 1 0 2 0 1 2 2: per class 3, 2, 4 images. A draw of 2 per class
    gives, per row, 2 distinct images of that class as [0, 1] pixels; the same seed gives the same draw."""
    labels = torch.tensor([2, 0, 1, 0, 2, 0, 1, 2, 2])
    images = (torch.arange(9, dtype=torch.uint8) * 25).view(9, 1, 1, 1).expand(9, 1, 2, 2).contiguous()
    src = ClassBalancedImages(images, labels, 3)
    assert src.counts.tolist() == [3, 2, 4]
    assert src.table.tolist() == [[1, 3, 5, -1], [2, 6, -1, -1], [0, 4, 7, 8]]
    x = src.draw(2, seed=5)
    assert x.shape == (3, 2, 1, 2, 2) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    idx = (x[:, :, 0, 0, 0] * 255 / 25).round().long()  # back to the image index
    assert (labels[idx] == torch.arange(3)[:, None]).all()  # row k holds class k only
    assert all(len(set(row)) == 2 for row in idx.tolist())  # distinct images
    assert torch.equal(src.draw(2, seed=5), x)
    assert len({tuple(src.draw_indices(2, seed).flatten().tolist()) for seed in range(8)}) > 1  # the seed matters
    assert src.draw(2, seed=5).shape == (3, 2, 1, 2, 2) and src.draw_indices(1, 0)[1].item() in (2, 6)
    with pytest.raises(CvlabError, match="class 1 has 2"):
        src.draw(3, seed=0)


def test_datamodule_offers_its_images_per_class():
    dm = _shapes(60)
    src = class_image_source(dm, "test").class_images("train")
    assert tuple(src.counts.tolist()) == dm.task_spec.train_class_counts
    x = src.draw(2, seed=0)
    assert x.shape == (10, 2, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert class_image_source(dm, "test").class_images("test").labels.numel() == 30
    with pytest.raises(CvlabError, match="draws real images per class, which object does not offer"):
        class_image_source(object(), "DatasetCondensation")


def test_pixel_space_step_equals_the_normalised_step_under_std_squared_preconditioning():
    """Three SGD-with-momentum steps of gradient matching on [0, 1] pixels, with the gradient scaled by std ** 2 per
    channel, land on the same images as the paper's steps on normalised images (same lr); unscaled they do not."""
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    u_of = lambda x: (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)  # noqa: E731
    torch.manual_seed(0)
    plain = create_net("convnet", 3, 3, S, width=4, depth=2)  # the paper's network on normalised images
    torch.manual_seed(0)
    pixel = create_pixel_net("convnet", 3, 3, S, mean, std, width=4, depth=2)  # the same weights, normalising inside
    g = torch.Generator().manual_seed(1)
    x_real, y_real = torch.rand(3, 8, 3, S, S, generator=g), torch.arange(3)[:, None].expand(3, 8)
    x0, y_syn = torch.rand(3, 3, S, S, generator=g), torch.arange(3)[:, None]

    def run(net: nn.Module, start: torch.Tensor, real: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        p, b = _params(net)
        g_real = class_gradients(net, p, b, real, y_real)
        img = start.clone().requires_grad_()
        opt = torch.optim.SGD([img], lr=0.1, momentum=0.5)
        for _ in range(3):
            loss = gradient_match_distance(class_gradients(net, p, b, img[:, None], y_syn), g_real, batched=True)
            (grad,) = torch.autograd.grad(loss, img)
            img.grad = grad * scale
            opt.step()
        return img.detach()

    u = run(plain, u_of(x0), u_of(x_real.flatten(0, 1)).view_as(x_real), torch.ones(()))
    x = run(pixel, x0, x_real, pixel_preconditioner(std, 3))
    assert (u - u_of(x0)).abs().max() > 1e-2  # the images moved
    torch.testing.assert_close(u_of(x), u, rtol=1e-4, atol=1e-5)
    x_plain = run(pixel, x0, x_real, torch.ones(()))
    assert (u_of(x_plain) - u).abs().max() > 1e-3  # without the preconditioner: a different (smaller) step
    assert pixel_preconditioner(std, 3).flatten().tolist() == pytest.approx([0.04, 0.0625, 0.09])


def test_pixel_evaluation_reproduces_the_normalised_protocol_numbers():
    """The protocol on [0, 1] pixels with normalisation inside the networks gives what it gave on normalised
    images before issue 34 (commit 7c078ca, same seeds): correct test images of 3 nets out of 40, with the
    geometric augmentations (which commute with the per-channel normalisation) and with noise (sd x std)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 3, 8, 8, generator=g), torch.arange(3).repeat_interleave(2)
    tx, ty = torch.rand(40, 3, 8, 8, generator=g), torch.randint(0, 3, (40,), generator=g)
    for augment, old in (("crop_scale_rotate", [12, 19, 9]), ("crop_noise", [10, 19, 9])):
        acc = train_and_test(x, y, tx, ty, "convnet", 3, {"width": 4, "depth": 2}, num_nets=3, seed=1,
                             recipe=EvalRecipe(epochs=4, augment=augment, batch_size=4),
                             mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
        assert (acc * 40).round().int().tolist() == old, augment


def test_evaluation_callback_logs_what_the_protocol_gives_on_the_condensed_set(tmp_path):
    L.seed_everything(0)
    dm, model, ev = _shapes(), _module(outer_loop=1, inner_loop=1), _evaluation(baselines=[], num_nets=2, epochs=2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, callbacks=[ev])
    trainer.fit(model, datamodule=dm)
    out = trainer.test(model, datamodule=dm, verbose=False)[0]
    x, y = model.condensed_set()
    test = dm.class_images("test")
    acc = train_and_test(x, y, test.pixels(torch.arange(10)), test.labels[:10], "convnet", 10, TINY, num_nets=2,
                         recipe=ev.recipe(), seed=0, mean=dm.task_spec.mean, std=dm.task_spec.std)
    assert out["eval/acc_mean"] == pytest.approx(acc.mean().item() * 100)
    assert out["eval/dc_convnet_acc_std"] == pytest.approx(acc.std(unbiased=False).item() * 100)


def test_old_normalised_condensed_files_load_as_pixels(tmp_path):
    px = torch.rand(2, 3, 4, 4)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    u = (px - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    torch.save({"images": u, "mean": mean, "std": std, "labels": torch.arange(2)}, tmp_path / "old.pt")
    torch.testing.assert_close(load_condensed(tmp_path / "old.pt")["images"], px)


# --- distributed ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_ddp_gives_the_same_image_update(tmp_path):
    def run(devices: int) -> torch.Tensor:
        out = tmp_path / f"d{devices}"
        cmd = [sys.executable, "-m", "experiments.cli", "fit", "--config", "experiments/dc/shapes/ipc1.yaml",
               "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
               "--trainer.strategy", "ddp" if devices > 1 else "auto", "--run.logger", "csv", "--run.dir", str(out),
               "--run.test_after_fit", "false", "--model.init_args.batch_real", "8",
               "--data.init_args.num_train", "200", "--trainer.enable_progress_bar", "false"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600)
        return load_condensed(out / "condensed.pt")["images"]

    one, two = run(1), run(2)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-5)


def test_benchmark_runs_the_reference_and_our_variants(capsys):
    """`cvlab bench dc` (not timed here): the public-code-structure reference and our paths all run."""
    from experiments.benchmarks.dc import main as bench_dc

    assert bench_dc(["--ipc", "1", "--variants", "reference", "loop", "batched", "--width", "8", "--batch-real", "8",
                     "--chunk", "4", "--iters", "1", "--warmup", "0", "--threads", "1"]) == 0
    rows = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("1 ")]
    assert rows == ["reference", "loop", "batched"]
