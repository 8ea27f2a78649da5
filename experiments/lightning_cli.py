"""The LightningCLI half of the ``cvlab`` command (imported only when a command needs Lightning).

:mod:`experiments.cli` is the light entry point (help, config-file checks, the one-line error printer);
this module holds :class:`CvlabCLI`: LightningCLI with cvlab's run folders, their owner lock, logger
defaults, safety callbacks and the checks made before any work:

- parse errors (an unknown key, a wrong type) become one line naming the key, the nearest valid key and
  ``--help`` (jsonargparse's usage dump is for ``--help``); key prefixes are not keys (no ``allow_abbrev``);
- values that parse but cannot work (batch size 0, ``max_epochs`` 0 or < -1, a negative learning rate, a
  GPU accelerator without a GPU, a run name that leaves the run root) are refused before anything is built;
- a run folder has one owner (:class:`experiments.run_folder.RunFolderLock`) and one truth: a finished
  ``fit`` is not retrained and an unfinished one is not silently restarted (both say the command that
  continues the same folder), ``last.ckpt`` is always the newest weights (no ``last-v1.ckpt``);
- a ``--ckpt_path`` of another LightningModule class, or with other layer shapes, is refused in one line
  (LightningCLI would swap the configured class for the checkpoint's).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import json
import logging
import os
import re
import shlex
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerStatus

from callbacks.metrics_json import MetricsJsonWriter
from callbacks.progress_line import EpochLine
from callbacks.safety import RngStateCheckpoint, StopOnDivergence, StopOnNonFiniteLoss
from callbacks.slurm_requeue import DropFinishedHpcCheckpoints
from cvlab.artifacts import KeepPreviousCheckpointIO, readable_checkpoint
from cvlab.errors import CvlabError
from experiments.command_line import check_config_files, one_line_warning, user_error_line
from experiments.run_folder import RunFolderLock, check_run_name, config_hash, make_logger


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class RunFolderError(CvlabError):
    """The run folder cannot be used as asked (finished already, unfinished, or not writable)."""


class ConfigValueError(CvlabError):
    """A config value that parses but cannot work (batch size 0, more devices than exist)."""


class ConfigKeyError(CvlabError):
    """A command line or config file that does not parse (an unknown key, a wrong type)."""


class CheckpointMismatchError(CvlabError):
    """A ``--ckpt_path`` that belongs to another model (another class, other layer shapes)."""


def quiet_lightning(verbose: bool) -> None:
    """Lightning's banners (GPU/TPU lines, the litlogger tip, "Seed set", the model summary, "Loading
    train_dataloader ...") and library deprecation warnings are noise for a cvlab user: shown only with
    ``--verbose`` (env ``CVLAB_VERBOSE=1``). Warnings of cvlab itself stay."""
    if verbose:
        return
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    warnings.formatwarning = one_line_warning  # Lightning's import put its own "file:line: message" format in

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ours = r"(?!(lit_modules|datamodules|callbacks|experiments|cvlab|tests)\b)"  # cvlab's own warnings stay
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=ours)
    warnings.filterwarnings("ignore", category=PossibleUserWarning, module=ours)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*skip_none parameter was deprecated.*")
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")  # the run folder


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


def _saved_max_epochs(run_dir: Path) -> Any:
    """``trainer.max_epochs`` of the config saved in a run folder (None if unknown)."""
    import yaml

    try:
        return (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("trainer", {}).get("max_epochs")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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


# --- parse errors as one line ---------------------------------------------------------------------------
def _parser_message(text: str) -> str:
    """jsonargparse's error report (usage, then ``error: ...`` and a Union report) as one line: the reason,
    the nested one where a class_path's arguments failed."""
    body = text.split("error:", 1)[-1] if "error:" in text else text
    lines = [" ".join(re.sub(r"\x1b\[[0-9;]*m", "", ln).split()) for ln in body.splitlines()]
    lines = [ln for ln in lines if ln]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("- Problem with given class_path")), None)
    if start is not None:
        nested = []
        for ln in lines[start + 1:]:
            if ln.startswith(("- ", "Given value")):
                break
            nested.append(ln)
        return f"{lines[0]} {lines[start][2:]} {' '.join(nested)}"
    kept = [ln for ln in lines if not ln.startswith(("Given value", "Subtypes", "usage:", "tip:"))]
    return " ".join(kept) or "invalid arguments"


def _option_keys(parser: Any) -> list[str]:
    """Every dotted key a (sub)parser accepts (``trainer.max_epochs``, ``run.name``, ...)."""
    keys = []
    for action in getattr(parser, "_actions", []):
        for opt in action.option_strings:
            if opt.startswith("--") and opt not in ("--help", "--config", "--print_config"):
                keys.append(opt[2:])
    return keys


def _class_keys(class_path: str | None, prefix: str) -> list[str]:
    """``prefix.init_args.<arg>`` for every constructor argument of the class at ``class_path``."""
    if not class_path:
        return []
    try:
        params = inspect.signature(_import_class(class_path).__init__).parameters
    except (AttributeError, ValueError, TypeError):
        return []
    return [f"{prefix}.init_args.{p}" for p in params if p not in ("self", "args", "kwargs")]


def _unknown_keys(message: str) -> list[str]:
    """The dotted keys a parse error complains about."""
    found = re.findall(r"""unrecognized arguments: --?([A-Za-z0-9_.\-]+)""", message, flags=re.I)
    section = re.match(r"""Parser key "([A-Za-z0-9_.]+)":""", message)
    for opt in re.findall(r"""Option '([A-Za-z0-9_.]+)' is not accepted""", message):
        found.append(f"{section.group(1)}.init_args.{opt}" if section else opt)
    found += re.findall(r"""[Kk]ey ['"]?([A-Za-z0-9_.]+)['"]? (?:is )?not expected""", message)
    found += re.findall(r"""does not accept option '([A-Za-z0-9_.]+)'""", message)  # a key in a config file
    return list(dict.fromkeys(k.split("=", 1)[0] for k in found if k))


def _given(argv: list[str], key: str) -> str | None:
    """The value given last on the command line for ``--key`` (``--key=v`` or ``--key v``)."""
    found = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{key}="):
            found = a.split("=", 1)[1]
        elif a == f"--{key}" and i + 1 < len(argv):
            found = argv[i + 1]
    return found


def _type_error(message: str, argv: list[str]) -> str | None:
    """``Parser key "k": ... Expected a <class 'int'> ...`` as ``--k expects int (or null), got 'abc'``."""
    m = re.match(r"""Parser key "([A-Za-z0-9_.]+)":""", message)
    types = re.findall(r"""Expected a <class '([A-Za-z0-9_.]+)'>""", message)
    if not m or not types or "class_path" in message:
        return None
    names = [t.rsplit(".", 1)[-1] for t in types if t != "NoneType"]
    null = " (or null)" if "NoneType" in types else ""
    given = _given(argv, m.group(1))
    got = f", got {given!r}" if given is not None else ""
    return f"--{m.group(1)} expects {' or '.join(names) or 'null'}{null}{got}"


def _moved_line(key: str, message: str, argv: list[str]) -> str | None:
    """The one line a class gives for a constructor argument that moved elsewhere (its ``moved_args`` mapping:
    old argument -> where it lives now), for an unknown ``section.init_args.<arg>``; else None."""
    section, _, arg = key.partition(".init_args.")
    paths = [_given(argv, f"{section}.class_path"), *re.findall(r"class_path '([A-Za-z0-9_.]+)'", message)]
    for path in filter(None, paths):
        moved = getattr(_import_class(path), "moved_args", None)
        if arg and isinstance(moved, dict) and arg in moved:
            return str(moved[arg])
    return None


def parse_error_line(text: str, argv: list[str], parser: Any = None) -> str:
    """One line for a failed parse: jsonargparse's reason (or the key and the type it expects), the nearest
    valid key, and where the usage is."""
    msg = _parser_message(text)
    sub = next((a for a in argv if not a.startswith("-")), None)
    valid: list[str] = []
    subparser = getattr(parser, "_subcommands_action", None)
    if subparser is not None and sub in getattr(subparser, "_name_parser_map", {}):
        valid = _option_keys(subparser._name_parser_map[sub])
    elif subparser is not None:
        sub = None  # not a command: the top-level usage
    for section in ("model", "data"):
        found = re.search(rf"""Parser key "{section}": Problem with given class_path '([A-Za-z0-9_.]+)'""", msg)
        valid += _class_keys(found.group(1) if found else _given(argv, f"{section}.class_path"), section)
    hint = ""
    for key in _unknown_keys(msg):
        moved = _moved_line(key, msg, argv)
        if moved:
            return moved
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if not near and "." in key:  # init_args left out: --model.lrr
            head, rest = key.split(".", 1)
            near = difflib.get_close_matches(f"{head}.init_args.{rest}", valid, n=1, cutoff=0.6)
        msg = f"--{key} is not an option" + (f" of {sub}" if sub else "")
        if near and near[0] != key:
            hint = f"; did you mean --{near[0]}?"
        break
    else:
        msg = _type_error(msg, argv) or msg
    required = re.match(r"the following arguments are required: (\w+\.)?(model|data)\b", msg)
    if required:
        msg = (f"no {required.group(2)} given: pass --config FILE (e.g. experiments/quickstart.yaml) or "
               f"--{required.group(2)} CLASS_PATH")
    return f"{msg}{hint} (`cvlab {sub + ' ' if sub else ''}--help` lists the options)"


# --- checkpoints that belong to another model -----------------------------------------------------------
def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def checkpoint_shape_mismatches(saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """``"key (saved shape) vs (model shape)"`` for every tensor both hold with different shapes."""
    return [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in saved.items()
            if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)]


def _import_class(class_path: str) -> Any:
    """The class at ``class_path`` (an alias such as ``lit_modules.ClassifierModule`` gives the same class
    as its home module), or the path itself when it does not import."""
    try:
        module, name = class_path.rsplit(".", 1)
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def _load_checkpoint(path: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip file (mmap needs one)
        return torch.load(path, map_location="cpu", weights_only=True)


LIMIT_BATCHES_KEYS = tuple(f"trainer.limit_{stage}_batches" for stage in ("train", "val", "test", "predict"))


def keep_batch_counts(parser: Any) -> None:
    """Parse ``trainer.limit_*_batches`` as ``int | float | None``, int first: a written ``1`` stays one batch
    and ``1.0`` stays 100%. The Trainer annotates them ``Optional[Union[int, float]]``, but typing's Union cache
    hands back an equal ``Union[float, int, None]`` made earlier (by lightning.fabric), so jsonargparse tried
    float first and turned the count 1 into 1.0 (all batches). ``int | float`` is not cached, so keeps its order."""
    for key in LIMIT_BATCHES_KEYS:
        action = parser._option_string_actions.get(f"--{key}")
        if action is not None and hasattr(action, "_typehint"):
            action._typehint = int | float | None


class CvlabCLI(LightningCLI):
    """LightningCLI with cvlab's run folders, logger defaults and safety callbacks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet_lightning(os.environ.get("CVLAB_VERBOSE", "") not in ("", "0"))
        kwargs.setdefault("model_class", None)
        kwargs.setdefault("datamodule_class", None)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", RunFolderConfig)
        kwargs.setdefault("auto_configure_optimizers", False)
        # single device unless the config asks for more (trainer.devices / strategy: ddp)
        kwargs.setdefault("trainer_defaults", {"devices": 1})
        self._lock: RunFolderLock | None = None
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_epoch is a typo, not max_epochs
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                super().parse_arguments(parser, args)
        except SystemExit as e:
            if e.code in (0, None):
                sys.stderr.write(err.getvalue())
                raise
            raise ConfigKeyError(parse_error_line(err.getvalue(), self._argv, parser)) from None
        sys.stderr.write(err.getvalue())

    def _parse_ckpt_path(self) -> None:
        """Check an explicit ``--ckpt_path`` (readable, a Lightning checkpoint; a damaged ``last.ckpt``
        falls back to ``last.ckpt.previous``; saved by the configured model class) before LightningCLI
        reads its hyper-parameters.

        LightningCLI lays the checkpoint's hyper-parameters over the whole config (its class too), so ``cvlab
        test --ckpt_path X --model.init_args.k v`` would silently run with the checkpoint's ``k``; the model
        keys given on the command line are put back on top (and said)."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if (
            ckpt is not None
            and ckpt not in ("last", "best", "hpc", "registry")
            and not str(ckpt).startswith("registry:")
        ):
            self.config[sub].ckpt_path = str(readable_checkpoint(ckpt))
            self._check_checkpoint_class(self.config[sub].ckpt_path)
        explicit = {k: self.config[sub].get(k) for k in command_line_model_keys(self._argv)} if sub else {}
        super()._parse_ckpt_path()
        for key, value in explicit.items():
            if self.config[sub].get(key) != value:
                print(f"cvlab: --{key} from the command line overrides the checkpoint's {self.config[sub].get(key)!r}",
                      flush=True)
                self.config[sub][key] = value

    def _check_checkpoint_class(self, ckpt: str) -> None:
        sub = self.config.get("subcommand")
        model = self.config[sub].get("model")
        configured = model.get("class_path") if hasattr(model, "get") else None
        saved = (_load_checkpoint(ckpt).get("hyper_parameters") or {}).get("_class_path")
        if saved and configured and _import_class(saved) is not _import_class(configured):
            raise CheckpointMismatchError(
                f"checkpoint {ckpt} holds a {_short(saved)} ({saved}) but the config's model is {_short(configured)} "
                f"({configured}); pass a checkpoint of {_short(configured)}, or the config that trained this one "
                "(its run folder's config.yaml)"
            )

    def _check_checkpoint_shapes(self, ckpt: str) -> None:
        """Refuse, in one line naming the layers, a checkpoint whose tensors do not fit the model's shapes."""
        saved = _load_checkpoint(ckpt).get("state_dict") or {}
        bad = checkpoint_shape_mismatches(saved, self.model.state_dict())
        if bad:
            n = len(bad)
            raise CheckpointMismatchError(
                f"checkpoint {ckpt} does not fit the configured {type(self.model).__name__}: {n} layer shape"
                f"{'s' * (n != 1)} differ ({'; '.join(bad[:3])}{f'; +{n - 3} more' if n > 3 else ''}; checkpoint vs "
                "model); configure the model as it was trained (its run folder's config.yaml), or pass another "
                "--ckpt_path"
            )

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
                            help="fit: delete a run folder's contents (finished or not) and train afresh in it")
        parser.add_argument("--run.divergence_factor", type=float, default=100.0,
                            help="stop when the loss stays above this multiple of its first-step value (0: off)")
        parser.add_argument("--run.divergence_window", type=int, default=20,
                            help="... for this many consecutive training steps")
        keep_batch_counts(parser)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run = cfg.run
        if run.name is not None:
            check_run_name(run.name)
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
        if _is_rank_zero():
            self._lock = RunFolderLock(run.dir, command=shlex.join(["cvlab", *map(str, self._argv)])).acquire()

    def _check_values(self, cfg: dict[str, Any]) -> None:
        """Values that parse but cannot work, refused before any work."""
        for key, value in _walk(cfg):
            leaf = key.rsplit(".", 1)[-1]
            if leaf.endswith("batch_size") and _is_number(value) and value < 1:
                raise ConfigValueError(f"--{key} must be a positive number of examples, got {value}")
            if (leaf == "lr" or leaf.endswith("_lr")) and _is_number(value) and value < 0:
                raise ConfigValueError(f"--{key} must be a learning rate >= 0, got {value}")
            if leaf in ("weight_decay", "momentum") and _is_number(value) and value < 0:
                raise ConfigValueError(f"--{key} must be >= 0, got {value}")
        trainer = cfg.get("trainer") or {}
        for key in ("max_epochs", "max_steps"):
            v = trainer.get(key)
            if _is_number(v) and (v == 0 or v < -1):
                why = "0 trains nothing (and would mark the run finished)" if v == 0 else "below -1"
                other = "max_steps" if key == "max_epochs" else "max_epochs"
                raise ConfigValueError(f"--trainer.{key} {v} cannot be meant: {why}; give a positive number, or -1 for "
                                       f"no limit (with --trainer.{other} or --trainer.max_time)")
        devices, accel = trainer.get("devices"), str(trainer.get("accelerator") or "auto")
        if accel in ("gpu", "cuda") and torch.cuda.device_count() == 0:
            raise ConfigValueError(
                f"--trainer.accelerator {accel}: no GPU is visible (torch.cuda.device_count() is 0, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --trainer.accelerator "
                "cpu (or auto)"
            )
        if accel == "tpu":
            import importlib.util

            if importlib.util.find_spec("torch_xla") is None:
                raise ConfigValueError("--trainer.accelerator tpu: no TPU here (torch_xla is not installed); "
                                       "use --trainer.accelerator cpu (or auto)")
        if accel == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigValueError("--trainer.accelerator mps: no Apple GPU here; use --trainer.accelerator cpu "
                                   "(or auto)")
        n = int(devices) if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()) else None
        if n is not None and n > 1 and accel in ("auto", "gpu", "cuda"):
            found = torch.cuda.device_count()
            if found < n:
                raise ConfigValueError(
                    f"--trainer.devices {n} asks for {n} GPUs but {found} {'is' if found == 1 else 'are'} visible; "
                    f"use --trainer.devices {max(found, 1)}, or for {n} CPU processes say --trainer.accelerator cpu "
                    "--trainer.strategy ddp"
                )

    def _check_run_folder(self, cfg: Any) -> None:
        """A writable run folder; a finished ``fit`` is not retrained and an unfinished one not restarted
        unless asked; ``--ckpt_path last`` resolved."""
        run, run_dir = cfg.run, Path(cfg.run.dir)
        self._new_run_dir = None if run_dir.exists() else run_dir
        target = _nearest_existing(run_dir)
        if not target.is_dir():
            raise RunFolderError(
                f"run folder {run_dir} cannot be created: {target} is a file; choose another --run.root or --run.dir"
            )
        if not _writable(target):
            what = "run folder" if target == run_dir.absolute() else f"run folder {run_dir} cannot be created: folder"
            raise RunFolderError(f"{what} {target} is read-only; choose a writable --run.root or --run.dir")
        if _is_rank_zero():
            RunFolderLock(run_dir).check_free()  # before anything in it is deleted or read
        ckpt = cfg.get("ckpt_path")
        last = run_dir / "checkpoints" / "last.ckpt"
        has_last = last.is_file() or last.with_name(last.name + ".previous").is_file()
        if self.subcommand == "fit" and ckpt is None and not run.overwrite:
            if _is_finished_fit(run_dir):
                done = _saved_max_epochs(run_dir)
                more = f"N > {done}" if _is_number(done) and done > 0 else "N larger than before"
                raise RunFolderError(
                    f"run folder {run_dir} holds a finished fit; nothing was changed. Train it further with the same "
                    f"command plus --run.dir {run_dir} --ckpt_path last --trainer.max_epochs N ({more}), start afresh "
                    "with a new --run.name NAME, or retrain in place with --run.overwrite true"
                )
            if has_last:
                raise RunFolderError(
                    f"run folder {run_dir} holds an unfinished fit ({last.name}); nothing was changed. "
                    "Continue it with "
                    "the same command plus --ckpt_path last, or retrain in place with --run.overwrite true"
                )
        if (
            self.subcommand == "fit"
            and run.overwrite
            and run_dir.is_dir()
            and _looks_like_run_folder(run_dir)
            and _is_rank_zero()
        ):
            shutil.rmtree(run_dir)
        if ckpt == "last":
            if has_last:
                cfg.ckpt_path = str(readable_checkpoint(last))
                self._check_checkpoint_class(cfg.ckpt_path)
            elif self.subcommand != "fit":
                raise RunFolderError(f"--ckpt_path last: no {last}; pass the path of a checkpoint")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException as e:
            self._drop_new_run_folder(e)
            self._release()
            raise

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            ckpt = self.config[subcommand].get("ckpt_path")
            if ckpt and Path(str(ckpt)).is_file():
                self._check_checkpoint_shapes(str(ckpt))
            super()._run_subcommand(subcommand)
        except SystemExit:
            if self.trainer.state.status == TrainerStatus.INTERRUPTED:
                self._say_interrupted(subcommand)
            raise
        except BaseException as e:
            self._drop_new_run_folder(e)
            raise
        finally:
            self._release()

    def _say_interrupted(self, subcommand: str) -> None:
        """After Ctrl-C (or SIGTERM) of a fit: one line with the command that resumes it (a pipeline stage
        stays quiet: ``cvlab run`` says how to resume the pipeline)."""
        if subcommand != "fit" or not _is_rank_zero() or os.environ.get("CVLAB_STAGE"):
            return
        argv = [a for a in map(str, self._argv) if not a.startswith("--ckpt_path")]
        run_dir = self.config[subcommand].run.dir
        if not any(a.startswith("--run.dir") for a in argv):
            argv.append(f"--run.dir={run_dir}")
        print(f"cvlab: interrupted; run folder {run_dir} is kept; resume with: "
              f"{shlex.join(['cvlab', *argv, '--ckpt_path=last'])}", file=sys.stderr, flush=True)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _drop_new_run_folder(self, e: BaseException) -> None:
        """After a user error, remove the run folder this command created if no checkpoint reached it
        (it holds only logs of a run that never started), so a failed try leaves nothing behind."""
        new = getattr(self, "_new_run_dir", None)
        if new is None or not new.is_dir() or not _is_rank_zero() or user_error_line(e) is None:
            return
        if not any((new / "checkpoints").glob("*.ckpt")):
            self._release()
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
        if config.get("enable_progress_bar") is False:
            callbacks.append(EpochLine())  # a line per epoch where there is no bar (pipeline stages, logs)
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = plugins + [KeepPreviousCheckpointIO()]
        if config.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in given
        ):
            # no version counter: last.ckpt is always the newest weights, never a last-v1.ckpt beside a stale one
            callbacks.append(ModelCheckpoint(dirpath=str(Path(run.dir) / "checkpoints"), save_last=True, save_top_k=1,
                                             enable_version_counter=False))
        if _is_rank_zero():
            print(f"cvlab: run folder {run.dir}", flush=True)
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        run = self.config[self.subcommand].run
        has_test = (
            self.datamodule is not None
            and type(self.datamodule).test_dataloader is not L.LightningDataModule.test_dataloader
        )
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
    check_config_files(list(argv))
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*args parameter is intended")
            _ParseOnlyCLI(args=list(argv))
    except _Parsed as parsed:
        sub = parsed.config.get("subcommand")
        return (parsed.config[sub] if sub else parsed.config).as_dict()
    except SystemExit:
        raise CvlabError("invalid arguments") from None
    raise CvlabError(f"`cvlab {' '.join(argv[:1])}` is not a command that parses a config")
