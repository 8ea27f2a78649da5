"""Class-balanced draws of [0, 1] pixel batches from a labelled image set.

A method that needs real images *per class* rather than shuffled batches (Dataset Condensation matches
the gradients of every class's real batch) reads them through this interface, which a datamodule
declares with :class:`ClassImageSource` (``class_images(split)``); it never reads the datamodule's
tensors directly. Images stay uint8 where they are kept and become [0, 1] floats only when drawn, so
normalisation stays inside the networks.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from cvlab.errors import CvlabError
from cvlab.image_ops import to_float

Split = Literal["train", "test"]


class ClassBalancedImages:
    """A labelled uint8 image set ``(N, C, H, W)`` indexed by class.

    ``table`` is the ``(K, Nmax)`` table of image indices per class in dataset order, padded with -1;
    ``counts`` the images per class ``(K,)``. :meth:`draw` gives ``n`` distinct random images of every
    class at once (one ``topk`` over the table, no loop over classes), seeded, so every rank of a
    distributed run draws the same batch.
    """

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int) -> None:
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise CvlabError(f"class-balanced images need (N, C, H, W) images and (N,) labels; got "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        labels = labels.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise CvlabError(f"labels must lie in [0, {num_classes}); got {int(labels.min())}..{int(labels.max())}")
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.counts = torch.bincount(labels, minlength=num_classes)  # (K,)
        order = torch.argsort(labels, stable=True)
        nmax = int(self.counts.max()) if labels.numel() else 0
        table = torch.full((num_classes, nmax), -1, dtype=torch.long, device=labels.device)
        starts = torch.cumsum(self.counts, 0) - self.counts
        pos = torch.arange(labels.numel(), device=labels.device) - torch.repeat_interleave(starts, self.counts)
        table[labels[order], pos] = order
        self.table = table

    def to(self, device: torch.device | str) -> ClassBalancedImages:
        """The same set with its tensors on ``device`` (the table is moved, not rebuilt)."""
        out = ClassBalancedImages.__new__(ClassBalancedImages)
        out.images, out.labels, out.num_classes = self.images.to(device), self.labels.to(device), self.num_classes
        out.counts, out.table = self.counts.to(device), self.table.to(device)
        return out

    @property
    def device(self) -> torch.device:
        return self.table.device

    def pixels(self, idx: Tensor) -> Tensor:
        """The images at ``idx`` (any shape) as [0, 1] floats ``(*idx.shape, C, H, W)``."""
        x = to_float(self.images[idx.flatten()])
        return x.view(*idx.shape, *x.shape[1:])

    def draw_indices(self, n: int, seed: int) -> Tensor:
        """``(K, n)`` indices of ``n`` distinct random images of every class, seeded by ``seed``."""
        least = int(self.counts.min())
        if n > least:
            k = int(self.counts.argmin())
            raise CvlabError(f"asked for {n} images of every class, but class {k} has {least}")
        g = torch.Generator(device=self.device).manual_seed(seed)
        u = torch.rand(self.table.shape, generator=g, device=self.device)
        u = u.masked_fill(self.table < 0, 2.0)  # padding is never picked
        pick = u.topk(n, dim=1, largest=False).indices  # (K, n)
        return self.table.gather(1, pick)

    def draw(self, n: int, seed: int) -> Tensor:
        """``n`` distinct random images of every class, [0, 1] pixels ``(K, n, C, H, W)``, seeded by ``seed``."""
        return self.pixels(self.draw_indices(n, seed))


@runtime_checkable
class ClassImageSource(Protocol):
    """What a datamodule declares when it can hand out its images per class (after ``setup``)."""

    def class_images(self, split: Split = "train") -> ClassBalancedImages:
        """The ``split``'s images indexed by class."""
        ...


def class_image_source(datamodule: object, owner: str) -> ClassImageSource:
    """The datamodule as a :class:`ClassImageSource`; one line naming ``owner`` when it is none."""
    if not isinstance(datamodule, ClassImageSource):
        raise CvlabError(f"{owner} draws real images per class, which {type(datamodule).__name__} does not offer "
                         "(a datamodule with class_images(split), e.g. any datamodules.TensorImageDataModule)")
    return datamodule
