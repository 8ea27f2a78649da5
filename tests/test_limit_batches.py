"""``trainer.limit_*_batches``: a written integer is a number of batches, a float a fraction (1.0 = all)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from experiments.cli import CvlabCLI
from experiments.lightning_cli import LIMIT_BATCHES_KEYS, parse_arguments_only
from tests.cli_runs import QUICKSTART, TINY_SHAPES

#: train, val, test, predict: a count of 1, all batches, a fraction, a count of 5
WRITTEN = ("1", "1.0", "0.5", "5")
WANTED: tuple[Any, ...] = (1, 1.0, 0.5, 5)


def _limits(config: dict[str, Any]) -> list[Any]:
    return [config["trainer"][key.split(".", 1)[1]] for key in LIMIT_BATCHES_KEYS]


def _same(got: list[Any], want: tuple[Any, ...]) -> bool:
    """Equal values of the same type (1 == 1.0 in Python, but Lightning reads them as 1 batch vs 100%)."""
    return [(type(g), g) for g in got] == [(type(w), w) for w in want]


def test_command_line_integers_stay_counts_and_floats_fractions() -> None:
    args = [f"--{key}={value}" for key, value in zip(LIMIT_BATCHES_KEYS, WRITTEN)]
    got = _limits(parse_arguments_only(["fit", f"--config={QUICKSTART}", *args]))
    assert _same(got, WANTED), got
    spaced = parse_arguments_only(["fit", f"--config={QUICKSTART}", "--trainer.limit_test_batches", "1"])
    assert _same([spaced["trainer"]["limit_test_batches"]], (1,))


def test_config_file_integers_stay_counts_and_floats_fractions(tmp_path: Path) -> None:
    cfg = tmp_path / "limits.yaml"
    cfg.write_text("trainer:\n" + "".join(f"  {key.split('.', 1)[1]}: {value}\n"
                                          for key, value in zip(LIMIT_BATCHES_KEYS, WRITTEN)))
    got = _limits(parse_arguments_only(["fit", f"--config={QUICKSTART}", f"--config={cfg}"]))
    assert _same(got, WANTED), got


@pytest.mark.filterwarnings("ignore:.*args parameter is intended")
def test_the_built_trainer_gets_one_batch_not_all(tmp_path: Path) -> None:
    cli = CvlabCLI(args=[f"--config={QUICKSTART}", *TINY_SHAPES, "--trainer.limit_test_batches=1",
                         "--trainer.limit_val_batches=1.0", f"--run.dir={tmp_path / 'run'}"], run=False)
    try:
        assert _same([cli.trainer.limit_test_batches, cli.trainer.limit_val_batches], (1, 1.0))
    finally:
        cli._release()


@pytest.mark.parametrize("bad", ["abc", "true"])
def test_a_non_number_is_still_refused(bad: str) -> None:
    from cvlab.errors import CvlabError

    with pytest.raises(CvlabError):
        parse_arguments_only(["fit", f"--config={QUICKSTART}", f"--trainer.limit_test_batches={bad}"])
