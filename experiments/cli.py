"""The ``cvlab`` command.

- ``cvlab fit|validate|test|predict --config X.yaml [--section.key value ...]``: LightningCLI with
  model and data in subclass mode, one deterministic run folder per config, ``metrics.json`` in it.
- ``cvlab run PIPELINE.yaml``: run an experiment's stages in order (see :mod:`experiments.pipeline`).
- ``cvlab bench NAME ...``: print a benchmark (see :mod:`experiments.benchmarks`).
- ``cvlab sweep FILE [--local | --slurm]``: a hyperparameter sweep (see :mod:`experiments.sweep`).

Errors: :func:`main` is the one place where a user's mistake becomes one ``cvlab: error: ...`` line
and exit code 1: every :class:`~cvlab.errors.CvlabError`, wherever it is raised (also inside
LightningCLI's instantiation of classes, where jsonargparse wraps it in "Does not validate against
any of the Union subtypes"), and the foreseeable OS errors (a read-only or full disk, no network).
:meth:`CvlabCLI.before_instantiate_classes` checks what can be checked before any work (batch sizes,
devices, the run folder, ``--ckpt_path``). Anything else is a bug and keeps its traceback;
``--traceback`` (or ``CVLAB_TRACEBACK=1``) shows the traceback of user errors too.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import urllib.error
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from callbacks.atomic_io import KeepPreviousCheckpointIO, readable_checkpoint
from callbacks.metrics_json import MetricsJsonWriter
from callbacks.safety import RngStateCheckpoint, StopOnDivergence, StopOnNonFiniteLoss
from callbacks.slurm_requeue import DropFinishedHpcCheckpoints
from cvlab.errors import CvlabError
from experiments.host_malloc import keep_freed_host_memory
from experiments.run_folder import config_hash, make_logger


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class RunFolderError(CvlabError):
    """The run folder cannot be used as asked (finished already, or not writable)."""


class ConfigValueError(CvlabError):
    """A config value that parses but cannot work (batch size 0, more devices than exist)."""


def _writable(folder: Path) -> bool:
    """Whether we may create files in ``folder``; no write bits counts as read-only even for root."""
    return os.access(folder, os.W_OK | os.X_OK) and bool(folder.stat().st_mode & 0o222)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _walk(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested config dict."""
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), cfg


def _is_finished_fit(run_dir: Path) -> bool:
    """A run folder whose ``fit`` completed: ``metrics.json`` has ``fit/steps`` (written at the end of fit)."""
    try:
        return "fit/steps" in json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False


def _looks_like_run_folder(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in ("config.yaml", "metrics.json", "checkpoints"))


class RunFolderConfig(SaveConfigCallback):
    """Save the resolved config as ``<run folder>/config.yaml`` (rank 0, overwritten on resume)."""

    def __init__(self, parser, config, **kwargs) -> None:
        kwargs.update(overwrite=True, save_to_log_dir=False)
        super().__init__(parser, config, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        path = Path(trainer.default_root_dir) / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)


def command_line_model_keys(argv: list[str]) -> list[str]:
    """The ``model.init_args.*`` keys set on a command line (``--model.init_args.k v``, ``--model.k=v``);
    ``class_path`` and appends (``+=``) are left out."""
    keys = []
    for arg in argv:
        if not isinstance(arg, str) or not arg.startswith("--model."):
            continue
        key = arg[2:].split("=", 1)[0]
        if key.endswith("+") or key in ("model.class_path", "model.init_args"):
            continue
        if not key.startswith("model.init_args."):
            key = "model.init_args." + key[len("model."):]
        key = ".".join(key.split(".")[:3])  # the whole parameter (a nested key sets part of a dict)
        if key not in keys:
            keys.append(key)
    return keys


class CvlabCLI(LightningCLI):
    """LightningCLI with cvlab's run folders, logger defaults and safety callbacks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", None)
        kwargs.setdefault("datamodule_class", None)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", RunFolderConfig)
        kwargs.setdefault("auto_configure_optimizers", False)
        # single device unless the config asks for more (trainer.devices / strategy: ddp)
        kwargs.setdefault("trainer_defaults", {"devices": 1})
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Check an explicit ``--ckpt_path`` (readable, a Lightning checkpoint; a damaged ``last.ckpt``
        falls back to ``last.ckpt.previous``) before LightningCLI reads its hyper-parameters.

        LightningCLI lays the checkpoint's hyper-parameters over the whole config, so ``cvlab test
        --ckpt_path X --model.init_args.k v`` would silently run with the checkpoint's ``k``; the model
        keys given on the command line are put back on top (and said)."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt is not None and ckpt not in ("last", "best", "hpc", "registry") and not str(ckpt).startswith("registry:"):
            self.config[sub].ckpt_path = str(readable_checkpoint(ckpt))
        explicit = {k: self.config[sub].get(k) for k in command_line_model_keys(self._argv)} if sub else {}
        super()._parse_ckpt_path()
        for key, value in explicit.items():
            if self.config[sub].get(key) != value:
                print(f"cvlab: --{key} from the command line overrides the checkpoint's {self.config[sub].get(key)!r}",
                      flush=True)
                self.config[sub][key] = value

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run.root", type=str, default=os.environ.get("CVLAB_RUNS", "runs"),
                            help="parent of run folders (env CVLAB_RUNS)")
        parser.add_argument("--run.name", type=str | None, default=None,
                            help="run name (default: the config file's name)")
        parser.add_argument("--run.dir", type=str | None, default=None,
                            help="explicit run folder (default: <root>/<name>-<config hash>)")
        parser.add_argument("--run.logger", type=Literal["wandb", "csv", "tensorboard", "none"],
                            default=os.environ.get("CVLAB_LOGGER", "wandb"),
                            help="wandb (offline unless configured), csv, tensorboard or none (env CVLAB_LOGGER)")
        parser.add_argument("--run.wandb_project", type=str, default="cvlab")
        parser.add_argument("--run.test_after_fit", type=bool, default=True,
                            help="after fit, evaluate the final weights on the test set (test/* metrics)")
        parser.add_argument("--run.overwrite", type=bool, default=False,
                            help="fit: delete a finished run folder's contents and train afresh in it")
        parser.add_argument("--run.divergence_factor", type=float, default=100.0,
                            help="stop when the loss stays above this multiple of its first-step value (0: off)")
        parser.add_argument("--run.divergence_window", type=int, default=20,
                            help="... for this many consecutive training steps")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run = cfg.run
        if run.name is None:
            configs = cfg.get("config") or []
            if configs:
                p = Path(str(configs[-1]))
                run.name = f"{p.parent.name}-{p.stem}" if p.parent.name not in ("", "experiments") else p.stem
            else:
                run.name = cfg.model.class_path.rsplit(".", 1)[-1].lower()
        if run.dir is None:
            run.dir = str(Path(run.root) / f"{run.name}-{config_hash(cfg.as_dict())}")
        cfg.trainer.default_root_dir = run.dir
        self._check_values(cfg.as_dict())
        self._check_run_folder(cfg)

    def _check_values(self, cfg: dict[str, Any]) -> None:
        """Values that parse but cannot work, refused before any work."""
        for key, value in _walk(cfg):
            leaf = key.rsplit(".", 1)[-1]
            if leaf.endswith("batch_size") and isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ConfigValueError(f"--{key} must be a positive number of examples, got {value}")
        trainer = cfg.get("trainer") or {}
        devices, accel = trainer.get("devices"), str(trainer.get("accelerator") or "auto")
        n = int(devices) if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()) else None
        if n is not None and n > 1 and accel in ("auto", "gpu", "cuda"):
            import torch

            found = torch.cuda.device_count()
            if found < n:
                raise ConfigValueError(
                    f"--trainer.devices {n} asks for {n} GPUs but {found} {'is' if found == 1 else 'are'} visible; "
                    f"use --trainer.devices {max(found, 1)}, or for {n} CPU processes say --trainer.accelerator cpu "
                    "--trainer.strategy ddp"
                )

    def _check_run_folder(self, cfg: Any) -> None:
        """A writable run folder; a finished ``fit`` is not retrained unless asked; ``--ckpt_path`` usable."""
        run, run_dir = cfg.run, Path(cfg.run.dir)
        self._new_run_dir = None if run_dir.exists() else run_dir
        target = _nearest_existing(run_dir)
        if not target.is_dir():
            raise RunFolderError(f"run folder {run_dir} cannot be created: {target} is a file; choose another --run.root or --run.dir")
        if not _writable(target):
            what = "run folder" if target == run_dir.absolute() else f"run folder {run_dir} cannot be created: folder"
            raise RunFolderError(f"{what} {target} is read-only; choose a writable --run.root or --run.dir")
        ckpt = cfg.get("ckpt_path")
        if self.subcommand == "fit" and ckpt is None and _is_finished_fit(run_dir):
            if not run.overwrite:
                raise RunFolderError(
                    f"run folder {run_dir} holds a finished fit; nothing was changed. Continue it with --ckpt_path last "
                    "(and a larger --trainer.max_epochs), start afresh with a new --run.name NAME, "
                    "or retrain in place with --run.overwrite true"
                )
        if self.subcommand == "fit" and run.overwrite and run_dir.is_dir() and _looks_like_run_folder(run_dir) and _is_rank_zero():
            shutil.rmtree(run_dir)
        if ckpt == "last":
            last = run_dir / "checkpoints" / "last.ckpt"
            if last.is_file() or last.with_name(last.name + ".previous").is_file():
                cfg.ckpt_path = str(readable_checkpoint(last))
            elif self.subcommand != "fit":
                raise RunFolderError(f"--ckpt_path last: no {last}; pass the path of a checkpoint")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException as e:
            self._drop_new_run_folder(e)
            raise

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException as e:
            self._drop_new_run_folder(e)
            raise

    def _drop_new_run_folder(self, e: BaseException) -> None:
        """After a user error, remove the run folder this command created if no checkpoint reached it
        (it holds only logs of a run that never started), so a failed try leaves nothing behind."""
        new = getattr(self, "_new_run_dir", None)
        if new is None or not new.is_dir() or not _is_rank_zero() or user_error_line(e) is None:
            return
        if not any((new / "checkpoints").glob("*.ckpt")):
            shutil.rmtree(new, ignore_errors=True)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        run = (self.config[self.subcommand] if self.subcommand else self.config).run
        if config.get("logger") is None:
            config["logger"] = make_logger(run.logger, run.dir, run.name, run.wandb_project)
        given = config.get("callbacks") or []
        callbacks = list(callbacks) + [
            MetricsJsonWriter(run.dir),
            StopOnNonFiniteLoss(),
            StopOnDivergence(run.divergence_factor, run.divergence_window),
            RngStateCheckpoint(),
            DropFinishedHpcCheckpoints(),
        ]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = plugins + [KeepPreviousCheckpointIO()]
        if config.get("enable_checkpointing", True) is not False and not any(isinstance(c, ModelCheckpoint) for c in given):
            callbacks.append(ModelCheckpoint(dirpath=str(Path(run.dir) / "checkpoints"), save_last=True, save_top_k=1))
        if _is_rank_zero():
            print(f"cvlab: run folder {run.dir}", flush=True)
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        run = self.config[self.subcommand].run
        has_test = self.datamodule is not None and type(self.datamodule).test_dataloader is not L.LightningDataModule.test_dataloader
        if run.test_after_fit and has_test and type(self.model).test_step is not L.LightningModule.test_step:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=self.trainer.is_global_zero)
        self._report()

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()

    def after_predict(self) -> None:
        self._report()

    def _report(self) -> None:
        if self.trainer.is_global_zero:
            root = Path(self.trainer.default_root_dir)
            line = f"cvlab: done; metrics in {root / 'metrics.json'}"
            offline = sorted((root / "wandb").glob("offline-run-*"))
            if offline:
                line += f"; wandb (offline): wandb sync {offline[-1]}"
            print(line, flush=True)


HELP = """usage: cvlab {fit,validate,test,predict,run,bench} ...

cvlab: papers about what a trained network knows and leaks, reimplemented as LightningModules.

commands:
  fit        train: cvlab fit --config experiments/quickstart.yaml [--section.key value ...]
  validate   evaluate on the validation set: ... --config X.yaml --ckpt_path CKPT
  test       evaluate on the test set: ... --config X.yaml --ckpt_path CKPT
  predict    run a method's predict loop (synthesis, attacks): ... --config X.yaml
  run        run a multi-stage experiment: cvlab run experiments/quickstart/pipeline.yaml
  bench      print a benchmark: cvlab bench list

`cvlab COMMAND --help` lists a command's options. Errors are one `cvlab: error: ...` line;
--traceback (or CVLAB_TRACEBACK=1) adds the full traceback.
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
            return _one_line(f"no space left writing {x.filename or 'a file'}: {x.strerror}; free space or choose another --run.root")
        if isinstance(x, RuntimeError) and ("channels, but got" in str(x) or "shapes cannot be multiplied" in str(x)):
            return _one_line(
                f"a network does not accept the data's images ({str(x).splitlines()[0]}); check that the model's or "
                "teacher's in_channels, image_size and num_classes match the data's"
            )
        if isinstance(x, urllib.error.URLError):
            return _one_line(f"network unreachable ({x.reason}); run where there is a network, or use files already on disk")
    return None


def _quiet_third_parties() -> None:
    """Silence what is noise for a cvlab user: LightningCLI's args-and-argv warning (cvlab passes
    ``args`` on purpose) and wandb's console chatter (cvlab prints the run folder and the sync command)."""
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")


class _Parsed(Exception):
    """Raised by :class:`_ParseOnlyCLI` once the arguments have parsed; carries the parsed config."""

    def __init__(self, config: Any) -> None:
        super().__init__("parsed")
        self.config = config


class _ParseOnlyCLI(CvlabCLI):
    """Parse a command line (config files, keys, types) and stop before anything is read, built or written
    (a later pipeline stage's ``--ckpt_path`` need not exist yet)."""

    def _parse_ckpt_path(self) -> None:
        raise _Parsed(self.config)


def parse_arguments_only(argv: list[str]) -> dict[str, Any]:
    """Parse ``cvlab argv`` as the CLI would, instantiating nothing, and return the subcommand's resolved
    config (what ``--print_config`` prints); a wrong key, type or config file raises :class:`CvlabError`
    with LightningCLI's reason (the nested one, where jsonargparse wraps it in its Union report)."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*args parameter is intended")
            _ParseOnlyCLI(args=list(argv))
    except _Parsed as parsed:
        sub = parsed.config.get("subcommand")
        return (parsed.config[sub] if sub else parsed.config).as_dict()
    except SystemExit:
        text = err.getvalue()
        body = text.split("error:", 1)[-1] if "error:" in text else text
        lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
        start = next((i for i, ln in enumerate(lines) if ln.startswith("- Problem with given class_path")), None)
        if start is not None:
            nested = []
            for ln in lines[start + 1 :]:
                if ln.startswith(("- ", "Given value")):
                    break
                nested.append(ln)
            msg = f"{lines[0]} {lines[start][2:]} {' '.join(nested)}"
        else:
            msg = " ".join(ln for ln in lines if not ln.startswith(("Given value", "Subtypes"))) or "invalid arguments"
        raise CvlabError(msg) from None
    raise CvlabError(f"`cvlab {' '.join(argv[:1])}` is not a command that parses a config")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    show_trace = os.environ.get("CVLAB_TRACEBACK", "") not in ("", "0") or "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        sys.exit(0 if argv else 2)
    _quiet_third_parties()
    try:
        keep_freed_host_memory()
        if argv[0] == "run":
            from experiments.pipeline import main as run_pipeline

            sys.exit(run_pipeline(argv[1:]))
        if argv[0] == "bench":
            from experiments.benchmarks import main as run_bench

            sys.exit(run_bench(argv[1:]))
        if argv and argv[0] == "sweep":
            from experiments.sweep import main as run_sweep

            sys.exit(run_sweep(argv[1:]))
        CvlabCLI(args=argv)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        line = user_error_line(e)
        if line is None or show_trace:
            raise
        print(f"cvlab: error: {line}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
