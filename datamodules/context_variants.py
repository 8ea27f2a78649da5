"""Context variants of one set of images, with object masks, for context vs object studies ("Lost in Context",
ICVGIP 2024; the variants of the Backgrounds Challenge, Xiao et al. 2020, MadryLab/backgrounds_challenge).

A test batch is ``(x, masks, labels)``: ``x`` float ``(B, V, 3, H, W)`` [0, 1] pixels, one slice per name in
``datamodule.variant_names``; ``masks`` bool ``(B, 1, H, W)`` (the object in the original image, the same pixels
in every variant); ``labels`` ``(B,)``.

Variants come in two kinds:

* *stored* (read or generated with the images): ``original``, ``only_fg`` (object on black), ``mixed_same`` /
  ``mixed_rand`` / ``mixed_next`` (the object on the background of another image of the same class / a random
  image / an image of the next class), ``only_bg`` (the embedded data: the true background behind the object),
  and on ImageNet-9 ``no_fg``, ``only_bg_b``, ``only_bg_t``;
* *built on the device per batch* from ``original`` and the masks, in torch: the three no-information
  contexts, ``noise_gaussian`` (N(0.5, 0.25^2) per value, clipped), ``noise_white`` (U(0, 1) per value),
  ``mean_colour`` (the ImageNet mean colour 255 * (0.485, 0.456, 0.406)); and ImageNet-CS perturbations
  ``ctx_<corruption>_<severity>`` / ``obj_<corruption>_<severity>`` (the corruption through the mask:
  :mod:`datamodules.context_corruption`).

:class:`ShapesContextDataModule` makes the embedded replica (shapes on class-correlated textures, with the true
backgrounds for the mixed variants). :class:`ImageNet9DataModule` reads the Backgrounds Challenge layout.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cvlab.task import TaskSpec
from datamodules.context_corruption import corrupt_region
from datamodules.data_root import resolve_data_dir
from datamodules.errors import CvlabError, DatasetCorruptError, DatasetNotFoundError
from datamodules.folders import IMAGE_SUFFIXES, decode_rgb
from datamodules.synthetic import Background, generate_shapes_with_backgrounds

IMAGENET_MEAN = (0.485, 0.456, 0.406)
NO_INFORMATION = ("noise_gaussian", "noise_white", "mean_colour")


def paste(objects: Tensor, masks: Tensor, contexts: Tensor) -> Tensor:
    """``objects * M + contexts * (1 - M)``: ``(B, C, H, W)`` images, ``(B, 1, H, W)`` masks, contexts
    broadcastable to the images."""
    return torch.where(masks.bool(), objects, contexts.to(objects.dtype).expand_as(objects))


def no_information_context(name: str, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A context with no information about the class, shaped and typed like ``like`` ``(B, 3, H, W)`` [0, 1]."""
    if name == "noise_gaussian":
        return (0.5 + 0.25 * torch.randn(like.shape, generator=generator, device=like.device)).clamp(0, 1)
    if name == "noise_white":
        return torch.rand(like.shape, generator=generator, device=like.device)
    if name == "mean_colour":
        return torch.tensor(IMAGENET_MEAN, device=like.device).view(1, 3, 1, 1).expand_as(like)
    raise CvlabError(f"unknown no-information context {name!r}; choose from {', '.join(NO_INFORMATION)}")


def _parse_corruptions(specs: list[str], prefix: str) -> list[tuple[str, str, int]]:
    out = []
    for s in specs:
        name, _, sev = s.partition(":")
        if not sev.isdigit() or not 1 <= int(sev) <= 5:
            raise CvlabError(f"corruption {s!r} must be 'name:severity' with severity 1..5, e.g. 'gaussian_noise:3'")
        out.append((f"{prefix}_{name}_{sev}", name, int(sev)))
    return out


class ContextVariantsDataModule(L.LightningDataModule):
    """The shared part: stored variants from :meth:`stored_dataset`, built variants per batch on the device.

    Args:
        variants: stored variants to serve (default: all the subclass has); ``original`` is always kept.
        no_information: add the three no-information contexts.
        context_corruptions: ``["gaussian_noise:3", ...]``: the context corrupted, the object kept.
        object_corruptions: the object corrupted, the context kept.
        batch_size, num_workers: the loader's.
        seed: seeds the built variants' noise (batch ``i`` draws with ``seed + i``).
    """

    stored_variants: tuple[str, ...] = ()
    num_classes: int = 0
    image_size: int = 224
    mean: tuple[float, ...] | None = None  # the data's statistics where known (a study's models bring their own)
    std: tuple[float, ...] | None = None

    def __init__(self, variants: list[str] | None = None, no_information: bool = True,
                 context_corruptions: list[str] | None = None, object_corruptions: list[str] | None = None,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        chosen = list(variants) if variants is not None else list(self.stored_variants)
        unknown = [v for v in chosen if v not in self.stored_variants]
        if unknown:
            raise CvlabError(f"unknown variants {unknown}; {type(self).__name__} has {', '.join(self.stored_variants)}")
        self.variants = ["original"] + [v for v in chosen if v != "original"]
        self.no_information = no_information
        self.built = ([(n, "", 0) for n in NO_INFORMATION] if no_information else []) + \
            _parse_corruptions(list(context_corruptions or []), "ctx") + \
            _parse_corruptions(list(object_corruptions or []), "obj")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.variant_names = self.variants + [n for n, _, _ in self.built]
        self.class_names: list[str] = []
        self._dataset: Dataset | None = None
        self._batches = 0

    @property
    def task_spec(self) -> TaskSpec:
        """RGB images of ``num_classes`` classes at ``image_size`` (class names once set up)."""
        names = tuple(self.class_names) if len(self.class_names) == self.num_classes else ()
        return TaskSpec(num_classes=int(self.num_classes), in_channels=3, image_size=int(self.image_size),
                        mean=self.mean, std=self.std, class_names=names, name=type(self).__name__)

    def stored_dataset(self) -> Dataset:
        """Items ``(images uint8 (len(self.variants), 3, H, W), mask bool (1, H, W), label)``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self._dataset is None:
            self._dataset = self.stored_dataset()

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        self._batches = 0
        return DataLoader(self._dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, masks, labels = batch
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x  # (B, Vs, 3, H, W)
        g = torch.Generator(device=x.device).manual_seed(self.seed + self._batches)
        self._batches += 1
        return self.build_variants(x, masks.bool(), g), masks.bool(), labels

    def build_variants(self, x: Tensor, masks: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Append the built variants to the stored ones: ``(B, Vs, 3, H, W)`` -> ``(B, V, 3, H, W)``."""
        orig = x[:, 0]
        extra = []
        for name, corruption, severity in self.built:
            if corruption == "":
                extra.append(paste(orig, masks, no_information_context(name, orig, generator)))
            else:
                region = "context" if name.startswith("ctx_") else "object"
                extra.append(corrupt_region(orig, masks, corruption, severity, region, generator))
        return torch.cat([x, torch.stack(extra, 1)], 1) if extra else x


class ShapesContextDataModule(ContextVariantsDataModule):
    """The embedded replica: shapes on textures (``background="correlated"``: the label's texture family with
    probability ``correlation``), with the variants built from the true backgrounds:

    ``only_fg`` object on black; ``mixed_same`` / ``mixed_rand`` / ``mixed_next``: the object on the background of
    another image of the same class / a random image / an image of class ``label + 1``; ``only_bg``: the image's
    own background without the object. Generated with ``seed`` (use one the classifier was not trained on).
    """

    stored_variants = ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next", "only_bg")
    num_classes = 10

    def __init__(self, num_images: int = 1000, image_size: int = 32, background: Background = "correlated",
                 correlation: float = 0.9, variants: list[str] | None = None, no_information: bool = True,
                 context_corruptions: list[str] | None = None, object_corruptions: list[str] | None = None,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 100, data_dir: str | None = None) -> None:
        super().__init__(variants, no_information, context_corruptions, object_corruptions, batch_size,
                         num_workers, seed)
        self.num_images = num_images
        self.image_size = image_size
        self.background: Background = background
        self.correlation = correlation
        from datamodules.synthetic import SHAPE_NAMES

        self.class_names = list(SHAPE_NAMES)

    def donors(self, labels: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """For each mixed variant, the index of the image whose background each image gets ``(N,)``."""
        n, k = labels.numel(), self.num_classes
        same = torch.empty(n, dtype=torch.long)
        nxt = torch.empty(n, dtype=torch.long)
        for c in range(k):  # one pass per class, not per image
            own = (labels == c).nonzero().squeeze(1)
            if own.numel() == 0:
                continue
            perm = own[torch.randperm(own.numel(), generator=generator)]
            same[perm] = perm.roll(1)  # another image of the class (itself only if it is alone)
            pool = (labels == (c + 1) % k).nonzero().squeeze(1)
            if pool.numel() == 0:
                pool = torch.arange(n)
            nxt[own] = pool[torch.randint(0, pool.numel(), (own.numel(),), generator=generator)]
        rand = torch.randint(0, n, (n,), generator=generator)
        return {"mixed_same": same, "mixed_rand": rand, "mixed_next": nxt}

    def stored_dataset(self) -> Dataset:
        b, bg = generate_shapes_with_backgrounds(self.num_images, seed=self.seed, image_size=self.image_size,
                                                 background=self.background, correlation=self.correlation)
        g = torch.Generator().manual_seed(self.seed + 1)
        donors = self.donors(b.labels, g)
        black = torch.zeros_like(b.images)
        make = {
            "original": lambda: b.images,
            "only_fg": lambda: paste(b.images, b.masks, black),
            "only_bg": lambda: bg,
            **{name: (lambda idx=idx: paste(b.images, b.masks, bg[idx])) for name, idx in donors.items()},
        }
        images = torch.stack([make[v]() for v in self.variants], 1)  # (N, Vs, 3, H, W) uint8
        self.donor_indices = donors
        return TensorDataset(images, b.masks, b.labels)


# --- ImageNet-9 (Backgrounds Challenge) --------------------------------------------------------------------------


class ImageNet9Dataset(Dataset):
    """Reads ``<root>/<variant>/val/<class>/<stem>.<ext>`` for each variant and ``<root>/fg_mask/val/<class>/
    <stem>.npy``; item ``i`` is ``(uint8 (V, 3, S, S), bool (1, S, S), label)`` resized to ``S = image_size``
    (bilinear for images, nearest for masks) when the files are another size."""

    def __init__(self, files: list[list[Path]], masks: list[Path], labels: list[int], image_size: int) -> None:
        self.files, self.masks, self.labels, self.image_size = files, masks, labels, image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        import numpy as np
        import torch.nn.functional as F

        imgs = [decode_rgb(p) for p in self.files[i]]
        mask = torch.from_numpy(np.load(self.masks[i], allow_pickle=False).astype(bool))
        for p, im in zip(self.files[i], imgs):
            if tuple(im.shape[-2:]) != tuple(mask.shape):
                raise DatasetCorruptError(f"mask {self.masks[i]} is {tuple(mask.shape)} but image {p} is "
                                          f"{tuple(im.shape[-2:])} (H, W): masks must match their images")
        x = torch.stack(imgs)  # (V, 3, H, W)
        m = mask[None]
        s = self.image_size
        if tuple(m.shape[-2:]) != (s, s):
            x = F.interpolate(x.float(), size=(s, s), mode="bilinear", antialias=True,
                              align_corners=False).round().clamp(0, 255).to(torch.uint8)
            m = F.interpolate(m[None].float(), size=(s, s), mode="nearest")[0].bool()
        return x, m, self.labels[i]


class ImageNet9DataModule(ContextVariantsDataModule):
    """ImageNet-9 of the Backgrounds Challenge (Xiao, Engstrom, Ilyas, Madry 2020), the layout of
    MadryLab/backgrounds_challenge: ``<root>/<variant>/val/<class>/*`` (the same file names in every variant)
    and masks ``<root>/fg_mask/val/<class>/<stem>.npy`` (binary H x W, the image's size).

    ``data_dir`` is the folder holding the variant folders (default ``$CVLAB_DATA/imagenet9``). Before any
    image is decoded, :meth:`setup` checks that every chosen variant folder exists, holds the same classes and
    file names as ``original``, and that every image has a mask of its size (headers only); each failure is
    one line naming the folder or file.
    """

    stored_variants = ("original", "only_fg", "no_fg", "only_bg_b", "only_bg_t", "mixed_same", "mixed_rand",
                       "mixed_next")
    num_classes = 9
    #: IN-9 pixel statistics (for networks trained on it)
    mean = (0.4717, 0.4499, 0.3837)
    std = (0.2600, 0.2516, 0.2575)

    def __init__(self, data_dir: str | None = None, split: str = "val", image_size: int = 224,
                 variants: list[str] | None = None, no_information: bool = True,
                 context_corruptions: list[str] | None = None, object_corruptions: list[str] | None = None,
                 limit: int | None = None, batch_size: int = 32, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(variants or ["original", "only_fg", "mixed_same", "mixed_rand", "mixed_next"],
                         no_information, context_corruptions, object_corruptions, batch_size, num_workers, seed)
        self.data_dir = data_dir
        self.split = split
        self.image_size = image_size
        self.limit = limit

    @property
    def root(self) -> Path:
        if self.data_dir is not None:
            return Path(self.data_dir).expanduser().resolve()
        return resolve_data_dir(None) / "imagenet9"

    def index(self) -> tuple[list[list[Path]], list[Path], list[int]]:
        """Checked file lists: per image the files of every variant, its mask, its label."""
        import numpy as np
        from PIL import Image

        root = self.root
        folders = {v: root / v / self.split for v in self.variants}
        for v, f in [*folders.items(), ("fg_mask", root / "fg_mask" / self.split)]:
            if not f.is_dir():
                raise DatasetNotFoundError(f"ImageNet-9 variant {v!r} missing: expected the folder {f} "
                                           "(layout <root>/<variant>/val/<class>/*, MadryLab/backgrounds_challenge)")
        classes = sorted(p.name for p in folders["original"].iterdir() if p.is_dir())
        if not classes:
            raise DatasetNotFoundError(f"no class folders in {folders['original']}")
        self.class_names = classes

        def stems(folder: Path) -> dict[str, Path]:
            if not folder.is_dir():
                return {}
            return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}

        files: list[list[Path]] = []
        masks: list[Path] = []
        labels: list[int] = []
        for label, c in enumerate(classes):
            per = {v: stems(folders[v] / c) for v in self.variants}
            ref = per["original"]
            for v, got in per.items():
                if got.keys() != ref.keys():
                    missing = sorted(ref.keys() - got.keys())[:3]
                    raise DatasetCorruptError(f"variant {v!r} class {c!r} has {len(got)} images, original has "
                                              f"{len(ref)}; e.g. missing {missing} in {folders[v] / c}")
            mask_dir = root / "fg_mask" / self.split / c
            mask_files = {p.stem: p for p in sorted(mask_dir.glob("*.npy"))} if mask_dir.is_dir() else {}
            if mask_files.keys() != ref.keys():
                lacking = sorted(ref.keys() - mask_files.keys())[:3]
                raise DatasetCorruptError(f"class {c!r}: {len(mask_files)} masks in {mask_dir} for {len(ref)} images "
                                          f"(every image needs <stem>.npy; e.g. missing {lacking})")
            for stem in ref:
                files.append([per[v][stem] for v in self.variants])
                masks.append(mask_files[stem])
                labels.append(label)
        if self.limit is not None:  # an even spread over classes: every k-th image
            step = max(len(labels) // max(self.limit, 1), 1)
            keep = list(range(0, len(labels), step))[: self.limit]
            files, masks, labels = [files[i] for i in keep], [masks[i] for i in keep], [labels[i] for i in keep]
        for fs, m in zip(files, masks):  # headers only: PIL reads the size, numpy the shape
            shape = np.load(m, mmap_mode="r", allow_pickle=False).shape
            for p in fs:
                with Image.open(p) as im:
                    hw = (im.height, im.width)
                if len(shape) != 2 or tuple(shape) != hw:
                    raise DatasetCorruptError(f"mask {m} is {tuple(shape)} but image {p} is {hw} (H, W): masks must "
                                              "be binary H x W arrays of their image's size")
        return files, masks, labels

    def stored_dataset(self) -> Dataset:
        files, masks, labels = self.index()
        return ImageNet9Dataset(files, masks, labels, self.image_size)


# --- ImageNet-CS: ImageNet validation images with ImageNet-S masks ----------------------------------------------
def imagenet_s_mask(png: Tensor) -> Tensor:
    """An ImageNet-S segmentation PNG ``(3 or 4, H, W)`` uint8 -> the object mask ``(H, W)`` bool: the class id is
    ``R + 256 G``; 0 is background and 1000 the "other" (ignored) label, both context here."""
    ids = png[0].long() + 256 * png[1].long()
    return (ids != 0) & (ids != 1000)


class ImageNetSDataset(Dataset):
    """Item ``i``: ``(uint8 (1, 3, S, S), bool (1, S, S), label)``: the image and its mask resized (shorter side to
    ``S``, bilinear / nearest) and centre-cropped together."""

    def __init__(self, images: list[Path], masks: list[Path], labels: list[int], image_size: int) -> None:
        self.images, self.masks, self.labels, self.image_size = images, masks, labels, image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        import torch.nn.functional as F

        img, png = decode_rgb(self.images[i]), decode_rgb(self.masks[i])
        if img.shape[-2:] != png.shape[-2:]:
            raise DatasetCorruptError(f"mask {self.masks[i]} is {tuple(png.shape[-2:])} but image {self.images[i]} is "
                                      f"{tuple(img.shape[-2:])} (H, W): masks must match their images")
        m = imagenet_s_mask(png)[None, None].float()
        h, w = img.shape[-2:]
        s = self.image_size
        nh, nw = (s, max(s, round(w * s / h))) if h <= w else (max(s, round(h * s / w)), s)
        x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        m = F.interpolate(m, size=(nh, nw), mode="nearest")
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[..., top:top + s, left:left + s].round().clamp(0, 255).to(torch.uint8)
        return x, m[0, :, top:top + s, left:left + s].bool(), self.labels[i]


class ImageNetSDataModule(ContextVariantsDataModule):
    """ImageNet-CS (Lost in Context): ImageNet validation images that have an ImageNet-S mask, with the context or
    the object corrupted through the mask (``context_corruptions`` / ``object_corruptions``, ImageNet-C families
    at severities 1-5) and the no-information contexts; labels are ImageNet's 1000 (sorted wnids).

    Layout under ``data_dir`` (default ``$CVLAB_DATA/imagenet``): images ``<image_dir>/<wnid>/<name>.JPEG``
    (torchvision's ImageFolder ``val``), masks ``<mask_dir>/<wnid>/<name>.png`` (ImageNet-S, e.g.
    ``ImageNetS919/validation-segmentation``). Only images with a mask are used; a wnid folder of masks without
    its image folder is an error.
    """

    stored_variants = ("original",)
    num_classes = 1000

    def __init__(self, data_dir: str | None = None, image_dir: str = "val",
                 mask_dir: str = "ImageNetS919/validation-segmentation", image_size: int = 224,
                 no_information: bool = True, context_corruptions: list[str] | None = None,
                 object_corruptions: list[str] | None = None, limit: int | None = None, batch_size: int = 32,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(["original"], no_information, context_corruptions, object_corruptions, batch_size,
                         num_workers, seed)
        self.data_dir, self.image_dir, self.mask_dir = data_dir, image_dir, mask_dir
        self.image_size, self.limit = image_size, limit

    def stored_dataset(self) -> Dataset:
        root = Path(self.data_dir).expanduser().resolve() if self.data_dir else resolve_data_dir(None) / "imagenet"
        img_root, mask_root = root / self.image_dir, root / self.mask_dir
        for f in (img_root, mask_root):
            if not f.is_dir():
                raise DatasetNotFoundError(f"ImageNet-CS needs {f} (images {img_root}/<wnid>/*.JPEG, ImageNet-S masks "
                                           f"{mask_root}/<wnid>/*.png)")
        wnids = sorted(p.name for p in img_root.iterdir() if p.is_dir())
        self.class_names = wnids
        index = {w: i for i, w in enumerate(wnids)}
        images, masks, labels = [], [], []
        for mdir in sorted(p for p in mask_root.iterdir() if p.is_dir()):
            if mdir.name not in index:
                raise DatasetCorruptError(f"masks for {mdir.name} but no image folder {img_root / mdir.name}")
            stems = {p.stem: p for p in (img_root / mdir.name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
            for mp in sorted(mdir.glob("*.png")):
                if mp.stem not in stems:
                    raise DatasetCorruptError(f"mask {mp} has no image {img_root / mdir.name / mp.stem}.JPEG")
                images.append(stems[mp.stem])
                masks.append(mp)
                labels.append(index[mdir.name])
        if not labels:
            raise DatasetNotFoundError(f"no ImageNet-S masks (*.png) under {mask_root}")
        if self.limit is not None:
            images, masks, labels = images[: self.limit], masks[: self.limit], labels[: self.limit]
        return ImageNetSDataset(images, masks, labels, self.image_size)
