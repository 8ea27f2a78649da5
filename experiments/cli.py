"""The ``cvlab`` command.

- ``cvlab fit|validate|test|predict --config X.yaml [--section.key value ...]``: LightningCLI with
  model and data in subclass mode, one deterministic run folder per config, ``metrics.json`` in it.
- ``cvlab run PIPELINE.yaml``: run an experiment's stages in order (see :mod:`experiments.pipeline`).
- ``cvlab bench NAME ...``: print a benchmark (see :mod:`experiments.benchmarks`).
- ``cvlab sweep FILE [--local | --slurm]``: a hyperparameter sweep (see :mod:`experiments.sweep`).

Errors: :func:`main` is the one place where a user's mistake becomes one ``cvlab: error: ...`` line
and exit code 1: every :class:`~cvlab.errors.CvlabError`, wherever it is raised (also inside
LightningCLI's instantiation of classes, where jsonargparse wraps it in "Does not validate against
any of the Union subtypes"), and the foreseeable errors of libraries (a read-only or full disk, no network,
Lightning's misconfiguration, a checkpoint that does not load, an invalid optimiser value).
:meth:`~experiments.lightning_cli.CvlabCLI.before_instantiate_classes` checks what can be checked before
any work (batch sizes, epochs, learning rates, devices, the run folder and its lock, ``--ckpt_path``).
Anything else is a bug and keeps its traceback; ``--traceback`` (or ``CVLAB_TRACEBACK=1``) shows the
traceback of user errors too. ``--verbose`` (or ``CVLAB_VERBOSE=1``) shows Lightning's banners and
library warnings, silenced by default.

Start-up: this module imports no torch or Lightning. ``--help`` and the config-file checks (missing,
empty, not YAML) answer at once; :mod:`experiments.lightning_cli` (the LightningCLI half, whose names are
re-exported here lazily: ``from experiments.cli import CvlabCLI`` works) is imported only to run a command.

Imports: this module is the top of the command layer. What the commands share (the one-line error and warning,
the config-file checks, :class:`OneLineArgumentParser`) lives in :mod:`experiments.command_line`, which imports
none of them (re-exported here: the old ``from experiments.cli import user_error_line`` works), so
``cli -> sweep -> pipeline -> lightning_cli -> run_folder`` import one way (``tests/test_layering.py``).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from experiments.command_line import check_config_files as check_config_files  # re-exported: the old paths
from experiments.command_line import one_line_warning as _one_line_warning
from experiments.command_line import user_error_line as user_error_line

#: names of :mod:`experiments.lightning_cli` that this module re-exports (imported on first use)
_LAZY = ("CvlabCLI", "RunFolderConfig", "RunFolderError", "ConfigValueError", "ConfigKeyError",
         "CheckpointMismatchError", "command_line_model_keys", "parse_arguments_only", "parse_error_line")
_CONFIG_COMMANDS = ("fit", "validate", "test", "predict")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from experiments import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


HELP = """usage: cvlab {fit,validate,test,predict,run,bench,results,sweep} ...

cvlab: papers about what a trained network knows and leaks, reimplemented as LightningModules.

commands:
  fit        train: cvlab fit --config experiments/quickstart.yaml [--section.key value ...]
  validate   evaluate on the validation set: ... --config X.yaml --ckpt_path CKPT
  test       evaluate on the test set: ... --config X.yaml --ckpt_path CKPT
  predict    run a method's predict loop (synthesis, attacks): ... --config X.yaml
  run        run a multi-stage experiment: cvlab run experiments/quickstart/pipeline.yaml
  bench      print a benchmark: cvlab bench list
  results    render docs/RESULTS.md from the records in docs/results/ (--check: fail if it is stale)

`cvlab COMMAND --help` lists a command's options. Errors are one `cvlab: error: ...` line;
--traceback (or CVLAB_TRACEBACK=1) adds the full traceback; --verbose (or CVLAB_VERBOSE=1) shows
Lightning's banners and library warnings.
"""


def _quiet_third_parties(verbose: bool = False) -> None:
    """Silence what is noise for a cvlab user: LightningCLI's args-and-argv warning (cvlab passes
    ``args`` on purpose) and wandb's console chatter (cvlab prints the run folder and the sync command);
    Lightning's banners are silenced where it is imported (:func:`experiments.lightning_cli.quiet_lightning`)."""
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")


def _is_set(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    show_trace = _is_set("CVLAB_TRACEBACK") or "--traceback" in argv
    if "--verbose" in argv:
        os.environ["CVLAB_VERBOSE"] = "1"  # pipeline stages and sweep trials inherit it
    argv = [a for a in argv if a not in ("--traceback", "--verbose")]
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        sys.exit(0 if argv else 2)
    _quiet_third_parties(_is_set("CVLAB_VERBOSE"))
    if not _is_set("CVLAB_VERBOSE"):
        warnings.formatwarning = _one_line_warning
    try:
        if argv[0] in _CONFIG_COMMANDS:
            check_config_files(argv)
        from experiments.host_malloc import keep_freed_host_memory

        keep_freed_host_memory()
        if argv[0] == "run":
            from experiments.pipeline import main as run_pipeline

            sys.exit(run_pipeline(argv[1:]))
        if argv[0] == "bench":
            from experiments.benchmarks import main as run_bench

            sys.exit(run_bench(argv[1:]))
        if argv[0] == "results":
            from experiments.results import main as render_results

            sys.exit(render_results(argv[1:]))
        if argv and argv[0] == "sweep":
            from experiments.sweep import main as run_sweep

            sys.exit(run_sweep(argv[1:]))
        from experiments.lightning_cli import CvlabCLI

        CvlabCLI(args=argv)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if show_trace:
            raise
        if not os.environ.get("CVLAB_STAGE"):  # a pipeline stage: `cvlab run` says how to resume
            print("cvlab: interrupted before training started; nothing to resume", file=sys.stderr, flush=True)
        sys.exit(130)
    except BaseException as e:
        line = user_error_line(e)
        if line is None or show_trace:
            raise
        print(f"cvlab: error: {line}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
