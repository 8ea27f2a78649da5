"""The torchvision-backed datamodules on tiny generated files in the real formats (no network)."""

from __future__ import annotations

import os
import shutil
import socket
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import datamodules
import datamodules.vision as vision
from datamodules import (
    CIFAR10DataModule,
    CIFAR10LTDataModule,
    CIFAR100DataModule,
    CIFAR100LTDataModule,
    DatasetNotFoundError,
    FashionMNISTDataModule,
    KMNISTDataModule,
    MNISTDataModule,
    SVHNDataModule,
    USPSDataModule,
    long_tail_counts,
    long_tail_indices,
)
from datamodules.errors import DatasetCorruptError
from tests.fakedata import write_cifar, write_mnist_idx, write_svhn, write_usps

MNIST_FAMILY = [
    (MNISTDataModule, "MNIST", (0.1307,), (0.3081,)),
    (FashionMNISTDataModule, "FashionMNIST", (0.2860,), (0.3530,)),
    (KMNISTDataModule, "KMNIST", (0.1918,), (0.3483,)),
]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a datamodule tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def first_batch(dm):
    x, y = next(iter(dm.train_dataloader()))
    return x, y, dm.on_after_batch_transfer((x, y), 0)


def check_normalised(dm, raw: torch.Tensor, out: torch.Tensor) -> None:
    """Batches reach the methods as [0, 1] pixels (networks normalise inside); the datamodule's own
    normalize() maps them with the task's statistics."""
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, raw.float() / 255)
    mean = torch.tensor(dm.mean).view(1, -1, 1, 1)
    std = torch.tensor(dm.std).view(1, -1, 1, 1)
    torch.testing.assert_close(dm.normalize(out), (raw.float() / 255 - mean) / std)


# --- MNIST family ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "folder", "mean", "std"), MNIST_FAMILY)
def test_mnist_family(tmp_path, no_network, cls, folder, mean, std):
    ref = write_mnist_idx(tmp_path, folder, n_train=50, n_test=20, seed=1)
    dm = cls(data_dir=str(tmp_path), batch_size=16)
    assert (dm.num_classes, dm.in_channels, dm.image_size, dm.augment) == (10, 1, 28, "none")
    assert (dm.mean, dm.std) == (mean, std)
    dm.setup("fit")
    assert dm.train_x.shape == (45, 1, 28, 28) and dm.train_x.dtype == torch.uint8  # 5 held out (a tenth)
    assert dm.test_x.shape == (20, 1, 28, 28) and dm.test_x.dtype == torch.uint8
    assert dm.train_y.dtype == torch.int64 and dm.test_y.dtype == torch.int64
    assert int(dm.train_y.min()) >= 0 and int(dm.train_y.max()) <= 9
    ti, vi = dm.train_indices.numpy(), dm.val_indices.numpy()
    assert sorted([*ti, *vi]) == list(range(50))  # validation is held out of the training file
    np.testing.assert_array_equal(dm.train_x.numpy(), ref["train"][0][ti])
    np.testing.assert_array_equal(dm.train_y.numpy(), ref["train"][1][ti])
    np.testing.assert_array_equal(dm.val_x.numpy(), ref["train"][0][vi])
    np.testing.assert_array_equal(dm.test_x.numpy(), ref["test"][0])
    np.testing.assert_array_equal(dm.test_y.numpy(), ref["test"][1])
    x, y, (xb, yb) = first_batch(dm)
    assert xb.shape == (16, 1, 28, 28) and yb.dtype == torch.int64
    check_normalised(dm, x, xb)


def test_mnist_uncompressed_files(tmp_path):
    ref = write_mnist_idx(tmp_path, "MNIST", n_train=30, n_test=10, compress=False)
    dm = MNISTDataModule(data_dir=str(tmp_path))
    dm.setup()
    np.testing.assert_array_equal(dm.test_x.numpy(), ref["test"][0])


def test_mnist_resize_to_32(tmp_path):
    write_mnist_idx(tmp_path, "MNIST", n_train=50, n_test=20)
    dm = MNISTDataModule(data_dir=str(tmp_path), image_size=32, batch_size=8)
    dm.setup()
    assert dm.train_x.shape == (45, 1, 32, 32) and dm.val_x.shape == (5, 1, 32, 32) and dm.train_x.dtype == torch.uint8
    assert dm.test_x.shape == (20, 1, 32, 32)
    assert dm.input_shape == (1, 32, 32)
    _, _, (xb, _) = first_batch(dm)
    assert xb.shape == (8, 1, 32, 32) and xb.dtype == torch.float32


def test_mnist_gz_is_read_without_extracting(tmp_path):
    ref = write_mnist_idx(tmp_path, "MNIST", n_train=20, n_test=10)
    raw = tmp_path / "MNIST" / "raw"
    dm = MNISTDataModule(data_dir=str(tmp_path))
    dm.setup()
    np.testing.assert_array_equal(dm.train_x.numpy(), ref["train"][0][dm.train_indices.numpy()])
    assert sorted(p.name for p in raw.iterdir()) == sorted(f + ".gz" for f in vision._MNIST_FILES)


def test_mnist_folder_without_write_bits_is_left_alone(tmp_path):
    ref = write_mnist_idx(tmp_path, "MNIST", n_train=20, n_test=10)
    raw = tmp_path / "MNIST" / "raw"
    raw.chmod(0o555)  # even root (who may write anyway) must not extract into it
    try:
        dm = MNISTDataModule(data_dir=str(tmp_path))
        dm.setup()
    finally:
        raw.chmod(0o755)
    np.testing.assert_array_equal(dm.test_x.numpy(), ref["test"][0])
    assert sorted(p.name for p in raw.iterdir()) == sorted(f + ".gz" for f in vision._MNIST_FILES)


def test_val_split(tmp_path):
    write_mnist_idx(tmp_path, "MNIST", n_train=50, n_test=20)
    dm = MNISTDataModule(data_dir=str(tmp_path), val_size=10, seed=3)
    dm.setup()
    assert (len(dm.train_x), len(dm.val_x), len(dm.test_x)) == (40, 10, 20)
    assert len(dm.train_dataloader().dataset) == 40 and len(dm.val_dataloader().dataset) == 10
    # a partition of the training file: every training image lands in exactly one of the two
    full = MNISTDataModule(data_dir=str(tmp_path), val_size=0)  # the whole training file
    full.setup()
    flat = lambda t: {bytes(r) for r in t.reshape(len(t), -1).numpy()}  # noqa: E731
    assert flat(dm.train_x) | flat(dm.val_x) == flat(full.train_x)
    assert not flat(dm.train_x) & flat(dm.val_x)


# --- CIFAR / SVHN ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "k"), [(CIFAR10DataModule, 10), (CIFAR100DataModule, 100)])
def test_cifar(tmp_path, no_network, cls, k):
    ref = write_cifar(tmp_path, k, n_train=50, n_test=20, seed=2)
    dm = cls(data_dir=str(tmp_path), batch_size=10)
    assert (dm.num_classes, dm.in_channels, dm.image_size, dm.augment) == (k, 3, 32, "crop_flip")
    dm.setup()
    assert dm.train_x.shape == (45, 3, 32, 32) and dm.train_x.dtype == torch.uint8
    assert dm.test_x.shape == (20, 3, 32, 32) and dm.test_y.dtype == torch.int64
    assert dm.train_x.is_contiguous()
    np.testing.assert_array_equal(dm.train_x.numpy(), ref["train"][0][dm.train_indices.numpy()])
    np.testing.assert_array_equal(dm.train_y.numpy(), ref["train"][1][dm.train_indices.numpy()])
    np.testing.assert_array_equal(dm.val_x.numpy(), ref["train"][0][dm.val_indices.numpy()])
    np.testing.assert_array_equal(dm.test_x.numpy(), ref["test"][0])
    np.testing.assert_array_equal(dm.test_y.numpy(), ref["test"][1])
    assert 0 <= int(dm.train_y.min()) and int(dm.train_y.max()) < k
    x, _, (xb, _) = first_batch(dm)
    assert xb.shape == (10, 3, 32, 32)
    check_normalised(dm, x, xb)  # no trainer attached: no augmentation


def test_augmentation_runs_only_while_training(tmp_path):
    write_cifar(tmp_path, 10, n_train=50, n_test=20)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=32)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=True, global_rank=0, global_step=0, current_epoch=0)
    xa, ya = dm.on_after_batch_transfer((x, y), 0)
    xb, _ = dm.on_after_batch_transfer((x, y), 0)
    assert xa.shape == (32, 3, 32, 32) and torch.equal(ya, y)
    torch.testing.assert_close(xa, xb)  # seeded by (seed, rank, step, epoch)
    plain = x.float() / 255  # pixels
    assert not torch.allclose(xa, plain)
    dm.trainer.training = False
    torch.testing.assert_close(dm.on_after_batch_transfer((x, y), 0)[0], plain)


def test_svhn(tmp_path, no_network):
    ref = write_svhn(tmp_path, n_train=50, n_test=20, seed=3)
    dm = SVHNDataModule(data_dir=str(tmp_path), batch_size=10)
    assert (dm.num_classes, dm.in_channels, dm.augment) == (10, 3, "crop")
    dm.setup()
    assert dm.train_x.shape == (45, 3, 32, 32) and dm.train_x.dtype == torch.uint8
    assert dm.test_x.shape == (20, 3, 32, 32)
    assert dm.train_y.dtype == torch.int64 and dm.train_y.shape == (45,)
    assert set(dm.train_y.tolist()) | set(dm.val_y.tolist()) == set(range(10))  # the file's 10 became 0
    np.testing.assert_array_equal(dm.train_x.numpy(), ref["train"][0][dm.train_indices.numpy()])
    np.testing.assert_array_equal(dm.train_y.numpy(), ref["train"][1][dm.train_indices.numpy()])
    np.testing.assert_array_equal(dm.test_x.numpy(), ref["test"][0])
    np.testing.assert_array_equal(dm.test_y.numpy(), ref["test"][1])
    x, _, (xb, _) = first_batch(dm)
    check_normalised(dm, x, xb)


def test_usps(tmp_path, no_network):
    ref = write_usps(tmp_path, n_train=30, n_test=20, seed=4)
    dm = USPSDataModule(data_dir=str(tmp_path), batch_size=10, image_size=32)
    dm.setup()
    assert (dm.num_classes, dm.in_channels, dm.train_x.shape[1:], len(dm.val_x)) == (10, 1, (1, 32, 32), 3)
    raw = USPSDataModule(data_dir=str(tmp_path))  # native 16 x 16: the pixels and labels exactly as written
    raw.setup()
    np.testing.assert_array_equal(raw.test_x.numpy(), ref["test"][0])
    np.testing.assert_array_equal(raw.test_y.numpy(), ref["test"][1])
    np.testing.assert_array_equal(raw.train_x.numpy(), ref["train"][0][raw.train_indices.numpy()])
    (tmp_path / "USPS" / "usps.t.bz2").write_bytes(b"BZh91AY&SY not really bz2")
    with pytest.raises(DatasetCorruptError, match="USPS file .*usps.t.bz2 is damaged"):
        USPSDataModule(data_dir=str(tmp_path)).setup()


@pytest.mark.parametrize("which", ["mnist", "cifar10", "cifar100", "svhn"])
def test_download_true_uses_present_files_offline(tmp_path, no_network, which):
    """Generated files do not match the official MD5s; present files must not be re-fetched."""
    if which == "mnist":
        write_mnist_idx(tmp_path, "MNIST", n_train=10, n_test=10)
        dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    elif which == "svhn":
        write_svhn(tmp_path, n_train=10, n_test=10)
        dm = SVHNDataModule(data_dir=str(tmp_path), download=True)
    else:
        k = 10 if which == "cifar10" else 100
        write_cifar(tmp_path, k, n_train=10, n_test=10)
        dm = (CIFAR10DataModule if k == 10 else CIFAR100DataModule)(data_dir=str(tmp_path), download=True)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_x), len(dm.val_x), len(dm.test_x)) == (9, 1, 10)


# --- long tail ------------------------------------------------------------------------------------
def test_long_tail_counts():
    c = long_tail_counts(5000, 10, 100)
    assert c == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert all(a >= b for a, b in zip(c, c[1:]))
    assert sum(c) == 12406  # CIFAR-10-LT, factor 100 (Cao et al. 2019)
    c100 = long_tail_counts(500, 100, 100)
    assert (c100[0], c100[-1], sum(c100)) == (500, 5, 10847)
    assert all(a >= b for a, b in zip(c100, c100[1:]))
    assert long_tail_counts(5000, 10, 10)[-1] == 500
    assert long_tail_counts(7, 4, 1) == [7, 7, 7, 7]
    assert long_tail_counts(9, 1, 100) == [9]
    with pytest.raises(ValueError):
        long_tail_counts(10, 10, 0.5)


def test_long_tail_indices_match_a_loop():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (500,), generator=g)
    counts = [40, 30, 1000, 0, 5, 17, 3]
    got = long_tail_indices(labels, counts)
    want = sorted(i for c in range(7) for i in (labels == c).nonzero().flatten().tolist()[: counts[c]])
    assert got.dtype == torch.int64 and got.tolist() == want
    assert long_tail_indices(torch.empty(0, dtype=torch.long), counts).numel() == 0
    with pytest.raises(ValueError):
        long_tail_indices(torch.tensor([0, 7]), counts)


def test_cifar10_lt(tmp_path):
    ref = write_cifar(tmp_path, 10, n_train=300, n_test=20, seed=4)  # 30 per class
    dm = CIFAR10LTDataModule(data_dir=str(tmp_path), imbalance_factor=10, max_per_class=20)
    want = long_tail_counts(20, 10, 10)
    assert want[0] == 20 and want[-1] == 2
    dm.setup()
    assert dm.class_counts == want
    assert torch.bincount(dm.train_y, minlength=10).tolist() == want
    # the first n_k images of each class in file order, kept in file order
    keep = long_tail_indices(torch.from_numpy(ref["train"][1]), want).numpy()
    np.testing.assert_array_equal(dm.train_x.numpy(), ref["train"][0][keep])
    for c in range(10):
        first = np.flatnonzero(ref["train"][1] == c)[: want[c]]
        np.testing.assert_array_equal(keep[np.isin(keep, first)], first)
    assert len(dm.test_x) == 20  # test set untouched
    np.testing.assert_array_equal(dm.test_y.numpy(), ref["test"][1])
    # defaults: the published profile
    default = CIFAR10LTDataModule(data_dir=str(tmp_path))
    assert default.target_counts == long_tail_counts(5000, 10, 100)


def test_cifar100_lt(tmp_path):
    write_cifar(tmp_path, 100, n_train=600, n_test=20, seed=5)  # 6 per class
    dm = CIFAR100LTDataModule(data_dir=str(tmp_path), imbalance_factor=6, max_per_class=6, val_size=5)
    dm.setup()
    want = long_tail_counts(6, 100, 6)
    assert (want[0], want[-1]) == (6, 1)
    assert len(dm.train_x) == sum(want)  # the long tail stays whole: validation comes from the images it left out
    assert len(dm.val_x) == 5 and len(dm.test_x) == 20
    assert not set(dm.val_indices.tolist()) & set(dm.train_indices.tolist())
    assert CIFAR100LTDataModule(data_dir=str(tmp_path)).target_counts[-1] == 5


def test_class_path_instantiation(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--data", type=datamodules.TensorImageDataModule)
    cfg = parser.parse_object(
        {
            "data": {
                "class_path": "datamodules.CIFAR10LTDataModule",
                "init_args": {"data_dir": str(tmp_path), "imbalance_factor": 50, "batch_size": 7},
            }
        }
    )
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, CIFAR10LTDataModule)
    assert (dm.imbalance_factor, dm.batch_size, dm.target_counts[-1]) == (50.0, 7, 100)


# --- missing data ---------------------------------------------------------------------------------
MISSING = [
    (MNISTDataModule, "MNIST/raw", "train-images-idx3-ubyte.gz"),
    (FashionMNISTDataModule, "FashionMNIST/raw", "t10k-labels-idx1-ubyte.gz"),
    (KMNISTDataModule, "KMNIST/raw", "train-labels-idx1-ubyte.gz"),
    (CIFAR10DataModule, "cifar-10-batches-py", "data_batch_1"),
    (CIFAR100DataModule, "cifar-100-python", "meta"),
    (CIFAR10LTDataModule, "cifar-10-batches-py", "batches.meta"),
    (CIFAR100LTDataModule, "cifar-100-python", "train"),
    (SVHNDataModule, "", "test_32x32.mat"),
    (USPSDataModule, "USPS", "usps.bz2"),
]


@pytest.mark.parametrize(("cls", "sub", "file"), MISSING)
def test_missing_data_raises(tmp_path, no_network, cls, sub, file):
    dm = cls(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "nowhere" / sub) in msg and file in msg
    assert "--data.download true" in msg and "CVLAB_DATA" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_partly_missing_names_what_is_missing(tmp_path, no_network):
    write_mnist_idx(tmp_path, "MNIST", n_train=10, n_test=10)
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DatasetNotFoundError, match=r"missing: t10k-images-idx3-ubyte\.gz\)"):
        MNISTDataModule(data_dir=str(tmp_path)).setup()
    write_cifar(tmp_path, 10, n_train=10, n_test=10)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DatasetNotFoundError, match=r"missing: data_batch_3\)"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup()


def test_torchvision_not_found_is_reraised_as_ours(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        with vision._not_found_as_ours("X", tmp_path, ["a"]):
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(RuntimeError, match="something else"):
        with vision._not_found_as_ours("X", tmp_path, ["a"]):
            raise RuntimeError("something else")


# --- the real thing -------------------------------------------------------------------------------
SHARED = Path("/work/shared/data")


@pytest.mark.data
def test_real_mnist(tmp_path, no_network):
    if not (SHARED / "MNIST" / "raw").is_dir():
        pytest.skip(f"no real MNIST under {SHARED}")
    shutil.copytree(SHARED / "MNIST", tmp_path / "MNIST")
    dm = MNISTDataModule(data_dir=str(tmp_path))  # extracts the .gz files next to themselves
    dm.setup()
    again = MNISTDataModule(data_dir=str(tmp_path), download=True)  # torchvision's own check, no network
    again.prepare_data()
    again.setup()
    assert torch.equal(again.test_x, dm.test_x)
    assert dm.train_x.shape == (55000, 1, 28, 28) and dm.val_x.shape == (5000, 1, 28, 28)
    assert dm.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(torch.cat([dm.train_y, dm.val_y])).tolist()[:2] == [5923, 6742]
    mean = dm.train_x.float().div(255).mean().item()
    assert abs(mean - 0.1307) < 1e-3


# --- the CIFAR-10 JPEG stand-in's quirks (../shared/data/cifar10_jpeg): files in the release's layout whose MD5s
# are not the release's, written with Python 2 string opcodes; no test here needs the stand-in itself ---------------
def _py2_str(v: str | bytes) -> bytes:
    b = v.encode("latin1") if isinstance(v, str) else v
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + len(b).to_bytes(4, "little") + b


def _py2_int(v: int) -> bytes:
    return b"K" + bytes([v]) if v < 256 else b"M" + v.to_bytes(2, "little")


def _py2_batch(labels: list[int], data: np.ndarray) -> bytes:
    """One batch as the stand-in's builder (and the Python 2 release) lays it out: protocol 2, Python 2 strings,
    ``numpy.core.multiarray._reconstruct`` with the pixels as one latin-1 string."""
    n = data.shape[0]
    array = b"".join([
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85", _py2_str("b"), b"\x87R(K\x01",
        _py2_int(n), _py2_int(3072), b"\x86cnumpy\ndtype\n", _py2_str("u1"), b"K\x00K\x01\x87R(K\x03",
        _py2_str("|"), b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89", _py2_str(data.tobytes()), b"tb",
    ])
    names = b"".join(_py2_str(f"train/cat/{i:04d}.jpg") for i in range(n))
    return b"".join([
        b"\x80\x02}(", _py2_str("batch_label"), _py2_str("training batch"), _py2_str("labels"),
        b"](" + b"".join(_py2_int(v) for v in labels) + b"e", _py2_str("data"), array,
        _py2_str("filenames"), b"](" + names + b"e", b"u.",
    ])


def test_unofficial_cifar_files_warn_naming_each_file_and_still_load(tmp_path):
    ref = write_cifar(tmp_path, 10, n_train=20, n_test=10, seed=3)
    folder = tmp_path / "cifar-10-batches-py"
    x1, y1 = ref["train"][0][:4].reshape(4, 3072), ref["train"][1][:4].tolist()
    (folder / "data_batch_1").write_bytes(_py2_batch(y1, x1))  # the stand-in's layout, same 4 images
    with pytest.warns(vision.UnofficialDataWarning) as caught:
        x, y = CIFAR10DataModule(data_dir=str(tmp_path)).load_split(train=True)
    warned = {str(w.message).split(" is not the official release")[0] for w in caught}
    files = [f"data_batch_{b}" for b in range(1, 6)] + ["batches.meta"]
    assert warned == {f"CIFAR-10 file {folder / n}" for n in files}
    assert "MD5 " in str(caught[0].message) and "reading it all the same" in str(caught[0].message)
    np.testing.assert_array_equal(x.numpy(), ref["train"][0])  # the Python 2 batch decodes to the same pixels
    assert y.tolist() == ref["train"][1].tolist()
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=2)
    with pytest.warns(vision.UnofficialDataWarning):
        dm.setup()  # loading goes on: the warning never stops it
    assert (len(dm.train_x), len(dm.val_x), len(dm.test_x)) == (18, 2, 10)


def test_official_cifar_md5_reads_without_a_warning(tmp_path):
    import warnings

    write_cifar(tmp_path, 10, n_train=10, n_test=4)
    f = tmp_path / "cifar-10-batches-py" / "test_batch"
    with warnings.catch_warnings():
        warnings.simplefilter("error", vision.UnofficialDataWarning)
        assert len(vision.read_pickled_batch(f, "CIFAR-10", official_md5=vision.file_md5(f))["labels"]) == 4
        vision.read_pickled_batch(f, "CIFAR-10")  # no MD5 to compare: nothing to report
    with pytest.warns(vision.UnofficialDataWarning, match=f"CIFAR-10 file {f} is not the official release"):
        vision.read_pickled_batch(f, "CIFAR-10", official_md5="0" * 32)


def test_cifar10_lt_counts_for_imbalance_100_are_taken_before_the_validation_hold_out(tmp_path):
    # CIFAR10LTDataModule.target_counts come from the whole 5,000 images per class (long_tail_counts(5000, ...)), i.e.
    # BEFORE validation is held out; split_indices then draws the validation images (by default a tenth of the 12,406
    # kept: 1,240) from the 37,594 that the long tail leaves out, so the training profile is still exactly these
    # counts after the hold-out.
    want = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert CIFAR10LTDataModule(data_dir=str(tmp_path)).target_counts == want
    # the same two steps at a hundredth of the scale: 50 per class, factor 100 -> [50, ..., 0]; 100 held out
    write_cifar(tmp_path, 10, n_train=500, n_test=10, seed=6)
    dm = CIFAR10LTDataModule(data_dir=str(tmp_path), max_per_class=50, val_size=100)
    with pytest.warns(vision.UnofficialDataWarning):
        dm.setup()
    small = long_tail_counts(50, 10, 100)
    assert dm.class_counts == small and len(dm.val_x) == 100
    assert not set(dm.val_indices.tolist()) & set(dm.train_indices.tolist())


@pytest.mark.data
def test_cifar10_stand_in_when_built():
    """The CIFAR-10 JPEG stand-in (``python ../shared/data/cifar10_jpeg/build_cifar10.py ROOT``, then
    ``CVLAB_CIFAR10_STAND_IN=ROOT pytest -m data -k stand_in``): every batch warns (its MD5 is not the release's)
    and loads; the protocol split and the long tail are exact."""
    root = Path(os.environ.get("CVLAB_CIFAR10_STAND_IN", "/nonexistent"))
    if not (root / "cifar-10-batches-py" / "data_batch_5").is_file():
        pytest.skip(f"no cifar-10-batches-py under {root} (set CVLAB_CIFAR10_STAND_IN)")
    dm = CIFAR10DataModule(data_dir=str(root))
    with pytest.warns(vision.UnofficialDataWarning, match="data_batch_1 is not the official release"):
        dm.setup()
    assert (len(dm.train_x), len(dm.val_x), len(dm.test_x)) == (45000, 5000, 10000)
    assert torch.bincount(dm.test_y, minlength=10).tolist() == [1000] * 10
    lt = CIFAR10LTDataModule(data_dir=str(root))
    with pytest.warns(vision.UnofficialDataWarning):
        counts = lt.class_counts
    # the default hold-out is a tenth of the 12,406 kept (1,240), drawn from the 37,594 images the tail leaves out
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50] and len(lt.val_x) == 1240
    assert torch.bincount(lt.val_y, minlength=10)[0] == 0  # class 0 keeps all its images: none left to validate
