"""Context variants and context/object corruption through the mask (Lost in Context): the embedded replica's
variants, the no-information contexts, ImageNet-CS corruption changing only the chosen region, and the
ImageNet-9 layout read from generated folders (JPEGs + .npy masks) with one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cvlab.errors import CvlabError
from datamodules.context_corruption import TORCH_CORRUPTIONS, corrupt_numpy, corrupt_region, corrupt_torch
from datamodules.context_variants import (
    IMAGENET_MEAN,
    ImageNet9DataModule,
    ShapesContextDataModule,
    no_information_context,
    paste,
)
from tests.fakedata import write_imagenet9, write_imagenet_s


def _images_masks(n: int = 4, s: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, s, s, generator=g) * 0.8 + 0.1
    m = torch.zeros(n, 1, s, s, dtype=torch.bool)
    m[:, :, 8:20, 10:26] = True
    return x, m


@pytest.mark.parametrize("name", sorted(TORCH_CORRUPTIONS))
@pytest.mark.parametrize("region", ["context", "object"])
def test_torch_corruption_changes_only_the_region(name: str, region: str) -> None:
    x, m = _images_masks()
    out = corrupt_region(x, m, name, 3, region, torch.Generator().manual_seed(1))
    changed = (out != x).any(1, keepdim=True)  # (B, 1, H, W)
    inside = m if region == "object" else ~m
    assert not changed[~inside].any(), "pixels outside the region changed"
    assert changed[inside].float().mean() > 0.2, "the region was hardly corrupted"  # impulse: 1 - 0.91^3
    assert out.min() >= 0 and out.max() <= 1


def test_numpy_family_changes_only_the_context() -> None:
    x, m = _images_masks(2)
    for name in ("defocus_blur", "pixelate", "jpeg_compression"):  # imagecorruptions-only families
        out = corrupt_region(x, m, name, 3, "context")
        changed = (out != x).any(1, keepdim=True)
        assert not changed[m].any() and changed[~m].any(), name
    import numpy as np
    from skimage.filters import gaussian

    for name in ("fog", "glass_blur", "gaussian_blur"):  # written for numpy 1 / scikit-image < 0.19: shimmed
        out = corrupt_region(x, m, name, 1, "context")
        changed = (out != x).any(1, keepdim=True)
        assert not changed[m].any() and changed[~m].any(), name
    assert "float_" not in np.__dict__  # the shim leaves numpy as it found it
    # gaussian_blur severity 1 is scikit-image's gaussian with sigma 1 over the channels, quantised as the package does
    img = (x[0] * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    ref = np.clip(gaussian(img / 255.0, sigma=1, channel_axis=-1), 0, 1) * 255
    full = corrupt_region(x[:1], torch.zeros_like(m[:1]), "gaussian_blur", 1, "context")
    np.testing.assert_allclose(full[0].permute(1, 2, 0).numpy() * 255, np.uint8(ref).astype(np.float32), atol=1e-3)


@pytest.mark.parametrize("name", ["brightness", "contrast"])
def test_torch_path_equals_imagecorruptions(name: str) -> None:
    x, _ = _images_masks(2)
    x = (x * 255).round() / 255  # on uint8 levels, as the package sees them
    for sev in (1, 5):
        ref = corrupt_numpy(x, name, sev)  # the package, per image, back to [0, 1] (its output is quantised)
        torch.testing.assert_close(corrupt_torch(x, name, sev), ref, atol=1.01 / 255, rtol=0)


def test_corruption_bad_input() -> None:
    x, m = _images_masks(2)
    with pytest.raises(CvlabError, match="severity must be 1..5"):
        corrupt_torch(x, "contrast", 6)
    with pytest.raises(CvlabError, match="unknown corruption 'blurry'"):
        corrupt_region(x, m, "blurry", 2)
    with pytest.raises(CvlabError, match="do not match images"):
        corrupt_region(x, m[:, :, :16], "contrast", 2)


def test_no_information_contexts() -> None:
    x, m = _images_masks(3)
    g = torch.Generator().manual_seed(0)
    mean = paste(x, m, no_information_context("mean_colour", x, g))
    assert torch.equal(mean[m.expand_as(x)], x[m.expand_as(x)])
    torch.testing.assert_close(mean[:, :, 0, 0], torch.tensor(IMAGENET_MEAN).expand(3, 3))
    white = no_information_context("noise_white", x, g)
    gauss = no_information_context("noise_gaussian", x, g)
    assert white.min() >= 0 and white.max() <= 1 and abs(float(white.mean()) - 0.5) < 0.02
    assert abs(float(gauss.std()) - 0.25) < 0.02 and abs(float(gauss.mean()) - 0.5) < 0.02
    with pytest.raises(CvlabError, match="unknown no-information context"):
        no_information_context("pink", x)


def test_shapes_variants_keep_the_object_and_swap_the_context() -> None:
    dm = ShapesContextDataModule(num_images=60, batch_size=20, context_corruptions=["contrast:5"],
                                 object_corruptions=["gaussian_noise:2"])
    assert dm.variant_names == ["original", "only_fg", "mixed_same", "mixed_rand", "mixed_next", "only_bg",
                                "noise_gaussian", "noise_white", "mean_colour", "ctx_contrast_5",
                                "obj_gaussian_noise_2"]
    dm.setup("test")
    ds = dm._dataset
    imgs, masks, labels = ds.tensors  # (N, 6, 3, H, W) uint8
    obj = masks.expand(-1, 3, -1, -1)
    for vi in range(5):  # the object's pixels are the original's in every object variant
        assert torch.equal(imgs[:, vi][obj], imgs[:, 0][obj])
    assert (imgs[:, 1][~obj] == 0).all()  # only_fg: black context
    from datamodules.synthetic import generate_shapes_with_backgrounds

    _, bg = generate_shapes_with_backgrounds(60, seed=dm.seed, background="correlated", correlation=0.9)
    assert torch.equal(imgs[:, 5], bg)  # only_bg: the true background behind the object
    donors = dm.donor_indices
    assert (labels[donors["mixed_same"]] == labels).all() and (donors["mixed_same"] != torch.arange(60)).all()
    assert (labels[donors["mixed_next"]] == (labels + 1) % 10).all()
    for name, idx in donors.items():  # context = the donor's background
        vi = dm.variant_names.index(name)
        assert torch.equal(imgs[:, vi][~obj], bg[idx][~obj])
    # a loaded batch carries all eleven variants, the built ones on the device
    x, m, y = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert x.shape == (20, 11, 3, 32, 32) and x.dtype == torch.float32 and m.shape == (20, 1, 32, 32)
    ctx = x[:, dm.variant_names.index("ctx_contrast_5")]
    o = m.expand(-1, 3, -1, -1)
    assert torch.equal(ctx[o], x[:, 0][o]) and not torch.equal(ctx[~o], x[:, 0][~o])
    objc = x[:, dm.variant_names.index("obj_gaussian_noise_2")]
    assert torch.equal(objc[~o], x[:, 0][~o]) and not torch.equal(objc[o], x[:, 0][o])


def test_unknown_variant() -> None:
    with pytest.raises(CvlabError, match=r"unknown variants \['no_fg'\]"):
        ShapesContextDataModule(variants=["no_fg"])
    with pytest.raises(CvlabError, match="name:severity"):
        ShapesContextDataModule(context_corruptions=["contrast"])


# --- ImageNet-9 -----------------------------------------------------------------------------------------------
def test_imagenet9_reads_every_variant_with_aligned_masks(tmp_path: Path) -> None:
    truth = write_imagenet9(tmp_path / "in9", per_class=2, size=24)
    dm = ImageNet9DataModule(data_dir=str(tmp_path / "in9"), image_size=24, batch_size=5,
                             variants=list(ImageNet9DataModule.stored_variants), context_corruptions=["contrast:3"])
    dm.setup("test")
    assert dm.class_names[0] == "00_dog" and len(dm.class_names) == 9
    batches = [dm.on_after_batch_transfer(b, 0) for b in dm.test_dataloader()]
    x = torch.cat([b[0] for b in batches])
    m = torch.cat([b[1] for b in batches])
    y = torch.cat([b[2] for b in batches])
    assert x.shape == (18, 8 + 3 + 1, 3, 24, 24)
    assert torch.equal(m[:, 0], torch.from_numpy(truth["masks"])) and torch.equal(y, torch.from_numpy(truth["labels"]))
    # the variants are the files of each folder: original and mixed_rand differ, mean_colour's context is the mean
    assert not torch.equal(x[:, 0], x[:, 6])
    mc = x[:, dm.variant_names.index("mean_colour")]
    ctx = ~m.expand(-1, 3, -1, -1)
    context_pixels = mc.permute(1, 0, 2, 3)[:, ~m[:, 0]]  # (3, context pixels of all images)
    torch.testing.assert_close(context_pixels.amin(1), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(context_pixels.amax(1), torch.tensor(IMAGENET_MEAN))
    assert torch.equal(mc[~ctx], x[:, 0][~ctx])


def test_imagenet9_resizes_images_and_masks_together(tmp_path: Path) -> None:
    write_imagenet9(tmp_path / "in9", per_class=1, size=24, variants=("original", "only_fg"))
    dm = ImageNet9DataModule(data_dir=str(tmp_path / "in9"), image_size=12, variants=["original", "only_fg"],
                             no_information=False)
    dm.setup("test")
    x, m, _ = next(iter(dm.test_dataloader()))
    assert x.shape[-2:] == (12, 12) and m.shape == (9, 1, 12, 12)


def test_imagenet9_missing_variant_folder(tmp_path: Path) -> None:
    write_imagenet9(tmp_path / "in9", per_class=1, variants=("original", "only_fg"))
    dm = ImageNet9DataModule(data_dir=str(tmp_path / "in9"), variants=["original", "mixed_rand"])
    with pytest.raises(CvlabError, match=r"variant 'mixed_rand' missing: expected the folder .*mixed_rand/val") as e:
        dm.setup("test")
    assert "\n" not in str(e.value)


def test_imagenet9_mask_count_mismatch(tmp_path: Path) -> None:
    write_imagenet9(tmp_path / "in9", per_class=2, variants=("original",))
    next((tmp_path / "in9" / "fg_mask" / "val" / "03_reptile").glob("*.npy")).unlink()
    dm = ImageNet9DataModule(data_dir=str(tmp_path / "in9"), variants=["original"])
    with pytest.raises(CvlabError, match=r"class '03_reptile': 1 masks in .* for 2 images"):
        dm.setup("test")


def test_imagenet9_image_count_mismatch_between_variants(tmp_path: Path) -> None:
    write_imagenet9(tmp_path / "in9", per_class=2, variants=("original", "only_fg"))
    next((tmp_path / "in9" / "only_fg" / "val" / "01_bird").glob("*.JPEG")).unlink()
    dm = ImageNet9DataModule(data_dir=str(tmp_path / "in9"), variants=["original", "only_fg"])
    with pytest.raises(CvlabError, match=r"variant 'only_fg' class '01_bird' has 1 images, original has 2"):
        dm.setup("test")


def test_imagenet9_mask_size_mismatch(tmp_path: Path) -> None:
    write_imagenet9(tmp_path / "in9", per_class=1, size=24, variants=("original",))
    bad = next((tmp_path / "in9" / "fg_mask" / "val" / "05_insect").glob("*.npy"))
    np.save(bad, np.zeros((20, 24), dtype=bool))
    dm = ImageNet9DataModule(data_dir=str(tmp_path / "in9"), variants=["original"])
    with pytest.raises(CvlabError, match=r"mask .* is \(20, 24\) but image .* is \(24, 24\)"):
        dm.setup("test")


# --- ImageNet-CS (ImageNet val + ImageNet-S masks) ------------------------------------------------------------------
def test_imagenet_s_masks_and_context_corruption(tmp_path: Path) -> None:
    from datamodules.context_variants import ImageNetSDataModule

    truth = write_imagenet_s(tmp_path / "in", mask_dir="seg")
    dm = ImageNetSDataModule(data_dir=str(tmp_path / "in"), mask_dir="seg", image_size=30, batch_size=4,
                             context_corruptions=["impulse_noise:5"], object_corruptions=["contrast:5"])
    x, m, y = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert dm.variant_names == ["original", "noise_gaussian", "noise_white", "mean_colour", "ctx_impulse_noise_5",
                                "obj_contrast_5"]
    assert x.shape == (4, 6, 3, 30, 30) and y.tolist() == [0, 0, 1, 1]
    assert torch.equal(m[:, 0], truth[:, :, 5:35])  # shorter side 30 already: centre crop of the 40 columns
    o = m.expand(-1, 3, -1, -1)
    ctx, obj = x[:, 4], x[:, 5]
    assert torch.equal(ctx[o], x[:, 0][o]) and not torch.equal(ctx[~o], x[:, 0][~o])
    assert torch.equal(obj[~o], x[:, 0][~o]) and not torch.equal(obj[o], x[:, 0][o])


def test_imagenet_s_mask_size_mismatch(tmp_path: Path) -> None:
    from PIL import Image

    from datamodules.context_variants import ImageNetSDataModule

    write_imagenet_s(tmp_path / "in", mask_dir="seg")
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(tmp_path / "in" / "seg" / "n01440764" / "im0.png")
    dm = ImageNetSDataModule(data_dir=str(tmp_path / "in"), mask_dir="seg", image_size=30)
    with pytest.raises(CvlabError, match=r"mask .*im0.png is \(10, 10\) but image .* is \(30, 40\)"):
        next(iter(dm.test_dataloader()))
