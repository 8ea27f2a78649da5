"""Writing shards for predict-style work (synthesis, reconstructions): one atomic file per batch.

``predict_step`` returns a dict of tensors that includes ``"index"`` ``(B,)``: the global indices of
the targets in the batch. :class:`ShardWriter` saves each batch as
``<folder>/shard-<first>-<last>-r<rank>.pt`` (temp file then rename), so a killed run leaves only
whole shards; reading and resuming are in :mod:`datamodules.shards`. ``manifest.json`` holds the
config fingerprint: a folder written by a different config is refused instead of being mixed in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from callbacks.atomic_io import atomic_torch_save, atomic_write_json, read_json
from cvlab.errors import CvlabError


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

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
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
