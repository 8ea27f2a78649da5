"""The shape every cvlab datamodule shares.

A dataset is decoded once into uint8 tensors ``(N, C, H, W)`` and int64 labels ``(N,)``. The loader
hands out whole uint8 batches with one index operation (``__getitems__``, no per-image work), and
``on_after_batch_transfer`` converts and augments the batch where it lives (on the GPU when training
there). Methods receive [0, 1] pixels: every network normalises its own input (a network trained here
with the task's ``mean``/``std``, which this class publishes; a teacher with its own). Subclasses only say
how to read their files (:meth:`load_split`) and what their images look like (class attributes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal, Union

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from cvlab.errors import CvlabError
from cvlab.image_ops import denormalize, normalize, random_crop, random_hflip, resize, to_float
from cvlab.task import TaskSpec
from datamodules.class_balanced import ClassBalancedImages, Split
from datamodules.data_root import resolve_data_dir

Augment = Literal["none", "crop", "flip", "crop_flip"]

#: a validation split: a count of training images (int), a share of them (float in (0, 1)), or ``None``
#: for the dataset's default; 0 validates on the test split (the old protocol, only to re-make old rows)
ValSize = Union[int, float, None]


def validation_count(val_size: ValSize, default: int | float, n_train: int) -> int:
    """How many of ``n_train`` training images to hold out for validation.

    ``val_size`` ``None`` takes ``default``: a count is capped at a tenth of the training images (5,000 of
    MNIST's 60,000; 1,240 of the 12,406 of long-tailed CIFAR-10; 6 of a 60-image test fixture), a share
    is taken as is. An explicit count must leave training images; a share is rounded down. At least one
    image is held out whenever a split is asked for and there are two or more. 0 holds out nothing.
    """
    if isinstance(val_size, float) and val_size > 1 and val_size.is_integer():
        val_size = int(val_size)  # the CLI parses Union[int, float] "1000" as 1000.0: a count all the same
    if val_size is None:
        if n_train < 2:
            return 0
        val_size = default if isinstance(default, float) else min(default, max(1, n_train // 10))
    if isinstance(val_size, bool) or val_size < 0 or (isinstance(val_size, float) and val_size >= 1):
        raise CvlabError(f"val_size must be a count >= 0 or a share in (0, 1), got {val_size!r}")
    if val_size == 0:
        return 0
    n = int(val_size * n_train) if isinstance(val_size, float) else int(val_size)
    if n >= n_train:
        raise CvlabError(f"val_size {val_size} leaves none of the {n_train} training images; "
                         "set --data.init_args.val_size to a smaller count or a share such as 0.1")
    return max(n, 1) if n_train >= 2 else 0


class TensorBatchDataset(Dataset):
    """``(images, labels)`` tensors served a batch at a time: ``__getitems__`` is one gather."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def batch_collate(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The dataset already returns a stacked batch; nothing to collate."""
    return batch


class EpochSeededRandomSampler(RandomSampler):
    """A random permutation per epoch, seeded by ``(seed, epoch)``: resuming a run replays its order.

    Lightning calls ``set_epoch`` on it each epoch. It is a ``RandomSampler``, so under DDP Lightning
    replaces it with ``DistributedSampler(shuffle=True, seed=<seed_everything>)``, which draws the same
    permutation when ``data.seed`` equals ``seed_everything`` (both 0 by default).
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        super().__init__(range(num_samples))
        self._n = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[int]:
        # the same permutation as DistributedSampler(seed=seed) at this epoch: under DDP rank r takes
        # every world_size-th index of it, so 2 processes see exactly the single process's batches
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self._n, generator=g).tolist())


class TensorImageDataModule(L.LightningDataModule):
    """Base class: uint8 tensors in memory, batched augmentation and normalisation on device.

    Args:
        data_dir: dataset root (default ``$CVLAB_DATA`` or ``./data``).
        batch_size: per-device training batch size.
        eval_batch_size: per-device batch size for validation/test/predict (default: ``batch_size``).
        num_workers: loader workers (0 is fastest for in-memory tensors).
        val_size: the validation split, held out of the training images with ``seed``: a count, a share
            in (0, 1), or ``None`` for the dataset's ``default_val_size`` (5,000 for MNIST, Fashion-MNIST,
            KMNIST, CIFAR and SVHN, at most a tenth of the training set; see :func:`validation_count`).
            Validation metrics drive every choice and every ``best``; the test split is evaluated once,
            after fit, on the final weights. 0 validates on the test split (the old protocol: only to
            re-make a row recorded under it; docs/DECISIONS.md).
        augment: batch augmentation for training: random crop (padding = size / 8), horizontal flip.
        image_size: resize every image once at load time (e.g. 32 for LeNet-5 on MNIST); ``None`` keeps it.
        download: let torchvision fetch missing files (needs a network).
        seed: seeds the shuffling, the validation split and the augmentation.
    """

    #: set by subclasses
    num_classes: int = 10
    in_channels: int = 3
    native_size: int = 32
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    default_augment: Augment = "none"
    default_val_size: int | float = 5000

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: ValSize = None,
        augment: Augment | None = None,
        image_size: int | None = None,
        download: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir = resolve_data_dir(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        validation_count(val_size, self.default_val_size, 2**62)  # a bad value fails here, not at setup
        self.val_count = 0  # the resolved split, set by setup()
        self.train_indices: Tensor | None = None  # into the loaded training split, set by setup()
        self.val_indices: Tensor | None = None
        self.augment: Augment = augment if augment is not None else self.default_augment
        self.image_size = image_size or self.native_size
        self.download = download
        self.seed = seed
        self.train_x: Tensor | None = None
        self.train_y: Tensor | None = None
        self.val_x: Tensor | None = None
        self.val_y: Tensor | None = None
        self.test_x: Tensor | None = None
        self.test_y: Tensor | None = None

    # --- what subclasses provide -------------------------------------------------------------
    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Read one split from disk: uint8 ``(N, C, H, W)`` and int64 ``(N,)``.

        Must raise :class:`datamodules.errors.DatasetNotFoundError` naming the expected files when
        they are missing and ``self.download`` is off.
        """
        raise NotImplementedError

    def select_train(self, labels: Tensor) -> Tensor | None:
        """Indices of the training examples to keep (e.g. a long-tailed subset); ``None`` keeps all."""
        return None

    # --- Lightning hooks --------------------------------------------------------------------
    def prepare_data(self) -> None:
        # rank 0 only: lets torchvision download/extract before other ranks read
        if self.download:
            self.load_split(train=True)
            self.load_split(train=False)

    def split_indices(self, n: int, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(train, validation)`` indices into the ``n`` loaded training images, drawn with ``seed``.

        The validation images come out of the training images. When :meth:`select_train` keeps a subset
        (a long tail), they are drawn from the images it leaves out, if there are enough, so that the
        training subset and its class profile stay whole.
        """
        pool = torch.arange(n) if keep is None else torch.as_tensor(keep, dtype=torch.long)
        count = validation_count(self.val_size, self.default_val_size, pool.numel())
        g = torch.Generator().manual_seed(self.seed)
        if count == 0:
            return pool, pool[:0]
        if keep is not None:
            left_out = torch.ones(n, dtype=torch.bool)
            left_out[pool] = False
            rest = left_out.nonzero().squeeze(1)
            if rest.numel() >= count:
                return pool, rest[torch.randperm(rest.numel(), generator=g)[:count]]
        perm = pool[torch.randperm(pool.numel(), generator=g)]
        return perm[count:], perm[:count]

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        x, y = self.load_split(train=True)
        self.train_indices, self.val_indices = self.split_indices(y.shape[0], self.select_train(y))
        self.val_count = self.val_indices.numel()
        self.train_x, self.train_y = resize(x[self.train_indices], self.image_size), y[self.train_indices]
        tx, ty = self.load_split(train=False)
        self.test_x, self.test_y = resize(tx, self.image_size), ty
        if self.val_count > 0:
            self.val_x, self.val_y = resize(x[self.val_indices], self.image_size), y[self.val_indices]
        else:  # val_size 0: the old protocol, validation on the test split
            self.val_x, self.val_y = self.test_x, self.test_y

    def _loader(self, x: Tensor, y: Tensor, train: bool) -> DataLoader:
        ds = TensorBatchDataset(x, y)
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochSeededRandomSampler(len(ds), self.seed) if train else None,
            shuffle=False,  # the sampler shuffles the training split
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=batch_collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_x, self.train_y, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_x, self.val_y, train=False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_x, self.test_y, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        x = to_float(x)
        trainer = self.trainer
        if trainer is not None and trainer.training and self.augment != "none":
            x = self.augment_batch(x, self._augment_generator(x.device, trainer))
        return x, y

    # --- batch transforms -------------------------------------------------------------------
    def _augment_generator(self, device: torch.device, trainer: L.Trainer) -> torch.Generator:
        # seeded by (seed, rank, step): repeatable and identical after resume from a checkpoint
        g = torch.Generator(device=device)
        g.manual_seed(hash((self.seed, trainer.global_rank, trainer.global_step, trainer.current_epoch)) % (2**62))
        return g

    def augment_batch(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training augmentation on a float batch in [0, 1]."""
        if self.augment in ("crop", "crop_flip"):
            x = random_crop(x, max(1, self.image_size // 8), generator)
        if self.augment in ("flip", "crop_flip"):
            x = random_hflip(x, generator)
        return x

    def normalize(self, x: Tensor) -> Tensor:
        """[0, 1] pixels -> the task's normalised space (what a network trained here sees inside)."""
        return normalize(x, self.mean, self.std)

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised network input -> [0, 1] pixels."""
        return denormalize(x, self.mean, self.std)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    def class_images(self, split: Split = "train") -> ClassBalancedImages:
        """The ``split``'s images indexed by class, for class-balanced [0, 1] pixel draws
        (:class:`datamodules.class_balanced.ClassImageSource`); built once per split after :meth:`setup`."""
        self.setup("fit" if split == "train" else "test")
        cache = self.__dict__.setdefault("_class_images", {})
        if split not in cache:
            x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
            cache[split] = ClassBalancedImages(x, y, self.num_classes)
        return cache[split]

    @property
    def task_spec(self) -> TaskSpec:
        """What this task's data are (:class:`cvlab.task.TaskSpec`): the one thing a system reads of it. The
        training images per class are filled in once the data are set up."""
        counts = ()
        if self.train_y is not None:
            y = self.train_y.reshape(-1).long()
            counts = tuple(int(c) for c in torch.bincount(y[y >= 0], minlength=self.num_classes))  # -1: unlabelled
        names = getattr(self, "class_names", None) or ()
        return TaskSpec(num_classes=int(self.num_classes), in_channels=int(self.in_channels),
                        image_size=int(self.image_size), mean=tuple(float(m) for m in self.mean),
                        std=tuple(float(s) for s in self.std), class_names=tuple(names), name=type(self).__name__,
                        train_class_counts=counts)
