"""Embedded image data that needs no download.

- `digits`: scikit-learn's bundled handwritten digits (1,797 real 8x8 grey images, 10 classes),
  split once with a fixed seed into train/val/test (70/10/20 %).
- `shapes`: a procedurally generated, deterministic image set at any resolution. Class
  `c` (10 classes) is a shape `c % 5` (disk, square, triangle, ring, cross) with a fill `c // 5`
  (solid, horizontal stripes). Per image, at random: centre, diameter (30-60 % of the side),
  foreground and background colours (at least 0.35 apart in mean intensity), and Gaussian pixel
  noise (sigma 0.08). Image `i` of a split depends only on (seed, split, i).

Images are float32 [N, H, W, 3] in [-1, 1]; labels int32 [N].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jdjax.data.pipeline import ArraySource, split_indices

SHAPES = ("disk", "square", "triangle", "ring", "cross")
FILLS = ("solid", "stripes")
NUM_SHAPE_CLASSES = len(SHAPES) * len(FILLS)
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def digits_splits(image_size: int = 8, seed: int = 0, classes: Sequence[int] | None = None) -> dict[str, ArraySource]:
    """The scikit-learn digits as {'train', 'val', 'test'} sources of 3-channel images.

    Each 8x8 digit is upscaled by pixel repetition to `image_size` (a multiple of 8). With
    `classes` (e.g. (5, 6, 7, 8, 9)) only those digits are kept, relabelled 0..len(classes)-1 in
    that order; the 70/10/20 split is drawn before the filter, so splits of complementary class
    sets never share an image.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[..., None]  # [1797, 8, 8, 1] in [-1, 1]
    if image_size != 8:
        if image_size % 8:
            raise ValueError(f"digits image_size must be a multiple of 8, got {image_size}.")
        k = image_size // 8
        images = images.repeat(k, axis=1).repeat(k, axis=2)
    images = np.repeat(images, 3, axis=-1)
    labels = data.target.astype(np.int32)
    parts = split_indices(len(labels), {"train": 0.7, "val": 0.1, "test": 0.2}, seed=seed)
    if classes is not None:
        classes = [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(range(10)):
            raise ValueError(f"digits classes must be distinct digits 0-9, got {classes}.")
        relabel = np.full(10, -1, np.int32)
        relabel[classes] = np.arange(len(classes))
        labels = relabel[labels]
        parts = {name: idx[labels[idx] >= 0] for name, idx in parts.items()}
    return {name: ArraySource({"image": images[idx], "label": labels[idx]}) for name, idx in parts.items()}


def _shape_mask(shape: str, yy, xx, cy, cx, radius) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "disk":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return (np.abs(dy) <= radius * 0.8) & (np.abs(dx) <= radius * 0.8)
    if shape == "triangle":  # apex up, base at cy + 0.8 r
        top, bottom = cy - radius, cy + 0.8 * radius
        half_width = (yy - top) / (bottom - top) * radius
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= half_width)
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= radius**2) & (d2 >= (0.55 * radius) ** 2)
    if shape == "cross":
        arm = radius * 0.3
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= radius)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= radius))
    raise ValueError(shape)


def shape_image(label: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class `label`: [image_size, image_size, 3] float32 in [-1, 1]."""
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    radius = rng.uniform(0.15, 0.30) * s  # diameter 30-60 % of the side
    cy, cx = rng.uniform(radius, s - radius, size=2)
    mask = _shape_mask(SHAPES[label % 5], yy, xx, cy, cx, radius)
    if FILLS[label // 5] == "stripes":
        period = max(s / 8, 2.0)
        mask &= ((yy // (period / 2)) % 2) == 0
    while True:
        fg, bg = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
        if abs(fg.mean() - bg.mean()) >= 0.35:
            break
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 0.08, size=(s, s, 3)).astype(np.float32)
    return (np.clip(img, 0, 1) * 2 - 1).astype(np.float32)


def shapes_split(split: str, num_examples: int, image_size: int = 32, seed: int = 0) -> ArraySource:
    """`num_examples` generated images for one split; labels cycle through the 10 classes."""
    labels = (np.arange(num_examples) % NUM_SHAPE_CLASSES).astype(np.int32)
    images = np.stack(
        [
            shape_image(int(y), image_size, np.random.default_rng([seed, SPLIT_SEEDS[split], i]))
            for i, y in enumerate(labels)
        ]
    )
    return ArraySource({"image": images, "label": labels})


def shapes_splits(sizes: dict[str, int], image_size: int = 32, seed: int = 0) -> dict[str, ArraySource]:
    return {name: shapes_split(name, n, image_size, seed) for name, n in sizes.items()}


def random_shift(max_shift: int):
    """Augmentation: translate each image by up to `max_shift` pixels (edge padding).

    The returned function takes (batch, draws) with draws [B, >=2] uniform(0, 1) per row.
    """

    def augment(batch: dict, draws: np.ndarray) -> dict:
        images = batch["image"]  # [B, H, W, 3]
        b, h, w, _ = images.shape
        padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
        dy, dx = np.floor(draws[:, :2].T * (2 * max_shift + 1)).astype(np.int64)  # [B] each
        rows = (np.arange(h)[None, :] + dy[:, None])[:, :, None]  # [B, H, 1]
        cols = (np.arange(w)[None, :] + dx[:, None])[:, None, :]  # [B, 1, W]
        out = padded[np.arange(b)[:, None, None], rows, cols]
        return {**batch, "image": out}

    return augment
