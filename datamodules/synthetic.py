"""Shapes-on-textures: the embedded default dataset (generated in memory, nothing to download).

Every image is one filled shape (10 classes) of a random flat colour, at a random centre, size
(spanning 40-70 % of the image side, always wholly inside) and small rotation (within +-15 degrees),
drawn over a textured background. The classes are, in label order::

    0 disk   1 square   2 triangle   3 plus   4 ring   5 diamond   6 X (diagonal cross)
    7 frame (hollow square)   8 T   9 hourglass

Every shape is symmetric under a left-right flip, so ``"flip"`` augmentation keeps the label.

A background is a sum of three sinusoidal gratings plus mild pixel noise, drawn from one of
``num_classes`` texture *families*. A family fixes a base colour (its hue), a palette, the orientation
of its dominant grating and a band of spatial frequencies, by a rule that depends only on the family
index (not on the seed), so the same family looks alike in every generated set. Which family an image
gets is set by ``background``:

* ``"random"``: uniform per image, independent of the label (the context carries no information);
* ``"correlated"``: the label's own family with probability ``correlation``, else uniform;
* ``"swapped"``: family ``(label + 1) % num_classes`` (a test set for models that learnt the context);
* ``"none"``: flat mid grey (``background_ids`` are then -1).

The foreground colour is the one of several random candidates farthest from the background's base
colour, so the object contrasts with its surroundings. Random draws are made in the same order for
every ``background`` mode: for a given seed the objects (class, place, size, rotation) and the
textures' random parts are the same, only the family (and so the colours) differs — useful for
context-versus-object studies, which also get the exact object masks.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from datamodules.base import Augment, TensorImageDataModule, ValSize

Background = Literal["random", "correlated", "swapped", "none"]

SHAPE_NAMES: tuple[str, ...] = (
    "disk",
    "square",
    "triangle",
    "plus",
    "ring",
    "diamond",
    "x",
    "frame",
    "t",
    "hourglass",
)


class ShapesBatch(NamedTuple):
    """One generated set: ``images`` uint8 ``(N, 3, H, W)``, ``masks`` bool ``(N, 1, H, W)`` (the
    object's pixels), ``labels`` int64 ``(N,)``, ``background_ids`` int64 ``(N,)`` (texture family,
    -1 for ``background="none"``)."""

    images: Tensor
    masks: Tensor
    labels: Tensor
    background_ids: Tensor


# --- shapes: inequalities on the object's own coordinates (x right, y down, roughly in [-1, 1]) ---
def _shape_mask(k: int, x: Tensor, y: Tensor) -> Tensor:
    ax, ay = x.abs(), y.abs()
    if k == 0:  # disk
        return x * x + y * y <= 1.0
    if k == 1:  # square
        return torch.maximum(ax, ay) <= 0.82
    if k == 2:  # triangle, apex up
        return (y <= 0.75) & (ax <= (y + 0.95) * (0.95 / 1.7))
    if k == 3:  # plus
        return ((ax <= 0.3) & (ay <= 0.95)) | ((ay <= 0.3) & (ax <= 0.95))
    if k == 4:  # ring
        r2 = x * x + y * y
        return (r2 <= 1.0) & (r2 >= 0.6**2)
    if k == 5:  # diamond
        return ax + ay <= 1.05
    if k == 6:  # X: a plus turned by 45 degrees
        u, v = (x + y).abs() * (0.5**0.5), (x - y).abs() * (0.5**0.5)
        return ((u <= 0.26) & (v <= 1.1)) | ((v <= 0.26) & (u <= 1.1))
    if k == 7:  # hollow square frame
        m = torch.maximum(ax, ay)
        return (m <= 0.9) & (m >= 0.55)
    if k == 8:  # T
        return ((y >= -0.95) & (y <= -0.5) & (ax <= 0.95)) | ((ax <= 0.25) & (ay <= 0.95))
    if k == 9:  # hourglass: two triangles meeting at the centre, closed top and bottom
        return (ay <= 0.95) & (ax <= ay * 0.95 + 0.06)
    raise ValueError(f"no shape {k}")


# --- texture families: a seed-independent rule --------------------------------------------------
def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``(...,)`` hue in [0, 1) (wraps), saturation, value -> ``(..., 3)`` rgb."""
    h = h.remainder(1.0)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    f = torch.minimum(k, 4 - k).clamp(0, 1)
    return v[..., None] - v[..., None] * s[..., None] * f


_LUMA = torch.tensor([0.299, 0.587, 0.114])


def texture_families(num_classes: int = 10) -> dict[str, Tensor]:
    """The fixed parameters of each texture family (depend on ``num_classes`` only).

    Returns ``base`` ``(K, 3)`` mean colour, ``palette`` ``(K, 3, 3)`` one colour direction per
    grating, ``angle`` ``(K,)`` orientation of the dominant grating (radians), ``freq`` ``(K, 2)``
    the band of spatial frequencies (cycles per image side).
    """
    k = torch.arange(num_classes, dtype=torch.float32)
    hue = k / num_classes
    base = _hsv_to_rgb(hue, torch.full_like(hue, 0.55), 0.42 + 0.16 * ((k % 2)))
    # gratings swing between a light and a dark version of the family hue (and a neighbouring hue)
    light = _hsv_to_rgb(hue + 0.04, torch.full_like(hue, 0.45), torch.full_like(hue, 0.85))
    dark = _hsv_to_rgb(hue - 0.04, torch.full_like(hue, 0.7), torch.full_like(hue, 0.25))
    near = _hsv_to_rgb(hue + 0.12, torch.full_like(hue, 0.7), torch.full_like(hue, 0.8))
    palette = torch.stack([light - base, dark - base, near - base], dim=1)
    golden = (math.sqrt(5) - 1) / 2
    angle = torch.remainder(k * golden, 1.0) * math.pi
    lo = torch.tensor([1.5, 2.5, 4.0])[(k % 3).long()]
    freq = torch.stack([lo, lo * 1.5], dim=1)
    return {"base": base, "palette": palette, "angle": angle, "freq": freq}


def generate_shapes(
    num_images: int,
    seed: int,
    image_size: int = 32,
    num_classes: int = 10,
    background: Background = "random",
    correlation: float = 1.0,
    labels: Tensor | None = None,
) -> ShapesBatch:
    """Draw ``num_images`` shapes-on-textures images; a pure function of its arguments.

    Args:
        num_images: how many images.
        seed: the only source of randomness; the same arguments give the same bytes.
        image_size: side of the square images.
        num_classes: shape classes and texture families (at most 10).
        background: ``"random"``, ``"correlated"``, ``"swapped"`` or ``"none"`` (see the module doc).
        correlation: for ``"correlated"``, the probability that the family equals the label.
        labels: int64 ``(num_images,)`` class of each image; default balanced (``i % num_classes``,
            shuffled).
    """
    return generate_shapes_with_backgrounds(num_images, seed, image_size, num_classes, background, correlation,
                                            labels)[0]


def generate_shapes_with_backgrounds(
    num_images: int,
    seed: int,
    image_size: int = 32,
    num_classes: int = 10,
    background: Background = "random",
    correlation: float = 1.0,
    labels: Tensor | None = None,
) -> tuple[ShapesBatch, Tensor]:
    """:func:`generate_shapes` (the same bytes) and each image's background alone: uint8 ``(N, 3, H, W)``, the
    texture and pixel noise without the object (the ground truth behind the object, for context studies)."""
    if not 1 <= num_classes <= len(SHAPE_NAMES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPE_NAMES)}, got {num_classes}")
    if background not in ("random", "correlated", "swapped", "none"):
        raise ValueError(f"unknown background {background!r}")
    n, s, kk = num_images, image_size, num_classes
    g = torch.Generator().manual_seed(int(seed))

    perm = torch.randperm(n, generator=g)
    if labels is None:
        labels = perm % kk
    else:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if n and (labels.min() < 0 or labels.max() >= kk):
            raise ValueError(f"labels must be in [0, {kk})")

    # every draw happens in this order whatever the background mode
    scale = 0.4 + 0.3 * torch.rand(n, generator=g)  # object side / image side
    half = scale  # half extent in [-1, 1] units
    centre = (torch.rand(n, 2, generator=g) * 2 - 1) * (1.0 - 1.18 * half[:, None])  # wholly inside
    theta = (torch.rand(n, generator=g) * 2 - 1) * math.radians(15.0)
    candidates = torch.rand(n, 8, 3, generator=g)  # foreground colour candidates
    same = torch.rand(n, generator=g) < correlation
    other = torch.randint(0, kk, (n,), generator=g)
    g_angle = torch.rand(n, 3, generator=g)
    g_freq = torch.rand(n, 3, generator=g)
    g_phase = torch.rand(n, 3, generator=g) * (2 * math.pi)
    g_amp = torch.rand(n, 3, generator=g)
    base_jitter = (torch.rand(n, 3, generator=g) * 2 - 1) * 0.05
    noise = torch.randn(n, 1, s, s, generator=g).mul_(0.03 * 255.0)  # grey pixel noise

    if background == "random":
        fam = other
    elif background == "correlated":
        fam = torch.where(same, labels, other)
    elif background == "swapped":
        fam = (labels + 1) % kk
    else:
        fam = torch.full((n,), -1, dtype=torch.long)

    # pixel-centre coordinates in [-1, 1]
    u = (torch.arange(s, dtype=torch.float32) + 0.5) * (2.0 / s) - 1.0
    gx, gy = u.view(1, 1, s), u.view(1, s, 1)

    # background texture: base colour + sum_j colour_j * sin(w_j (x cos a_j + y sin a_j) + phase_j),
    # in 0..255 units with +0.5 folded in, so that the final cast to uint8 rounds
    if background == "none":
        bg_base = torch.full((n, 3), 0.5)
        img = (bg_base * 255.0 + 0.5)[:, :, None, None].expand(n, 3, s, s)
    else:
        fams = texture_families(kk)
        bg_base = (fams["base"][fam] + base_jitter).clamp(0.05, 0.95)
        lo, hi = fams["freq"][fam].unbind(1)
        ang = torch.stack(
            [
                fams["angle"][fam] + (g_angle[:, 0] * 2 - 1) * math.radians(10.0),  # the family's orientation
                g_angle[:, 1] * math.pi,  # weaker gratings at any orientation
                g_angle[:, 2] * math.pi,
            ],
            dim=1,
        )  # (n, 3)
        amp = torch.stack([0.35 + 0.2 * g_amp[:, 0], 0.1 + 0.15 * g_amp[:, 1], 0.1 + 0.15 * g_amp[:, 2]], dim=1)
        w = math.pi * (lo[:, None] + (hi - lo)[:, None] * g_freq)  # (n, 3): f cycles over the side (length 2)
        ax = (w * ang.cos())[:, :, None, None] * gx[None] + g_phase[:, :, None, None]  # (n, 3, 1, s)
        ay = (w * ang.sin())[:, :, None, None] * gy[None]  # (n, 3, s, 1)
        waves = torch.sin(ax + ay)  # (n, grating, s, s)
        colours = fams["palette"][fam] * (255.0 * amp[:, :, None])  # (n, grating, rgb)
        # elementwise sums (not a matmul): the same bytes whatever the thread count
        img = torch.addcmul((bg_base * 255.0 + 0.5)[:, :, None, None], colours[:, 0, :, None, None], waves[:, 0, None])
        for j in (1, 2):
            img.addcmul_(colours[:, j, :, None, None], waves[:, j, None])

    # the object: foreground colour far from the background's base colour
    # (squared rgb distance plus twice the squared luminance difference)
    diff = candidates - bg_base[:, None, :]
    dist = diff.square().sum(-1) + 2.0 * (diff * _LUMA).sum(-1).square()
    fg = candidates[torch.arange(n), dist.argmax(1)]  # (n, 3)

    # object coordinates: rotate by -theta about the centre, divide by the half extent
    c, sn, inv = theta.cos(), theta.sin(), 1.0 / half
    dx = (gx - centre[:, 0, None, None]) * inv[:, None, None]  # (n, 1, s)
    dy = (gy - centre[:, 1, None, None]) * inv[:, None, None]  # (n, s, 1)
    cx, sx = c[:, None, None] * dx, sn[:, None, None] * dx
    cy, sy = c[:, None, None] * dy, sn[:, None, None] * dy
    masks = torch.empty(n, s, s, dtype=torch.bool)
    for k in range(kk):
        idx = (labels == k).nonzero().squeeze(1)
        if idx.numel():
            masks[idx] = _shape_mask(k, cx[idx] + sy[idx], cy[idx] - sx[idx])
    masks = masks[:, None]
    backgrounds = (img + noise).clamp_(0.0, 255.0).to(torch.uint8)
    img = torch.where(masks, (fg * 255.0 + 0.5)[:, :, None, None], img)
    img.add_(noise)
    images = img.clamp_(0.0, 255.0).to(torch.uint8)  # truncation of x + 0.5: rounding
    return ShapesBatch(images=images, masks=masks, labels=labels, background_ids=fam), backgrounds


class ShapesDataModule(TensorImageDataModule):
    """Shapes on textured backgrounds (see :mod:`datamodules.synthetic`): 10 classes, 3 x 32 x 32,
    generated in memory in about a second, so it needs no ``data_dir`` and no download
    (both are accepted and ignored).

    The training set is drawn with ``seed`` and the test set with ``seed + 1``; classes are balanced
    unless ``imbalance_factor > 1`` keeps an exponentially decaying number per class
    (``long_tail_counts(num_train // 10, 10, imbalance_factor)``: class 0 keeps all, class 9 keeps
    ``1 / imbalance_factor`` of them). After :meth:`setup`, ``train_masks`` / ``val_masks`` /
    ``test_masks`` (bool ``(N, 1, H, W)``, resized by nearest neighbour with ``image_size``) and
    ``train_background_ids`` / ``test_background_ids`` line up with ``train_x`` / ``val_x`` / ``test_x``.

    Args:
        num_train: images generated for training (before any long-tail selection and val split).
        num_test: test images.
        background: texture mode of the training set: ``"random"``, ``"correlated"``, ``"swapped"``
            or ``"none"``.
        test_background: texture mode of the test set (default: ``background``), e.g. ``"swapped"``
            to test a model trained on ``"correlated"`` backgrounds.
        correlation: for ``"correlated"``, the probability that the texture family is the label's.
        imbalance_factor: ratio of the largest to the smallest training class (1 = balanced).
    """

    num_classes = 10
    in_channels = 3
    native_size = 32
    # per-channel mean/std measured on 20,000 generated 32x32 images (background="random", seed 0)
    mean = (0.4117, 0.4220, 0.4058)
    std = (0.2295, 0.2420, 0.2298)
    default_augment: Augment = "flip"
    default_val_size: int | float = 0.1  # 1,000 of the default 10,000 training images

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
        num_train: int = 10000,
        num_test: int = 2000,
        background: Background = "random",
        test_background: Background | None = None,
        correlation: float = 1.0,
        imbalance_factor: float = 1.0,
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
        if imbalance_factor < 1.0:
            raise ValueError(f"imbalance_factor must be >= 1, got {imbalance_factor}")
        self.num_train = num_train
        self.num_test = num_test
        self.background: Background = background
        self.test_background: Background = test_background if test_background is not None else background
        self.correlation = correlation
        self.imbalance_factor = imbalance_factor
        self._generated: dict[bool, ShapesBatch] = {}
        self.train_masks: Tensor | None = None
        self.val_masks: Tensor | None = None
        self.test_masks: Tensor | None = None
        self.train_background_ids: Tensor | None = None
        self.val_background_ids: Tensor | None = None
        self.test_background_ids: Tensor | None = None

    def prepare_data(self) -> None:  # nothing to download
        pass

    def generate(self, train: bool) -> ShapesBatch:
        """The full generated split (cached), before long-tail selection, val split and resize."""
        if train not in self._generated:
            self._generated[train] = generate_shapes(
                self.num_train if train else self.num_test,
                seed=self.seed if train else self.seed + 1,
                image_size=self.native_size,
                num_classes=self.num_classes,
                background=self.background if train else self.test_background,
                correlation=self.correlation,
            )
        return self._generated[train]

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        b = self.generate(train)
        return b.images, b.labels

    def select_train(self, labels: Tensor) -> Tensor | None:
        keep = None
        if self.imbalance_factor != 1.0:
            from datamodules.longtail import long_tail_counts, long_tail_indices

            counts = long_tail_counts(self.num_train // self.num_classes, self.num_classes, self.imbalance_factor)
            keep = torch.as_tensor(long_tail_indices(labels, counts), dtype=torch.long)
        return keep

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        super().setup(stage)
        # the base class's selection and validation split, on the masks
        tr, idx = self.generate(True), self.train_indices
        te = self.generate(False)
        self.train_masks = self._resize_masks(tr.masks[idx])
        self.train_background_ids = tr.background_ids[idx]
        self.test_masks = self._resize_masks(te.masks)
        self.test_background_ids = te.background_ids
        if self.val_count > 0:
            self.val_masks = self._resize_masks(tr.masks[self.val_indices])
            self.val_background_ids = tr.background_ids[self.val_indices]
        else:
            self.val_masks, self.val_background_ids = self.test_masks, self.test_background_ids
        self._generated.clear()  # the uint8 tensors live on in train_x / test_x

    def _resize_masks(self, m: Tensor) -> Tensor:
        if m.shape[-1] == self.image_size and m.shape[-2] == self.image_size:
            return m
        r = torch.nn.functional.interpolate(m.to(torch.uint8), size=(self.image_size, self.image_size), mode="nearest")
        return r.bool()
