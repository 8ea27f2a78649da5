"""``cvlab sweep``: expansion, validation before any trial, local runs with skip and sorted tables,
the SLURM job array, and wandb registration (mocked: no network)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cvlab.errors import CvlabError
from experiments import sweep as sw
from experiments.cli import main as cvlab_main
from tests.cli_runs import REPO, TINY_SHAPES

QUICKSTART_SWEEP = REPO / "experiments" / "sweeps" / "quickstart_lr.yaml"
LRS = [0.001, 0.003, 0.01]


def _write_sweep(tmp_path: Path, params: dict, method: str = "grid", extra: list[str] | None = None, name: str = "s",
                 **more) -> Path:
    spec = {"name": name, "method": method, "metric": {"name": "test/acc", "goal": "maximize"}, "parameters": params,
            "command": ["cvlab", "fit", "--config", "experiments/quickstart.yaml", *(extra or []), "${args}"], **more}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------- expansion


def test_grid_expands_every_combination_in_file_order(tmp_path: Path) -> None:
    s = sw.load_sweep(_write_sweep(tmp_path, {"model.init_args.lr": {"values": [1, 2]},
                                              "trainer.max_epochs": {"values": [3, 4, 5]},
                                              "seed_everything": {"value": 7}}))
    trials = sw.expand_trials(s)
    assert len(trials) == 6
    assert trials[0] == {"model.init_args.lr": 1, "trainer.max_epochs": 3, "seed_everything": 7}
    assert trials[-1] == {"model.init_args.lr": 2, "trainer.max_epochs": 5, "seed_everything": 7}
    assert len({sw.trial_id(t) for t in trials}) == 6
    assert sw.trial_args(trials[0]) == ["--model.init_args.lr=1", "--trainer.max_epochs=3", "--seed_everything=7"]
    # the id does not depend on the order of the keys
    assert sw.trial_id({"b": 1, "a": 2}) == sw.trial_id({"a": 2, "b": 1})
    assert sw.trial_id({"a": 2}, ["cvlab", "fit"]) != sw.trial_id({"a": 2}, ["cvlab", "fit", "--trainer.max_epochs=9"])


def test_random_sweep_draws_seeded_values_inside_their_ranges(tmp_path: Path) -> None:
    s = sw.load_sweep(_write_sweep(tmp_path, {"model.init_args.lr": {"distribution": "log_uniform_values",
                                                                     "min": 1e-4, "max": 1e-1},
                                              "trainer.max_epochs": {"distribution": "int_uniform", "min": 1, "max": 3},
                                              "model.init_args.optimizer": {"values": ["adam", "sgd"]}},
                                   method="random"))
    a, b = sw.expand_trials(s, count=50, seed=1), sw.expand_trials(s, count=50, seed=1)
    assert a == b and len(a) == 50
    assert all(1e-4 <= t["model.init_args.lr"] <= 1e-1 for t in a)
    assert {t["trainer.max_epochs"] for t in a} == {1, 2, 3}
    assert {t["model.init_args.optimizer"] for t in a} == {"adam", "sgd"}
    lrs = sorted(t["model.init_args.lr"] for t in a)  # log-uniform: the median sits near the geometric mean 3e-3
    assert 1e-3 < lrs[25] < 1e-2
    with pytest.raises(CvlabError, match="trial count"):
        sw.expand_trials(s)


# --------------------------------------------------------------------------------------- bad input


def test_unknown_key_fails_before_any_trial(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_sweep(tmp_path, {"model.init_args.lrr": {"values": [0.1, 0.2]}})
    monkeypatch.setattr(sw.subprocess, "run", lambda *a, **k: pytest.fail("a trial ran"))
    with pytest.raises(SystemExit) as e:
        cvlab_main(["sweep", str(path), "--local", "--dir", str(tmp_path / "sw")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cvlab: error:") and "--model.init_args.lrr is not an option" in err[0]
    assert not (tmp_path / "sw").exists()


def test_a_value_the_cli_rejects_fails_naming_the_key(tmp_path: Path) -> None:
    s = sw.load_sweep(_write_sweep(tmp_path, {"trainer.max_epochs": {"values": [2, "two"]}}))
    with pytest.raises(CvlabError, match=r"trainer.max_epochs=two.*does not parse"):
        sw.validate(s, sw.expand_trials(s))


def test_empty_grid_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cvlab_main(["sweep", str(_write_sweep(tmp_path, {"model.init_args.lr": {"values": []}})), "--local"])
    assert "the grid is empty" in capsys.readouterr().err
    with pytest.raises(CvlabError, match="'parameters' is empty"):
        sw.load_sweep(_write_sweep(tmp_path, {}))


@pytest.mark.parametrize("flags", [["--agents", "2"], ["--local", "--devices", "2"]])
def test_more_devices_than_visible_gpus_fails_before_any_work(flags: list[str], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sw, "visible_gpus", lambda: ["0"])
    monkeypatch.setattr(sw, "validate", lambda *a: pytest.fail("validated before checking devices"))
    with pytest.raises(SystemExit):
        cvlab_main(["sweep", str(QUICKSTART_SWEEP), *flags, "--dir", str(tmp_path / "sw")])
    err = capsys.readouterr().err
    assert f"{flags[-2]} 2 needs 2 GPUs, but 1 are visible" in err
    assert not (tmp_path / "sw").exists()


# ------------------------------------------------------------------------------------------- local


def _fake_trials(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    """Replace the trial process: write metrics.json with test/acc = 1 - |log10(lr) + 2.5| / 10 (best at 0.003)."""
    import math

    def run(argv, env=None, **kw):
        calls.append((argv, env))
        lr = float(next(a for a in argv if a.startswith("--model.init_args.lr=")).split("=")[1])
        folder = Path(next(a for a in argv if a.startswith("--run.dir=")).split("=", 1)[1])
        (folder / "metrics.json").write_text(json.dumps({"test/acc": 1 - abs(math.log10(lr) + 2.5) / 10}))
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(sw.subprocess, "run", run)


def test_local_sweep_table_is_sorted_skips_finished_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _fake_trials(monkeypatch, calls)
    folder = tmp_path / "sw"
    assert sw.main([str(QUICKSTART_SWEEP), "--local", "--dir", str(folder)]) == 0
    assert len(calls) == 3
    argv = calls[0][0]
    assert argv[:3] == [sys.executable, "-m", "experiments.cli"] and "--ckpt_path=last" in argv
    assert argv[3:6] == ["fit", "--config", "experiments/quickstart.yaml"]
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["model.init_args.lr"]) for r in rows] == [0.003, 0.001, 0.01]  # 0.001 and 0.01 tie: file order
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert (folder / "results.md").read_text().count("| trial-") == 3
    assert (folder / "metric.png").stat().st_size > 1000
    # a rerun skips all three; a fourth value runs alone
    calls.clear()
    assert sw.main([str(QUICKSTART_SWEEP), "--local", "--dir", str(folder)]) == 0
    assert calls == []
    with open(folder / "results.csv") as f:  # the rerun keeps the trials' status and wall times (issue 35)
        again = list(csv.DictReader(f))
    assert [(r["status"], r["wall_s"]) for r in again] == [(r["status"], r["wall_s"]) for r in rows]
    assert all(r["status"] == "done" and r["wall_s"] != "" for r in again)
    four = _write_sweep(tmp_path, {"model.init_args.lr": {"values": [*LRS, 0.03]}}, name="quickstart_lr")
    assert sw.main([str(four), "--local", "--dir", str(folder)]) == 0
    assert len(calls) == 1 and "--model.init_args.lr=0.03" in calls[0][0]


def test_n_devices_run_trials_side_by_side_one_gpu_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _fake_trials(monkeypatch, calls)
    monkeypatch.setattr(sw, "visible_gpus", lambda: ["4", "6"])
    assert sw.main([str(QUICKSTART_SWEEP), "--local", "--devices", "2", "--dir", str(tmp_path / "sw")]) == 0
    assert len(calls) == 3
    assert {env["CUDA_VISIBLE_DEVICES"] for _, env in calls} <= {"4", "6"}


def test_failed_trial_is_listed_last_and_the_sweep_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _fake_trials(monkeypatch, calls)
    fake = sw.subprocess.run
    monkeypatch.setattr(sw.subprocess, "run", lambda argv, **k: subprocess.CompletedProcess(argv, 3)
                        if "--model.init_args.lr=0.003" in argv else fake(argv, **k))
    assert sw.main([str(QUICKSTART_SWEEP), "--local", "--dir", str(tmp_path / "sw")]) == 1
    rows = list(csv.DictReader(open(tmp_path / "sw" / "results.csv")))
    assert [r["status"] for r in rows] == ["done", "done", "failed"] and rows[-1]["model.init_args.lr"] == "0.003"


@pytest.mark.slow
def test_local_grid_sweep_of_the_quickstart_runs_three_folders_and_skips_them_after(tmp_path: Path) -> None:
    """The real thing: three `cvlab fit` processes of the shrunk quickstart, then a rerun that runs none."""
    path = _write_sweep(tmp_path, {"model.init_args.lr": {"values": LRS}}, extra=TINY_SHAPES, name="tiny")
    folder = tmp_path / "sw"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "experiments.cli", "sweep", str(path), "--local", "--dir", str(folder)]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    trials = sorted(folder.glob("trial-*"))
    assert len(trials) == 3
    for t in trials:
        assert (t / "checkpoints" / "last.ckpt").is_file() and (t / "config.yaml").is_file()
        lr = yaml.safe_load((t / "config.yaml").read_text())["model"]["init_args"]["lr"]
        assert lr in LRS
    rows = list(csv.DictReader(open(folder / "results.csv")))
    accs = [float(r["test/acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True) and len(accs) == 3
    for r in rows:
        assert json.loads((folder / r["trial"] / "metrics.json").read_text())["test/acc"] == pytest.approx(
            float(r["test/acc"]), abs=1e-4)
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stdout.count("finished before") == 3
    assert "cvlab fit" not in second.stdout and len(sorted(folder.glob("trial-*"))) == 3


# ------------------------------------------------------------------------------------------- SLURM


def test_slurm_script_is_valid_bash_with_one_trial_per_array_index(tmp_path: Path) -> None:
    folder = tmp_path / "sw"
    assert sw.main([str(QUICKSTART_SWEEP), "--slurm", "--dir", str(folder)]) == 0
    script = folder / "sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert f"--local --table --dir {folder}" in text  # the closing hint names the sweep folder
    assert "#SBATCH --array=0-2" in text and "#SBATCH --signal=USR1@90" in text and "#SBATCH --requeue" in text
    # run it with a stand-in srun that prints what it was asked to launch
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    launched = []
    for i in range(3):
        out = subprocess.run(["bash", str(script)], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                                         "SLURM_ARRAY_TASK_ID": str(i)}, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        args = out.stdout.splitlines()
        assert args[:4] == [".venv/bin/python", "-m", "experiments.cli", "fit"] and "--ckpt_path=last" in args
        launched.append((next(a for a in args if a.startswith("--model.init_args.lr=")),
                         next(a for a in args if a.startswith("--run.dir="))))
    assert sorted(float(lr.split("=")[1]) for lr, _ in launched) == LRS
    assert len({d for _, d in launched}) == 3
    bad = subprocess.run(["bash", str(script)],
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "3"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no trial for array index 3" in bad.stderr


def test_slurm_script_leaves_out_finished_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "sw"
    s = sw.load_sweep(QUICKSTART_SWEEP)
    done = folder / sw.trial_id({"model.init_args.lr": 0.003}, s.command)
    done.mkdir(parents=True)
    (done / "metrics.json").write_text(json.dumps({"test/acc": 0.9}))
    assert sw.main([str(QUICKSTART_SWEEP), "--slurm", "--dir", str(folder)]) == 0
    text = (folder / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-1" in text and "lr=0.003" not in text and s.name in text


# ---------------------------------------------------------------------------------------- pipelines


def test_pipeline_sweep_passes_stage_keys_and_shares_stage_folders(tmp_path: Path) -> None:
    s = sw.load_sweep(REPO / "experiments" / "sweeps" / "zskd_mnist_short.yaml")
    trials = sw.expand_trials(s)
    assert len(trials) == 4
    tc = sw.trial_command(s, trials[0], tmp_path / "sw" / sw.trial_id(trials[0], s.command))
    assert tc.env == {"WANDB_RESUME": "allow"}
    assert tc.argv[3:5] == ["run", "experiments/zskd/mnist/pipeline.yaml"]
    assert ("--synthesize.model.init_args.temperature=5.0" in tc.argv
            and tc.argv[-1] == f"--root={tmp_path / 'sw' / 'stages'}")
    call = sw.pipeline_call(tc.argv)
    assert call.only == ["teacher", "synthesize", "student"]
    assert "synthesize.model.init_args.lr=0.3" in call.sets and "teacher.trainer.max_epochs=2" in call.sets
    # a parameter that names no stage is refused before anything runs
    bad = tmp_path / "bad.yaml"
    spec = yaml.safe_load((REPO / "experiments" / "sweeps" / "zskd_mnist_short.yaml").read_text())
    spec["parameters"] = {"model.init_args.temperature": {"values": [5.0]}}
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(CvlabError, match="does not start with a stage"):
        sw.validate(sw.load_sweep(bad), [{"model.init_args.temperature": 5.0}])


def test_cvlab_run_takes_stage_keys_like_set_and_survives_sigusr1(capsys: pytest.CaptureFixture) -> None:
    from experiments.pipeline import main as pipeline_main

    before = signal.getsignal(signal.SIGUSR1)
    try:
        assert pipeline_main(["experiments/zskd/shapes/pipeline.yaml", "--dry-run",
                              "--student.trainer.max_epochs=3"]) == 0
        out = capsys.readouterr().out
        student = next(ln for ln in out.splitlines() if ln.startswith("[student]"))
        assert "--trainer.max_epochs=3" in student
        assert "--trainer.max_epochs=3" not in next(ln for ln in out.splitlines() if ln.startswith("[teacher]"))
        # SLURM's requeue signal reaches every process of the step: the pipeline process must not die of it
        assert callable(signal.getsignal(signal.SIGUSR1))
        os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, before)
    with pytest.raises(CvlabError, match=r"^unrecognized arguments: stray \(`cvlab run --help` lists the options\)$"):
        pipeline_main(["experiments/zskd/shapes/pipeline.yaml", "--dry-run", "stray"])


# ------------------------------------------------------------------------------------------- wandb


def test_wandb_sweep_registers_the_file_and_starts_one_agent_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    registered, agents, popen = [], [], []
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "sweep", lambda sweep, project: registered.append((sweep, project)) or "abc123")
    monkeypatch.setattr(wandb, "agent", lambda sweep_id, project, count: agents.append((sweep_id, project, count)))

    class FakePopen:
        def __init__(self, cmd, env, cwd):
            popen.append((cmd, env))

        def wait(self):
            return 0

    monkeypatch.setattr(sw.subprocess, "Popen", FakePopen)
    # one agent: in this process, on whatever device there is
    assert sw.main([str(QUICKSTART_SWEEP), "--project", "p", "--count", "2"]) == 0
    cfg, project = registered[0]
    assert project == "p" and cfg["metric"]["name"] == "test/acc" and "${args}" in cfg["command"]
    assert cfg["parameters"] == {"model.init_args.lr": {"values": LRS}}
    assert agents == [("abc123", "p", 2)] and popen == []
    # three agents on three visible GPUs: one `wandb agent` process each, CUDA_VISIBLE_DEVICES set per agent
    monkeypatch.setattr(sw, "visible_gpus", lambda: ["1", "2", "5"])
    assert sw.main([str(QUICKSTART_SWEEP), "--project", "p", "--agents", "3"]) == 0
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in popen] == ["1", "2", "5"]
    for cmd, env in popen:
        assert cmd == [sys.executable, "-m", "wandb", "agent", "--project", "p", "abc123"]
        assert env["WANDB_MODE"] == "online"
    assert len(agents) == 1


def test_wandb_sweep_needs_wandb_online(monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "sweep", lambda **k: pytest.fail("registered offline"))
    with pytest.raises(CvlabError, match="need wandb online"):
        sw.main([str(QUICKSTART_SWEEP)])
