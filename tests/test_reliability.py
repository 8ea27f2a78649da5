"""Issues 19 and 35: bad inputs through the real ``cvlab`` entry point give one exact line and exit code 1;
crafted pickles run nothing; finished runs are not retrained; damaged checkpoints fall back; divergence
stops a run; results files are group-readable; pipelines are checked before anything runs; config keys,
types, files and values that cannot be meant are one line; docs/RELIABILITY.md says what a user sees."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

from callbacks.safety import DivergedLossError, StopOnDivergence
from cvlab.artifacts import atomic_write_json
from datamodules.errors import DatasetCorruptError
from datamodules.vision import read_pickled_batch
from experiments.cli import main
from experiments.pipeline import run_pipeline
from tests.cli_runs import QUICKSTART, TINY_SHAPES
from tests.fakedata import write_cifar
from tests.reliability_catalogue import (
    CASES,
    QS,
    STUDENT,
    SYNTH,
    generate,
    make_workspace,
    normalised,
    page_rows,
    render,
    run_main,
)

ERR = "cvlab: error: "


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    os.environ.setdefault("CVLAB_LOGGER", "csv")
    return make_workspace(tmp_path_factory.mktemp("ws"))


def fails(argv: list[str], ws: dict[str, Path]) -> str:
    """Run ``cvlab argv``; assert exit 1 and exactly one stderr line; return it."""
    o = run_main(render(argv, ws))
    assert o.code == 1, o
    assert o.stderr_lines == 1, o
    return o.line


# --- 1. data files are untrusted ------------------------------------------------------------------
def test_crafted_cifar_batch_is_refused_and_runs_nothing(ws, tmp_path: Path) -> None:
    run = tmp_path / "run"
    line = fails(["fit", "--config=experiments/teachers/cifar10_alexnet.yaml",
                  "--data.init_args.data_dir={w}/cifar_evil", f"--run.dir={run}", "--run.logger=csv"], ws)
    batch = ws["w"] / "cifar_evil" / "cifar-10-batches-py" / "data_batch_1"
    assert line == (f"{ERR}refused CIFAR-10 file {batch}: global 'io.open' is not allowed in a data file "
                    "(a data pickle may hold only lists, dicts, strings, numbers and numpy arrays); "
                    "replace it with the official release file")
    assert not ws["marker"].exists()
    assert not run.exists(), "a run that failed on its inputs leaves no folder behind"


def test_truncated_and_foreign_cifar_batches_name_the_file(ws) -> None:
    base = ["fit", "--config=experiments/teachers/cifar10_alexnet.yaml", "--run.logger=csv", "--run.dir={w}/runs/r"]
    short = ws["w"] / "cifar_short" / "cifar-10-batches-py" / "data_batch_1"
    assert fails([*base, "--data.init_args.data_dir={w}/cifar_short"], ws) == (
        f"{ERR}cannot read CIFAR-10 file {short}: it is truncated or damaged (pickle data was truncated); "
        "replace it with the official release file")
    foreign = ws["w"] / "cifar_foreign" / "cifar-10-batches-py" / "data_batch_1"
    assert fails([*base, "--data.init_args.data_dir={w}/cifar_foreign"], ws) == (
        f"{ERR}CIFAR-10 file {foreign} has no uint8 'data' of shape (N, 3072) (found NoneType); "
        "replace it with the official release file")


def test_release_format_reads_and_official_md5_is_checked(tmp_path: Path) -> None:
    from datamodules.vision import CIFAR10DataModule, file_md5

    xy = write_cifar(tmp_path, 10, n_train=10, n_test=4)
    f = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = read_pickled_batch(f, "CIFAR-10", official_md5=file_md5(f))
    assert batch["data"].shape == (4, 3072) and batch["labels"] == xy["test"][1].tolist()
    x, y = CIFAR10DataModule(data_dir=str(tmp_path)).load_split(train=False)
    assert torch.equal(x, torch.from_numpy(xy["test"][0])) and y.tolist() == xy["test"][1].tolist()
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DatasetCorruptError, match="differs from the official release|truncated"):
        read_pickled_batch(f, "CIFAR-10", official_md5="0" * 32)


def test_truncated_mnist_gz_names_the_file(ws) -> None:
    assert fails(["fit", "--config=experiments/teachers/mnist_lenet5.yaml", "--data.init_args.data_dir={w}/mnist_gz",
                  "--run.logger=csv", "--run.dir={w}/runs/r"], ws) == (
        f"{ERR}cannot decompress {ws['mnist_gz']}: it is truncated or not gzip (Compressed file ended before the "
        "end-of-stream marker was reached); replace it with the official file")


def test_download_without_network_is_one_line(ws, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    empty = ws["w"] / "nothing_here"
    assert fails(["fit", "--config=experiments/teachers/cifar10_alexnet.yaml", f"--data.init_args.data_dir={empty}",
                  "--data.init_args.download=true", "--run.logger=csv", "--run.dir={w}/runs/r"], ws) == (
        f"{ERR}CIFAR-10: download failed (<urlopen error [Errno -3] Temporary failure in name resolution>); "
        "copy data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta into "
        f"{empty / 'cifar-10-batches-py'} from a machine with a network and rerun without --data.download")


# --- 2. teacher failures through the CLI ---------------------------------------------------------
def test_teacher_failures_are_one_line_through_the_cli(ws) -> None:
    w = ws["w"]
    assert fails([*STUDENT, "--model.init_args.teacher={w}/missing.ckpt", "--run.dir={w}/runs/r"], ws) == (
        f"{ERR}teacher checkpoint not found: {w / 'missing.ckpt'} "
        "(train one with `cvlab fit --config experiments/teachers/...`, "
        "or pass the path of an existing .ckpt / state_dict / TorchScript file)")
    for bad in ("truncated", "foreign", "evil_ckpt"):
        line = fails([*STUDENT, f"--model.init_args.teacher={{{bad}}}", "--run.dir={w}/runs/r"], ws)
        assert line.startswith(f"{ERR}cannot read checkpoint {ws[bad]} (") and line.endswith(
            "re-create it or re-download it"
        )
        assert "\x1b" not in line and "Union subtypes" not in line
    assert not ws["marker"].exists()
    line = fails([*STUDENT, "--model.init_args.teacher={weights: {state_dict}, arch: resnet18, in_channels: 1}",
                  "--run.dir={w}/runs/r"], ws)
    assert line.startswith(f"{ERR}weights in {ws['state_dict']} do not fit resnet18: missing ")
    assert "shape mismatches fc.weight (10, 84) vs (10, 512)" in line and "closest zoo architecture is 'lenet5'" in line


def test_teacher_channels_that_do_not_fit_the_data_in_synthesis(ws) -> None:
    assert fails([*SYNTH, "--model.init_args.teacher={teacher1}", "--run.dir={w}/runs/r"], ws) == (
        f"{ERR}teacher {ws['teacher1']} and the data disagree on in_channels: 1 vs 3 (ShapesDataModule); "
        "use the teacher trained on that task")


# --- config values, devices, run folders ----------------------------------------------------------
@pytest.mark.parametrize("size", [0, -5])
def test_batch_size_must_be_positive(ws, size: int) -> None:
    assert fails([*QS, f"--data.init_args.batch_size={size}", "--run.dir={w}/runs/r"], ws) == (
        f"{ERR}--data.init_args.batch_size must be a positive number of examples, got {size}")


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="4 GPUs are visible")
def test_devices_without_gpus_is_refused(ws) -> None:
    n = torch.cuda.device_count()
    assert fails([*QS, "--trainer.devices=4", "--run.dir={w}/runs/r"], ws) == (
        f"{ERR}--trainer.devices 4 asks for 4 GPUs but {n} {'is' if n == 1 else 'are'} visible; use --trainer.devices "
        f"{max(n, 1)}, or for 4 CPU processes say --trainer.accelerator cpu --trainer.strategy ddp")


def test_read_only_run_root_and_run_folder(ws) -> None:
    assert fails([*QS, "--run.root={ro_root}", "--run.name=x"], ws).startswith(
        f"{ERR}run folder {ws['ro_root']}/x-")
    assert fails([*QS, "--run.root={ro_root}", "--run.name=x"], ws).endswith(
        f"cannot be created: folder {ws['ro_root']} is read-only; choose a writable --run.root or --run.dir")
    assert fails([*QS, "--run.dir={ro_run}"], ws) == (
        f"{ERR}run folder {ws['ro_run']} is read-only; choose a writable --run.root or --run.dir")


def test_help_lists_cvlab_commands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cvlab {fit,validate,test,predict,run,bench")
    assert "\n  run " in out and "\n  bench " in out and "--traceback" in out


def test_traceback_flag_shows_the_trace(ws) -> None:
    from experiments.cli import ConfigValueError

    with pytest.raises(ConfigValueError):
        main(render([*QS, "--data.init_args.batch_size=0", "--run.dir={w}/runs/r", "--traceback"], ws))


def test_lightning_cli_args_warning_is_silenced(ws) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_main(render([*QS, "--data.init_args.batch_size=0", "--run.dir={w}/runs/r"], ws))
    assert not [w for w in seen if "args parameter is intended" in str(w.message)]


# --- checkpoints: --ckpt_path, damaged last.ckpt, finished runs, wall time, file modes -------------
def test_bad_ckpt_path_is_one_line(ws) -> None:
    w = ws["w"]
    assert fails([*QS, "--run.dir={w}/runs/r", "--ckpt_path={w}/missing.ckpt"], ws) == (
        f"{ERR}checkpoint not found: {w / 'missing.ckpt'}; "
        "pass --ckpt_path last to resume this run folder's last.ckpt, "
        "or the path of an existing .ckpt")
    line = fails([*QS, "--run.dir={w}/runs/r", "--ckpt_path={truncated}"], ws)
    assert line.startswith(
        f"{ERR}cannot use checkpoint {ws['truncated']} (4000 bytes): "
        "it is truncated, corrupt or not a weights-only torch file ("
    )
    assert fails([*QS, "--run.dir={w}/runs/r", "--ckpt_path={state_dict}"], ws).startswith(
        f"{ERR}cannot use checkpoint {ws['state_dict']} (")
    assert "it is not a Lightning checkpoint (no state_dict/global_step" in fails(
        [*QS, "--run.dir={w}/runs/r", "--ckpt_path={state_dict}"], ws
    )
    assert "weights-only" in fails([*QS, "--run.dir={w}/runs/r", "--ckpt_path={evil_ckpt}"], ws)
    assert not ws["marker"].exists()


def test_truncated_last_ckpt_without_previous_names_it(ws) -> None:
    last = ws["killed_noprev"] / "checkpoints" / "last.ckpt"
    line = fails([*QS, "--run.dir={killed_noprev}", "--ckpt_path=last"], ws)
    assert line.startswith(f"{ERR}cannot use checkpoint {last} (1000 bytes): it is truncated")
    assert line.endswith("no previous checkpoint beside it, so delete it to start afresh or pass another --ckpt_path")


def test_truncated_last_ckpt_falls_back_to_previous_and_resumes_exactly(ws) -> None:
    run = ws["killed_prev"]
    prev = run / "checkpoints" / "last.ckpt.previous"
    before_s = torch.load(prev, weights_only=True)["callbacks"]["MetricsJsonWriter"]["fit_wall_s"]
    with pytest.warns(UserWarning, match="resuming from the previous checkpoint"):
        o = run_main(render([*QS, "--run.dir={killed_prev}", "--ckpt_path=last", "--run.test_after_fit=false"], ws))
    assert o.code == 0, o
    done = torch.load(ws["done"] / "checkpoints" / "last.ckpt", weights_only=True)
    again = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert again["global_step"] == done["global_step"] == 16
    for k, v in done["state_dict"].items():
        torch.testing.assert_close(again["state_dict"][k], v, msg=k)
    # fit/wall_s counts the killed part too
    assert json.loads((run / "metrics.json").read_text())["fit/wall_s"] > before_s > 0


def test_finished_fit_is_not_retrained(ws) -> None:
    run = ws["done"]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert fails([*QS, "--run.dir={done}"], ws) == (
        f"{ERR}run folder {run} holds a finished fit; nothing was changed. Train it further with the same command plus "
        f"--run.dir {run} --ckpt_path last --trainer.max_epochs N (N > 2), start afresh with a new --run.name NAME, "
        "or retrain in place with --run.overwrite true")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_overwrite_retrains_in_place(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_main(
        ["fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--trainer.max_epochs=1", f"--run.dir={run}"]
    ).code == 0
    (run / "stray.txt").write_text("x")
    o = run_main(
        ["fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--trainer.max_epochs=1", f"--run.dir={run}",
         "--run.overwrite=true"]
    )
    assert o.code == 0, o
    assert not (run / "stray.txt").exists() and not list((run / "checkpoints").glob("last-v*.ckpt"))


def test_results_files_are_group_readable(ws, tmp_path: Path) -> None:
    for f in (ws["done"] / "metrics.json", ws["done"] / "checkpoints" / "last.ckpt"):
        assert f.stat().st_mode & stat.S_IRGRP, f
    old = os.umask(0o002)
    try:
        mode = stat.S_IMODE(atomic_write_json(tmp_path / "m.json", {"a": 1}).stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o664


# --- 3. divergence --------------------------------------------------------------------------------
def test_diverging_run_stops_with_one_line(ws) -> None:
    line = fails([*QS, "--model.init_args.lr=1e6", "--run.divergence_window=3", "--run.dir={w}/runs/div"], ws)
    assert line.startswith(f"{ERR}loss diverged: ") and "above 100 x its starting level" in line
    assert "--run.divergence_factor 0" in line


class _Trainer:
    def __init__(self) -> None:
        self.global_step, self.current_epoch, self.checkpoint_callback = 0, 0, None


def test_divergence_guard_window_and_off_switch() -> None:
    # 100 x 2.0 = 200: streaks of 2 (steps 1-2) and 3 (steps 4-6); with window 3 the guard reads its
    # sticky flag every 3 steps, so it stops at step 6; a window of 4 or factor 0 never stops
    losses = [2.0, 500.0, 500.0, 1.0, 500.0, 500.0, 500.0, 1.0, 1.0, 1.0, 1.0]
    for factor, window, stops_at in ((100.0, 3, 6), (100.0, 4, None), (0.0, 1, None), (100.0, 1, 1)):
        guard, t = StopOnDivergence(factor, window), _Trainer()
        stopped = None
        for step, loss in enumerate(losses):
            t.global_step = step
            try:
                guard.on_train_batch_end(t, None, torch.tensor(loss), None, step)
            except DivergedLossError:
                stopped = step
                break
        assert stopped == stops_at, (factor, window, stopped)


# --- 4. pipelines ---------------------------------------------------------------------------------
def test_pipeline_reference_typo_fails_before_any_stage(ws, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    assert fails(["run", "{typo_pipeline}", f"--root={root}"], ws) == (
        f"{ERR}stage 'student' refers to ${{teachr}} in '--model.init_args.teacher=${{teachr}}/checkpoints/last.ckpt', "
        "which is not an earlier stage (there is no such stage); earlier stages: ['teacher']; nothing was run")
    assert not root.exists()
    assert fails(["run", "experiments/quickstart/pipeline.yaml", "--set", "techer.trainer.max_epochs=1",
                  f"--root={root}"], ws) == (
        f"{ERR}--set 'techer.trainer.max_epochs=1': no stage named 'techer' (stages: ['student', 'teacher'])")
    assert fails(["run", "experiments/quickstart/pipeline.yaml", "--set", "*.model.init_args.teacher=${student}/x",
                  f"--root={root}"], ws).startswith(f"{ERR}stage 'teacher' refers to ${{student}}")


def test_dry_run_prints_shell_quoted_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shlex

    run_pipeline("experiments/quickstart/pipeline.yaml", root=tmp_path / "r b", dry_run=True,
                 sets=["teacher.model.init_args.arch_kwargs={width: 8, depth: 2}"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[teacher] ")]
    argv = shlex.split(lines[0].removeprefix("[teacher] "))
    assert "--model.init_args.arch_kwargs={width: 8, depth: 2}" in argv
    assert any(a.startswith("--run.dir=") and "r b" in a for a in argv)


# --- issue 35: one line for every error a user can cause ----------------------------------------------
def test_config_key_errors_name_the_key_and_the_nearest_one(ws) -> None:
    help_ = "(`cvlab fit --help` lists the options)"
    assert fails([*QS, "--trainer.max_epoch=3", "--run.dir={w}/runs/r"], ws) == (
        f"{ERR}--trainer.max_epoch is not an option of fit; did you mean --trainer.max_epochs? {help_}")
    assert fails([*QS, "--model.lrr=0.1", "--run.dir={w}/runs/r"], ws) == (
        f"{ERR}--model.init_args.lrr is not an option of fit; did you mean --model.init_args.lr? {help_}")
    assert fails([*QS, "--trainer.max_epochs=abc", "--run.dir={w}/runs/r"], ws) == (
        f"{ERR}--trainer.max_epochs expects int (or null), got 'abc' {help_}")


def test_config_files_that_cannot_be_read_name_the_file(ws) -> None:
    assert fails(["fit", "--config={bad_yaml_yaml}"], ws) == (
        f"{ERR}config file {ws['bad_yaml_yaml']} is not valid YAML: "
        "expected <block end>, but found '<block mapping start>' "
        "at line 3, column 2")
    assert fails(["fit", "--config={empty_yaml}"], ws) == (
        f"{ERR}config file {ws['empty_yaml']} is empty; "
        "a config names at least model: and data: (see experiments/quickstart.yaml)")
    lines = ws["twice_yaml"].read_text().splitlines()
    first, last = (n for n, line in enumerate(lines, 1) if line.startswith("trainer:"))
    assert fails(["fit", "--config={twice_yaml}"], ws) == (
        f"{ERR}config file {ws['twice_yaml']}: key 'trainer' is written twice in one mapping (lines {first} and "
        f"{last}); YAML would keep only the last: merge or rename one")


@pytest.mark.parametrize(
    "value, why", [("0", "0 trains nothing (and would mark the run finished)"), ("-5", "below -1")]
)
def test_max_epochs_that_cannot_be_meant_are_refused(ws, value: str, why: str) -> None:
    assert fails([*QS, f"--trainer.max_epochs={value}", "--run.dir={w}/runs/r"], ws) == (
        f"{ERR}--trainer.max_epochs {value} cannot be meant: {why}; give a positive number, or -1 for no limit "
        "(with --trainer.max_steps or --trainer.max_time)")


def test_negative_lr_and_missing_gpu_are_one_line(ws) -> None:
    assert fails([*QS, "--model.init_args.lr=-0.1", "--run.dir={w}/runs/r"], ws) == (
        f"{ERR}--model.init_args.lr must be a learning rate >= 0, got -0.1")
    if torch.cuda.device_count() == 0:
        assert fails([*QS, "--trainer.accelerator=gpu", "--run.dir={w}/runs/r"], ws).startswith(
            f"{ERR}--trainer.accelerator gpu: no GPU is visible")


def test_run_name_that_leaves_the_run_root_is_refused(ws) -> None:
    assert fails([*QS, "--run.name=../../escape"], ws).startswith(
        f"{ERR}--run.name '../../escape' would leave the run root"
    )


def test_help_answers_without_importing_lightning() -> None:
    import subprocess
    import sys

    code = "import sys; from experiments.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\n" \
           "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out


# --- the catalogue page --------------------------------------------------------------------------------
PAGE = Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md"


def test_reliability_page_lists_every_case_with_what_a_user_sees() -> None:
    text = PAGE.read_text()
    rows = page_rows(text)
    assert [r["what"] for r in rows] == [c.what for c in CASES] and len(rows) >= 60
    for row, case in zip(rows, CASES):
        if case.accepted:
            assert f"| {row['n']} | {case.what} | {case.accepted} |" in text, case.what
        else:
            assert (row["exit"], row["stderr"]) == ("1", "1"), row
            assert row["line"].startswith("cvlab: error: "), row
    assert "created their marker file: **no**" in text


@pytest.mark.slow
def test_reliability_page_is_what_a_regeneration_gives(tmp_path: Path) -> None:
    out = tmp_path / "RELIABILITY.md"
    generate(out)
    assert normalised(out.read_text()) == normalised(PAGE.read_text())
