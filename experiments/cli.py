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
"""

from __future__ import annotations

import errno
import os
import re
import sys
import urllib.error
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cvlab.errors import CvlabError

#: names of :mod:`experiments.lightning_cli` that this module re-exports (imported on first use)
_LAZY = ("CvlabCLI", "RunFolderConfig", "RunFolderError", "ConfigValueError", "ConfigKeyError",
         "CheckpointMismatchError", "command_line_model_keys", "parse_arguments_only", "parse_error_line")
_CONFIG_COMMANDS = ("fit", "validate", "test", "predict")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from experiments import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _config_files(argv: list[str]) -> list[str]:
    """The values of ``--config X``, ``--config=X`` and ``-c X`` on a command line."""
    out = []
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return out


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file exists and is a non-empty YAML mapping; else one line naming the file (before
    any heavy import). A value that is not a file name (inline YAML such as ``{trainer: ...}``) is left to
    the parser."""
    import yaml

    for value in _config_files(argv):
        path = Path(value)
        if not path.is_file():
            if value.lstrip().startswith(("{", "[")) or "\n" in value or ": " in value:
                continue
            where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
            raise CvlabError(f"config file not found: {value}{where}")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise CvlabError(f"config file {value} is not valid YAML: {problem}{at}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CvlabError(f"cannot read config file {value}: {e}") from None
        if content is None:
            raise CvlabError(f"config file {value} is empty; a config names at least model: and data: "
                             "(see experiments/quickstart.yaml)")
        if not isinstance(content, dict):
            raise CvlabError(f"config file {value} holds a {type(content).__name__}, not a mapping of keys "
                             "(model:, data:, trainer:, ...)")


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


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception it was raised from or during, breadth first, each once."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [c for c in (x.__cause__, x.__context__) if c is not None]


def _one_line(text: str) -> str:
    """``text`` on one line, without terminal colour codes."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())


def user_error_line(e: BaseException) -> str | None:
    """The one line to print for a user's mistake, or None for a bug (which keeps its traceback)."""
    chain = list(_chain(e))
    for x in chain:
        if isinstance(x, CvlabError):
            return _one_line(str(x))
    for x in chain:
        if isinstance(x, OSError) and x.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return _one_line(
                f"cannot write {x.filename or 'a file'}: {x.strerror}; choose a writable --run.root or --run.dir "
                "(or fix the folder's permissions)"
            )
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return _one_line(
                f"no space left writing {x.filename or 'a file'}: {x.strerror}; free space or choose another --run.root"
            )
        if isinstance(x, RuntimeError) and ("channels, but got" in str(x) or "shapes cannot be multiplied" in str(x)):
            return _one_line(
                f"a network does not accept the data's images ({str(x).splitlines()[0]}); check that the model's or "
                "teacher's in_channels, image_size and num_classes match the data's"
            )
        if isinstance(x, urllib.error.URLError):
            return _one_line(
                f"network unreachable ({x.reason}); run where there is a network, or use files already on disk"
            )
        if type(x).__name__ == "MisconfigurationException":  # Lightning's word for a config that cannot run
            return _one_line(str(x).strip().splitlines()[0] if str(x).strip() else "invalid trainer configuration")
        if isinstance(x, RuntimeError) and str(x).startswith("Error(s) in loading state_dict for "):
            lines = [ln.strip() for ln in str(x).splitlines() if ln.strip()]
            return _one_line(f"the checkpoint does not fit the model: {' '.join(lines[:3])[:400]}; configure the model "
                             "as it was trained (its run folder's config.yaml), or pass another --ckpt_path")
        if isinstance(x, ValueError) and re.match(r"Invalid [a-z_ ]+(value|rate|parameter)", str(x)):
            return _one_line(f"invalid optimiser setting: {x}")
    return None


def _quiet_third_parties(verbose: bool = False) -> None:
    """Silence what is noise for a cvlab user: LightningCLI's args-and-argv warning (cvlab passes
    ``args`` on purpose) and wandb's console chatter (cvlab prints the run folder and the sync command);
    Lightning's banners are silenced where it is imported (:func:`experiments.lightning_cli.quiet_lightning`)."""
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """A warning as one ``cvlab: warning: ...`` line (Python's default adds the file and the source line)."""
    return f"cvlab: warning: {_one_line(str(message)).removeprefix('cvlab: ')}\n"


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
