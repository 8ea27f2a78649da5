"""Target domains made offline from a task: the same images under a fixed pixel-space shift.

``invert``: ``x -> 1 - x`` (MNIST -> inverted MNIST: white digits on black become black on white), the offline
domain pair of the source-free adaptation experiments (Data Impressions, TPAMI 2022); ``none`` keeps the images, for
a real target dataset given to a source model of another input shape; ``texture``: each image alpha-blended over a
texture of the embedded shapes data's families (:func:`datamodules.synthetic.generate_shapes_with_backgrounds`,
random family per image, seeded per split), ``a * x + (1 - a) * texture`` with ``a = x`` on [0, 1] pixels, so bright
strokes stay and the dark background becomes texture (MNIST -> MNIST on textured backgrounds, in the spirit of
MNIST-M) (``channels``: grey <-> colour, e.g. MNIST as
3-channel images for an SVHN model; ``task``'s ``image_size`` sets the size). The training split is the
unlabelled target data of an adaptation method (labels are kept only so that evaluation can use them); validation
and test are the task's held-out and test images, shifted the same way.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from datamodules.base import TensorImageDataModule
from datamodules.transfer_sets import match_channels


class DomainShiftDataModule(TensorImageDataModule):
    """``task``'s splits under ``shift``; image shape, classes and statistics stay the task's.

    Args:
        task: the source task's datamodule (its splits, validation split included).
        shift: ``invert`` (``1 - x`` on [0, 1] pixels, ``255 - x`` on the stored uint8), ``texture`` (blended over
            the shapes data's textures, see the module doc) or ``none``.
        channels: convert the images to this many channels (grey by channel mean, colour by repeating grey);
            ``None`` keeps the task's.
        batch_size, eval_batch_size, num_workers, seed: as in :class:`TensorImageDataModule`.
    """

    def __init__(self, task: TensorImageDataModule, shift: Literal["invert", "texture", "none"] = "invert",
                 channels: int | None = None, batch_size: int = 128, eval_batch_size: int | None = None,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(data_dir=str(task.data_dir), batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, augment="none", image_size=task.image_size, seed=seed)
        self.task, self.shift = task, shift
        self.num_classes, self.in_channels = task.num_classes, channels or task.in_channels
        self.mean, self.std = task.mean, task.std
        if self.in_channels != task.in_channels:  # statistics of the converted images: grey ones repeated or averaged
            m, sd = sum(task.mean) / len(task.mean), sum(task.std) / len(task.std)
            self.mean, self.std = (m,) * self.in_channels, (sd,) * self.in_channels

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        t = self.task
        t.setup(stage)
        for split in ("train", "val", "test"):
            x = match_channels(getattr(t, f"{split}_x"), self.in_channels)
            if self.shift == "invert":
                x = 1 - x if x.dtype.is_floating_point else 255 - x
            elif self.shift == "texture":
                x = blend_over_textures(x, seed=self.seed * 3 + ("train", "val", "test").index(split))
            setattr(self, f"{split}_x", x)
            setattr(self, f"{split}_y", getattr(t, f"{split}_y"))


def blend_over_textures(x: Tensor, seed: int) -> Tensor:
    """``a * x + (1 - a) * t`` with ``a = x`` (pixels in [0, 1]): stored uint8 ``(N, C, H, W)`` in, uint8 out; ``t`` a
    texture per image from the shapes data's families at ``x``'s size (grey: the channel mean)."""
    from datamodules.synthetic import generate_shapes_with_backgrounds

    if x.shape[0] == 0:
        return x
    _, tex = generate_shapes_with_backgrounds(x.shape[0], seed, x.shape[-1], background="random")
    t = tex.float().mean(1, keepdim=True) if x.shape[1] == 1 else tex.float()
    a = x.float() / 255
    return (a * x.float() + (1 - a) * t).round_().clamp_(0, 255).to(torch.uint8)
