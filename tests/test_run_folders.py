"""Issue 35: a run folder has one owner and one truth; data files are checked for consistency.

Each test reproduces a defect found on a fresh clone (it fails on the code before the fix): a rerun of an
interrupted fit retrained in place and forked ``last-v1.ckpt``; two concurrent fits both trained one folder;
``kill -9`` of ``cvlab run`` left its stage training as an orphan; MNIST with another split's labels trained;
a poisoned ``.gz`` stayed poisoned after the good one was copied back; the "finished fit" advice trained a
new folder from scratch; a checkpoint of another class replaced the configured model.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import MNISTDataModule
from datamodules.errors import DatasetCorruptError
from experiments.run_folder import RunFolderBusyError, RunFolderLock, check_run_name
from tests.cli_runs import QUICKSTART, REPO, TINY_SHAPES
from tests.fakedata import write_idx, write_mnist_idx
from tests.reliability_catalogue import run_main

ERR = "cvlab: error: "
ONE_EPOCH = [*TINY_SHAPES, "--trainer.max_epochs=1"]


def _fit(run: Path, *extra: str):
    return run_main(["fit", f"--config={QUICKSTART}", *ONE_EPOCH, f"--run.dir={run}", *extra])


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- the lock -----------------------------------------------------------------------------------------
def test_lock_names_a_live_owner_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder.mkdir()
        (folder / RunFolderLock.NAME).write_text(json.dumps(
            {"pid": sleeper.pid, "host": os.uname().nodename, "command": "cvlab fit --config a.yaml", "since": 0}))
        with pytest.raises(RunFolderBusyError, match=rf"in use by pid {sleeper.pid} on .*`cvlab fit --config a.yaml`"):
            RunFolderLock(folder).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    dead = _dead_pid()
    (folder / RunFolderLock.NAME).write_text(json.dumps({"pid": dead, "host": os.uname().nodename, "command": "x"}))
    with pytest.warns(UserWarning, match=rf"taking over the lock of pid {dead} .*no longer runs"):
        lock = RunFolderLock(folder, command="me").acquire()
    assert json.loads((folder / RunFolderLock.NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / RunFolderLock.NAME).exists()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / RunFolderLock.NAME).write_text(json.dumps({"pid": 1, "host": "node-a", "slurm_job": "4242"}))
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with pytest.raises(RunFolderBusyError, match="in use by pid 1 on node-a .*if that process is gone, delete"):
        RunFolderLock(folder).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued onto another node
    with pytest.warns(UserWarning, match="taking over the lock of pid 1"):
        RunFolderLock(folder).acquire().release()


def test_run_names_stay_below_the_run_root() -> None:
    for bad in ("../../escape", "/abs", "a/../../b", ""):
        with pytest.raises(Exception, match="would leave the run root"):
            check_run_name(bad)
    check_run_name("zskd/teacher")


# --- one truth: no silent retraining, no last-v1.ckpt --------------------------------------------------
def test_rerun_of_an_interrupted_fit_is_refused_then_continued_in_place(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _fit(run).code == 0
    (run / "metrics.json").unlink()  # killed before fit ended: last.ckpt is epoch 1 of 2 in the case
    before = {p: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    o = run_main(["fit", f"--config={QUICKSTART}", *TINY_SHAPES, f"--run.dir={run}"])  # 2 epochs, no --ckpt_path
    assert (o.code, o.stderr_lines) == (1, 1), o
    assert o.line == (f"{ERR}run folder {run} holds an unfinished fit (last.ckpt); nothing was changed. Continue it "
                      "with the same command plus --ckpt_path last, or retrain in place with --run.overwrite true")
    assert {p: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    o = run_main(["fit", f"--config={QUICKSTART}", *TINY_SHAPES, f"--run.dir={run}", "--ckpt_path=last"])
    assert o.code == 0, o
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert not [n for n in names if re.search(r"-v\d+\.ckpt$", n)], names
    assert _step(run / "checkpoints" / "last.ckpt") == 16  # 2 epochs x 8 steps: the newest weights


def test_continue_advice_followed_literally_trains_the_same_folder(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    argv = ["fit", f"--config={QUICKSTART}", *ONE_EPOCH, f"--run.root={root}"]
    assert run_main(argv).code == 0
    (folder,) = root.iterdir()
    o = run_main(argv)
    assert o.code == 1, o
    m = re.search(r"with the same command plus (.*) --trainer\.max_epochs N \(N > (\d+)\)", o.line)
    assert m and m.group(2) == "1", o.line
    again = run_main([*argv, *shlex.split(m.group(1)), "--trainer.max_epochs=2"])
    assert again.code == 0, again
    assert sorted(p.name for p in root.iterdir()) == [folder.name]  # no new folder trained from scratch
    assert _step(folder / "checkpoints" / "last.ckpt") == 16
    assert json.loads((folder / "metrics.json").read_text())["fit/steps"] == 16


# --- checkpoints of another model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("clf") / "run"
    assert _fit(run).code == 0
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("command", ["fit", "test"])
def test_a_checkpoint_of_another_class_is_refused(classifier_ckpt: Path, tmp_path: Path, command: str) -> None:
    o = run_main([command, "--config=experiments/zskd/shapes/student_real.yaml", *TINY_SHAPES[:3],
                  f"--model.init_args.teacher={classifier_ckpt}", f"--ckpt_path={classifier_ckpt}",
                  f"--run.dir={tmp_path / 'r'}", "--run.logger=csv"])
    assert (o.code, o.stderr_lines) == (1, 1), o
    assert o.line == (f"{ERR}checkpoint {classifier_ckpt} holds a ClassifierModule (lit_modules.ClassifierModule) "
                      "but the config's model is KDStudent (lit_modules.distillation.KDStudent); pass "
                      "a checkpoint of KDStudent, or the config that trained this one (its run folder's config.yaml)")


@pytest.mark.parametrize("command", ["fit", "test"])
def test_a_checkpoint_of_another_width_names_the_layers(classifier_ckpt: Path, tmp_path: Path, command: str) -> None:
    wide = [a.replace("width: 8", "width: 16") for a in ONE_EPOCH]
    o = run_main(
        [command, f"--config={QUICKSTART}", *wide, f"--ckpt_path={classifier_ckpt}", f"--run.dir={tmp_path / 'r'}"]
    )
    assert (o.code, o.stderr_lines) == (1, 1), o
    assert o.line.startswith(f"{ERR}checkpoint {classifier_ckpt} does not fit the configured ClassifierModule: ")
    assert "layer shapes differ (net." in o.line and "(8, 3, 3, 3) vs (16, 3, 3, 3)" in o.line


# --- data consistency ----------------------------------------------------------------------------------
def _mnist_with(tmp_path: Path, n_images: int, n_labels: int, prefix: str = "train") -> Path:
    """Generated MNIST (uncompressed) whose ``prefix`` split has ``n_images`` images and ``n_labels`` labels."""
    write_mnist_idx(tmp_path, "MNIST", n_train=30, n_test=10, compress=False)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / f"{prefix}-images-idx3-ubyte", np.zeros((n_images, 28, 28), np.uint8), compress=False)
    write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n_labels) % 10).astype(np.uint8), compress=False)
    return raw


def test_mnist_with_the_test_labels_as_training_labels_is_refused(tmp_path: Path) -> None:
    raw = _mnist_with(tmp_path, 60_000, 10_000)
    with pytest.raises(DatasetCorruptError) as e:
        MNISTDataModule(data_dir=str(tmp_path)).setup()
    assert str(e.value) == (
        f"MNIST training files do not belong together: {raw / 'train-images-idx3-ubyte'} holds 60,000 images but "
        f"{raw / 'train-labels-idx1-ubyte'} holds 10,000 labels (10,000 is the official test size: a test file?); "
        "replace them with the official files")


def test_mnist_with_the_test_files_in_the_training_place_is_refused(tmp_path: Path) -> None:
    _mnist_with(tmp_path, 10_000, 10_000)
    with pytest.raises(
        DatasetCorruptError, match=r"training files hold 10,000 examples, the official test split's size"
    ):
        MNISTDataModule(data_dir=str(tmp_path)).setup()


def test_mnist_labels_outside_the_classes_are_refused(tmp_path: Path) -> None:
    raw = _mnist_with(tmp_path, 30, 30)
    write_idx(raw / "train-labels-idx1-ubyte", np.full(30, 12, np.uint8), compress=False)
    with pytest.raises(DatasetCorruptError, match=r"holds labels 12\.\.12, not classes 0\.\.9"):
        MNISTDataModule(data_dir=str(tmp_path)).setup()


def test_a_poisoned_archive_is_one_line_and_the_good_one_then_reads(tmp_path: Path) -> None:
    ref = write_mnist_idx(tmp_path, "MNIST", n_train=30, n_test=10)
    gz = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    good = gz.read_bytes()
    gz.write_bytes(gzip.compress(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()))
    with pytest.raises(DatasetCorruptError) as e:
        MNISTDataModule(data_dir=str(tmp_path)).setup()
    assert str(e.value).startswith(f"{gz} is not an IDX file of 3 dimensions (header ")
    assert str(e.value).endswith("replace it with the official file") and "\n" not in str(e.value)
    gz.write_bytes(good)  # the official archive copied back: it is what is read now
    dm = MNISTDataModule(data_dir=str(tmp_path), val_size=0)
    dm.setup()
    np.testing.assert_array_equal(dm.train_x.numpy(), ref["train"][0])
    assert sorted(p.name for p in gz.parent.iterdir()) == sorted(f + ".gz" for f in
                                                                  ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                                   "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


@pytest.mark.data
def test_the_real_mnist_passes_the_consistency_checks(shared_data: Path) -> None:
    dm = MNISTDataModule(data_dir=str(shared_data), val_size=0)
    dm.setup()
    assert (len(dm.train_x), len(dm.test_x)) == (60_000, 10_000)


# --- processes: two fits on one folder, kill -9 of `cvlab run` -----------------------------------------
def _cvlab(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CVLAB_LOGGER": "csv"}
    return subprocess.Popen([sys.executable, "-m", "experiments.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.2)


@pytest.mark.slow
def test_two_concurrent_fits_of_one_folder_one_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    long = ["fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--trainer.max_epochs=200", f"--run.dir={run}"]
    first = _cvlab(*long)
    try:
        _wait_for(run / RunFolderLock.NAME, first)
        second = _cvlab(*long)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 1, (out, err)
        assert err.startswith(f"{ERR}run folder {run} is in use by pid {first.pid} on ") and len(err.splitlines()) == 1
        assert "wait for it to end or stop it" in err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert not [p for p in (run / "checkpoints").glob("*.ckpt") if re.search(r"-v\d+\.ckpt$", p.name)]


def _one_stage_pipeline(tmp_path: Path, max_epochs: int) -> Path:
    """A pipeline of one tiny quickstart fit stage of ``max_epochs`` epochs."""
    import yaml

    pipeline = tmp_path / "p.yaml"
    args = {a.split("=", 1)[0][2:]: a.split("=", 1)[1] for a in TINY_SHAPES}
    args["trainer.max_epochs"] = str(max_epochs)
    pipeline.write_text(yaml.safe_dump({"name": "p", "stages": [
        {"name": "train", "command": "fit", "config": [str(QUICKSTART)], "args": args}]}))
    return pipeline


@pytest.mark.slow
def test_kill_9_of_cvlab_run_stops_its_stage_and_a_rerun_resumes(tmp_path: Path) -> None:
    cmd = ["run", str(_one_stage_pipeline(tmp_path, 12)), "--root", str(tmp_path / "runs")]
    parent = _cvlab(*cmd)
    root = tmp_path / "runs" / "p"
    t0 = time.time()
    while not list(root.glob("train-*/checkpoints/last.ckpt")):
        assert parent.poll() is None, parent.communicate()
        assert time.time() - t0 < 300
        time.sleep(0.2)
    folder = next(root.glob("train-*"))
    stage_pid = json.loads((folder / RunFolderLock.NAME).read_text())["pid"]
    parent.kill()  # kill -9: no handler runs in the parent
    parent.communicate()
    t0 = time.time()
    while time.time() - t0 < 30 and _alive(stage_pid):
        time.sleep(0.2)
    assert not _alive(stage_pid), "the stage trains on as an orphan"
    assert "fit/steps" not in json.loads(
        (folder / "metrics.json").read_text() if (folder / "metrics.json").exists() else "{}"
    )
    again = _cvlab(*cmd)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "resuming a killed run" in out
    assert _step(folder / "checkpoints" / "last.ckpt") == 12 * 8


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")  # a zombie (dead, not yet reaped) counts as gone
    return not (status.exists() and "\nState:\tZ" in status.read_text())


@pytest.mark.slow
def test_ctrl_c_of_cvlab_run_ends_with_one_line_naming_the_resume_command(tmp_path: Path) -> None:
    cmd = ["run", str(_one_stage_pipeline(tmp_path, 200)), "--root", str(tmp_path / "runs")]
    parent = _cvlab(*cmd, start_new_session=True)  # its own process group, as a shell gives a foreground job
    t0 = time.time()
    while not list((tmp_path / "runs" / "p").glob("train-*/checkpoints/last.ckpt")):
        assert parent.poll() is None, parent.communicate()
        assert time.time() - t0 < 300
        time.sleep(0.2)
    os.killpg(parent.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    out, err = parent.communicate(timeout=120)
    folder = next((tmp_path / "runs" / "p").glob("train-*"))
    assert parent.returncode == 130, (out[-2000:], err)
    assert err.splitlines() == [f"cvlab: interrupted during stage 'train'; its folder {folder} is kept; resume with: "
                                f"cvlab {shlex.join(cmd)}"], err
    assert not (folder / RunFolderLock.NAME).exists()
