"""Deterministic run folders, their owner lock, and the logger that writes into them.

A run folder has one writer at a time: :class:`RunFolderLock` is a file ``.cvlab.lock`` holding the owner's
pid, host and command, taken (atomically, ``O_EXCL``) for the life of a ``cvlab`` command or pipeline stage.
A second process on the same folder stops with one line naming the owner; the lock of a process that is
gone (killed with ``kill -9``, a crashed node on the same host) is taken over with a warning.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvlab.errors import CvlabError

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

#: keys that do not change what a run computes, left out of its identity
_IGNORED_KEYS = (
    "run",
    "ckpt_path",
    "config",
    "trainer.logger",
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
)


def config_hash(config: dict[str, Any], ignore: tuple[str, ...] = _IGNORED_KEYS) -> str:
    """8 hex digits identifying a resolved config (a flat or nested dict), minus bookkeeping keys."""

    def strip(d: Any, prefix: str = "") -> Any:
        if isinstance(d, dict):
            return {k: strip(v, f"{prefix}{k}.") for k, v in sorted(d.items()) if f"{prefix}{k}" not in ignore}
        if isinstance(d, (list, tuple)):
            return [strip(v, prefix) for v in d]
        return d

    blob = json.dumps(strip(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def wandb_is_configured() -> bool:
    """True when the user has set wandb up to sync (an API key, a login, or WANDB_MODE=online)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("online", "run"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def make_logger(kind: str, run_dir: str, name: str, project: str = "cvlab") -> Logger | bool:
    """The run's logger: ``wandb`` (offline unless configured; sync later with ``wandb sync``),
    ``csv``, ``tensorboard``, or ``none``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir=run_dir, name="", version="")
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=run_dir, name="", version="")
    if kind == "wandb":
        offline = not wandb_is_configured() or os.environ.get("WANDB_MODE", "").lower() == "offline"
        logger = WandbLogger(save_dir=run_dir, name=name, project=project, offline=offline)
        logger._wandb_init.pop("anonymous", None)  # Lightning passes anonymous=None; wandb warns it "has no effect"
        return logger
    raise ValueError(f"unknown logger {kind!r}; expected wandb, csv, tensorboard or none")


class RunFolderBusyError(CvlabError):
    """Another live process owns the run folder."""


class RunNameError(CvlabError):
    """A run name that would put the run folder outside the run root."""


def check_run_name(name: str) -> None:
    """A run name is a relative path below the run root (``a``, ``zskd/teacher``): no ``..``, not absolute."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise RunNameError(
            f"--run.name {name!r} would leave the run root; use a plain name (letters, digits, '-', '_', '/'), "
            "or --run.dir DIR for an explicit folder"
        )


def _slurm_job() -> str | None:
    """``<job id>[_<array task>]`` of the SLURM job this process belongs to (kept across requeues), or None."""
    job = os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return None if job is None else f"{job}_{task}" if task is not None else job


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunFolderLock:
    """The owner lock of a run folder: ``<folder>/.cvlab.lock`` = ``{"pid", "host", "command", "since"}``.

    :meth:`acquire` creates it atomically or raises :class:`RunFolderBusyError` naming the live owner; a lock
    left by a process that no longer runs on this host is taken over with a warning. :meth:`release` removes
    it if it is still ours. A lock from another host cannot be checked and is refused (the line says how to
    clear it)."""

    NAME = ".cvlab.lock"

    def __init__(self, folder: str | os.PathLike, command: str | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self.command = command if command is not None else " ".join(["cvlab", *sys.argv[1:]])[:300]
        self.held = False

    def owner(self) -> dict[str, Any] | None:
        """The current lock's contents, or None when there is no lock (an unreadable one reads as ``{}``)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def live_owner(self) -> dict[str, Any] | None:
        """The owner if it still runs (or cannot be checked: another host), else None."""
        owner = self.owner()
        if owner is None:
            return None
        pid, host = owner.get("pid"), owner.get("host")
        job = _slurm_job()
        if job is not None and owner.get("slurm_job") == job and (pid, host) != (os.getpid(), socket.gethostname()):
            return None  # this SLURM job, requeued (maybe on another node): the instance that wrote it is gone
        if host not in (None, socket.gethostname()):
            return owner
        if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            return owner
        return None

    def busy_error(self, owner: dict[str, Any]) -> RunFolderBusyError:
        since = owner.get("since")
        when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
        remote = owner.get("host") not in (None, socket.gethostname())
        how = (f"if that process is gone, delete {self.path}" if remote
               else f"wait for it to end or stop it (kill {owner.get('pid')})")
        return RunFolderBusyError(
            f"run folder {self.folder} is in use by pid {owner.get('pid')} on {owner.get('host')} "
            f"(`{owner.get('command', '?')}`{when}); {how}, or use another --run.dir"
        )

    def check_free(self) -> None:
        """Raise :class:`RunFolderBusyError` if a live process owns the folder (takes nothing)."""
        owner = self.live_owner()
        if owner is not None:
            raise self.busy_error(owner)

    def acquire(self) -> RunFolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": time.time(),
              "slurm_job": _slurm_job()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.live_owner()
                if owner is not None:
                    raise self.busy_error(owner) from None
                stale = self.owner() or {}
                if stale.get("pid") != os.getpid():
                    warnings.warn(
                        f"run folder {self.folder}: taking over the lock of pid {stale.get('pid')} "
                        f"(`{stale.get('command', '?')}`), which no longer runs", stacklevel=2)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)  # also when the process ends without reaching the owner's release
            return self
        raise RunFolderBusyError(f"run folder {self.folder}: could not take its lock {self.path} (another process "
                                 "keeps taking it); use another --run.dir")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self.owner()
        if owner is not None and owner.get("pid") == os.getpid():
            try:
                self.path.unlink()
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
