"""Datamodules on torchvision's readers of the classic small datasets.

Each split is decoded once into uint8 tensors through the dataset object's ``.data`` and
``.targets``/``.labels`` (never one PIL image at a time); batching, augmentation and normalisation
are the base class's (:class:`datamodules.base.TensorImageDataModule`).

Files live where torchvision looks for them under the data root (``--data.data_dir``, else
``$CVLAB_DATA``, else ``./data``):

* MNIST / Fashion-MNIST / KMNIST: ``<root>/{MNIST,FashionMNIST,KMNIST}/raw/*-ubyte`` or ``*-ubyte.gz``
  (a ``.gz`` is extracted next to itself, as torchvision would; into a temporary folder instead if the
  raw folder is read-only or has no write permission bits, so a shared read-only copy is never written);
* CIFAR-10: ``<root>/cifar-10-batches-py/``; CIFAR-100: ``<root>/cifar-100-python/``;
* SVHN: ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat``.

Present files are taken as they are: the MD5 of the official release is only checked by torchvision
when it downloads, so re-packed or generated files in the same format load too (a damaged file still
fails when it is parsed). Missing files with ``download=False`` raise
:class:`datamodules.errors.DatasetNotFoundError` before anything is read, never touching the network.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torchvision.datasets as tvd
from torch import Tensor

from datamodules.base import Augment, TensorImageDataModule
from datamodules.errors import DatasetNotFoundError
from datamodules.longtail import long_tail_counts, long_tail_indices

__all__ = [
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "KMNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "SVHNDataModule",
    "CIFAR10LTDataModule",
    "CIFAR100LTDataModule",
]


# --- errors ---------------------------------------------------------------------------------------
def dataset_not_found(
    dataset: str, folder: Path, expected: Sequence[str], missing: Sequence[str] = ()
) -> DatasetNotFoundError:
    """The one-line error for a dataset whose files are not on disk."""
    msg = f"{dataset} not found: expected {', '.join(expected)} in {folder}"
    if missing and list(missing) != list(expected):
        msg += f" (missing: {', '.join(missing)})"
    msg += (
        "; copy them there, or set --data.download true on a machine with a network, "
        "or point --data.data_dir (or CVLAB_DATA) at a folder that holds them"
    )
    return DatasetNotFoundError(" ".join(msg.split("\n")))


@contextlib.contextmanager
def _not_found_as_ours(dataset: str, folder: Path, expected: Sequence[str]) -> Iterator[None]:
    """torchvision's ``RuntimeError("Dataset not found ...")`` -> :class:`DatasetNotFoundError`."""
    try:
        yield
    except DatasetNotFoundError:
        raise
    except RuntimeError as e:
        text = str(e)
        if not (text.startswith("Dataset") and "not found" in text):
            raise
        raise dataset_not_found(dataset, folder, expected) from None


# --- MNIST family ---------------------------------------------------------------------------------
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _gunzip(src: Path, dst: Path) -> None:
    """Decompress ``src`` to ``dst`` atomically (a half-written file never carries the final name)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=1 << 20)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _is_read_only_error(e: OSError) -> bool:
    return isinstance(e, PermissionError) or e.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def _writable(folder: Path) -> bool:
    """Whether we may write into ``folder``; a folder without write bits counts as read-only even
    for root (who ``os.access`` says may write anywhere)."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


class _MNISTFamilyDataModule(TensorImageDataModule):
    """Shared reader of the IDX datasets (torchvision's ``MNIST`` and subclasses)."""

    num_classes = 10
    in_channels = 1
    native_size = 28
    default_augment: Augment = "none"
    dataset_name = "MNIST"
    torchvision_class: type[tvd.MNIST] = tvd.MNIST

    @property
    def raw_folder(self) -> Path:
        """Where torchvision reads the IDX files: ``<root>/<ClassName>/raw``."""
        return self.data_dir / self.torchvision_class.__name__ / "raw"

    def _expected(self) -> list[str]:
        return [f + ".gz" for f in _MNIST_FILES]

    def _legacy_exists(self) -> bool:
        # torchvision < 0.9 cached processed/{training,test}.pt; torchvision still reads them
        processed = self.raw_folder.parent / "processed"
        return all((processed / f).is_file() for f in ("training.pt", "test.pt"))

    def _check_files(self) -> None:
        raw = self.raw_folder
        missing = [f + ".gz" for f in _MNIST_FILES if not (raw / f).is_file() and not (raw / f"{f}.gz").is_file()]
        if missing and not self._legacy_exists():
            raise dataset_not_found(self.dataset_name, raw, self._expected(), missing)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        if not self.download:
            self._check_files()
        root, tmp = self.data_dir, None
        try:
            if not self._extract(self.raw_folder):
                raise PermissionError(errno.EACCES, "read-only data folder", str(self.raw_folder))
        except OSError as e:
            if not _is_read_only_error(e):
                raise
            # read-only data folder (e.g. a shared mount): extract into a temporary copy instead
            tmp = tempfile.TemporaryDirectory(prefix="cvlab-mnist-")
            root = Path(tmp.name)
            self._extract(self.raw_folder, root / self.torchvision_class.__name__ / "raw")
        try:
            with _not_found_as_ours(self.dataset_name, self.raw_folder, self._expected()):
                ds = self.torchvision_class(str(root), train=train, download=self.download)
            x = ds.data.unsqueeze(1).contiguous()  # (N, 28, 28) uint8 -> (N, 1, 28, 28)
            y = torch.as_tensor(ds.targets, dtype=torch.long).clone()
        finally:
            if tmp is not None:
                tmp.cleanup()
        return x, y

    @staticmethod
    def _extract(raw: Path, dest: Path | None = None) -> bool:
        """Make every IDX file present uncompressed (what torchvision reads) in ``dest`` (default ``raw``).

        Returns False, having written nothing, when ``raw`` needs extracting but is read-only.
        """
        if not raw.is_dir():
            return True
        if dest is not None:
            dest.mkdir(parents=True, exist_ok=True)
        elif any(not (raw / n).is_file() and (raw / f"{n}.gz").is_file() for n in _MNIST_FILES):
            if not _writable(raw):
                return False
        for name in _MNIST_FILES:
            src, gz = raw / name, raw / f"{name}.gz"
            if dest is None:
                if not src.is_file() and gz.is_file():
                    _gunzip(gz, src)
            elif src.is_file():
                os.symlink(src, dest / name)
            elif gz.is_file():
                _gunzip(gz, dest / name)
        return True


class MNISTDataModule(_MNISTFamilyDataModule):
    """MNIST handwritten digits (LeCun et al., 1998): 60,000 train / 10,000 test, 1x28x28, 10 classes.

    Files: ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``. ``image_size``
    stays 28 unless set (e.g. 32 for LeNet-5). No augmentation by default.
    """

    mean = (0.1307,)
    std = (0.3081,)
    dataset_name = "MNIST"
    torchvision_class = tvd.MNIST


class FashionMNISTDataModule(_MNISTFamilyDataModule):
    """Fashion-MNIST (Xiao et al., 2017): Zalando clothing images in MNIST's format and sizes.

    Files: ``<data_dir>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
    """

    mean = (0.2860,)
    std = (0.3530,)
    dataset_name = "Fashion-MNIST"
    torchvision_class = tvd.FashionMNIST


class KMNISTDataModule(_MNISTFamilyDataModule):
    """Kuzushiji-MNIST (Clanuwat et al., 2018): cursive Japanese characters in MNIST's format and sizes.

    Files: ``<data_dir>/KMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
    """

    mean = (0.1918,)
    std = (0.3483,)
    dataset_name = "KMNIST"
    torchvision_class = tvd.KMNIST


# --- CIFAR ----------------------------------------------------------------------------------------
class _CIFAR10Files(tvd.CIFAR10):
    """torchvision's CIFAR-10 reader, with "integrity" meaning "the files are there".

    torchvision compares every batch with the MD5 of the official archive; a present file is taken
    as it is here (a damaged pickle still fails to load), and ``download`` is skipped when all are there.
    """

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(folder, f)) for f in names)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not os.path.isfile(path):
            raise RuntimeError("Dataset metadata file not found. You can use download=True to download it")
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR100Files(_CIFAR10Files):
    base_folder = tvd.CIFAR100.base_folder
    url = tvd.CIFAR100.url
    filename = tvd.CIFAR100.filename
    tgz_md5 = tvd.CIFAR100.tgz_md5
    train_list = tvd.CIFAR100.train_list
    test_list = tvd.CIFAR100.test_list
    meta = tvd.CIFAR100.meta


class CIFAR10DataModule(TensorImageDataModule):
    """CIFAR-10 (Krizhevsky, 2009): 50,000 train / 10,000 test, 3x32x32, 10 classes.

    Files: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (the python
    version of the archive, extracted). Random crop (padding 4) and horizontal flip by default.
    """

    num_classes = 10
    in_channels = 3
    native_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    default_augment: Augment = "crop_flip"
    dataset_name = "CIFAR-10"
    torchvision_class: type[tvd.CIFAR10] = _CIFAR10Files

    @property
    def folder(self) -> Path:
        return self.data_dir / self.torchvision_class.base_folder

    def _expected(self) -> list[str]:
        tv = self.torchvision_class
        return [f for f, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        expected = self._expected()
        if not self.download:
            missing = [f for f in expected if not (self.folder / f).is_file()]
            if missing:
                raise dataset_not_found(self.dataset_name, self.folder, expected, missing)
        with _not_found_as_ours(self.dataset_name, self.folder, expected):
            ds = self.torchvision_class(str(self.data_dir), train=train, download=self.download)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC view -> NCHW
        y = torch.as_tensor(ds.targets, dtype=torch.long)
        return x, y


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (Krizhevsky, 2009): 50,000 train / 10,000 test, 3x32x32, 100 fine classes.

    Files: ``<data_dir>/cifar-100-python/{train, test, meta}``. Random crop and flip by default.
    """

    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    dataset_name = "CIFAR-100"
    torchvision_class = _CIFAR100Files


# --- SVHN -----------------------------------------------------------------------------------------
class _SVHNFiles(tvd.SVHN):
    """torchvision's SVHN reader, with "integrity" meaning "the .mat file is there" (see CIFAR)."""

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))

    def download(self) -> None:
        if not self._check_integrity():  # torchvision's would re-fetch a file whose MD5 differs
            super().download()


class SVHNDataModule(TensorImageDataModule):
    """SVHN (Netzer et al., 2011), cropped digits: 73,257 train / 26,032 test, 3x32x32, 10 classes.

    Files: ``<data_dir>/train_32x32.mat`` and ``<data_dir>/test_32x32.mat`` (the ``extra`` split is not
    used). Labels are 0-9 (the file's 10 for digit 0 becomes 0). Random crop by default, no flip.
    """

    num_classes = 10
    in_channels = 3
    native_size = 32
    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)
    default_augment: Augment = "crop"
    dataset_name = "SVHN"
    files = ("train_32x32.mat", "test_32x32.mat")

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        expected = list(self.files)
        if not self.download:
            missing = [f for f in expected if not (self.data_dir / f).is_file()]
            if missing:
                raise dataset_not_found(self.dataset_name, self.data_dir, expected, missing)
        with _not_found_as_ours(self.dataset_name, self.data_dir, expected):
            ds = _SVHNFiles(str(self.data_dir), split="train" if train else "test", download=self.download)
        x = torch.from_numpy(ds.data).contiguous()  # (N, 3, 32, 32) uint8
        y = torch.as_tensor(ds.labels, dtype=torch.long).reshape(-1)
        return x, y


# --- long-tailed CIFAR ----------------------------------------------------------------------------
class _LongTailMixin(TensorImageDataModule):
    """Training set cut to the exponential long-tail profile (:mod:`datamodules.longtail`)."""

    #: examples per class in the balanced training set (class 0 keeps them all)
    full_per_class: int = 5000

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int = 0,
        augment: Augment | None = None,
        image_size: int | None = None,
        download: bool = False,
        seed: int = 0,
        imbalance_factor: float = 100.0,
        max_per_class: int | None = None,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_size=val_size,
            augment=augment,
            image_size=image_size,
            download=download,
            seed=seed,
        )
        self.imbalance_factor = float(imbalance_factor)
        self.max_per_class = max_per_class
        self.target_counts = long_tail_counts(self.n_max, self.num_classes, self.imbalance_factor)  # validates

    @property
    def n_max(self) -> int:
        """Examples kept of class 0: ``max_per_class`` if given, else the dataset's full count."""
        return self.full_per_class if self.max_per_class is None else int(self.max_per_class)

    def select_train(self, labels: Tensor) -> Tensor:
        return long_tail_indices(labels, self.target_counts)

    @property
    def class_counts(self) -> list[int]:
        """Training examples per class after :meth:`setup` (after the validation split, if any)."""
        self.setup("fit")
        return torch.bincount(self.train_y, minlength=self.num_classes).tolist()


class CIFAR10LTDataModule(_LongTailMixin, CIFAR10DataModule):
    """CIFAR-10-LT (Cui et al., 2019; Cao et al., 2019): CIFAR-10 with a long-tailed training set.

    Class ``k`` keeps its first ``floor(n_max * (1/imbalance_factor)^(k/9))`` training images in file
    order (5000 ... 50 for the usual factor 100, 12,406 in all); the test set stays balanced.

    Args:
        imbalance_factor: ratio of the largest to the smallest class (e.g. 10, 50, 100).
        max_per_class: ``n_max``, images kept of class 0 (default 5000, the whole class).
    """

    full_per_class = 5000


class CIFAR100LTDataModule(_LongTailMixin, CIFAR100DataModule):
    """CIFAR-100-LT (Cui et al., 2019; Cao et al., 2019): CIFAR-100 with a long-tailed training set.

    Class ``k`` keeps its first ``floor(n_max * (1/imbalance_factor)^(k/99))`` training images in file
    order (500 ... 5 for the usual factor 100, 10,847 in all); the test set stays balanced.

    Args:
        imbalance_factor: ratio of the largest to the smallest class (e.g. 10, 50, 100).
        max_per_class: ``n_max``, images kept of class 0 (default 500, the whole class).
    """

    full_per_class = 500
