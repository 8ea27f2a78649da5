"""The cvlab CLI: run folders, metrics.json, resume, clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments.cli import main
from experiments.run_folder import config_hash
from tests.cli_runs import QUICKSTART, TINY_SHAPES, SimulatedKill, read_metrics, run_cli


def test_fit_writes_run_folder_metrics_and_last_ckpt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    cli = run_cli("fit", f"--config={QUICKSTART}", *TINY_SHAPES, run_dir=run)
    out = capsys.readouterr().out
    assert f"cvlab: run folder {run}" in out
    m = read_metrics(run)
    for key in ("train/loss", "val/acc", "test/acc", "fit/wall_s"):
        assert key in m, key
    assert 0.0 <= m["test/acc"] <= 1.0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    # the loss falls over the run
    import csv

    rows = list(csv.DictReader(open(run / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[-1] < losses[0]
    assert cli.trainer.global_step == 16


def test_default_run_folder_is_deterministic(tmp_path: Path) -> None:
    cfg = {"model": {"lr": 0.1}, "trainer": {"max_epochs": 2}, "run": {"dir": "x"}}
    same = {"model": {"lr": 0.1}, "trainer": {"max_epochs": 2}, "run": {"dir": "y"}}
    other = {"model": {"lr": 0.2}, "trainer": {"max_epochs": 2}}
    assert config_hash(cfg) == config_hash(same) != config_hash(other)


def test_resume_from_last_ckpt_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = run_cli("fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--run.test_after_fit=false",
                   run_dir=tmp_path / "full")
    # the same run, killed at the start of its second epoch ...
    part = tmp_path / "part"
    kill = '--trainer.callbacks+={"class_path": "tests.cli_runs.KillAtEpoch", "init_args": {"epoch": 1}}'
    with pytest.raises(SimulatedKill):
        run_cli("fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--run.test_after_fit=false", kill, run_dir=part)
    # ... and resumed from last.ckpt with the full budget
    resumed = run_cli("fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--run.test_after_fit=false",
                      f"--ckpt_path={part / 'checkpoints' / 'last.ckpt'}", run_dir=part)
    assert resumed.trainer.global_step == full.trainer.global_step == 16
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"{name} differs after resume")


def test_unknown_config_key_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["fit", f"--config={QUICKSTART}", "--model.init_args.lrr=0.1", f"--run.dir={tmp_path / 'r'}"])
    assert e.value.code != 0
    assert "lrr" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_missing_dataset_fails_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = Path("experiments/teachers/mnist_lenet5.yaml")
    with pytest.raises(SystemExit) as e:
        main(["fit", f"--config={cfg}", f"--data.init_args.data_dir={tmp_path / 'empty'}", "--run.logger=csv",
              f"--run.dir={tmp_path / 'r'}"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cvlab: error:"), err
    assert "MNIST" in err[0] and str(tmp_path / "empty") in err[0]


def test_nan_loss_stops_with_step_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--model.init_args.optimizer=sgd",
              "--model.init_args.lr=1e30", f"--run.dir={tmp_path / 'r'}"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "loss became" in err and "global step" in err


def test_model_data_mismatch_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--model.init_args.in_channels=1",
              f"--run.dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert "disagree on in_channels: 1 vs 3 (ShapesDataModule); set --model.init_args.in_channels to 3" in err


def test_command_line_model_keys_beat_the_checkpoints_hyper_parameters(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    from experiments.cli import command_line_model_keys

    assert command_line_model_keys(["test", "--model.init_args.lr=0.5", "--model.momentum", "0.1",
                                    "--model.init_args.arch_kwargs.width=4", "--model.class_path=x",
                                    "--trainer.max_epochs=1", "--model.init_args.lr", "0.2"]) == [
        "model.init_args.lr", "model.init_args.momentum", "model.init_args.arch_kwargs"]
    run = tmp_path / "run"
    run_cli("fit", f"--config={QUICKSTART}", *TINY_SHAPES, "--trainer.max_epochs=1", run_dir=run)
    ckpt = run / "checkpoints" / "last.ckpt"
    # LightningCLI alone would test with the checkpoint's lr (its hyper-parameters are laid over the config)
    cli = run_cli("test", f"--config={QUICKSTART}", *TINY_SHAPES, f"--ckpt_path={ckpt}", "--model.init_args.lr=0.123",
                  run_dir=tmp_path / "test")
    assert cli.model.hparams.lr == pytest.approx(0.123)
    assert "--model.init_args.lr from the command line overrides" in capsys.readouterr().out
    same = run_cli("test", f"--config={QUICKSTART}", *TINY_SHAPES, f"--ckpt_path={ckpt}", run_dir=tmp_path / "test2")
    assert same.model.hparams.lr != pytest.approx(0.123)


def test_names_that_moved_to_the_command_layers_ground_keep_their_old_paths() -> None:
    """experiments.command_line holds what cli, lightning_cli, pipeline and sweep share; the old paths still work."""
    from experiments import cli, command_line, lightning_cli, pipeline

    assert cli.user_error_line is command_line.user_error_line
    assert cli.check_config_files is command_line.check_config_files
    assert cli.parse_arguments_only is lightning_cli.parse_arguments_only
    assert pipeline.OneLineArgumentParser is command_line.OneLineArgumentParser
    from cvlab.errors import CvlabError

    assert command_line.user_error_line(RuntimeError("x")) is None  # a bug keeps its traceback
    assert command_line.user_error_line(ValueError("y", CvlabError("a\n  b"))) is None
    try:
        raise ValueError("wrapped") from CvlabError("the \x1b[31mreason\x1b[0m\n  here")
    except ValueError as e:
        assert command_line.user_error_line(e) == "the reason here"
    with pytest.raises(CvlabError, match=r"unrecognized arguments: --x \(`cvlab run --help` lists the options\)"):
        command_line.OneLineArgumentParser(prog="cvlab run").parse_args(["--x"])
