"""Datamodules on torchvision's readers of the classic small datasets.

Each split is decoded once into uint8 tensors through the dataset object's ``.data`` and
``.targets``/``.labels`` (never one PIL image at a time); batching, augmentation and normalisation
are the base class's (:class:`datamodules.base.TensorImageDataModule`).

Files live where torchvision looks for them under the data root (``--data.data_dir``, else
``$CVLAB_DATA``, else ``./data``):

* MNIST / Fashion-MNIST / KMNIST: ``<root>/{MNIST,FashionMNIST,KMNIST}/raw/*-ubyte.gz`` or ``*-ubyte``.
  A ``.gz`` is read as it is, never extracted (so a replaced archive is what is read, and a shared
  read-only copy is never written); the extracted file is read only where there is no ``.gz``. The
  images and labels of a split must agree in count, the counts must not be another split's official
  size (60,000 train / 10,000 test: a test file in the training files' place), and the labels must be
  classes of the dataset; each file's IDX header is checked against its size;
* CIFAR-10: ``<root>/cifar-10-batches-py/``; CIFAR-100: ``<root>/cifar-100-python/``;
* SVHN: ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat``.

Data files are untrusted input, like checkpoints. CIFAR's python pickles are never given to
``pickle.load``: :func:`read_pickled_batch` unpickles with :class:`DataUnpickler`, which admits only
the builtins and numpy array types those files hold, so a crafted batch cannot run code; each file's
MD5 is compared with the official release's, and a file that differs (re-packed or generated data in
the same format, e.g. the CIFAR-10 JPEG stand-in) is still read, only ever through the restricted unpickler,
and checked for the release's structure, with an :class:`datamodules.errors.UnofficialDataWarning` naming it.
A damaged, truncated or foreign file fails with one line naming it
(:class:`datamodules.errors.DatasetCorruptError`); so does a truncated or foreign MNIST file. Missing files with
``download=False`` raise :class:`datamodules.errors.DatasetNotFoundError` before anything is read,
never touching the network; a download that fails (no network) says so in one line.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import urllib.error
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets as tvd
from torch import Tensor

from datamodules.base import Augment, TensorImageDataModule, ValSize
from datamodules.errors import CvlabError, DatasetCorruptError, DatasetNotFoundError, UnofficialDataWarning
from datamodules.longtail import long_tail_counts, long_tail_indices

__all__ = [
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "KMNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "SVHNDataModule",
    "USPSDataModule",
    "CIFAR10LTDataModule",
    "CIFAR100LTDataModule",
    "MNISTLTDataModule",
    "FashionMNISTLTDataModule",
    "DataUnpickler",
    "read_pickled_batch",
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _not_found_as_ours(dataset: str, folder: Path, expected: Sequence[str]) -> Iterator[None]:
    """torchvision's ``RuntimeError("Dataset not found ...")`` -> :class:`DatasetNotFoundError`; a
    failed download (no network, a refused mirror) -> one line that says what to copy where."""
    try:
        yield
    except DatasetNotFoundError:
        raise
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise DatasetNotFoundError(
            f"{dataset}: download failed ({_first_line(e)}); copy {', '.join(expected)} into {folder} "
            "from a machine with a network and rerun without --data.download"
        ) from None
    except RuntimeError as e:
        text = str(e)
        if text.startswith("Error downloading"):  # torchvision's MNIST mirrors all failed
            raise DatasetNotFoundError(
                f"{dataset}: download failed ({_first_line(e)}; no network?); copy {', '.join(expected)} into "
                f"{folder} from a machine with a network and rerun without --data.download"
            ) from None
        if not (text.startswith("Dataset") and "not found" in text):
            raise
        raise dataset_not_found(dataset, folder, expected) from None


# --- untrusted pickles ----------------------------------------------------------------------------
#: the only globals a data pickle may name: numpy's array and scalar reconstruction (numpy 1 and 2
#: module names) and ``_codecs.encode``, which protocol-2 pickles written by Python 3 use for bytes
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("_codecs", "encode"): __import__("codecs").encode,
}


class DataUnpickler(pickle.Unpickler):
    """An unpickler for data files: builtin containers and numbers, strings, bytes and numpy arrays.

    Any other global (``os.system``, ``builtins.eval``, a class to instantiate ...) raises
    ``pickle.UnpicklingError`` before it is looked up, so nothing in the file is ever called but
    numpy's array reconstruction.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a data file") from None


def file_md5(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_pickled_batch(path: str | os.PathLike, dataset: str, official_md5: str | None = None) -> dict[str, Any]:
    """Unpickle one data file with :class:`DataUnpickler` (latin-1 strings, as the Python 2 release).

    Returns the file's dict with ``str`` keys. With ``official_md5`` the file's MD5 is compared first:
    a match is the official release; anything else is read all the same, only through the restricted
    unpickler, after an :class:`UnofficialDataWarning` naming the file (a warning, never an error).
    Raises :class:`DatasetCorruptError` (one line naming the file) when the file holds
    anything but plain data, is truncated, or is not a dict.
    """
    path = Path(path)
    where = f"{dataset} file {path}"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetCorruptError(f"cannot read {where}: {e.strerror or e}") from None
    digest = hashlib.md5(data, usedforsecurity=False).hexdigest() if official_md5 is not None else None
    official = official_md5 is not None and digest == official_md5
    if official_md5 is not None and not official:
        warnings.warn(
            f"{where} is not the official release (MD5 {digest}, official {official_md5}); "
            "reading it all the same, through the restricted unpickler",
            UnofficialDataWarning,
            stacklevel=2,
        )
    try:
        obj = DataUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if "is not allowed" not in str(e):  # a truncated or damaged pickle
            raise DatasetCorruptError(
                f"cannot read {where}: it is truncated or damaged ({_first_line(e)}); "
                "replace it with the official release file"
            ) from None
        raise DatasetCorruptError(
            f"refused {where}: {_first_line(e)} (a data pickle may hold only lists, dicts, strings, numbers "
            "and numpy arrays); replace it with the official release file"
        ) from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as e:
        state = "differs from the official release and " if official_md5 and not official else ""
        raise DatasetCorruptError(
            f"cannot read {where}: it {state}is truncated or not a {dataset} batch ({_first_line(e)}); "
            "replace it with the official release file"
        ) from None
    if not isinstance(obj, dict):
        raise DatasetCorruptError(f"{where} holds a {type(obj).__name__}, expected the release's dict; replace it")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_images_labels(
    batch: dict[str, Any], label_key: str, path: Path, dataset: str
) -> tuple[np.ndarray, list[int]]:
    """``data`` (N, 3072) uint8 and ``labels``/``fine_labels`` (N ints) of one CIFAR batch, checked."""
    x, y = batch.get("data"), batch.get(label_key)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        found = f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}".strip()
        raise DatasetCorruptError(
            f"{dataset} file {path} has no uint8 'data' of shape (N, 3072) (found {found}); "
            "replace it with the official release file"
        )
    if not isinstance(y, (list, np.ndarray)) or len(y) != x.shape[0]:
        raise DatasetCorruptError(
            f"{dataset} file {path}: '{label_key}' must list one label per image ({x.shape[0]}); "
            "replace it with the official release file"
        )
    return x, [int(v) for v in y]


# --- MNIST family ---------------------------------------------------------------------------------
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


#: (train, test) sizes of the official releases of every MNIST-format dataset read here
_MNIST_OFFICIAL_SIZES = (60_000, 10_000)
#: IDX element type codes (the third magic byte) -> numpy dtypes (big-endian, as IDX stores them)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it is a ``.gz``; a damaged archive is one line naming it."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DatasetCorruptError(
            f"cannot decompress {path}: it is truncated or not gzip ({_first_line(e)}); "
            "replace it with the official file"
        ) from None


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """An IDX file (MNIST's format; ``.gz`` read as it is) as a numpy array of ``ndim`` dimensions.

    The header (magic ``0 0 type ndim``, then ``ndim`` big-endian int32 sizes) must match ``ndim`` and the
    file's length exactly; anything else (random bytes, a truncated or padded file) is
    :class:`DatasetCorruptError` naming the file."""
    path = Path(path)
    data = _read_bytes(path)
    bad = f"{path} is not an IDX file of {ndim} dimension{'s' * (ndim != 1)}"
    if len(data) < 4 + 4 * ndim or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES or data[3] != ndim:
        head = data[:4].hex(" ") if data else "empty"
        raise DatasetCorruptError(f"{bad} (header {head}); replace it with the official file")
    dtype = np.dtype(_IDX_TYPES[data[2]])
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetCorruptError(
            f"{bad} of shape {shape}: it has {len(data):,} bytes where the header says {expected:,} (truncated or "
            "damaged); replace it with the official file"
        )
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder("="))


def check_mnist_split(dataset: str, images: Path, labels: Path, n_images: int, n_labels: int, train: bool) -> None:
    """Images and labels of one split belong together: the same count, and not the other split's official
    size (a test file in the training files' place, or the reverse)."""
    split, other = ("training", "test") if train else ("test", "training")
    own, their = _MNIST_OFFICIAL_SIZES if train else _MNIST_OFFICIAL_SIZES[::-1]
    if n_images != n_labels:
        raise DatasetCorruptError(
            f"{dataset} {split} files do not belong together: {images} holds {n_images:,} images but {labels} holds "
            f"{n_labels:,} labels"
            f"{f' ({their:,} is the official {other} size: a {other} file?)' if their in (n_images, n_labels) else ''}"
            "; replace them with the official files"
        )
    if n_images == their and their != own:
        raise DatasetCorruptError(
            f"{dataset} {split} files hold {n_images:,} examples, the official {other} split's size (the {split} split "
            f"has {own:,}): {images} and {labels} look like the {other} files; replace them with the official files"
        )


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

    def _file(self, name: str) -> Path | None:
        """The ``.gz`` of an IDX file if present (read as it is), else the extracted file, else None."""
        for f in (self.raw_folder / f"{name}.gz", self.raw_folder / name):
            if f.is_file():
                return f
        return None

    def _download(self, train: bool) -> None:
        """torchvision's download into ``raw_folder`` (its MD5s checked); a failure is one line."""
        with _not_found_as_ours(self.dataset_name, self.raw_folder, self._expected()):
            self.torchvision_class(str(self.data_dir), train=train, download=True)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        prefix = "train" if train else "t10k"
        names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        if self.download and any(self._file(n) is None for n in names):
            self._download(train)
        images, labels = (self._file(n) for n in names)
        if images is None or labels is None:
            if self._legacy_exists():
                return self._load_legacy(train)
            self._check_files()
            raise dataset_not_found(self.dataset_name, self.raw_folder, self._expected())
        x = read_idx(images, ndim=3)  # (N, H, W) uint8
        y = read_idx(labels, ndim=1)  # (N,)
        check_mnist_split(self.dataset_name, images, labels, len(x), len(y), train)
        if x.dtype != np.uint8 or x.shape[1:] != (28, 28):
            raise DatasetCorruptError(f"{images} holds {x.dtype} images of size {x.shape[1:]}, not 28x28 uint8; "
                                      "replace it with the official file")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DatasetCorruptError(f"{labels} holds labels {int(y.min())}..{int(y.max())}, not classes 0.."
                                      f"{self.num_classes - 1}; replace it with the official file")
        return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))

    def _load_legacy(self, train: bool) -> tuple[Tensor, Tensor]:
        """torchvision < 0.9's cache ``processed/{training,test}.pt``, read through torchvision."""
        with _not_found_as_ours(self.dataset_name, self.raw_folder, self._expected()):
            ds = self.torchvision_class(str(self.data_dir), train=train, download=False)
        return ds.data.unsqueeze(1).contiguous(), torch.as_tensor(ds.targets, dtype=torch.long).clone()


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
    """CIFAR-10's file list, official MD5s and archive URL (torchvision's); never instantiated: the
    batches are read by :func:`read_pickled_batch`, not by torchvision's ``pickle.load``."""

    label_key = "labels"

    @classmethod
    def fetch(cls, root: str) -> None:
        """Download and extract the official archive (its MD5 checked by torchvision)."""
        tvd.utils.download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)


class _CIFAR100Files(_CIFAR10Files):
    base_folder = tvd.CIFAR100.base_folder
    url = tvd.CIFAR100.url
    filename = tvd.CIFAR100.filename
    tgz_md5 = tvd.CIFAR100.tgz_md5
    train_list = tvd.CIFAR100.train_list
    test_list = tvd.CIFAR100.test_list
    meta = tvd.CIFAR100.meta
    label_key = "fine_labels"


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
        tv = self.torchvision_class
        if self.download and any(not (self.folder / f).is_file() for f in expected):
            with _not_found_as_ours(self.dataset_name, self.folder, expected):
                tv.fetch(str(self.data_dir))
        xs, ys = [], []
        for name, md5 in tv.train_list if train else tv.test_list:
            path = self.folder / name
            x, y = _cifar_images_labels(
                read_pickled_batch(path, self.dataset_name, md5), tv.label_key, path, self.dataset_name
            )
            xs.append(x)
            ys += y
        read_pickled_batch(self.folder / tv.meta["filename"], self.dataset_name, tv.meta["md5"])  # refused if crafted
        x = torch.from_numpy(np.concatenate(xs)).reshape(-1, 3, 32, 32)  # rows are channel-major: (N, 3, 32, 32)
        y = torch.as_tensor(ys, dtype=torch.long)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DatasetCorruptError(
                f"{self.dataset_name} labels in {self.folder} run {int(y.min())}..{int(y.max())}, "
                f"expected 0..{self.num_classes - 1}"
            )
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


class USPSDataModule(TensorImageDataModule):
    """USPS handwritten digits (Hull, 1994): 7,291 train / 2,007 test, 1x16x16 grey, 10 classes (0-9), read by
    torchvision's ``USPS`` from the LIBSVM files ``<data_dir>/USPS/usps.bz2`` and ``usps.t.bz2``. A target domain for
    MNIST models (``image_size: 32`` resizes it to LeNet-5's input; MNIST's digits are white on black like USPS's)."""

    num_classes = 10
    in_channels = 1
    native_size = 16
    mean = (0.5,)  # not measured (no USPS on this machine): networks trained on USPS normalise with these
    std = (0.5,)
    default_val_size = 729  # a tenth of the 7,291 training digits
    dataset_name = "USPS"
    files = ("usps.bz2", "usps.t.bz2")

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        folder, expected = self.data_dir / "USPS", list(self.files)
        name = self.files[0 if train else 1]
        if not self.download and not (folder / name).is_file():
            raise dataset_not_found(
                self.dataset_name, folder, expected, [f for f in expected if not (folder / f).is_file()]
            )
        try:
            with _not_found_as_ours(self.dataset_name, folder, expected):
                ds = tvd.USPS(str(folder), train=train, download=self.download)
        except (OSError, EOFError, ValueError) as e:
            raise DatasetCorruptError(
                f"USPS file {folder / name} is damaged or not in LIBSVM format ({_first_line(e)})"
            ) from None
        x = torch.from_numpy(ds.data).unsqueeze(1).contiguous()  # (N, 1, 16, 16) uint8
        return x, torch.as_tensor(ds.targets, dtype=torch.long)


# --- long-tailed CIFAR ----------------------------------------------------------------------------
class ImbalanceFactorError(CvlabError, ValueError):
    """An imbalance factor below 1."""


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
        val_size: ValSize = None,
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
        if not float(imbalance_factor) >= 1.0:  # also NaN
            raise ImbalanceFactorError(
                f"imbalance_factor must be >= 1 (the head-to-tail ratio; 1 = balanced), got {imbalance_factor}; "
                "set --data.init_args.imbalance_factor to e.g. 100"
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


class MNISTLTDataModule(_LongTailMixin, MNISTDataModule):
    """MNIST-LT: MNIST with a long-tailed training set (CBGAN's MNIST-scale setting).

    Class ``k`` keeps its first ``floor(n_max * (1/imbalance_factor)^(k/9))`` training images in file order
    (``n_max`` 5000, below every MNIST class's count, so the profile is exact: 5000 ... 50 for factor 100,
    12,406 in all, as CIFAR-10-LT); the validation split comes from the images left out, the test set stays
    balanced.

    Args:
        imbalance_factor: ratio of the largest to the smallest class (>= 1; 100 in CBGAN).
        max_per_class: ``n_max`` (default 5000).
    """

    full_per_class = 5000


class FashionMNISTLTDataModule(_LongTailMixin, FashionMNISTDataModule):
    """Fashion-MNIST-LT: Fashion-MNIST with a long-tailed training set (as :class:`MNISTLTDataModule`)."""

    full_per_class = 5000
