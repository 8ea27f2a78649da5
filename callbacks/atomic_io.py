"""Writes that a kill cannot leave half done: write a temporary file beside the target, then rename.

Files get the mode a plain ``open()`` would give them (``0o666`` less the umask; group-readable under
the usual umask 022 or 002), not ``mkstemp``'s private 0600, so a group on a shared cluster can read
metrics, shards and manifests as it reads checkpoints. :class:`KeepPreviousCheckpointIO` writes
Lightning checkpoints the same way and keeps the one it replaces as ``<name>.previous`` until the
new one is complete on disk; :func:`readable_checkpoint` falls back to it when ``last.ckpt`` is damaged.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from cvlab.errors import CvlabError

#: suffix of the checkpoint kept while its successor is written
PREVIOUS_SUFFIX = ".previous"


def _umask() -> int:
    """The process umask, read without changing it (Linux), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: str | os.PathLike, write, keep_previous: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            os.replace(path, path.with_name(path.name + PREVIOUS_SUFFIX))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return _atomic(path, lambda f: torch.save(obj, f))


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    path = Path(path)
    if not path.is_file():
        return default
    return json.loads(path.read_text())


class KeepPreviousCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic and group-readable; the checkpoint a save replaces is
    kept as ``<name>.previous`` (one generation), so a damaged ``last.ckpt`` has a fallback."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        _atomic(path, lambda f: torch.save(checkpoint, f), keep_previous=True)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        super().remove_checkpoint(path)
        Path(str(path) + PREVIOUS_SUFFIX).unlink(missing_ok=True)


class CheckpointReadError(CvlabError):
    """A checkpoint given to resume or evaluate from cannot be used."""


def _read_lightning_checkpoint(path: Path) -> str | None:
    """None if ``path`` holds a Lightning checkpoint readable with ``weights_only=True``, else why not."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, __import__("pickle").UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"it is truncated, corrupt or not a weights-only torch file ({first[:160]})"
    if not isinstance(obj, dict) or "state_dict" not in obj or "global_step" not in obj:
        keys = sorted(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        return f"it is not a Lightning checkpoint (no state_dict/global_step; found {keys})"
    return None


def readable_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` if it is a readable Lightning checkpoint; else its ``.previous`` with a warning when that
    one is; else :class:`CheckpointReadError` with one line naming both."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(
            f"checkpoint not found: {path}; pass --ckpt_path last to resume this run folder's last.ckpt, or the path of an existing .ckpt"
        )
    why = _read_lightning_checkpoint(path)
    if why is None:
        return path
    prev = path.with_name(path.name + PREVIOUS_SUFFIX)
    if prev.is_file():
        prev_why = _read_lightning_checkpoint(prev)
        if prev_why is None:
            warnings.warn(f"cvlab: {path} is unusable ({why}); resuming from the previous checkpoint {prev}", stacklevel=2)
            return prev
        raise CheckpointReadError(
            f"cannot resume from {path} ({why}) nor from {prev} ({prev_why}); delete both to start this run afresh"
        )
    raise CheckpointReadError(
        f"cannot use checkpoint {path} ({path.stat().st_size} bytes): {why}; no previous checkpoint beside it, "
        "so delete it to start afresh or pass another --ckpt_path"
    )
