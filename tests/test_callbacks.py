"""Shared callbacks: atomic files, metrics.json merging, shards (resume, fingerprint), image grids."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from cvlab.artifacts import (
    ShardMismatchError,
    atomic_torch_save,
    atomic_write_json,
    check_manifest,
    load_shards,
    merge_metrics,
    pending_indices,
    read_json,
)
from cvlab.image_log import image_grid, log_image_grid


def test_atomic_write_leaves_no_temp_file_and_keeps_old_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})  # not serialisable: the write fails midway
    assert read_json(path) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_merge_metrics_keeps_earlier_keys(tmp_path: Path) -> None:
    p = tmp_path / "metrics.json"
    merge_metrics(p, {"fit/wall_s": 3.0, "val/acc": 0.5})
    out = merge_metrics(p, {"test/acc": 0.9, "val/acc": 0.6})
    assert out == {"fit/wall_s": 3.0, "val/acc": 0.6, "test/acc": 0.9} == read_json(p)


def test_shards_resume_and_fingerprint(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    check_manifest(folder, {"iterations": 10, "classes": 10})
    for lo in (0, 4):
        idx = torch.arange(lo, lo + 4)
        atomic_torch_save({"index": idx, "x": idx.float() * 2}, folder / f"shard-{lo:09d}-{lo + 3:09d}-r0.pt")
    assert pending_indices(folder, 12).tolist() == [8, 9, 10, 11]
    out = load_shards(folder)
    assert out["index"].tolist() == list(range(8))
    assert torch.equal(out["x"], torch.arange(8).float() * 2)
    check_manifest(folder, {"iterations": 10, "classes": 10})  # same config: fine
    with pytest.raises(ShardMismatchError, match="iterations: folder has 10, config has 20"):
        check_manifest(folder, {"iterations": 20, "classes": 10})


def test_image_grid_and_png(tmp_path: Path) -> None:
    imgs = torch.rand(20, 1, 8, 8)
    grid = image_grid(imgs, nrow=10)
    assert grid.shape == (3, 2 * (8 + 2) + 2, 10 * (8 + 2) + 2)  # 2 rows of 10, padding 2, grey -> RGB
    assert grid.min() >= 0 and grid.max() <= 1
    path = log_image_grid(None, "synthesis/impressions", imgs, out_dir=tmp_path, step=3)
    assert path == tmp_path / "images" / "synthesis_impressions_0000003.png" and path.is_file()


@pytest.mark.parametrize("caption", [None, "per class"])
def test_image_grid_reaches_wandb_and_tensorboard(tmp_path: Path, monkeypatch, caption) -> None:
    """The default logger is wandb: a grid with or without a caption must log (wandb offline, no network)."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wb = WandbLogger(save_dir=str(tmp_path), offline=True, project="cvlab-test")
    tb = TensorBoardLogger(save_dir=str(tmp_path))
    trainer = L.Trainer(logger=[wb, tb], default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False)
    try:
        path = log_image_grid(trainer, "synthesis/impressions", torch.rand(4, 1, 8, 8), nrow=2, caption=caption)
    finally:
        wb.experiment.finish()
    assert path is not None and path.is_file()
    assert list(Path(tb.log_dir).glob("events.out.tfevents.*"))


def test_load_shards_drops_ddp_repeats(tmp_path: Path) -> None:
    # DDP pads rank 1's last batch with a repeat of index 0
    atomic_torch_save({"index": torch.tensor([0, 2]), "x": torch.tensor([0.0, 2.0])},
                      tmp_path / "shard-000000000-000000002-r0.pt")
    atomic_torch_save({"index": torch.tensor([1, 0]), "x": torch.tensor([1.0, 0.0])},
                      tmp_path / "shard-000000000-000000001-r1.pt")
    out = load_shards(tmp_path)
    assert out["index"].tolist() == [0, 1, 2] and out["x"].tolist() == [0.0, 1.0, 2.0]
