"""Deterministic run folders and the logger that writes into them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

#: keys that do not change what a run computes, left out of its identity
_IGNORED_KEYS = ("run", "ckpt_path", "config", "trainer.logger", "trainer.enable_progress_bar", "trainer.default_root_dir")


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
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir=run_dir, name="", version="")
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=run_dir, name="", version="")
    if kind == "wandb":
        offline = not wandb_is_configured() or os.environ.get("WANDB_MODE", "").lower() == "offline"
        return WandbLogger(save_dir=run_dir, name=name, project=project, offline=offline)
    raise ValueError(f"unknown logger {kind!r}; expected wandb, csv, tensorboard or none")
