"""Issue 36: fast adversarial training (one-cycle lr, RS-FGSM, robust validation, best-robust restore), Wong et
al.'s MNIST CNN, GAT's step snapshots (taken, used, resumed) and the gradient-masking flag."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lit_modules.nets import create_net
from lit_modules.optim import build_optimizer, build_schedule, cyclic_factor
from lit_modules.robustness import AdversarialTraining, FGSMTraining, GrayBoxAdversarialTraining, SnapshotModel
from lit_modules.robustness.attacks import fgsm, pgd
from lit_modules.robustness.gray_box import attack_suite, gradient_masking
from tests.test_adversarial_training import _module as _trainer_module
from tests.test_attacks import _blobs


def _module(regime: str, adversary=None, **kw) -> AdversarialTraining:
    """The tiny system of tests/test_adversarial_training.py with instance norm (no batch statistics)."""
    return _trainer_module(regime, adversary,
                           **{"arch_kwargs": {"width": 8, "depth": 2, "norm": "instancenorm"}, **kw})


def _trainer(**kw) -> L.Trainer:
    kw = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
          "enable_model_summary": False, "inference_mode": False, "num_sanity_val_steps": 0, **kw}
    return L.Trainer(**kw)


def _loader(n: int, batch: int, seed: int = 0, shuffle: bool = False) -> DataLoader:
    x, y = _blobs(n, seed=seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle)


# --- the one-cycle schedule ---------------------------------------------------------------------------------------


def test_cyclic_factor_worked_steps() -> None:
    # 1000 steps, peak at 40%: t = (step + 1) / 1000, up to 1 at t = 0.4, down to 0 at t = 1
    assert cyclic_factor(0, 1000) == pytest.approx(0.0025)
    assert cyclic_factor(199, 1000) == pytest.approx(0.5)
    assert cyclic_factor(399, 1000) == pytest.approx(1.0)
    assert cyclic_factor(699, 1000) == pytest.approx(0.5)
    assert cyclic_factor(999, 1000) == pytest.approx(0.0)
    assert cyclic_factor(1500, 1000) == 0.0


def test_cyclic_schedule_sets_the_lr_of_each_step() -> None:
    # Wong et al.'s MNIST: 10 epochs of 550 steps, lr_max 5e-3, peak at epoch 4
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], "adam", lr=5e-3, weight_decay=0.0)
    sched = build_schedule(opt, "cyclic", 5500, [0.4])
    lrs = []
    for _ in range(5500):
        lrs.append(opt.param_groups[0]["lr"])  # the lr this step uses
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-3 / 2200)
    assert lrs[1099] == pytest.approx(2.5e-3)
    assert lrs[2199] == pytest.approx(5e-3) and max(lrs) == pytest.approx(5e-3)
    assert lrs[3849] == pytest.approx(2.5e-3)
    assert lrs[5499] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="peak"):
        build_schedule(opt, "cyclic", 100, [1.5])


# --- Wong et al.'s network and RS-FGSM ----------------------------------------------------------------------------


def test_wong_mnist_net_layout() -> None:
    net = create_net("wong_mnist", num_classes=10, in_channels=1, image_size=28)
    assert sum(p.numel() for p in net.parameters()) == 166_406  # 272 + 8,224 + 156,900 + 1,010
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert net.forward_features(torch.rand(2, 1, 28, 28)).shape == (2, 100)


def test_fast_regime_is_one_step_of_alpha_from_a_random_start() -> None:
    model = _module("fast").eval()  # FastTraining's default alpha: 1.25 eps
    x, y = _blobs(16, seed=1)
    torch.manual_seed(7)
    got = model.craft(x, y)
    torch.manual_seed(7)
    expected = pgd(model, x, y, 0.15, alpha=1.25 * 0.15, steps=1)
    torch.testing.assert_close(got, expected)
    assert (got - x).abs().max() <= 0.15 + 1e-6
    # every image adversarial, plain CE
    torch.manual_seed(7)
    loss = model.training_step((x, y), 0)
    with torch.no_grad():
        torch.testing.assert_close(loss, F.cross_entropy(model(expected), y))


# --- robust validation and the restored best weights --------------------------------------------------------------


def test_robust_val_acc_equals_a_hand_run_pgd_on_the_same_images() -> None:
    model = _module("fast", robust_val_images=40, robust_val_steps=3, seed=5)
    loader = _loader(64, batch=16, seed=2)  # 40 images: batches 0, 1 and the first 8 of batch 2
    (seen,) = _trainer().validate(model, loader, verbose=False)
    model.eval()
    hits = 0
    for b, (x, y) in enumerate(loader):
        x, y = x[: max(0, 40 - 16 * b)], y[: max(0, 40 - 16 * b)]
        if len(y) == 0:
            break
        g = torch.Generator().manual_seed(5 * 1_000_003 + b)
        adv = pgd(model, x, y, 0.15, alpha=None, steps=3, generator=g)
        with torch.no_grad():
            hits += int((model(adv).argmax(-1) == y).sum())
    assert seen["val/robust_acc"] == pytest.approx(hits / 40)
    # the same images and starts every validation: the number does not move
    assert _trainer().validate(model, loader, verbose=False)[0]["val/robust_acc"] == pytest.approx(hits / 40)


def test_early_stopping_on_robust_acc_restores_the_best_robust_weights() -> None:
    model = _module("fast", robust_val_images=64, robust_val_steps=2, restore_best=True)
    states: list[dict[str, Tensor]] = []
    accs: list[float] = []

    class Sabotage(L.Callback):
        """Record each validation's weights and robust accuracy; from epoch 3 on, wreck the weights (as
        catastrophic overfitting does) so that the best epoch is an early one and early stopping fires."""

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch >= 3:
                with torch.no_grad():
                    for p in pl_module.net.parameters():
                        p.mul_(-3.0)

        def on_train_epoch_end(self, trainer, pl_module):  # after this epoch's validation
            states.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})
            accs.append(float(trainer.callback_metrics["val/robust_acc"]))

    stop = EarlyStopping(monitor="val/robust_acc", mode="max", patience=1)
    trainer = _trainer(max_epochs=20, callbacks=[Sabotage(), stop])
    trainer.fit(model, _loader(256, batch=64, seed=0, shuffle=True), _loader(64, batch=32, seed=9))
    assert trainer.current_epoch < 19, "early stopping did not fire"
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))  # the first epoch of the highest accuracy
    assert accs[-1] < accs[best], accs
    assert model.best_robust is not None and model.best_robust["epoch"] == best
    for k, v in model.net.state_dict().items():  # the final weights are the best epoch's, not the last
        torch.testing.assert_close(v, states[best][k], msg=k)
    assert not torch.equal(model.net.state_dict()["fc.weight"], states[-1]["fc.weight"])
    assert float(trainer.callback_metrics["val/robust_acc_best"]) == pytest.approx(accs[best])


def test_best_robust_weights_are_in_the_checkpoint(tmp_path: Path) -> None:
    model = _module("fast", robust_val_images=32, robust_val_steps=2, restore_best=True)
    trainer = _trainer(max_epochs=2)
    trainer.fit(model, _loader(128, batch=64), _loader(32, batch=32, seed=9))
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    fresh = _module("fast", robust_val_images=32, robust_val_steps=2, restore_best=True)
    fresh.on_load_checkpoint(torch.load(tmp_path / "x.ckpt", map_location="cpu", weights_only=True))
    assert fresh.best_robust["epoch"] == model.best_robust["epoch"]
    for k, v in model.best_robust["state"].items():
        assert torch.equal(v, fresh.best_robust["state"][k])


# --- GAT's step snapshots -------------------------------------------------------------------------------------------


def test_step_snapshot_is_the_model_at_step_k_and_seeds_the_batch_that_uses_it(monkeypatch) -> None:
    model = _module("gat", FGSMTraining(adv_ratio=1.0, labels="true", random_eps=False), snapshot_steps=2,
                    bag_size=10, snapshot_share=0.5, seed=3)
    weights: dict[int, dict[str, Tensor]] = {}
    used: list[tuple] = []

    class Weights(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.net.state_dict().items()}

    craft = GrayBoxAdversarialTraining.craft

    def spy(self, x, y):
        out = craft(self, x, y)
        if self.last_seed is not None and self.last_seed[0] == self.global_step:
            i = self.last_seed[1]
            used.append((self.global_step, self.bag.steps[i], x.clone(), y.clone(), out.clone()))
        return out

    monkeypatch.setattr(GrayBoxAdversarialTraining, "craft", spy)
    _trainer(max_steps=9, callbacks=[Weights()]).fit(model, _loader(6 * 32, batch=32, seed=4))
    assert model.bag.steps == [2, 4, 6, 8]  # from the first steps, several per epoch (6 batches)
    for s, k in zip(model.bag.snapshots, model.bag.steps):  # the snapshot of step k is the model at step k
        for name, v in s.items():
            assert torch.equal(v, weights[k][name]), (k, name)
    assert [u[0] for u in used] == [2, 3, 4, 5, 6, 7, 8]  # the bag is used from its first snapshot on
    current = _module("gat", FGSMTraining(labels="true", random_eps=False))
    for step, k, x, y, out in used:
        assert k <= step
        snap = SnapshotModel(model.net, model.normalize, weights[k])
        ks = round(0.5 * x.shape[0])
        torch.testing.assert_close(out[:ks], fgsm(snap, x[:ks], y[:ks], 0.15))  # the share seeded by snapshot k
        current.net.load_state_dict(weights[step])
        torch.testing.assert_close(out[ks:], fgsm(current, x[ks:], y[ks:], 0.15))  # the rest: the current model


def test_step_snapshots_survive_resume_mid_epoch(tmp_path: Path) -> None:
    kw = {"snapshot_steps": 2, "bag_size": 3, "bag_refresh": "reservoir", "seed": 1}
    full = _module("gat", **kw)
    _trainer(max_steps=11).fit(full, _loader(8 * 32, batch=32, seed=4))
    part = _module("gat", **kw)
    first = _trainer(max_steps=5)  # killed mid-epoch (8 batches per epoch) after step 5
    first.fit(part, _loader(8 * 32, batch=32, seed=4))
    first.save_checkpoint(tmp_path / "mid.ckpt")
    saved = torch.load(tmp_path / "mid.ckpt", map_location="cpu", weights_only=True)["gat_bag"]
    assert saved["steps"] == [2, 4] and saved["taken"] == 2
    resumed = _module("gat", **kw)
    _trainer(max_steps=11).fit(resumed, _loader(8 * 32, batch=32, seed=4), ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.bag.taken == full.bag.taken == 5  # steps 2, 4, 6, 8, 10 offered
    assert sorted(resumed.bag.steps) == sorted(full.bag.steps)  # the reservoir drew the same sample
    for k in (2, 4):  # the snapshots taken before the kill came back unchanged
        if k in resumed.bag.steps:
            a = resumed.bag.snapshots[resumed.bag.steps.index(k)]
            b = {name: v for name, v in saved["snapshots"][saved["steps"].index(k)].items()}
            assert all(torch.equal(a[n], b[n]) for n in a)


# --- the gradient-masking flag ---------------------------------------------------------------------------------------


class MaskedNet(nn.Module):
    """Hand-made gradient masking: class 0 on constant-0.5 images unless their mean pixel moves away from 0.5,
    ``logit_1 - logit_0 = 100 (m - 0.5)^2 - 1``; at the clean point the gradient is exactly 0 (FGSM does not
    move: 100% accuracy), but from a random start PGD follows ``sign(m - 0.5)`` to ``|m - 0.5| = eps``
    (``100 * 0.09 - 1 > 0``: 0% accuracy)."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.flatten(1).mean(1)
        d = 100 * (m - 0.5) ** 2 - 1
        return torch.stack([torch.zeros_like(d), d], 1)


class RobustNet(nn.Module):
    """Truly robust on the same data: ``logit_1 - logit_0 = (m - 0.5) - 1`` stays negative in the eps ball."""

    def forward(self, x: Tensor) -> Tensor:
        d = (x.flatten(1).mean(1) - 0.5) - 1
        return torch.stack([torch.zeros_like(d), d], 1)


def _white_box(model: nn.Module) -> dict[str, float]:
    x, y = torch.full((8, 1, 6, 6), 0.5), torch.zeros(8, dtype=torch.long)
    torch.manual_seed(0)
    out = {}
    for name, attack in attack_suite(0.3, 10, 40, 0.01, 1, 20, 0.03, 3).items():
        with torch.no_grad():
            out[name] = float((model(attack(model, x, y)).argmax(-1) == y).float().mean())
    return out


def test_masking_flag_fires_on_a_masked_model_and_not_on_a_robust_one() -> None:
    masked = _white_box(MaskedNet())
    assert masked["fgsm"] == 1.0 and masked["pgd20x3"] == 0.0
    gap, flag = gradient_masking(masked["fgsm"], min(masked["pgd"], masked["pgd20x3"]))
    assert flag and gap == pytest.approx(1.0)
    robust = _white_box(RobustNet())
    assert robust["fgsm"] == robust["pgd20x3"] == 1.0
    assert gradient_masking(robust["fgsm"], min(robust["pgd"], robust["pgd20x3"])) == (0.0, False)
    # the threshold's worked answers: Madry-like 95 vs 89 is not masked, FGSM-AT-like 62 vs 1 is
    assert gradient_masking(0.95, 0.89) == (pytest.approx(0.06), False)
    assert gradient_masking(0.62, 0.01)[1]


def test_graybox_report_runs_on_the_validation_split_with_the_strong_pgd_and_the_flag(tmp_path: Path) -> None:
    from lit_modules.robustness import GrayBoxEvaluation

    model = _module("fast")
    gray = GrayBoxEvaluation(ifgsm_steps=2, pgd_steps=2, pgd_alpha=None, strong_steps=2, strong_restarts=3,
                             pictures=0)
    gray.epochs, gray.snapshots = [0], [{k: v.clone() + 0.1 for k, v in model.net.state_dict().items()}]
    (m,) = _trainer(callbacks=[gray], default_root_dir=tmp_path).validate(model, _loader(64, batch=32, seed=3),
                                                                          verbose=False)
    assert (tmp_path / "images" / "graybox_curve.png").is_file()  # in the run folder, not the working directory
    assert {"val/acc_fgsm", "val/acc_pgd", "val/acc_pgd2x3", "val/acc_graybox_e0_fgsm", "val/masking_gap",
            "val/masked"} <= set(m)
    assert m["val/acc_pgd2x3"] <= m["val/acc_clean"] + 1e-6
    assert m["val/masking_gap"] == pytest.approx(m["val/acc_fgsm"] - min(m["val/acc_pgd"], m["val/acc_pgd2x3"]))
