"""Log a grid of images where people look at them: wandb, TensorBoard, and a PNG in the run folder (ground floor)."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import make_grid, save_image


def image_grid(images: Tensor, nrow: int = 10, padding: int = 2) -> Tensor:
    """``(B, C, H, W)`` in [0, 1] -> one ``(3, H', W')`` grid, clamped to [0, 1]."""
    images = images.detach().float().clamp(0, 1).cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return make_grid(images, nrow=nrow, padding=padding, pad_value=1.0)


def log_image_grid(
    trainer: L.Trainer | None,
    key: str,
    images: Tensor,
    nrow: int = 10,
    step: int | None = None,
    caption: str | None = None,
    out_dir: str | Path | None = None,
) -> Path | None:
    """Log ``images`` (``(B, C, H, W)`` in [0, 1]) as one grid under ``key`` (e.g. ``synthesis/impressions``).

    Sent to every attached wandb / TensorBoard logger, and saved as
    ``<out_dir or trainer.default_root_dir>/images/<key>_<step>.png`` so CSV users see it too.
    Only rank 0 logs. Returns the PNG path (or ``None`` on other ranks).
    """
    if trainer is not None and not trainer.is_global_zero:
        return None
    grid = image_grid(images, nrow=nrow)
    step = step if step is not None else (trainer.global_step if trainer is not None else 0)
    for logger in trainer.loggers if trainer is not None else []:
        if isinstance(logger, WandbLogger):
            extra = {"caption": [caption]} if caption else {}  # WandbLogger takes no caption=None
            logger.log_image(key=key, images=[grid], step=step, **extra)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)
    root = Path(out_dir) if out_dir is not None else (Path(trainer.default_root_dir) if trainer is not None else None)
    if root is None:
        return None
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
    path = root / "images" / f"{name}_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path

