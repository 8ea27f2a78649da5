"""Datamodules over image files: ImageNet and any ``ImageFolder``-style dataset in class folders; iNaturalist 2019
(torchvision's reader, the competition's JSON splits).

Layout (torchvision's ``ImageFolder`` / ``ImageNet`` after extraction)::

    <root>/<split>/<class>/<image>.{JPEG,jpg,jpeg,png,bmp,webp}

Classes are the sorted folder names of a split (ImageNet: the 1,000 WordNet ids ``n01440764`` ...,
which gives the standard label order). Such datasets do not fit in memory, so unlike the tensor
datamodules (:mod:`datamodules.base`) images are decoded by the loader's workers, one file each, into
fixed-size uint8 crops (training: a random resized crop drawn from the worker's generator, which Lightning's
``seed_everything(workers=True)`` seeds per run, rank, worker and epoch; evaluation:
resize the shorter side to ``image_size * 256 / 224`` and take the centre crop); the batch is converted to
[0, 1] floats and flipped where it lives, by the base class. The validation split is held out of the
training images (``val_size``, default 10,000, at most a tenth); the test split is the ``val`` folder
(ImageNet's labelled validation set, the usual test set). A test-only run (``cvlab test``) reads only
the test folder, so a training folder need not exist.

Nothing is downloaded: ImageNet's licence asks each user to fetch it (``download: true`` is refused with
the expected layout). A missing folder, a split without images, classes that differ between splits and
an undecodable file each fail with one line naming the path.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image

from datamodules.base import EpochSeededRandomSampler, TensorImageDataModule, ValSize
from datamodules.errors import CvlabError, DatasetCorruptError, DatasetNotFoundError

__all__ = ["ImageFolderDataModule", "ImageNetDataModule", "INaturalist2019DataModule", "FolderDataset",
           "scan_class_folders"]

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp"})


def scan_class_folders(split_dir: Path) -> tuple[list[str], list[Path], Tensor]:
    """``(class names, files, labels)`` of ``split_dir/<class>/<image>``: sorted classes, sorted files."""
    if not split_dir.is_dir():
        raise DatasetNotFoundError(f"no folder {split_dir} (expected <root>/<split>/<class>/<image>.JPEG)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image>.JPEG)")
    files: list[Path] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [k] * len(found)
    if not files:
        raise DatasetNotFoundError(f"{split_dir} has class folders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes, files, torch.tensor(labels, dtype=torch.long)


def decode_rgb(path: Path) -> Tensor:
    """uint8 ``(3, H, W)``; an unreadable file fails with one line naming it."""
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetCorruptError(f"cannot decode image {path}: {first}") from None


def center_crop(img: Tensor, size: int, resize_size: int) -> Tensor:
    """Resize the shorter side to ``resize_size`` (antialiased), then the central ``size x size``."""
    h, w = img.shape[-2:]
    # torchvision's Resize(int): the shorter side to resize_size, the longer scaled and truncated
    nh, nw = (resize_size, int(resize_size * w / h)) if h <= w else (int(resize_size * h / w), resize_size)
    nh, nw = max(size, nh), max(size, nw)
    out = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))  # torchvision's CenterCrop offsets
    return out[:, top:top + size, left:left + size].round_().clamp_(0, 255).to(torch.uint8)


def random_resized_crop(img: Tensor, size: int, generator: torch.Generator | None = None,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Inception-style crop: a random area share in ``scale`` and aspect ratio in ``ratio`` (log-uniform),
    resized to ``size x size``; the whole image when ten draws do not fit (as torchvision)."""
    h, w = img.shape[-2:]
    area = h * w
    log_r = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_r[0].item(), log_r[1].item(), generator=generator)).item()
        cw, ch = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            break
    else:
        top, left, ch, cw = 0, 0, h, w
    crop = img[None, :, top:top + ch, left:left + cw].float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


class FolderDataset(Dataset):
    """Files and labels decoded one at a time into ``size x size`` uint8 crops (random when ``train``)."""

    def __init__(self, files: list[Path], labels: Tensor, size: int, resize_size: int, train: bool) -> None:
        if len(files) != labels.shape[0]:
            raise ValueError(f"{len(files)} files but {labels.shape[0]} labels")
        self.files, self.labels = files, labels
        self.size, self.resize_size, self.train = size, resize_size, train

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = decode_rgb(self.files[i])
        if self.train:
            return random_resized_crop(img, self.size), self.labels[i]
        return center_crop(img, self.size, self.resize_size), self.labels[i]


class ImageFolderDataModule(TensorImageDataModule):
    """Images in class folders (see :mod:`datamodules.folders`), decoded by loader workers.

    Args:
        root: the folder holding the splits (default ``<data_dir>/<folder>``, ``folder`` a class attribute).
        num_classes: the expected number of classes; the folders must hold exactly that many.
        train_split / test_split: split folder names (``train`` / ``val``).
        image_size: the crop side (224); evaluation resizes the shorter side to ``image_size * 256 / 224``.
        augment: ``"flip"`` (default) or ``"none"`` on top of the training crop.
        Others as :class:`datamodules.base.TensorImageDataModule`.
    """

    folder: str = "images"
    native_size = 224
    default_augment = "flip"
    default_val_size = 10000
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        data_dir: str | None = None,
        root: str | None = None,
        num_classes: int | None = None,
        train_split: str = "train",
        test_split: str = "val",
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        val_size: ValSize = None,
        augment: str | None = None,
        image_size: int | None = None,
        download: bool = False,
        seed: int = 0,
    ) -> None:
        if augment not in (None, "none", "flip"):
            raise CvlabError(
                f"augment {augment!r}: folder datasets take 'flip' or 'none' "
                "(the training crop is a random resized crop)")
        if download:
            raise DatasetNotFoundError(
                f"{type(self).__name__} cannot download its data; place it as <root>/{train_split}/<class>/<image> "
                f"and <root>/{test_split}/<class>/<image> and pass --data.init_args.root")
        super().__init__(data_dir=data_dir, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, val_size=val_size, augment=augment, image_size=image_size,
                         download=False, seed=seed)
        self.root = Path(root) if root else Path(self.data_dir) / self.folder
        if num_classes is not None:
            self.num_classes = num_classes
        self.train_split, self.test_split = train_split, test_split
        self.resize_size = round(self.image_size * 256 / 224)
        self.class_names: list[str] | None = None
        self.train_set: FolderDataset | None = None
        self.val_set: FolderDataset | None = None
        self.test_set: FolderDataset | None = None

    def _check_classes(self, classes: list[str], split: str) -> None:
        if self.class_names is not None and classes != self.class_names:
            extra = sorted(set(classes) ^ set(self.class_names))[:3]
            raise DatasetCorruptError(
                f"{self.root / split} has other class folders than the other split (e.g. {extra})")
        if len(classes) != self.num_classes:
            raise DatasetCorruptError(f"{self.root / split} has {len(classes)} class folders, {type(self).__name__} "
                                      f"expects {self.num_classes} (set --data.init_args.num_classes)")
        self.class_names = classes

    def list_split(self, split: str) -> tuple[list[str], list[Path], Tensor]:
        """``(class names, files, labels)`` of one split; here the class folders of ``<root>/<split>``."""
        return scan_class_folders(self.root / split)

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is None:
            classes, files, labels = self.list_split(self.test_split)
            self._check_classes(classes, self.test_split)
            self.test_set = FolderDataset(files, labels, self.image_size, self.resize_size, train=False)
            self.test_y = labels
        if stage in ("test", "predict") or self.train_set is not None:
            return
        classes, files, labels = self.list_split(self.train_split)
        self._check_classes(classes, self.train_split)
        train_idx, val_idx = self.split_indices(len(files), None)
        self.train_indices, self.val_indices, self.val_count = train_idx, val_idx, val_idx.numel()
        pick = lambda idx: ([files[i] for i in idx.tolist()], labels[idx])  # noqa: E731
        self.train_set = FolderDataset(*pick(train_idx), self.image_size, self.resize_size, train=True)
        self.val_set = (FolderDataset(*pick(val_idx), self.image_size, self.resize_size, train=False)
                        if self.val_count else self.test_set)
        # the labels alone (the images stay files): class counts for DRW, long-tail profiles
        self.train_y, self.val_y = self.train_set.labels, self.val_set.labels

    def _folder_loader(self, ds: FolderDataset, train: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochSeededRandomSampler(len(ds), self.seed) if train else None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._folder_loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._folder_loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._folder_loader(self.test_set, train=False)


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k (ILSVRC-2012) in ``<data_dir>/imagenet/{train,val}/<wnid>/*.JPEG`` (the layout of
    torchvision's ``ImageNet`` after extraction, with the validation images sorted into wnid folders).
    ``class_names`` are the wnids in label order, e.g. for a WordNet class hierarchy."""

    folder = "imagenet"
    num_classes = 1000


class INaturalist2019DataModule(ImageFolderDataModule):
    """iNaturalist 2019 (1,010 species, long-tailed): images indexed by torchvision's ``INaturalist(version="2019")``
    reader in ``<data_dir>/inaturalist/2019/<super category>/<category id>/*.jpg`` (the ``train_val2019`` archive,
    extracted there), split by the competition's ``train2019.json`` / ``val2019.json`` next to that folder (COCO
    style: ``images[].file_name`` = ``train_val2019/<super>/<id>/<file>``, ``annotations[].category_id``). Labels are
    the category ids (torchvision's ``full`` target); the training split is ``train``, the test split the official
    ``val`` (3 images a class); our validation split is held out of ``train``."""

    folder = "inaturalist"
    num_classes = 1010
    #: the torchvision version name and the split files
    version = "2019"
    split_files = {"train": "train2019.json", "val": "val2019.json"}

    def list_split(self, split: str) -> tuple[list[str], list[Path], Tensor]:
        import json

        import torchvision.datasets as tvd

        if split not in self.split_files:
            raise CvlabError(f"iNaturalist 2019 has splits {sorted(self.split_files)}, not {split!r}")
        ann = self.root / self.split_files[split]
        if not (self.root / self.version).is_dir() or not ann.is_file():
            raise DatasetNotFoundError(
                f"iNaturalist 2019 not found: expected {self.root / self.version}/<super>/<id>/*.jpg "
                "(train_val2019.tar.gz "
                f"extracted and renamed) and {ann} (train2019.json / val2019.json from the competition)")
        try:
            ds = tvd.INaturalist(str(self.root), version=self.version, target_type="full", download=False)
        except RuntimeError as e:
            raise DatasetCorruptError(
                f"iNaturalist 2019 under {self.root / self.version}: {str(e).splitlines()[0]}") from None
        # torchvision's index: (category id, file name) under root/2019/<all_categories[id]>/
        where = {f"{ds.all_categories[c]}/{f}": c for c, f in ds.index}
        try:
            meta = json.loads(ann.read_text())
            label_of = {a["image_id"]: int(a["category_id"]) for a in meta["annotations"]}
            entries = [(im["file_name"], label_of[im["id"]]) for im in meta["images"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetCorruptError(
                f"{ann} is not an iNaturalist annotation file ({type(e).__name__}: {e})") from None
        files, labels = [], []
        for name, label in entries:
            key = "/".join(Path(name).parts[-3:])  # <super>/<id>/<file>
            if where.get(key) != label:
                raise DatasetCorruptError(f"{ann}: {name} (category {label}) is not in {self.root / self.version}"
                                          + ("" if key not in where else f" under category {where[key]}"))
            files.append(self.root / self.version / key)
            labels.append(label)
        classes = [str(i) for i in range(len(ds.all_categories))]
        return classes, files, torch.tensor(labels, dtype=torch.long)
