"""SLURM preemption: the requeue signal saves, asks ``scontrol`` for a requeue, and the requeued run
resumes to the result of an uninterrupted one; the sbatch templates are valid bash launching with srun.

The cluster is stood in for by environment variables (``SLURM_JOB_ID``, ``SLURM_NTASKS``, ...) and a
fake ``scontrol`` on PATH that records its arguments and, like a real requeue, sends SIGTERM to the job
(its parent process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_runs import QUICKSTART, REPO, TINY_SHAPES

TEMPLATES = sorted((REPO / "experiments" / "slurm").glob("*.sbatch"))
# long enough that the signal lands mid-training: 4 epochs of 24 batches
RUN = ["fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--data.init_args.num_train=1200", "--trainer.max_epochs=4"]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_sbatch_templates_are_valid_bash_launching_with_srun_and_requeue(template: Path) -> None:
    assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
    text = template.read_text()
    assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text
    assert "srun " in text and "--ckpt_path=last" in text or "cvlab run" in text
    assert "uv run" not in "\n".join(ln for ln in text.splitlines() if ln.lstrip().startswith("srun"))


def _slurm_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    # like `scontrol requeue`: SIGTERM to every process of the job (here: the caller's process group)
    scontrol.write_text('#!/bin/bash\ntrap "" TERM\necho "$@" >> "$SCONTROL_LOG"\n'
                        'kill -TERM -- -"$(ps -o pgid= -p "$PPID" | tr -d " ")"\n')
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SCONTROL_LOG=str(tmp_path / "scontrol.log"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", SLURM_JOB_ID="4242", SLURM_JOB_NAME="cvlab-test", SLURM_NTASKS="1",
               SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NUM_NODES="1", SLURM_NODELIST="localhost", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_NODEID="0")
    return env


def _signal_when(proc: subprocess.Popen, ready: Path, timeout: float = 300, group: bool = False) -> None:
    t0 = time.time()
    while not ready.is_file():
        assert proc.poll() is None, "the run ended before the signal could be sent"
        assert time.time() - t0 < timeout, f"{ready} never appeared"
        time.sleep(0.2)
    if group:  # SLURM signals every process of the job step
        os.killpg(proc.pid, signal.SIGUSR1)
    else:
        proc.send_signal(signal.SIGUSR1)


def _metrics(folder: Path) -> dict[str, float]:
    m = json.loads((folder / "metrics.json").read_text())
    return {k: v for k, v in m.items() if k.startswith(("test/", "val/"))}


@pytest.mark.slow
def test_requeue_signal_saves_requeues_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "experiments.cli"]
    full = tmp_path / "full"
    base = subprocess.run([*cli, *RUN, f"--run.dir={full}"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert base.returncode == 0, base.stderr[-2000:]

    env, run = _slurm_env(tmp_path), tmp_path / "preempted"
    cmd = [*cli, *RUN, f"--run.dir={run}", "--ckpt_path=last"]  # the sbatch line: the same on every (re)start
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _signal_when(proc, run / "checkpoints" / "last.ckpt")
    out, _ = proc.communicate(timeout=300)
    assert "Requeued SLURM job: 4242" in out and "Received SIGTERM" in out, out[-2000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("hpc_ckpt_*.ckpt")), "Lightning's SLURM handler saved no checkpoint"
    # stopped before the end (Lightning exits 0 on SIGTERM): no test metrics yet
    assert "test/acc" not in json.loads((run / "metrics.json").read_text() if (run / "metrics.json").is_file()
                                        else "{}"), out[-2000:]

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    restored = [ln for ln in (again.stdout + again.stderr).splitlines()
                if "Restoring states from the checkpoint path" in ln]
    assert restored == [f"Restoring states from the checkpoint path at {run / 'checkpoints' / 'last.ckpt'}"]
    # the finished run drops the stale hpc checkpoint (else the test after fit would load it on SLURM)
    assert not list(run.glob("hpc_ckpt_*.ckpt"))
    got, want = _metrics(run), _metrics(full)
    assert set(got) == set(want) and "test/acc" in got
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


@pytest.mark.slow
def test_a_requeued_pipeline_resumes_its_stage_to_the_same_result(tmp_path: Path) -> None:
    """`cvlab run` under srun: SLURM signals the pipeline and its stage; the pipeline survives, the stage
    saves and requeues; the requeued pipeline resumes the stage from last.ckpt."""
    pipeline = tmp_path / "p.yaml"
    args = {a.split("=", 1)[0][2:]: a.split("=", 1)[1] for a in RUN[2:]}
    import yaml

    pipeline.write_text(yaml.safe_dump({"name": "p", "stages": [{"name": "train", "command": "fit",
                                                                 "config": [str(QUICKSTART)], "args": args}]}))
    env = _slurm_env(tmp_path)
    cmd = [sys.executable, "-m", "experiments.cli", "run", str(pipeline), "--root", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    t0 = time.time()
    while not list((tmp_path / "runs" / "p").glob("train-*/checkpoints/last.ckpt")):
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.2)
    folder = next((tmp_path / "runs" / "p").glob("train-*"))
    _signal_when(proc, folder / "checkpoints" / "last.ckpt", group=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "stopped by SIGTERM" in out and "rerun to resume" in out, out[-2000:]
    assert not (folder / "stage.json").exists()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming a killed run" in again.stdout
    full = subprocess.run([sys.executable, "-m", "experiments.cli", *RUN, f"--run.dir={tmp_path / 'full'}"], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0
    got, want = _metrics(folder), _metrics(tmp_path / "full")
    assert set(got) == set(want) and all(got[k] == pytest.approx(want[k], abs=1e-6) for k in want)
