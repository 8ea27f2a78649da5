"""AdversarialTraining with its adversaries (clean | FGSM-AT | PGD-AT), GrayBoxAdversarialTraining, the deprecated
AdversarialTrainer, and the GrayBoxEvaluation callback."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from cvlab.errors import CvlabError
from lit_modules.robustness import (
    AdversarialTrainer,
    AdversarialTraining,
    CleanTraining,
    FastTraining,
    FGSMTraining,
    GrayBoxAdversarialTraining,
    PGDTraining,
    SnapshotModel,
    TrainingAdversary,
)
from lit_modules.robustness.adversarial_training import EmptyBagError
from lit_modules.robustness.attacks import fgsm
from tests.cli_runs import SimulatedKill, read_metrics, run_cli, run_cli_subprocess
from tests.test_attacks import _blobs

# a tiny GAT run on the embedded shapes data through the CLI (seconds)
GAT_TINY = [
    "--model=lit_modules.robustness.GrayBoxAdversarialTraining", "--model.init_args.eps=0.03",
    "--model.init_args.arch=convnet",
    "--model.init_args.arch_kwargs={width: 8, depth: 2, norm: instancenorm}", "--model.init_args.in_channels=3",
    "--model.init_args.optimizer=adam", "--model.init_args.lr=0.003", "--model.init_args.weight_decay=0",
    "--model.init_args.snapshot_share=1.0",
    "--data=datamodules.ShapesDataModule", "--data.init_args.num_train=200", "--data.init_args.num_test=64",
    "--data.init_args.batch_size=50", "--trainer.max_epochs=3", "--trainer.inference_mode=false",
    "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1", "--run.logger=csv",
    '--trainer.callbacks+={"class_path": "lit_modules.robustness.GrayBoxEvaluation", '
    '"init_args": {"ifgsm_steps": 3, "pgd_steps": 3, "pgd_alpha": null, "pictures": 4}}',
]


ADVERSARIES = {"clean": CleanTraining, "fgsm": FGSMTraining, "pgd": PGDTraining, "fast": FastTraining}
TINY = {"arch": "convnet", "arch_kwargs": {"width": 8, "depth": 2, "norm": "batchnorm"}, "in_channels": 1,
        "num_classes": 4, "image_size": 8, "eps": 0.15, "optimizer": "adam", "lr": 0.01, "weight_decay": 0.0,
        "lr_schedule": "none"}


def _module(regime: str, adversary: TrainingAdversary | None = None, **kw) -> AdversarialTraining:
    """``regime`` ``gat``: GrayBoxAdversarialTraining (its adversary default FGSMTraining()); else AdversarialTraining
    with ``adversary`` (default: the regime's adversary with its defaults)."""
    torch.manual_seed(0)
    kw = {**TINY, **kw}
    if regime == "gat":
        return GrayBoxAdversarialTraining(adversary=adversary, **kw)
    return AdversarialTraining(adversary=adversary or ADVERSARIES[regime](), **kw)


@pytest.mark.parametrize("regime", ["clean", "fgsm", "pgd", "gat"])
def test_every_regime_trains_and_its_loss_falls(regime: str) -> None:
    x, y = _blobs(384, seed=0)
    # PGD-AT at eps 0.15 learns slowly on these blobs (1.50 -> 1.35 in 18 steps): a smaller ball for it
    model = _module(regime, PGDTraining(steps=3, alpha=None) if regime == "pgd" else None,
                    eps=0.08 if regime == "pgd" else 0.15)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, f"{regime}: loss did not fall: {losses}"
    if regime == "gat":
        assert model.bag.epochs == [0, 1, 2]  # one snapshot per epoch, in order
        assert not torch.equal(model.bag.snapshots[0]["fc.weight"], model.bag.snapshots[2]["fc.weight"])


def test_fgsm_at_loss_is_kurakins_mixed_loss() -> None:
    model = _module("fgsm", FGSMTraining(adv_ratio=0.25, adv_weight=0.3, labels="true", random_eps=False)).eval()
    x, y = _blobs(16, seed=1)
    loss = model.training_step((x, y), 0)
    k = 4
    adv = fgsm(model, x[:k], y[:k], 0.15)
    with torch.no_grad():
        ce_adv = F.cross_entropy(model(adv), y[:k], reduction="sum")
        ce_clean = F.cross_entropy(model(x[k:]), y[k:], reduction="sum")
    torch.testing.assert_close(loss, (0.3 * ce_adv + ce_clean) / (0.3 * k + 12))


def test_pgd_at_trains_on_adversaries_only() -> None:
    model = _module("pgd", PGDTraining(steps=2)).eval()
    x, y = _blobs(8, seed=2)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
    assert model.training_step((x, y), 0) > clean  # every image attacked: the loss is above the clean one


def test_gat_seeds_adversaries_from_a_snapshot() -> None:
    model = _module("gat", FGSMTraining(labels="true", random_eps=False), snapshot_share=1.0, warmup_epochs=0)
    old = {k: v.clone() for k, v in model.net.state_dict().items()}
    model.bag.add(model.net, epoch=0)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.5 * torch.randn_like(p))  # the current model moves away from the snapshot
    x, y = _blobs(8, seed=3)
    seed, i = model.seed_model()
    assert isinstance(seed, SnapshotModel) and i == 0
    expected = fgsm(SnapshotModel(model.net, model.normalize, old), x, y, 0.15)
    torch.testing.assert_close(model.craft(x, y), expected)
    assert not torch.equal(expected, fgsm(model, x, y, 0.15))


def test_gat_bag_asked_for_before_any_snapshot_is_a_clear_error() -> None:
    model = _module("gat", warmup_epochs=0)
    x, y = _blobs(8, seed=4)
    with pytest.raises(EmptyBagError, match="snapshot bag is empty.*warmup_epochs"):
        model.training_step((x, y), 0)
    assert isinstance(EmptyBagError("x"), CvlabError)


def test_bag_keeps_the_latest_snapshots() -> None:
    model = _module("gat", bag_size=2)
    for e in range(4):
        model.bag.add(model.net, e)
    assert model.bag.epochs == [2, 3] and len(model.bag) == 2


def test_bag_refresh_first_keeps_the_first_and_reservoir_a_seeded_sample() -> None:
    model = _module("gat", bag_size=3, bag_refresh="first")
    for k in range(1, 9):
        model.bag.add(model.net, 0, step=10 * k)
    assert model.bag.steps == [10, 20, 30] and model.bag.taken == 8
    picks = []
    for seed in range(40):
        bag = _module("gat", bag_size=3, bag_refresh="reservoir", seed=seed).bag
        for k in range(1, 13):
            bag.add(model.net, 0, step=k)
        assert len(bag) == 3 and len(set(bag.steps)) == 3 and bag.taken == 12
        again = _module("gat", bag_size=3, bag_refresh="reservoir", seed=seed).bag
        for k in range(1, 13):
            again.add(model.net, 0, step=k)
        assert again.steps == bag.steps  # seeded by (seed, n): the same run keeps the same sample
        picks += bag.steps
    # a uniform sample of 12: each step kept 40 * 3 / 12 = 10 times on average; the first ones are not lost
    assert sum(s <= 3 for s in picks) >= 15 and sum(s >= 10 for s in picks) >= 15


def test_bad_trainer_settings_fail_early() -> None:
    with pytest.raises(CvlabError, match=r"eps must be in \[0, 1\]"):
        _module("fgsm", eps=8.0)
    with pytest.raises(CvlabError, match="adv_ratio"):
        FGSMTraining(adv_ratio=0.0)
    with pytest.raises(CvlabError, match="steps >= 1"):
        PGDTraining(steps=0)
    with pytest.raises(CvlabError, match="adversary must be a training adversary"):
        _module("fgsm", adversary="pgd")
    with pytest.raises(CvlabError, match="snapshot_share"):
        _module("gat", snapshot_share=1.5)
    with pytest.raises(CvlabError, match="bag_refresh"):
        _module("gat", bag_refresh="lifo")
    with pytest.raises(CvlabError, match="restore_best.*robust_val_images"):
        _module("fast", restore_best=True)


def _bag(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def test_bag_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    model = _module("gat")
    for e in range(2):
        model.bag.add(model.net, e)
        with torch.no_grad():
            model.net.fc.weight.add_(1.0)
    ckpt: dict = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "x.ckpt")
    fresh = _module("gat")
    fresh.on_load_checkpoint(torch.load(tmp_path / "x.ckpt", weights_only=True))
    assert fresh.bag.epochs == [0, 1]
    for a, b in zip(model.bag.snapshots, fresh.bag.snapshots):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # four CLI runs: ~40 s alone, minutes on a loaded machine
def test_snapshots_survive_resume_and_graybox_evaluates(tmp_path: Path) -> None:
    full = run_cli("fit", *GAT_TINY, run_dir=tmp_path / "full")
    part = tmp_path / "part"
    kill = '--trainer.callbacks+={"class_path": "tests.cli_runs.KillAtEpoch", "init_args": {"epoch": 2}}'
    with pytest.raises(SimulatedKill):
        run_cli("fit", *GAT_TINY, kill, run_dir=part)
    killed = _bag(part / "checkpoints" / "last.ckpt")
    assert killed["gat_bag"]["epochs"] == [0, 1]  # the checkpoint of epoch 1 holds epoch 1's snapshot
    resumed = run_cli("fit", *GAT_TINY, f"--ckpt_path={part / 'checkpoints' / 'last.ckpt'}", run_dir=part)
    assert resumed.model.bag.epochs == full.model.bag.epochs == [0, 1, 2]
    for a, b in zip(full.model.bag.snapshots, resumed.model.bag.snapshots):
        for k in a:
            torch.testing.assert_close(a[k], b[k], msg=f"snapshot {k} differs after resume")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"{name} differs after resume")
    gray = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "GrayBoxEvaluation")
    assert gray.epochs == [0, 1, 2]
    # the gray-box evaluation ran after fit: every attack below clean, the worst case is the minimum
    m = read_metrics(full.trainer.default_root_dir)
    attacked = {k: v for k, v in m.items() if k.startswith("test/acc_") and k not in ("test/acc_worst",)}
    assert {"test/acc_fgsm", "test/acc_ifgsm", "test/acc_pgd", "test/acc_graybox_e0_fgsm",
            "test/acc_graybox_e1_ifgsm", "test/acc_graybox_worst"} <= set(attacked)
    assert all(v <= m["test/acc"] + 1e-6 for v in attacked.values())
    assert m["test/acc_worst"] == pytest.approx(min(attacked.values()))
    assert m["test/acc_graybox_worst"] == pytest.approx(min(v for k, v in attacked.items() if "_e" in k))
    # the checkpoint is a teacher for every method: same logits through load_teacher
    from lit_modules.teacher import load_teacher

    teacher = load_teacher(str(Path(full.trainer.default_root_dir) / "checkpoints" / "last.ckpt"))
    probe = torch.rand(4, 3, 32, 32)
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(probe), full.model(probe))
    images = Path(full.trainer.default_root_dir) / "images"
    assert (images / "graybox_curve.png").is_file() and list(images.glob("test_adversarial_examples_*.png"))
    # as a stage: `cvlab test --ckpt_path` restores the snapshots and gives the same numbers
    stage = run_cli("test", *GAT_TINY,
                    f"--ckpt_path={Path(full.trainer.default_root_dir) / 'checkpoints' / 'last.ckpt'}",
                    run_dir=tmp_path / "stage")
    s = read_metrics(stage.trainer.default_root_dir)
    for k in ("test/acc", "test/acc_graybox_e0_fgsm", "test/acc_graybox_e1_fgsm", "test/acc_fgsm"):
        assert s[k] == pytest.approx(m[k]), k


# the trainer on 2 CPU processes (DDP, gloo) equals one process on the same global batch: GAT (every image
# adversarial, fixed eps: per-device batches then split the global batch's work exactly) with the snapshot drawn
# by (seed, global_step), identical on every rank; instance norm (BatchNorm's statistics are per rank)
DDP = [a for a in GAT_TINY if not a.startswith(("--trainer.callbacks", "--data.init_args.batch_size",
                                                 "--model.init_args.snapshot_share"))] + [
    '--model.init_args.adversary={"class_path": "lit_modules.robustness.FGSMTraining", '
    '"init_args": {"adv_ratio": 1.0, "random_eps": false}}', "--model.init_args.snapshot_share=1.0",
    "--model.init_args.optimizer=sgd", "--model.init_args.momentum=0.0", "--model.init_args.lr=0.05",
    "--data.init_args.augment=none", "--trainer.accelerator=cpu", "--run.test_after_fit=false",
]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    single = tmp_path / "single"
    r1 = run_cli_subprocess("fit", *DDP, "--data.init_args.batch_size=50", f"--run.dir={single}")
    assert r1.returncode == 0, r1.stderr[-3000:]
    ddp = tmp_path / "ddp"
    r2 = run_cli_subprocess("fit", *DDP, "--data.init_args.batch_size=25", "--trainer.devices=2",
                            "--trainer.strategy=ddp", f"--run.dir={ddp}")
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = (_bag(d / "checkpoints" / "last.ckpt") for d in (single, ddp))
    assert a["gat_bag"]["epochs"] == b["gat_bag"]["epochs"] == [0, 1, 2]
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], atol=1e-5, rtol=1e-4,
                                   msg=f"{k} differs between 1 and 2 processes")
    for sa, sb in zip(a["gat_bag"]["snapshots"], b["gat_bag"]["snapshots"]):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=1e-4)


def test_eps_warmup_ramps_the_training_eps(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _module("pgd", eps_warmup_epochs=2.0)

    class _T:  # what train_eps reads of a trainer
        num_training_batches = 10

    model._trainer = _T()  # type: ignore[assignment]
    for step, expected in ((0, 0.15 / 20), (9, 0.15 / 2), (19, 0.15), (50, 0.15)):
        monkeypatch.setattr(AdversarialTraining, "global_step", property(lambda self, s=step: s))
        assert model.train_eps() == pytest.approx(expected)


# --- the deprecated AdversarialTrainer: the same training as the new classes, a warning that names them ------------

OLD_ARGS = {"clean": {}, "fgsm": {"adv_ratio": 0.25, "fgsm_labels": "true"}, "pgd": {"pgd_steps": 2, "pgd_alpha": None},
            "fast": {"fast_alpha": 0.2}, "gat": {"snapshot_steps": 1, "bag_size": 2, "seed": 2}}
NEW = {"clean": ("AdversarialTraining", lambda: _module("clean")),
       "fgsm": ("AdversarialTraining", lambda: _module("fgsm", FGSMTraining(adv_ratio=0.25, labels="true"))),
       "pgd": ("AdversarialTraining", lambda: _module("pgd", PGDTraining(steps=2, alpha=None))),
       "fast": ("AdversarialTraining", lambda: _module("fast", FastTraining(alpha=0.2))),
       "gat": ("GrayBoxAdversarialTraining", lambda: _module("gat", snapshot_steps=1, bag_size=2, seed=2))}


def _fit3(model: AdversarialTraining) -> AdversarialTraining:
    """Three optimisation steps on fixed batches, the global RNG (random eps, PGD's start) seeded alike."""
    x, y = _blobs(48, seed=5)
    torch.manual_seed(11)
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    return model


@pytest.mark.parametrize("regime", sorted(OLD_ARGS))
def test_deprecated_regime_warns_and_trains_as_the_new_class(regime: str) -> None:
    name, build = NEW[regime]
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match=f"AdversarialTrainer is deprecated.*{name}"):
        old = AdversarialTrainer(regime=regime, **TINY, **OLD_ARGS[regime])
    new = build()
    assert type(new).__name__ == name
    for (k, a), b in zip(_fit3(old).state_dict().items(), _fit3(new).state_dict().values()):
        assert torch.equal(a, b), f"{regime}: {k} differs after 3 steps"
    if regime == "gat":  # the snapshot path was taken: steps 1 and 2 seeded from the bag
        assert old.bag.steps == new.bag.steps == [1, 2]
        assert old.last_seed == new.last_seed and old.last_seed[0] == 2
    else:
        assert len(old.bag) == 0  # the non-GAT regimes take no snapshots


def test_checkpoints_load_weights_only_old_and_new(tmp_path: Path) -> None:
    for model, cls in ((AdversarialTrainer(regime="gat", snapshot_steps=1, **TINY), AdversarialTrainer),
                       (_module("gat", FGSMTraining(labels="true"), snapshot_steps=1), GrayBoxAdversarialTraining),
                       (_module("pgd", PGDTraining(steps=2, alpha=None)), AdversarialTraining)):
        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        x, y = _blobs(48, seed=5)
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
        trainer.save_checkpoint(tmp_path / "x.ckpt")
        ckpt = torch.load(tmp_path / "x.ckpt", map_location="cpu", weights_only=True)  # plain values only
        loaded = cls.load_from_checkpoint(tmp_path / "x.ckpt", map_location="cpu", weights_only=True)
        assert type(loaded.adversary) is type(model.adversary) and vars(loaded.adversary) == vars(model.adversary)
        for k, v in model.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k]), k
        if isinstance(model, GrayBoxAdversarialTraining):
            assert ckpt["gat_bag"]["steps"] == [1, 2] and loaded.bag.steps == [1, 2]
