"""Robust vs clean accuracy of distilled students (experiments/data_impressions/robust_curve.py and its pipeline)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cvlab.errors import CvlabError
from experiments.data_impressions.robust_curve import at_clean, main, matched_table, points, read_reports, split_name
from lit_modules.robustness.severity_report import COLUMNS


def test_at_clean_worked_answers() -> None:
    pts = [(0.6, 0.3), (0.2, 0.1), (0.8, 0.2)]  # joined in order of clean accuracy: 0.2 -> 0.6 -> 0.8
    assert at_clean(pts, 0.4) == pytest.approx(0.2)     # halfway from (0.2, 0.1) to (0.6, 0.3)
    assert at_clean(pts, 0.7) == pytest.approx(0.25)    # halfway from (0.6, 0.3) to (0.8, 0.2)
    assert at_clean(pts, 0.2) == pytest.approx(0.1)     # an end point
    assert at_clean(pts, 0.1) is None and at_clean(pts, 0.9) is None  # never extrapolated
    assert at_clean([(0.5, 0.4)], 0.5) == pytest.approx(0.4) and at_clean([], 0.5) is None


def test_model_names_split_into_arm_and_budget() -> None:
    assert split_name("impressions_e20") == ("impressions", "e20")
    assert split_name("real_data_s5") == ("real_data", "s5")
    with pytest.raises(CvlabError, match="named <arm>_<budget>"):
        split_name("teacher")


def _write_report(folder: Path, rows: list[tuple[str, str, float, float, float]]) -> None:
    folder.mkdir(parents=True)
    (folder / "stage.json").write_text("{}")
    with open(folder / "severity_report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, restval="0")
        w.writeheader()
        for model, attack, eps, clean, adv in rows:
            w.writerow({"model": model, "attack": attack, "eps": eps, "clean_accuracy": clean, "adv_accuracy": adv})


def _two_seeds(root: Path) -> Path:
    folder = root / "data_impressions_robust_curve_mnist"
    # seed 0: impressions (0.3, 0.1) -> (0.5, 0.2); real (0.4, 0.3) -> (0.9, 0.5); seed 1: both shifted by +0.1 robust
    for seed, shift in ((0, 0.0), (1, 0.1)):
        rows = [("impressions_e2", "pgd", 0.1, 0.3, 0.1 + shift), ("impressions_e20", "pgd", 0.1, 0.5, 0.2 + shift),
                ("real_s5", "pgd", 0.1, 0.4, 0.3 + shift), ("real_e1", "pgd", 0.1, 0.9, 0.5 + shift),
                ("real_e1", "pgd", 0.2, 0.9, 0.05)]
        _write_report(folder / f"seed-{seed}" / "robustness-abc", rows)
    (folder / "seed-2" / "robustness-unfinished").mkdir(parents=True)  # no stage.json: not read
    return folder


def test_matched_comparison_reads_each_arm_at_the_same_clean_accuracy(tmp_path: Path) -> None:
    reports = read_reports(_two_seeds(tmp_path))
    assert sorted(reports) == [0, 1]
    assert points(reports[0], "pgd", 0.1) == {"impressions": {"e2": (0.3, 0.1), "e20": (0.5, 0.2)},
                                              "real": {"s5": (0.4, 0.3), "e1": (0.9, 0.5)}}
    table = matched_table(reports, [("pgd", 0.1)], [0.45, 0.6])
    # at clean 45%: impressions 0.175 / 0.275 -> 22.5 +- 7.1; real 0.32 / 0.42 -> 37.0 +- 7.1
    assert "| pgd 0.1 | 45 | 22.5 +- 7.1 (n=2) | 37.0 +- 7.1 (n=2) |" in table
    # at clean 60% the impressions' curve ends at 50%: no value, never extrapolated
    assert "| pgd 0.1 | 60 | - | 43.0 +- 7.1 (n=2) |" in table
    # paired per seed: impressions minus real at 45% is 0.175 - 0.32 and 0.275 - 0.42 -> -14.5 +- 0.0 points
    paired = matched_table(reports, [("pgd", 0.1)], [0.45, 0.6], baseline="real")
    assert "| pgd 0.1 | 45 | 22.5 +- 7.1 (n=2) | 37.0 +- 7.1 (n=2) | -14.5 +- 0.0 (n=2) |" in paired
    assert "| pgd 0.1 | 60 | - | 43.0 +- 7.1 (n=2) | - |" in paired
    with pytest.raises(CvlabError, match="--baseline 'teacher': no such arm"):
        matched_table(reports, [("pgd", 0.1)], [0.45], baseline="teacher")


def test_report_command_prints_tables_and_draws(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _two_seeds(tmp_path)
    assert main([str(folder), "--attacks", "pgd@0.1", "pgd@0.2", "--levels", "0.45", "--out",
                 str(tmp_path / "curve.png")]) == 0
    out = capsys.readouterr().out
    assert "2 seeds: [0, 1]" in out and "| real_e1 | 90.0 +- 0.0 (n=2) | 55.0 +- 7.1 (n=2) | 5.0 +- 0.0 (n=2) |" in out
    assert (tmp_path / "curve.png").stat().st_size > 0
    with pytest.raises(CvlabError, match="give <attack>@<eps>"):
        main([str(folder), "--attacks", "pgd"])
    with pytest.raises(CvlabError, match="no seed-<s>/robustness-<hash>/"):
        main([str(tmp_path / "empty")])


def test_pipeline_attacks_every_student_it_trains() -> None:
    import yaml

    from experiments.pipeline import load_pipeline

    spec = yaml.safe_load(Path("experiments/data_impressions/mnist/robust_curve.yaml").read_text())
    load_pipeline("experiments/data_impressions/mnist/robust_curve.yaml")  # a valid pipeline (merge keys resolved)
    students = [s["name"] for s in spec["stages"] if s["command"] == "fit" and s["name"] != "teacher"]
    models = next(s for s in spec["stages"] if s["name"] == "robustness")["args"]["model.init_args.models"]
    assert sorted(models) == sorted(students) and len(students) == 18
    assert all(models[n] == f"${{{n}}}/checkpoints/last.ckpt" for n in students)
    assert {split_name(n)[0] for n in students} == {"impressions", "transfer", "real"}
    budgets = {s["name"]: s["args"] for s in spec["stages"] if s["name"] in students}
    assert [budgets[f"impressions_e{e}"]["trainer.max_epochs"] for e in (2, 5, 10, 20, 40)] == [2, 5, 10, 20, 40]
    steps = (5, 15, 25, 35, 50, 100, 200)
    assert [budgets[f"real_s{k}"]["trainer.max_steps"] for k in steps] == list(steps)
