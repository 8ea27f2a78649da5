"""The embedded shapes-on-textures dataset: generator, datamodule, and that a small CNN learns it."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from datamodules.synthetic import SHAPE_NAMES, ShapesDataModule, _shape_mask, generate_shapes

PREVIEW = "/tmp/shapes_preview.png"


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a = generate_shapes(300, seed=5)
    b = generate_shapes(300, seed=5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = generate_shapes(300, seed=6)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.masks, c.masks)


def test_same_bytes_whatever_the_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = generate_shapes(500, seed=2)
        torch.set_num_threads(2)
        b = generate_shapes(500, seed=2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.images, b.images)


def test_shapes_and_dtypes() -> None:
    b = generate_shapes(50, seed=0)
    assert b.images.shape == (50, 3, 32, 32) and b.images.dtype == torch.uint8
    assert b.masks.shape == (50, 1, 32, 32) and b.masks.dtype == torch.bool
    assert b.labels.shape == (50,) and b.labels.dtype == torch.int64
    assert b.background_ids.shape == (50,) and b.background_ids.dtype == torch.int64
    big = generate_shapes(8, seed=0, image_size=64)
    assert big.images.shape == (8, 3, 64, 64) and big.masks.shape == (8, 1, 64, 64)
    assert generate_shapes(0, seed=0).images.shape == (0, 3, 32, 32)


def test_labels_balanced_by_default_and_given_labels_kept() -> None:
    b = generate_shapes(1000, seed=1)
    assert torch.bincount(b.labels, minlength=10).tolist() == [100] * 10
    assert not torch.equal(b.labels[:10], torch.arange(10))  # shuffled
    given = torch.tensor([3, 3, 7, 0])
    assert torch.equal(generate_shapes(4, seed=1, labels=given).labels, given)
    with pytest.raises(ValueError):
        generate_shapes(4, seed=1, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        generate_shapes(2, seed=1, labels=torch.tensor([0, 10]))


def test_masks_hold_the_object() -> None:
    b = generate_shapes(2000, seed=3)
    frac = b.masks.float().mean(dim=(1, 2, 3))
    assert frac.min() > 0.04, "every image shows its object"
    assert frac.max() < 0.45
    assert 0.1 < frac.mean() < 0.25
    # the object is drawn in one flat colour (+ mild noise): its pixels vary little
    x = b.images.float()
    m = b.masks.expand_as(x)
    obj_std = torch.stack([x[i][m[i]].view(3, -1).std(1).mean() for i in range(50)])
    assert obj_std.max() < 15
    # and it stands out from the background around it
    fg = (x * m).sum((2, 3)) / m.sum((2, 3))
    bg = (x * ~m).sum((2, 3)) / (~m).sum((2, 3))
    assert ((fg - bg).norm(dim=1) > 40).float().mean() > 0.9


def test_every_shape_is_symmetric_under_a_horizontal_flip() -> None:
    u = torch.arange(-100, 101, dtype=torch.float32) * 0.013  # exactly symmetric about 0
    y, x = torch.meshgrid(u, u, indexing="ij")
    for k, name in enumerate(SHAPE_NAMES):
        m = _shape_mask(k, x, y)
        assert torch.equal(m, m.flip(-1)), name
        assert 0.1 < m.float().mean() < 0.6, name


def test_shapes_differ_from_each_other() -> None:
    u = torch.linspace(-1.0, 1.0, 64)
    y, x = torch.meshgrid(u, u, indexing="ij")
    masks = torch.stack([_shape_mask(k, x, y) for k in range(10)]).float().flatten(1)
    inter = masks @ masks.T
    iou = inter / (masks.sum(1)[:, None] + masks.sum(1)[None] - inter)
    assert (iou - torch.eye(10)).max() < 0.85


def test_background_modes() -> None:
    n = 1000
    cor = generate_shapes(n, seed=4, background="correlated", correlation=1.0)
    assert torch.equal(cor.background_ids, cor.labels)
    half = generate_shapes(n, seed=4, background="correlated", correlation=0.5)
    agree = (half.background_ids == half.labels).float().mean()
    assert 0.48 < agree < 0.62  # 0.5 + 0.5 / 10
    swp = generate_shapes(n, seed=4, background="swapped")
    assert torch.equal(swp.background_ids, (swp.labels + 1) % 10)
    rnd = generate_shapes(n, seed=4, background="random")
    assert torch.bincount(rnd.background_ids, minlength=10).min() > 60
    assert (rnd.background_ids == rnd.labels).float().mean() < 0.2
    # the same seed draws the same objects whatever the background
    for other in (cor, swp):
        assert torch.equal(other.masks, rnd.masks) and torch.equal(other.labels, rnd.labels)
    flat = generate_shapes(200, seed=4, background="none")
    assert (flat.background_ids == -1).all()
    bg = flat.images.float().permute(1, 0, 2, 3)[:, ~flat.masks[:, 0]]
    assert (bg.mean() - 127.5).abs() < 2 and bg.std() < 12
    # textured backgrounds do vary
    tex = rnd.images.float().permute(1, 0, 2, 3)[:, ~rnd.masks[:, 0]]
    assert tex.std() > 30
    with pytest.raises(ValueError):
        generate_shapes(4, seed=0, background="stripes")  # type: ignore[arg-type]


def test_texture_families_are_seed_independent() -> None:
    # the mean background colour of a family is the same from one seed to another
    means = []
    for seed in (10, 11):
        g = generate_shapes(2000, seed=seed, background="random")
        x = g.images.float() * ~g.masks
        per = (x.sum((2, 3)) / (~g.masks).sum((2, 3)))  # (N, 3) background colour
        means.append(torch.stack([per[g.background_ids == f].mean(0) for f in range(10)]))
    assert (means[0] - means[1]).abs().max() < 6
    # ... and families differ from each other
    d = torch.cdist(means[0], means[0]) + torch.eye(10) * 1e3
    assert d.min() > 10


def test_generation_speed() -> None:
    generate_shapes(100, seed=0)  # warm-up
    t = time.perf_counter()
    b = generate_shapes(12000, seed=0)
    elapsed = time.perf_counter() - t
    assert b.images.shape[0] == 12000
    assert elapsed < 10, f"12,000 images took {elapsed:.1f} s"


def test_preview_grid() -> None:
    """Writes 4 images per class (one row of 4 per class pair) for a look by eye."""
    from torchvision.utils import save_image

    b = generate_shapes(400, seed=0)
    idx = torch.cat([(b.labels == k).nonzero()[:4, 0] for k in range(10)])
    assert idx.numel() == 40
    save_image(b.images[idx].float() / 255, PREVIEW, nrow=8, padding=1)


def test_datamodule_splits_masks_and_stats() -> None:
    dm = ShapesDataModule(num_train=1000, num_test=300, seed=3)
    assert dm.augment == "flip" and dm.input_shape == (3, 32, 32)
    dm.setup("fit")
    assert dm.train_x.shape == (900, 3, 32, 32) and dm.train_x.dtype == torch.uint8  # a tenth held out
    assert dm.test_x.shape == (300, 3, 32, 32) and dm.test_y.dtype == torch.int64
    full = generate_shapes(1000, seed=3).images
    assert torch.equal(dm.train_x, full[dm.train_indices]) and torch.equal(dm.val_x, full[dm.val_indices])
    assert torch.equal(dm.test_x, generate_shapes(300, seed=4).images)  # test set: seed + 1
    assert dm.train_masks.shape == (900, 1, 32, 32) and dm.test_masks.shape == (300, 1, 32, 32)
    assert dm.val_masks.shape == (100, 1, 32, 32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 3, 32, 32) and y.shape == (128,)
    # the hard-coded normalisation statistics match the data
    big = generate_shapes(5000, seed=123).images.float() / 255
    assert torch.allclose(big.mean((0, 2, 3)), torch.tensor(dm.mean), atol=0.01)
    assert torch.allclose(big.std((0, 2, 3)), torch.tensor(dm.std), atol=0.01)


def test_datamodule_val_split_and_resize_keep_masks_aligned() -> None:
    dm = ShapesDataModule(num_train=600, num_test=100, val_size=100, image_size=64, seed=1)
    dm.setup("fit")
    full = generate_shapes(600, seed=1)
    assert dm.train_x.shape == (500, 3, 64, 64) and dm.val_x.shape == (100, 3, 64, 64)
    assert dm.train_masks.shape == (500, 1, 64, 64) and dm.train_masks.dtype == torch.bool
    assert dm.val_masks.shape == (100, 1, 64, 64) and dm.test_masks.shape == (100, 1, 64, 64)
    assert torch.equal(dm.train_y, full.labels[dm.train_indices])
    assert torch.equal(dm.val_y, full.labels[dm.val_indices])
    up = torch.nn.functional.interpolate(full.masks[dm.train_indices].to(torch.uint8), size=64).bool()
    assert torch.equal(dm.train_masks, up)
    assert sorted(torch.cat([dm.train_indices, dm.val_indices]).tolist()) == list(range(600))


def test_datamodule_test_background() -> None:
    dm = ShapesDataModule(num_train=200, num_test=200, background="correlated", test_background="swapped")
    dm.setup()
    assert torch.equal(dm.train_background_ids, dm.train_y)
    assert torch.equal(dm.test_background_ids, (dm.test_y + 1) % 10)
    assert ShapesDataModule(background="swapped").test_background == "swapped"


def test_datamodule_long_tail() -> None:
    dm = ShapesDataModule(num_train=10000, num_test=100, imbalance_factor=100, val_size=50)
    dm.setup()
    counts = torch.bincount(dm.train_y, minlength=10).tolist()  # validation comes from the images left out
    assert counts == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert counts[0] / counts[-1] == 100
    full = generate_shapes(10000, seed=0)
    assert torch.equal(dm.train_x, full.images[dm.train_indices])
    assert torch.equal(dm.train_masks, full.masks[dm.train_indices])
    assert torch.equal(dm.val_x, full.images[dm.val_indices])
    assert torch.bincount(dm.test_y, minlength=10).tolist() == [10] * 10  # the test set stays balanced
    balanced = ShapesDataModule(num_train=500, num_test=10)
    balanced.setup()
    assert torch.bincount(torch.cat([balanced.train_y, balanced.val_y]), minlength=10).tolist() == [50] * 10


def _small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 64), nn.Flatten(), nn.Linear(64 * 4 * 4, 10))


@pytest.mark.slow
def test_a_small_cnn_learns_the_shapes() -> None:
    """Adam 2e-3, batch 128, 2 epochs on 10,000 images: >= 90 % on 2,000 test images."""
    torch.manual_seed(0)
    dm = ShapesDataModule(num_train=10000, num_test=2000, seed=0)
    dm.setup()
    xtr, ytr = dm.normalize(dm.train_x.float() / 255), dm.train_y
    xte, yte = dm.normalize(dm.test_x.float() / 255), dm.test_y
    net = _small_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    start = time.perf_counter()
    for _ in range(2):
        net.train()
        for b in torch.randperm(xtr.shape[0]).split(128):
            loss = nn.functional.cross_entropy(net(xtr[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (torch.cat([net(x).argmax(1) for x in xte.split(500)]) == yte).float().mean().item()
    print(f"\nsmall CNN, 2 epochs: test accuracy {acc:.4f} in {time.perf_counter() - start:.1f} s")
    assert acc >= 0.90
