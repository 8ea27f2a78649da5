"""Artifacts a run leaves: files that a kill cannot leave half done, metrics.json, and the shard store.

- **Atomic writes**: write a temporary file beside the target, then rename. Files get the mode a plain ``open()``
  would give them (``0o666`` less the umask), not ``mkstemp``'s private 0600, so a group on a shared cluster can
  read metrics, shards and manifests as it reads checkpoints. :class:`KeepPreviousCheckpointIO` writes Lightning
  checkpoints the same way and keeps the one it replaces as ``<name>.previous`` until the new one is complete on
  disk; :func:`readable_checkpoint` falls back to it when ``last.ckpt`` is damaged.
- **metrics.json**: :func:`merge_metrics` (flat ``stage/metric`` keys).
- **The shard store** of predict-style stages (synthesis, reconstructions): ``predict_step`` returns a dict of
  tensors with ``"index"`` ``(B,)``; :class:`ShardWriter` (a prediction-writer callback that a predict-style
  method adds through :func:`with_shard_writer`) stores each batch as
  ``<folder>/shard-<first>-<last>-r<rank>.pt``; ``manifest.json`` holds the config's fingerprint
  (:func:`check_manifest`), so a folder written by another config is refused instead of mixed in. A killed run
  leaves only whole shards, and :func:`pending_indices` tells the next run which targets are left, whatever the
  number of devices was.

Ground floor: every layer may import it; it imports nothing of cvlab but the errors.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

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

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        _atomic(path, lambda f: torch.save(checkpoint, f), keep_previous=True)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        super().remove_checkpoint(path)
        Path(str(path) + PREVIOUS_SUFFIX).unlink(missing_ok=True)


class CheckpointReadError(CvlabError):
    """A checkpoint given to resume or evaluate from cannot be used."""


#: what ``torch.load`` raises on a truncated, corrupt or foreign file (catch it to turn it into one line)
UNREADABLE_TORCH_FILE = (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError)


def _read_lightning_checkpoint(path: Path) -> str | None:
    """None if ``path`` holds a Lightning checkpoint readable with ``weights_only=True``, else why not."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_TORCH_FILE as e:
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
            f"checkpoint not found: {path}; pass --ckpt_path last to resume this run folder's last.ckpt, "
            "or the path of an existing .ckpt"
        )
    why = _read_lightning_checkpoint(path)
    if why is None:
        return path
    prev = path.with_name(path.name + PREVIOUS_SUFFIX)
    if prev.is_file():
        prev_why = _read_lightning_checkpoint(prev)
        if prev_why is None:
            warnings.warn(f"cvlab: {path} is unusable ({why}); resuming from the previous checkpoint {prev}",
                          stacklevel=2)
            return prev
        raise CheckpointReadError(
            f"cannot resume from {path} ({why}) nor from {prev} ({prev_why}); delete both to start this run afresh"
        )
    raise CheckpointReadError(
        f"cannot use checkpoint {path} ({path.stat().st_size} bytes): {why}; no previous checkpoint beside it, "
        "so delete it to start afresh or pass another --ckpt_path"
    )


# -- metrics.json ----------------------------------------------------------------------------------------------


def merge_metrics(path: str | Path, metrics: dict[str, float]) -> dict[str, float]:
    """Merge ``metrics`` into the JSON file at ``path`` (atomically) and return the result."""
    merged = dict(read_json(path, default={}))
    merged.update(metrics)
    atomic_write_json(path, merged)
    return merged


# -- the shard store ---------------------------------------------------------------------------------------------


class ShardMismatchError(CvlabError):
    """A shard folder belongs to another config."""


def check_manifest(folder: str | Path, fingerprint: dict[str, Any]) -> None:
    """Create ``manifest.json`` or verify that the folder was written with the same fingerprint."""
    folder = Path(folder)
    path = folder / "manifest.json"
    fp = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    old = read_json(path)
    if old is None:
        atomic_write_json(path, fp)
        return
    if old != fp:
        diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        detail = ", ".join(f"{k}: folder has {old.get(k)!r}, config has {fp.get(k)!r}" for k in diff[:4])
        raise ShardMismatchError(
            f"shard folder {folder} was written by a different config ({detail}); "
            "use another run folder or delete that one"
        )


def shard_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("shard-*.pt"))


def load_shards(folder: str | Path) -> dict[str, Tensor]:
    """Concatenate every shard's tensors, ordered by ``index``, each index once (weights-only load).

    DDP samplers pad the last batch of a rank with repeated targets; the repeats are dropped.
    """
    files = shard_files(folder)
    if not files:
        raise CvlabError(f"no shards in {folder}: run the synthesis stage first")
    parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = out["index"].argsort(stable=True)
    out = {k: v[order] for k, v in out.items()}
    keep = torch.ones_like(out["index"], dtype=torch.bool)
    keep[1:] = out["index"][1:] != out["index"][:-1]
    return {k: v[keep] for k, v in out.items()}


def pending_indices(folder: str | Path | None, total: int) -> Tensor:
    """Indices in ``[0, total)`` not yet covered by a shard in ``folder`` (all of them if ``None``)."""
    done = torch.zeros(total, dtype=torch.bool)
    for f in shard_files(folder) if folder is not None else []:
        done[torch.load(f, map_location="cpu", weights_only=True)["index"]] = True
    return (~done).nonzero().flatten()


def shard_folder(trainer: L.Trainer | None) -> Path | None:
    """The folder of the trainer's shard writer (a callback with ``resolve_folder``), if any."""
    for cb in trainer.callbacks if trainer is not None else []:
        if hasattr(cb, "resolve_folder"):
            return Path(cb.resolve_folder(trainer))
    return None


def all_shards_on_rank_zero(trainer: L.Trainer) -> dict[str, Tensor] | None:
    """At the end of a sharded predict run: wait until every rank has written its shards, then return
    them all (:func:`load_shards`) on global rank zero and ``None`` on the other ranks."""
    trainer.strategy.barrier()
    return load_shards(shard_folder(trainer)) if trainer.is_global_zero else None


class ShardWriter(BasePredictionWriter):
    """Write each predicted batch (a dict of tensors with ``"index"``) as one atomic shard.

    Args:
        folder: where shards go (default ``<run folder>/shards``).
    """

    def __init__(self, folder: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.folder = folder

    def resolve_folder(self, trainer: L.Trainer) -> Path:
        return Path(self.folder) if self.folder else Path(trainer.default_root_dir) / "shards"

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        if not isinstance(prediction, dict) or "index" not in prediction:
            raise TypeError("ShardWriter expects predict_step to return a dict of tensors with an 'index' entry")
        out = {k: v.detach().cpu().contiguous() for k, v in prediction.items()}
        idx = out["index"]
        name = f"shard-{int(idx.min()):09d}-{int(idx.max()):09d}-r{trainer.global_rank}.pt"
        atomic_torch_save(out, self.resolve_folder(trainer) / name)


def with_shard_writer(trainer: L.Trainer | None) -> list[L.Callback]:
    """For ``configure_callbacks`` of predict-style modules: a :class:`ShardWriter` unless the trainer has one."""
    has = trainer is not None and any(isinstance(c, ShardWriter) for c in trainer.callbacks)
    return [] if has else [ShardWriter()]
