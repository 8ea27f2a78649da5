"""Reading the shards of predict-style stages (synthesis, reconstructions), and resuming them.

A stage's ``predict_step`` returns a dict of tensors that includes ``"index"`` ``(B,)``, the global
indices of its targets; :class:`callbacks.shard_writer.ShardWriter` stores each batch atomically as
``<folder>/shard-<first>-<last>-r<rank>.pt``. A killed run leaves only whole shards, and
:func:`pending_indices` tells the next run which targets are left, whatever the number of devices
was. Reading lives here, with the data; writing is the callback's.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from cvlab.errors import CvlabError


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
