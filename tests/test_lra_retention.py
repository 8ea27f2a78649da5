"""LRA judged as the paper argues (issue 37): the retention probe and its measures with worked answers, the probe
inside a run (taken, labelled by the teacher, evaluated, resumed), the paired runner (both arms of a pipeline share
teacher, generator start, student start and seed) and the paired difference of the results record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from cvlab.errors import CvlabError
from cvlab.records import mean_sd, paired_differences, record_from_seeds
from experiments.lightning_cli import CvlabCLI
from experiments.pipeline import _overrides_for, _resolve, load_pipeline, seed_overrides
from lit_modules.distillation.lra_retention import (
    RetentionProbe,
    accuracy_drops,
    probe_accuracy,
    probe_forgetting,
    retention_figure,
)
from tests.conftest import REPO
from tests.test_lra import _dm, _fake_mnist, _module, _trainer, save_teacher

#: the MNIST LRA pipelines (every one pairs LRA with its baseline)
PIPELINES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "experiments/lra/mnist").glob("pipeline*.yaml"))
# the pipelines whose record reports LRA minus baseline (the paired one must be among them)
PAIRED = [p for p in PIPELINES if "differences" in (yaml.safe_load((REPO / p).read_text()).get("record") or {})]


# --- the measures: worked answers -------------------------------------------------------------------------------
def test_probe_accuracy_equals_a_hand_computation_on_a_fixed_batch() -> None:
    """Two probes of 4 images, 3 classes. Probe 0: arg-maxes 0, 1, 2, 2 against labels 0, 1, 2, 0: 3 of 4 agree.
    Probe 1: arg-maxes 1, 0 (a tie of classes 0 and 1 goes to 0), 2, 1 against labels 1, 1, 1, 1: 2 of 4 agree."""
    logits = torch.tensor([[[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0], [1.0, 1.0, 4.0]],
                           [[0.0, 9.0, 1.0], [2.0, 2.0, 0.0], [0.0, 1.0, 7.0], [-1.0, 0.5, 0.0]]])
    labels = torch.tensor([[0, 1, 2, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(probe_accuracy(logits, labels), torch.tensor([0.75, 0.5]), rtol=0, atol=0)
    with pytest.raises(CvlabError, match=r"logits \(P, n, K\) and labels \(P, n\)"):
        probe_accuracy(logits, labels[:, :3])


def test_accuracy_drops_and_probe_forgetting_worked_answers() -> None:
    d = accuracy_drops([0.50, 0.70, 0.65, 0.80, 0.72, 0.72, 0.90, 0.60])  # falls 0.05, 0.08, 0.30
    assert d.count == 3 and d.total == pytest.approx(0.43) and d.largest == pytest.approx(0.30)
    assert accuracy_drops([]).count == 0 and accuracy_drops([0.4, 0.5]).total == 0.0
    assert probe_forgetting([[0.9, 0.7, 0.8], [0.6, 0.6]]) == pytest.approx(0.05)  # (0.1 + 0) / 2
    assert probe_forgetting([]) == 0.0


def test_retention_probe_rows_curves_and_state() -> None:
    probe = RetentionProbe([4, 0, 4])
    assert probe.epochs == [0, 4] and probe.wants(0) and not probe.wants(1)
    probe.record([])  # an evaluation before the first probe
    probe.add(0, torch.zeros(3, 1, 2, 2), torch.tensor([1, 2, 3]))
    assert not probe.wants(0) and len(probe) == 1
    probe.record([0.9])
    probe.add(4, torch.ones(3, 1, 2, 2), torch.tensor([0, 0, 0]))
    probe.record([0.7, 1.0])
    probe.record([0.8, 0.6])
    assert probe.images.shape == (2, 3, 1, 2, 2) and probe.labels.tolist() == [[1, 2, 3], [0, 0, 0]]
    assert probe.curves() == [[0.9, 0.7, 0.8], [1.0, 0.6]]
    assert probe.mean_curve() == [None, 0.9, pytest.approx(0.85), pytest.approx(0.7)]
    other = RetentionProbe([0, 4])
    other.load_state_dict(probe.state_dict())
    assert other.taken == [0, 4] and other.acc == probe.acc and torch.equal(other.images, probe.images)
    with pytest.raises(CvlabError, match="2 probes but 1 accuracies"):
        probe.record([0.5])
    with pytest.raises(CvlabError, match=r"probes hold \(3, 1, 2, 2\)"):
        probe.add(5, torch.zeros(2, 1, 2, 2), torch.zeros(2))
    with pytest.raises(CvlabError, match="probe_epochs must be >= 0"):
        RetentionProbe([-1])


def test_retention_figure_is_an_rgb_image_of_every_run() -> None:
    runs = {"lra": {"generator_step": [2, 4, 6], "acc": [0.5, 0.7, 0.6], "probe_acc": [[], [0.9], [0.8, 1.0]]},
            "baseline": {"generator_step": [2, 4, 6], "acc": [0.4, 0.6, 0.7]}}
    img = retention_figure(runs, title="seed 0")
    assert img.dim() == 4 and img.shape[:2] == (1, 3) and img.shape[2] > 100 and 0 <= img.min() < img.max() <= 1


# --- the probe inside a run ---------------------------------------------------------------------------------------
def test_probe_is_the_generated_batch_with_the_teachers_labels_and_its_logged_accuracy_is_the_students(
        tmp_path: Path) -> None:
    teacher, data = save_teacher(tmp_path / "t.ckpt"), _fake_mnist(tmp_path / "data")
    L.seed_everything(0)
    m = _module(teacher, probe_epochs=[0, 2, 9], probe_size=5)
    seen: dict[int, torch.Tensor] = {}

    class Spy(L.Callback):  # the last generated batch of each epoch, before the module keeps its probe
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx + 1 == trainer.num_training_batches:
                seen[trainer.current_epoch] = pl_module._last_new[:5].clone()

    trainer = _trainer(tmp_path / "a", 3, enable_checkpointing=False, callbacks=[Spy()])
    trainer.fit(m, datamodule=_dm(data))
    assert m.probe.taken == [0, 2]  # epoch 9 is past the run
    torch.testing.assert_close(m.probe.images, torch.stack([seen[0], seen[2]]), rtol=0, atol=0)
    with torch.no_grad():
        labels = m.teacher.forward_normalized(m.probe.images.flatten(0, 1)).argmax(-1).view(2, 5)
    assert torch.equal(m.probe.labels, labels)
    assert [len(r) for r in m.probe.acc] == [1, 1, 2]  # a row per validation: probes taken by then
    # the last row is the final student's agreement with the teacher, by hand: arg-max == label, counted
    m.eval()
    with torch.no_grad():
        pred = torch.stack([m.net(m.student_view(x)).argmax(-1) for x in m.probe.images])  # (2, 5)
    by_hand = [(pred[p] == labels[p]).sum().item() / 5 for p in range(2)]
    assert m.probe.acc[-1] == pytest.approx(by_hand)
    logged = trainer.callback_metrics
    assert float(logged["retention/probe_acc"]) == pytest.approx(sum(by_hand) / 2)
    assert float(logged["retention/probe_acc/e2"]) == pytest.approx(by_hand[1])
    curves = m.probe.curves()
    assert float(logged["retention/probe_forgetting"]) == pytest.approx(probe_forgetting(curves))
    assert float(logged["retention/probe_drops"]) == sum(accuracy_drops(c).count for c in curves)
    summary = json.loads((tmp_path / "a" / "retention_curve.json").read_text())
    assert summary["probe_epochs"] == [0, 2] and summary["probe_acc"] == m.probe.acc
    assert len(summary["probe_acc"]) == len(summary["acc"]) == 3
    assert list((tmp_path / "a" / "images").glob("retention_curve_*.png"))


def test_bad_probe_options_fail_clearly(tmp_path: Path) -> None:
    teacher = save_teacher(tmp_path / "t.ckpt")
    with pytest.raises(CvlabError, match=r"probe_size must be in \[1, batch_size=8\]"):
        _module(teacher, probe_epochs=[0], probe_size=9)
    with pytest.raises(CvlabError, match="probe_epochs must be >= 0"):
        _module(teacher, probe_epochs=[-2])
    assert _module(teacher).retention_summary().get("probe_acc") is None  # no probe configured: no probe keys


# --- the paired runner --------------------------------------------------------------------------------------------
def _build_arms(pipeline: str, seed: int, teacher: Path, data: Path, tmp: Path,
                names: tuple[str, ...] = ("lra", "baseline")) -> dict[str, L.LightningModule]:
    """The ``names`` stages of ``pipeline`` for ``seed``, built (not run) from exactly the arguments
    ``cvlab run --seeds`` gives them, with the teacher stage's folder at ``teacher``."""
    _, stages = load_pipeline(REPO / pipeline)
    arms = [s for s in stages if s.name in names]
    sets = seed_overrides(arms, [], seed)
    out = {}
    for stage in arms:
        args = [_resolve(a, {"teacher": teacher}, stage.name) for a in stage.args + _overrides_for(stage.name, sets)]
        argv = [*[f"--config={c}" for c in stage.config], *args, f"--data.init_args.data_dir={data}",
                "--trainer.enable_progress_bar=false", "--run.logger=csv", f"--run.dir={tmp / f'{stage.name}-{seed}'}"]
        out[stage.name] = CvlabCLI(args=argv, run=False).model
    return out


@pytest.mark.filterwarnings("ignore:.*args parameter is intended")
@pytest.mark.parametrize("pipeline", [p if "paired" in p else pytest.param(p, marks=pytest.mark.slow)
                                      for p in PIPELINES])
def test_paired_runner_gives_both_arms_the_same_teacher_and_generator_start(pipeline: str, tmp_path: Path) -> None:
    """Per seed, ``cvlab run PIPELINE --seeds N`` builds LRA and its baseline with the same teacher weights, the
    same initial generator and student weights and the same latent seed: the arms differ only in the student
    update, so LRA minus baseline is a per-seed paired difference."""
    teacher = tmp_path / "teacher"
    save_teacher(teacher / "checkpoints" / "last.ckpt")
    data = _fake_mnist(tmp_path / "data")
    arms = _build_arms(pipeline, 3, teacher, data, tmp_path)
    lra, base = arms["lra"], arms["baseline"]
    assert (lra.hparams.meta, base.hparams.meta) == ("second_order", "none")
    for part in ("teacher", "generator", "net"):
        a, b = getattr(lra, part).state_dict(), getattr(base, part).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{part}.{k}"
    assert lra.hparams.seed == base.hparams.seed == 3
    assert torch.equal(lra._latent(0, 0), base._latent(0, 0))
    differ = {k for k in lra.hparams if k != "teacher" and lra.hparams[k] != base.hparams.get(k)}
    assert differ <= {"meta", "inner_lr", "retain_weight"}, differ  # the method and its own knobs only
    # another seed starts elsewhere (the check above can fail)
    other = _build_arms(pipeline, 4, teacher, data, tmp_path, names=("baseline",))["baseline"]
    assert not torch.equal(other.generator.state_dict()["l1.weight"], base.generator.state_dict()["l1.weight"])


# --- the paired difference ----------------------------------------------------------------------------------------
def test_paired_differences_worked_answer() -> None:
    values = {"lra:test/acc": [0.90, 0.80, 0.85], "baseline:test/acc": [0.88, 0.82, 0.80]}
    diff = paired_differences(values, {"lra-baseline:test/acc": ["lra:test/acc", "baseline:test/acc"],
                                       "gone": ["lra:test/acc", "other:test/acc"]})
    assert list(diff) == ["lra-baseline:test/acc"]  # a pair whose stage did not run is left out
    assert diff["lra-baseline:test/acc"] == pytest.approx([0.02, -0.02, 0.05])
    mean, sd = mean_sd(diff["lra-baseline:test/acc"])
    assert mean == pytest.approx(0.05 / 3) and sd == pytest.approx(math.sqrt((0.02 - 0.05 / 3) ** 2
                                                                            + (-0.02 - 0.05 / 3) ** 2
                                                                            + (0.05 - 0.05 / 3) ** 2) / math.sqrt(2))
    with pytest.raises(CvlabError, match="a difference names two metrics"):
        paired_differences(values, {"bad": ["lra:test/acc"]})


@pytest.mark.parametrize("pipeline", PAIRED)
def test_lra_pipeline_record_reports_the_paired_difference_and_retention(pipeline: str) -> None:
    """The record of ``cvlab run PIPELINE --seeds 3`` holds LRA minus baseline per seed and the retention metrics
    of both arms (they are not test/val metrics: the pipeline's record names them)."""
    assert "experiments/lra/mnist/pipeline_cpu_paired.yaml" in PAIRED
    spec = yaml.safe_load((REPO / pipeline).read_text())

    def arm(acc: float, probe: float) -> dict[str, float]:
        return {"test/acc": acc, "val/acc": acc, "retention/probe_acc": probe, "retention/probe_forgetting": 0.1,
                "retention/drops": 2.0, "retention/drop_total": 0.03, "retention/probe_drops": 1.0}

    per_seed = {s: {"teacher": {"test/acc": 0.99}, "lra": arm(a, p), "baseline": arm(b, q)}
                for s, (a, b, p, q) in enumerate([(0.90, 0.88, 0.8, 0.7), (0.80, 0.82, 0.9, 0.9),
                                                  (0.85, 0.80, 0.7, 0.6)])}
    rec = record_from_seeds(spec, per_seed, f"cvlab run {pipeline} --seeds 3")
    assert rec.values["lra-baseline:test/acc"] == pytest.approx([0.02, -0.02, 0.05])
    assert rec.values["lra-baseline:retention/probe_acc"] == pytest.approx([0.1, 0.0, 0.1])
    shown = {m.key: m for m in rec.report}
    assert shown["lra-baseline:test/acc"].scale == 100  # points
    for key in ("lra:retention/probe_acc", "baseline:retention/probe_acc", "lra:retention/drops"):
        assert key in shown and key in rec.values


def test_paired_report_table_and_picture(tmp_path: Path) -> None:
    """Two seeds of a finished paired run: the table holds each arm and LRA minus baseline in points, with the
    mean +- sd of the difference over seeds (2.00 and -1.00: mean 0.50, sd 2.12); the picture is written."""
    from experiments.lra.paired_report import main, paired_table

    root = tmp_path / "lra_mnist_paired"
    for seed, (a, b) in enumerate([(0.90, 0.88), (0.80, 0.81)]):
        for arm, acc in (("lra", a), ("baseline", b)):
            d = root / f"seed-{seed}" / f"{arm}-0123abcd"
            d.mkdir(parents=True)
            (d / "stage.json").write_text("{}")
            (d / "metrics.json").write_text(json.dumps({"test/acc": acc, "retention/drops": 1.0}))
            (d / "retention_curve.json").write_text(json.dumps(
                {"generator_step": [2, 4], "acc": [0.5, acc], "probe_acc": [[0.9], [0.8, 0.95]]}))
    table = paired_table({0: {"lra": {"test/acc": 0.90}, "baseline": {"test/acc": 0.88}},
                          1: {"lra": {"test/acc": 0.80}, "baseline": {"test/acc": 0.81}}})
    row0, row1, summary = table.splitlines()[2:]
    assert row0.startswith("| 0 | 90.00 | 88.00 | 2.00 |") and row1.startswith("| 1 | 80.00 | 81.00 | -1.00 |")
    assert summary.startswith("| mean +- sd | 85.00 +- 7.07 | 84.50 +- 4.95 | 0.50 +- 2.12 |")
    assert main([str(root), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000
