"""Tiny datasets written in the real on-disk formats, for tests that must not touch the network.

Every writer returns what a correct reader must decode, as numpy arrays:
``{"train": (images uint8 (N, C, H, W), labels int64 (N,)), "test": (...)}``. Labels are balanced
(``i % num_classes``) and shuffled with ``seed``, so every class is present when ``n >= num_classes``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def save_cvlab_checkpoint(module, path: str | os.PathLike) -> Path:
    """``module`` (a LightningModule, e.g. an untrained ClassifierModule) saved as cvlab's checkpoints are:
    ``{"state_dict", "hyper_parameters"}``, which :func:`lit_modules.teacher.load_teacher` reads."""
    import torch

    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return Path(path)


def _images_labels(n: int, num_classes: int, shape: tuple[int, ...], rng: np.random.Generator):
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    return x, y


# --- MNIST / FashionMNIST / KMNIST: IDX files, gzipped ---------------------------------------------
def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool = True) -> Path:
    """One IDX (``ubyte``) file: magic ``0x0000 08 nd``, big-endian int32 dims, then raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_mnist_idx(
    root: str | os.PathLike,
    folder_name: str = "MNIST",
    n_train: int = 50,
    n_test: int = 20,
    seed: int = 0,
    compress: bool = True,
) -> Splits:
    """``<root>/<folder_name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (28x28, 10 classes).

    ``folder_name`` is torchvision's class name: ``MNIST``, ``FashionMNIST`` or ``KMNIST``.
    ``compress=False`` writes the extracted files (no ``.gz``) instead.
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder_name / "raw"
    out: Splits = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x, y = _images_labels(n, 10, (28, 28), rng)
        ext = ".gz" if compress else ""
        write_idx(raw / f"{prefix}-images-idx3-ubyte{ext}", x, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{ext}", y.astype(np.uint8), compress)
        out[split] = (x[:, None], y)
    return out


# --- CIFAR-10 / CIFAR-100: python pickles ---------------------------------------------------------
def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(
    root: str | os.PathLike, num_classes: int = 10, n_train: int = 50, n_test: int = 20, seed: int = 0
) -> Splits:
    """The python version of CIFAR-10 (``<root>/cifar-10-batches-py/``: ``data_batch_1..5``,
    ``test_batch``, ``batches.meta``) or CIFAR-100 (``<root>/cifar-100-python/``: ``train``, ``test``,
    ``meta``). Rows are 3072 bytes, channel-major (1024 R, 1024 G, 1024 B), as in the release.
    """
    if num_classes not in (10, 100):
        raise ValueError("num_classes must be 10 or 100")
    rng = np.random.default_rng(seed)
    xtr, ytr = _images_labels(n_train, num_classes, (3, 32, 32), rng)
    xte, yte = _images_labels(n_test, num_classes, (3, 32, 32), rng)
    if num_classes == 10:
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        chunks = np.array_split(np.arange(n_train), 5)
        for b, idx in enumerate(chunks, start=1):
            _pickle(
                folder / f"data_batch_{b}",
                {
                    "batch_label": f"training batch {b} of 5",
                    "labels": ytr[idx].tolist(),
                    "data": xtr[idx].reshape(len(idx), 3072),
                    "filenames": [f"img_{i}.png" for i in idx],
                },
            )
        _pickle(
            folder / "test_batch",
            {
                "batch_label": "testing batch 1 of 1",
                "labels": yte.tolist(),
                "data": xte.reshape(n_test, 3072),
                "filenames": [f"test_{i}.png" for i in range(n_test)],
            },
        )
        _pickle(
            folder / "batches.meta",
            {"num_cases_per_batch": max(1, n_train // 5), "label_names": [f"class_{c}" for c in range(10)],
             "num_vis": 3072},
        )
    else:
        folder = Path(root) / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
            _pickle(
                folder / name,
                {
                    "filenames": [f"{name}_{i}.png" for i in range(len(y))],
                    "batch_label": f"{name}ing batch 1 of 1",
                    "fine_labels": y.tolist(),
                    "coarse_labels": (y // 5).tolist(),
                    "data": x.reshape(len(y), 3072),
                },
            )
        _pickle(
            folder / "meta",
            {
                "fine_label_names": [f"fine_{c}" for c in range(100)],
                "coarse_label_names": [f"coarse_{c}" for c in range(20)],
            },
        )
    return {"train": (xtr, ytr), "test": (xte, yte)}


# --- SVHN: MATLAB files ---------------------------------------------------------------------------
def write_svhn(root: str | os.PathLike, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Splits:
    """``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat``: ``X`` (32, 32, 3, N) uint8 and ``y``
    (N, 1) with labels 1..10, 10 meaning the digit 0 (the returned labels are 0..9)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out: Splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = _images_labels(n, 10, (3, 32, 32), rng)
        mat_y = np.where(y == 0, 10, y).astype(np.uint8)[:, None]
        savemat(root / f"{split}_32x32.mat", {"X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)), "y": mat_y})
        out[split] = (x, y)
    return out


# --- class folders of image files (ImageFolder / ImageNet layout) --------------------------------------------
def write_image_folders(root: str | os.PathLike, classes: list[str], per_class: dict[str, int],
                        size: tuple[int, int] = (40, 48), seed: int = 0, suffix: str = ".JPEG") -> Splits:
    """``<root>/<split>/<class>/<i><suffix>`` for each split in ``per_class`` (``{"train": 3, "val": 2}``): JPEG
    (or PNG) files of ``size`` (H, W) whose pixels are ``np.uint8`` noise around a class-dependent grey level.
    Returns the decoded-as-written arrays for PNG (lossless); for JPEG only the labels are exact."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out: Splits = {}
    for split, n in per_class.items():
        xs, ys = [], []
        for k, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                level = 40 + 160 * k / max(len(classes) - 1, 1)
                img = np.clip(rng.normal(level, 20, size=(*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{name}_{i}{suffix}")
                xs.append(img.transpose(2, 0, 1))
                ys.append(k)
        out[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    return out


# --- WordNet 3.0 data.noun ------------------------------------------------------------------------------------
# a small data.noun in WordNet 3.0's format: licence lines start with two spaces; w_cnt in hex, p_cnt 3 digits;
# pointers "symbol offset pos source/target"; '~' hyponym pointers ignored; '@i' used when there is no '@'.
DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 002 ~ 00001930 n 0000 ~ 00002137 n 0000 | that which is perceived
00001930 03 n 01 physical_entity 0 002 @ 00001740 n 0000 ~ 00002684 n 0000 | an entity that has physical existence
00002137 03 n 02 abstraction 0 abstract_entity 0 001 @ 00001740 n 0000 | a general concept
00002684 03 n 01 object 0 003 @ 00001930 n 0000 ~ 02084071 n 0000 ~ 02121620 n 0000 | a tangible thing
02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 003 @ 00002684 n 0000 @ 00002137 n 0000 \
#m 02083346 n 0000 | a member of the genus Canis
02121620 05 n 01 cat 0 001 @ 00002684 n 0000 | feline mammal
09999999 18 n 01 Einstein 0 002 @i 00002137 n 0000 ;u 06000000 n 0000 | physicist
"""


def write_data_noun(path: str | os.PathLike) -> Path:
    """:data:`DATA_NOUN` at ``path``: synsets entity > physical_entity > object > {dog n02084071, cat n02121620},
    entity > abstraction > Einstein n09999999 (an instance hypernym)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DATA_NOUN)
    return path

IN9_CLASSES = ("00_dog", "01_bird", "02_vehicle", "03_reptile", "04_carnivore", "05_insect", "06_instrument",
               "07_primate", "08_fish")


def write_imagenet9(root: str | os.PathLike, per_class: int = 2, size: int = 24, seed: int = 0,
                    variants: tuple[str, ...] = ("original", "only_fg", "no_fg", "only_bg_b", "only_bg_t",
                                                 "mixed_same", "mixed_rand", "mixed_next"),
                    classes: tuple[str, ...] = IN9_CLASSES) -> dict[str, np.ndarray]:
    """ImageNet-9 of the Backgrounds Challenge: ``<root>/<variant>/val/<class>/<stem>.JPEG`` (the same stems in
    every variant) and ``<root>/fg_mask/val/<class>/<stem>.npy`` (bool H x W: a centred box). Returns the masks
    ``(N, H, W)`` and labels ``(N,)`` in reading order (classes sorted, stems sorted)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    masks, labels = [], []
    for label, c in enumerate(classes):
        for i in range(per_class):
            stem = f"n{label:08d}_{i:05d}"
            m = np.zeros((size, size), dtype=bool)
            lo, hi = sorted(rng.integers(size // 6, size - size // 6, size=2))
            m[lo:hi + 2, size // 4: 3 * size // 4] = True
            for v in variants:
                d = root / v / "val" / c
                d.mkdir(parents=True, exist_ok=True)
                px = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(px).save(d / f"{stem}.JPEG", quality=95)
            d = root / "fg_mask" / "val" / c
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / f"{stem}.npy", m)
            masks.append(m)
            labels.append(label)
    return {"masks": np.stack(masks), "labels": np.asarray(labels, dtype=np.int64)}


def write_imagenet_s(root: str | os.PathLike, mask_dir: str = "ImageNetS919/validation-segmentation",
                     size: tuple[int, int] = (30, 40), wnids: tuple[str, ...] = ("n01440764", "n01443537"),
                     per_class: int = 2, seed: int = 0):
    """ImageNet val images ``<root>/val/<wnid>/im<i>.JPEG`` with ImageNet-S masks ``<root>/<mask_dir>/<wnid>/im<i>.png``
    (class id ``R + 256 G``; a box of the image's class, ids above 255 for odd ``i``, a corner of the ignored id
    1000). Returns the object masks ``(N, H, W)`` bool in reading order."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    masks = []
    for w, wnid in enumerate(wnids):
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
        (root / mask_dir / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "val" / wnid / f"im{i}.JPEG")
            ids = np.zeros(size, dtype=np.int64)
            ids[5:20, 10:30] = w + 1 + 300 * (i % 2)
            ids[0:3, 0:3] = 1000
            png = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
            Image.fromarray(png).save(root / mask_dir / wnid / f"im{i}.png")
            masks.append(torch.from_numpy((ids != 0) & (ids != 1000)))
    return torch.stack(masks)


# --- USPS: LIBSVM text, bz2 ----------------------------------------------------------------------------------
def write_usps(root: str | os.PathLike, n_train: int = 30, n_test: int = 20, seed: int = 0) -> Splits:
    """``<root>/USPS/usps.bz2`` and ``usps.t.bz2``: lines ``label idx:value ...`` (labels 1..10 for digits 0..9, 256
    values in [-1, 1]), as LIBSVM ships them. Each value sits half a grey level above its pixel, so torchvision's
    truncating ``((v + 1) / 2 * 255).astype(uint8)`` decodes it exactly."""
    import bz2

    rng = np.random.default_rng(seed)
    folder = Path(root) / "USPS"
    folder.mkdir(parents=True, exist_ok=True)
    out: Splits = {}
    for name, split, n in (("usps.bz2", "train", n_train), ("usps.t.bz2", "test", n_test)):
        x, y = _images_labels(n, 10, (1, 16, 16), rng)
        lines = []
        for img, label in zip(x, y):
            vals = (img.reshape(-1).astype(np.float64) + 0.5) / 255 * 2 - 1
            lines.append(f"{label + 1} " + " ".join(f"{j + 1}:{v:.10f}" for j, v in enumerate(vals)))
        (folder / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
        out[split] = (x, y)
    return out


# --- iNaturalist 2019: <root>/2019/<super>/<id>/*.jpg + train2019.json / val2019.json ------------------------
def write_inaturalist2019(root: str | os.PathLike, counts: dict[int, tuple[int, int]],
                          supers: tuple[str, ...] = ("Birds", "Plants"), size: tuple[int, int] = (30, 40),
                          seed: int = 0) -> dict[str, list[int]]:
    """Category ``c`` (ids 0..K-1, super category ``supers[c % len(supers)]``) gets ``counts[c] = (train, val)``
    JPEGs; the JSONs list them COCO-style with ``file_name`` ``train_val2019/<super>/<c>/<file>``. Returns the labels
    of each split in file order."""
    import json

    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    out: dict[str, list[int]] = {"train": [], "val": []}
    meta = {s: {"images": [], "annotations": [], "categories": []} for s in out}
    for c, (n_train, n_val) in sorted(counts.items()):
        folder = root / "2019" / supers[c % len(supers)] / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("val", n_val)):
            meta[split]["categories"].append({"id": c, "name": f"species {c}"})
            for i in range(n):
                name = f"{split}_{c}_{i}.jpg"
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
                k = len(meta[split]["images"])
                meta[split]["images"].append({"id": 1000 * c + 10 * i + len(split), "file_name":
                                              f"train_val2019/{supers[c % len(supers)]}/{c}/{name}"})
                meta[split]["annotations"].append({"id": k, "image_id": 1000 * c + 10 * i + len(split),
                                                   "category_id": c})
                out[split].append(c)
    for split in out:
        (root / f"{split}2019.json").write_text(json.dumps(meta[split]))
    return out
