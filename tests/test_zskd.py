"""Zero-shot KD: class similarity, Dirichlet targets, the KD loss, impression synthesis (resume, DDP),
and the KD student on impressions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cvlab.artifacts import ShardMismatchError, load_shards
from cvlab.image_ops import random_affine, random_mix
from experiments.cli import main as cvlab
from lit_modules.classifier import ClassifierModule
from lit_modules.distillation.data_impressions import (
    FinalLayerError,
    class_similarity,
    concentration,
    dirichlet_targets,
    final_linear,
    impression_plan,
    sample_dirichlet,
    total_variation,
)
from lit_modules.distillation.kd_loss import (
    distillation_loss,
    kd_kl_loss,
    soft_cross_entropy,
)
from lit_modules.distillation.kd_student import KDStudent
from lit_modules.distillation.zskd import initial_images, synthesize
from lit_modules.teacher import load_teacher
from tests.conftest import REPO
from tests.fakedata import save_cvlab_checkpoint


def save_teacher(path: Path, arch: str = "convnet", num_classes: int = 10, in_channels: int = 3,
                 arch_kwargs: dict | None = None, seed: int = 0) -> Path:
    """A cvlab teacher checkpoint (random weights) as ClassifierModule writes it."""
    torch.manual_seed(seed)
    kw = (arch_kwargs if arch_kwargs is not None
          else ({"width": 8, "depth": 2, "norm": "batchnorm"} if arch == "convnet" else {}))
    m = ClassifierModule(arch=arch, num_classes=num_classes, in_channels=in_channels, image_size=32, arch_kwargs=kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_cvlab_checkpoint(m, path)
    return path


# --- class similarity and Dirichlet targets -------------------------------------------------------------
def test_class_similarity_of_a_hand_built_final_layer() -> None:
    w = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])  # unit rows: e1, e2, diag, -e1
    c = class_similarity(w)
    r = 1 / math.sqrt(2)  # cosines: [[1,0,r,-1],[0,1,r,0],[r,r,1,-r],[-1,0,-r,1]] -> (c + 1) / 2
    cos = torch.tensor([[1, 0, r, -1], [0, 1, r, 0], [r, r, 1, -r], [-1, 0, -r, 1.0]])
    torch.testing.assert_close(c, (cos + 1) / 2)
    assert c.min() == 0 and c.max() == 1 and torch.equal(c, c.T)


def test_concentration_paper_keeps_beta_public_code_cancels_it() -> None:
    sim = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.4], [0.2, 0.4, 1.0]])
    k, b = torch.tensor([0, 0]), torch.tensor([1.0, 0.1])
    paper = concentration(sim, k, b, "paper")  # row 0 re-normalised: [1, 0.375, 0]
    torch.testing.assert_close(paper, torch.tensor([[1.0, 0.375, 0.0], [0.1, 0.0375, 0.0]]) + 1e-4)
    public = concentration(sim, k, b, "public_code")
    torch.testing.assert_close(public[0], public[1])  # beta = 0.1 gives the same targets as beta = 1


def test_impression_plan_balances_classes_and_splits_beta() -> None:
    classes, betas = impression_plan(40, 4, (1.0, 0.1), (0.5, 0.5))
    assert torch.bincount(classes).tolist() == [10, 10, 10, 10]
    for k in range(4):
        assert (betas[classes == k] == 1.0).sum() == 5 and torch.allclose(betas[classes == k][5:], torch.tensor(0.1))


def test_dirichlet_samples_lie_on_the_simplex_with_the_right_mean() -> None:
    alpha = torch.tensor([[2.0, 1.0, 1.0], [0.3, 0.1, 0.6]]).repeat_interleave(20000, 0)  # (40000, 3)
    y = sample_dirichlet(alpha, seed=0)
    assert (y >= 0).all() and torch.allclose(y.sum(1), torch.ones(len(y)))
    torch.testing.assert_close(y[:20000].mean(0), torch.tensor([0.5, 0.25, 0.25]), atol=0.01, rtol=0)
    torch.testing.assert_close(y[20000:].mean(0), torch.tensor([0.3, 0.1, 0.6]), atol=0.01, rtol=0)
    tiny = sample_dirichlet(torch.full((100, 10), 1e-4), seed=1)  # underflowing gammas: still no NaN
    assert torch.isfinite(tiny).all() and torch.allclose(tiny.sum(1), torch.ones(100))
    assert torch.equal(sample_dirichlet(alpha[:5], 3), sample_dirichlet(alpha[:5], 3))


def test_dirichlet_targets_peak_at_their_class_for_large_beta() -> None:
    sim = class_similarity(torch.randn(10, 16, generator=torch.Generator().manual_seed(0)))
    y, classes, betas = dirichlet_targets(sim, 2000, betas=(50.0,), beta_split=(1.0,))
    assert (y.argmax(1) == classes).float().mean() > 0.5 and betas.eq(50.0).all()


def test_teacher_without_a_final_linear_layer_fails_clearly() -> None:
    with pytest.raises(FinalLayerError, match="no final linear layer"):
        final_linear(nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    # any network whose last layer is an nn.Linear will do (cvlab's zoo or not)
    fc = nn.Linear(4, 3)
    assert final_linear(nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), fc)) is fc


# --- KD loss -----------------------------------------------------------------------------------------------
def test_kd_loss_is_zero_when_student_equals_teacher_and_scales_with_tau_squared() -> None:
    t = torch.randn(8, 10)
    assert kd_kl_loss(t.clone(), t, 20.0).abs() < 1e-6
    s = torch.randn(8, 10)
    assert kd_kl_loss(s, t, 4.0) > 0
    # tau^2 * KL == tau^2 * (CE(p_t, p_s) - H(p_t))
    p_t = (t / 4).softmax(-1)
    ent = -(p_t * p_t.log()).sum(-1)
    torch.testing.assert_close(kd_kl_loss(s, t, 4.0), 16 * (soft_cross_entropy(s, p_t, 4.0) - ent).mean())


def test_distillation_loss_ignores_unlabelled_rows() -> None:
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, -1, 2, -1])
    total, kd, ce = distillation_loss(s, t, y, 2.0, hard_label_weight=0.5)
    ref = torch.nn.functional.cross_entropy(s[[0, 2]], y[[0, 2]])
    torch.testing.assert_close(ce, ref)
    torch.testing.assert_close(total, 0.5 * kd + 0.5 * ref)
    _, _, ce0 = distillation_loss(s, t, torch.full((4,), -1), 2.0, hard_label_weight=0.5)
    assert ce0 == 0


def test_random_affine_identity_and_flip() -> None:
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(random_affine(x), x)
    torch.testing.assert_close(random_affine(x, scale=0.0, rotate=0.0, flip=False, translate=0.0), x)
    y = random_affine(x, scale=0.2, translate=0.1, rotate=15, flip=True, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.equal(y, x)


def test_random_mix_blends_each_image_with_one_partner_at_a_uniform_weight() -> None:
    b = 2000
    x = torch.eye(b).view(b, b, 1, 1)  # image i is the one-hot e_i: a blend shows its partner and weight
    assert torch.equal(random_mix(x, 0.0), x)
    out = random_mix(x, 0.5, torch.Generator().manual_seed(0)).view(b, b)
    torch.testing.assert_close(out.sum(1), torch.ones(b))  # a convex blend of two images
    own = out.diagonal()
    assert (own >= 0.5).all() and ((out > 0).sum(1) <= 2).all()  # the image stays dominant; one partner at most
    partner = (out - torch.diag(own)).argmax(1)
    moved = own < 1
    assert partner[moved].unique().numel() == int(moved.sum())  # partners are a permutation: no image used twice
    w = 1 - own[moved]  # U(0, 0.5): mean 0.25, sd 0.144
    assert abs(w.mean().item() - 0.25) < 0.015 and w.max() <= 0.5


# --- synthesis ---------------------------------------------------------------------------------------------
def test_synthesis_lowers_the_teachers_loss_on_its_targets(tmp_path: Path) -> None:
    teacher = load_teacher(save_teacher(tmp_path / "t.ckpt"))
    y, _, _ = dirichlet_targets(class_similarity(final_linear(teacher).weight), 20)
    x0 = initial_images(torch.arange(20), (3, 32, 32), "uniform", 0)
    start = soft_cross_entropy(teacher(x0), y, 1.0)  # tau = 1: a random tiny teacher moves fast enough
    x, loss = synthesize(teacher, x0, y, iterations=60, lr=0.1, temperature=1.0)
    ent = -(y * y.clamp_min(1e-30).log()).sum(1)  # CE floor: KL(y || teacher) = CE - H(y)
    assert (loss - ent).mean() < 0.5 * (start - ent).mean() and (loss < start).all()
    assert teacher.training is False and all(not p.requires_grad for p in teacher.parameters())


def test_synthesis_works_inside_a_caching_autocast(tmp_path: Path) -> None:
    # LeNet-5's first op is a conv on x itself, the tensor autocast would cache
    teacher = load_teacher(save_teacher(tmp_path / "t.ckpt", arch="lenet5", in_channels=1))
    y, _, _ = dirichlet_targets(class_similarity(final_linear(teacher).weight), 10)
    x0 = initial_images(torch.arange(10), (1, 32, 32), "uniform", 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cache_enabled=True by default
        _, loss = synthesize(teacher, x0, y, iterations=30, lr=0.1, temperature=1.0)
    assert (loss < soft_cross_entropy(teacher(x0), y, 1.0) - 0.05).all()


def test_batched_synthesis_equals_one_class_at_a_time(tmp_path: Path) -> None:
    teacher = load_teacher(save_teacher(tmp_path / "t.ckpt"))
    y, classes, _ = dirichlet_targets(class_similarity(final_linear(teacher).weight), 20)
    x0 = initial_images(torch.arange(20), (3, 32, 32), "gaussian", 0)
    xb, lb = synthesize(teacher, x0, y, 10, 0.05, 20.0)
    for k in range(10):
        m = classes == k
        xk, lk = synthesize(teacher, x0[m], y[m], 10, 0.05, 20.0)
        torch.testing.assert_close(xk, xb[m], rtol=1e-4, atol=1e-5)


def test_pixel_penalty_shrinks_the_impressions(tmp_path: Path) -> None:
    teacher = load_teacher(save_teacher(tmp_path / "t.ckpt"))
    y, _, _ = dirichlet_targets(class_similarity(final_linear(teacher).weight), 10)
    x0 = initial_images(torch.arange(10), (3, 32, 32), "gaussian", 0) * 3
    free, _ = synthesize(teacher, x0, y, 30, 0.1, 20.0)
    held, _ = synthesize(teacher, x0, y, 30, 0.1, 20.0, pixel_l2=1.0)
    assert held.flatten(1).norm(dim=1).max() < 0.5 * free.flatten(1).norm(dim=1).min()


def test_total_variation_worked_answer() -> None:
    x = torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]).view(1, 1, 2, 3)
    # across columns: (1-0)^2 + (3-1)^2 + 0 + 0 = 5; across rows: 0^2 + 1^2 + 3^2 = 10
    torch.testing.assert_close(total_variation(x), torch.tensor([15.0]))
    # per image, summed over channels; a constant image has none
    batch = torch.cat([x.expand(1, 3, 2, 3), torch.full((1, 3, 2, 3), 0.7)])
    torch.testing.assert_close(total_variation(batch), torch.tensor([45.0, 0.0]))


def test_smoothness_prior_lowers_the_impressions_variation(tmp_path: Path) -> None:
    teacher = load_teacher(save_teacher(tmp_path / "t.ckpt"))
    y, _, _ = dirichlet_targets(class_similarity(final_linear(teacher).weight), 10)
    x0 = initial_images(torch.arange(10), (3, 32, 32), "gaussian", 0)
    free, _ = synthesize(teacher, x0, y, 30, 0.1, 20.0)
    smooth, _ = synthesize(teacher, x0, y, 30, 0.1, 20.0, pixel_tv=1.0)
    assert total_variation(smooth).max() < 0.5 * total_variation(free).min()


def test_clipped_impressions_are_stored_in_the_pixel_range(tmp_path: Path) -> None:
    teacher = save_teacher(tmp_path / "t.ckpt")
    over = {"model.init_args.init": "gaussian", "model.init_args.lr": "1.0"}
    cvlab(_synth_args(teacher, tmp_path / "raw", n=10, **over))
    cvlab(_synth_args(teacher, tmp_path / "clip", n=10, **over, **{"model.init_args.clip": "true"}))
    raw, clipped = load_shards(tmp_path / "raw" / "shards")["image"], load_shards(tmp_path / "clip" / "shards")["image"]
    assert raw.min() < 0 and raw.max() > 1  # the check below can fail
    torch.testing.assert_close(clipped, raw.clamp(0, 1))
    # the reported CE and the teacher's agreement describe the stored (clipped) images
    shards = load_shards(tmp_path / "clip" / "shards")
    t = load_teacher(str(teacher))
    with torch.no_grad():
        logits = t(shards["image"])
    ce = soft_cross_entropy(logits, shards["target"], 20.0)
    torch.testing.assert_close(shards["loss"], ce, rtol=1e-4, atol=1e-5)
    assert torch.equal(shards["teacher_pred"], logits.argmax(-1))
    raw_loss = load_shards(tmp_path / "raw" / "shards")["loss"]
    assert not torch.allclose(raw_loss, ce, rtol=1e-3)  # clipping changed the CE: the check above can fail


def _synth_args(teacher: Path, run: Path, n: int = 30, **over: str) -> list[str]:
    args = {"model.init_args.teacher": str(teacher), "model.init_args.iterations": "5", "model.init_args.lr": "0.05",
            "model.init_args.grid_per_class": "2", "data.init_args.num_impressions": str(n),
            "data.init_args.batch_size": "8", "trainer.enable_progress_bar": "false", **over}
    return ["predict", "--config", "experiments/zskd/shapes/synthesize.yaml", f"--run.dir={run}", "--run.logger=csv",
            *[f"--{k}={v}" for k, v in args.items()]]


def test_synthesis_stage_writes_shards_metrics_grid_and_resumes(tmp_path: Path) -> None:
    teacher = save_teacher(tmp_path / "t.ckpt")
    run = tmp_path / "run"
    cvlab(_synth_args(teacher, run))
    r = load_shards(run / "shards")
    assert r["index"].tolist() == list(range(30)) and r["image"].shape == (30, 3, 32, 32)
    assert torch.bincount(r["class"]).tolist() == [3] * 10
    assert (r["loss"] < r["loss_start"]).all()
    m = json.loads((run / "metrics.json").read_text())
    assert m["synthesis/num_impressions"] == 30 and m["synthesis/loss_mean"] < m["synthesis/loss_start_mean"]
    assert list((run / "images").glob("synthesis_impressions_per_class*.png"))
    shards = sorted((run / "shards").glob("shard-*.pt"))
    for f in shards[1:3]:  # a killed run: only whole shards remain
        f.unlink()
    cvlab(_synth_args(teacher, run))
    again = load_shards(run / "shards")
    assert all(f.exists() for f in shards)
    torch.testing.assert_close(again["image"], r["image"])
    torch.testing.assert_close(again["target"], r["target"])
    # every shard written (e.g. a run killed while logging): the rerun has no batches, yet summarises
    (run / "metrics.json").unlink()
    for f in (run / "images").glob("*.png"):
        f.unlink()
    cvlab(_synth_args(teacher, run))
    assert json.loads((run / "metrics.json").read_text())["synthesis/num_impressions"] == 30
    assert list((run / "images").glob("synthesis_impressions_per_class*.png"))


def test_shard_folder_from_another_config_is_refused(tmp_path: Path) -> None:
    from experiments.cli import CvlabCLI

    teacher = save_teacher(tmp_path / "t.ckpt")
    run = tmp_path / "run"
    cvlab(_synth_args(teacher, run, n=10))
    with pytest.raises(ShardMismatchError, match="different config.*temperature"):
        CvlabCLI(args=_synth_args(teacher, run, n=10, **{"model.init_args.temperature": "5"}))


def test_synthesis_needs_a_teacher_for_the_tasks_classes(tmp_path: Path) -> None:
    teacher = save_teacher(tmp_path / "t.ckpt", num_classes=7)
    from cvlab.errors import CvlabError
    from experiments.cli import CvlabCLI

    with pytest.raises(CvlabError, match="disagree on num_classes: 7 vs 10"):
        CvlabCLI(args=_synth_args(teacher, tmp_path / "run", n=10))


# --- the student on impressions ---------------------------------------------------------------------------
def test_student_distils_from_impressions_and_rejects_wrong_class_count(tmp_path: Path) -> None:
    from cvlab.errors import CvlabError
    from experiments.cli import CvlabCLI

    teacher = save_teacher(tmp_path / "t.ckpt")
    synth = tmp_path / "synth"
    cvlab(_synth_args(teacher, synth, n=40))
    run = tmp_path / "student"
    args = ["fit", "--config", "experiments/zskd/shapes/student.yaml", f"--run.dir={run}", "--run.logger=csv",
            f"--model.init_args.teacher={teacher}", f"--data.init_args.pool.init_args.folder={synth}/shards",
            "--data.init_args.task.init_args.num_train=100", "--data.init_args.task.init_args.num_test=50",
            "--data.init_args.batch_size=16", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1"]
    cli = CvlabCLI(args=args)
    m = json.loads((run / "metrics.json").read_text())
    assert {"test/acc", "test/teacher_acc", "train/kd"} <= set(m) and math.isfinite(m["train/kd"])
    counts = torch.bincount(cli.datamodule.test_y, minlength=10).double()
    per_class = torch.tensor([m[f"test/acc_class/{k}"] for k in range(10)], dtype=torch.float64)
    assert math.isclose((per_class * counts).sum().item() / counts.sum().item(), m["test/acc"], abs_tol=1e-6)
    assert cli.datamodule.train_x.shape[0] == 40 and cli.datamodule.train_x.dtype == torch.float32
    # a student checkpoint is itself a teacher
    t2 = load_teacher(run / "checkpoints" / "last.ckpt")
    assert final_linear(t2).out_features == 10
    synth7 = tmp_path / "synth7"  # impressions of a 7-class teacher
    synth7.mkdir()
    torch.save({"index": torch.arange(4), "image": torch.zeros(4, 3, 32, 32), "target": torch.full((4, 7), 1 / 7)},
               synth7 / "shard-000000000-000000003-r0.pt")
    with pytest.raises(CvlabError, match="7 classes but the task"):
        CvlabCLI(args=[a if "pool.init_args.folder" not in a else f"--data.init_args.pool.init_args.folder={synth7}"
                       for a in args] + [f"--run.dir={tmp_path / 'student7'}"])
    with pytest.raises(CvlabError, match="aug_mix.*0.7"):
        KDStudent(teacher=str(teacher), aug_mix=0.7)


@pytest.mark.slow
def test_two_process_ddp_synthesis_writes_disjoint_shards_covering_all_targets(tmp_path: Path) -> None:
    teacher = save_teacher(tmp_path / "t.ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = {n: tmp_path / f"run{n}" for n in (1, 2)}
    for n, run in runs.items():
        extra = ["--trainer.accelerator=cpu", f"--trainer.devices={n}"] + (["--trainer.strategy=ddp"] if n == 2 else [])
        cmd = [sys.executable, "-m", "experiments", *_synth_args(teacher, run, n=21), *extra]
        subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=300)
    by_rank: dict[str, set[int]] = {"r0": set(), "r1": set()}
    for f in (runs[2] / "shards").glob("shard-*.pt"):
        by_rank[f.stem[-2:]] |= set(torch.load(f, weights_only=True)["index"].tolist())
    assert by_rank["r0"] and by_rank["r1"] and by_rank["r0"] | by_rank["r1"] == set(range(21))
    assert len(by_rank["r0"] & by_rank["r1"]) <= 1  # at most the one index DDP repeats to even out the ranks
    one, two = load_shards(runs[1] / "shards"), load_shards(runs[2] / "shards")  # repeats from DDP padding dropped
    assert torch.equal(one["index"], two["index"])
    torch.testing.assert_close(one["image"], two["image"], rtol=1e-4, atol=1e-5)


def test_mnist_recipe_candidates_share_the_teacher_and_each_change_one_thing() -> None:
    """experiments/zskd/mnist/pipeline_recipes.yaml: every candidate student distils from the same teacher stage,
    every candidate synthesis is the default one plus exactly one argument, and the record reports each candidate's
    validation difference to the default student."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "experiments/zskd/mnist/pipeline_recipes.yaml"
    spec = yaml.safe_load(path.read_text())
    stages = {s["name"]: s for s in spec["stages"]}
    base = stages["synthesize"]
    for name, s in stages.items():
        if name.startswith("synthesize_"):
            assert s["config"] == base["config"]
            assert len([k for k, v in s["args"].items() if base["args"].get(k) != v]) == 1, name
        if name.startswith("student"):
            assert s["args"]["model.init_args.teacher"] == "${teacher}/checkpoints/last.ckpt"
    assert stages["student_48k"]["args"]["trainer.max_epochs"] * 2 == 200  # twice the impressions, equal steps
    pairs = spec["record"]["differences"]
    assert {b for _, b in pairs.values()} == {"student:val/acc"}
    assert {a.split(":")[0] for a, _ in pairs.values()} == {n for n in stages if n.startswith("student_")}
    reported = {m["key"] for m in spec["record"]["report"]}
    assert set(pairs) <= reported and {f"{n}:test/acc" for n in stages if n.startswith("student")} <= reported


def test_benchmark_runs_both_synthesis_paths_and_both_student_poolings(capsys: pytest.CaptureFixture[str]) -> None:
    """`cvlab bench zskd` (not timed here): the synthesis paths and the KD student steps with cvlab's pooling and
    with the stock nn.MaxPool2d, which the reference swaps in for every MaxPool2x2."""
    from torch import nn

    from experiments.benchmarks._measure import stock_layers
    from experiments.benchmarks.zskd import main as bench_zskd
    from lit_modules.nets import create_net
    from lit_modules.nets.pooling import MaxPool2x2

    net = stock_layers(create_net("lenet5", 10, 1, 32))
    assert not any(isinstance(m, MaxPool2x2) for m in net.modules())
    assert sum(type(m) is nn.MaxPool2d and m.kernel_size == 2 for m in net.modules()) == 2
    assert bench_zskd(["--task", "mnist", "--iterations", "1", "--per-class", "1", "--student-steps", "2",
                       "--student-batch", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for label in ("KD student steps, lenet5 -> lenet5_half, batch 8: cvlab pooling", "stock nn.MaxPool2d",
                  "batched (1 batch of 10)", "per-class loop"):
        assert label in out
