"""``cvlab run PIPELINE --seeds N`` (issue 20): the pipeline over N seeds, each in its own folder, and the
mean, sample sd and range of every test metric."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cvlab.records import load_record
from experiments.pipeline import load_pipeline, run_seeds, seed_overrides, seed_summary, seeds_table
from tests.cli_runs import QUICKSTART, TINY_SHAPES

STUDENT = Path(__file__).resolve().parents[1] / "experiments" / "zskd" / "shapes" / "student_real.yaml"


def test_seed_summary_worked_values() -> None:
    per_seed = {
        0: {"student": {"test/acc": 0.9, "val/acc": 0.5}, "teacher": {"test/acc": 0.95}},
        1: {"student": {"test/acc": 0.8, "val/acc": 0.6}, "teacher": {"test/acc": 0.95}},
        2: {"student": {"test/acc": 0.7, "train/loss": 0.1}, "dc": {"eval/acc_mean": 0.5}},
    }
    s = seed_summary(per_seed)
    # test-split metrics, then validation ones (what recipes are chosen on); no training metrics
    assert list(s) == ["student:test/acc", "teacher:test/acc", "dc:eval/acc_mean", "student:val/acc"]
    assert s["student:val/acc"]["values"] == [0.5, 0.6]
    st = s["student:test/acc"]
    assert st["mean"] == pytest.approx(0.8) and st["sd"] == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / 2)
    assert (st["min"], st["max"], st["n"], st["values"]) == (0.7, 0.9, 3, [0.9, 0.8, 0.7])
    assert s["teacher:test/acc"]["sd"] == 0.0 and s["teacher:test/acc"]["n"] == 2
    table = seeds_table({"name": "p", "paper": {"student:test/acc": 0.85}}, s, [0, 1, 2], "cvlab run p.yaml --seeds 3")
    assert "`cvlab run p.yaml --seeds 3`" in table
    assert "| student:test/acc | 0.8000 | 0.1000 | 0.7000 - 0.9000 | 0.9000 0.8000 0.7000 | 0.85 |" in table


def _tiny_quickstart(tmp_path: Path) -> Path:
    spec = {
        "name": "tiny",
        "stages": [
            {"name": "teacher", "command": "fit", "config": [str(QUICKSTART)], "args": TINY_SHAPES},
            {"name": "student", "command": "fit", "config": [str(STUDENT)],
             "args": [a for a in TINY_SHAPES if "arch_kwargs" not in a] + [
                 "--model.init_args.teacher=${teacher}/checkpoints/last.ckpt",
                 "--model.init_args.arch_kwargs={width: 8, depth: 2, norm: batchnorm}"]},
        ],
        "paper": {"student:test/acc": 0.5},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_seed_overrides_reach_the_methods_own_seed_arguments(tmp_path: Path) -> None:
    _, stages = load_pipeline(_tiny_quickstart(tmp_path))
    out = seed_overrides(stages, [], 3)
    # ClassifierModule has no seed argument; KDStudent (augmentation) and ShapesDataModule do
    assert out == ["teacher.seed_everything=3", "teacher.data.init_args.seed=3", "student.seed_everything=3",
                   "student.model.init_args.seed=3", "student.data.init_args.seed=3"]


def test_seed_overrides_reach_a_wrapped_task_datamodule() -> None:
    """LRA's students validate on the task's split: it must follow the seed, as the teacher's does."""
    _, stages = load_pipeline(
        Path(__file__).resolve().parents[1] / "experiments" / "lra" / "mnist" / "pipeline_cpu_hour.yaml")
    out = seed_overrides([s for s in stages if s.name in ("teacher", "lra")], [], 2)
    assert "teacher.data.init_args.seed=2" in out and "lra.data.init_args.task.init_args.seed=2" in out
    assert "lra.model.init_args.seed=2" in out and "lra.data.init_args.seed=2" not in out


@pytest.mark.slow
def test_two_seeds_of_the_tiny_quickstart(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, md = _tiny_quickstart(tmp_path), tmp_path / "RESULTS.md"
    summary = run_seeds(path, [0, 1], root=tmp_path / "runs", results_md=str(md), command="cvlab run tiny --seeds 2")
    for key in ("teacher:test/acc", "student:test/acc"):
        st = summary[key]
        assert st["n"] == 2 and st["min"] <= st["mean"] <= st["max"] and st["sd"] >= 0
    folders = {s: next((tmp_path / "runs" / "tiny" / f"seed-{s}").glob("teacher-*")) for s in (0, 1)}
    w = [torch.load(folders[s] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for s in (0, 1)]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0] if w[0][k].is_floating_point())  # the seeds differ
    text = md.read_text()
    assert "tiny: 2 seeds (0, 1)" in text and "`cvlab run tiny --seeds 2`" in text and "| student:test/acc |" in text
    rec = load_record(tmp_path / "runs" / "tiny" / "record.json")  # the run's results record
    assert rec.seeds == [0, 1] and rec.values["student:test/acc"] == [summary["student:test/acc"]["values"][i]
                                                                       for i in (0, 1)]
    assert "cvlab run tiny --seeds 2" in rec.command and str(tmp_path) not in rec.command
