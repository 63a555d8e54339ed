"""Embedded image data (jdjax/data/images.py): scikit-learn digits splits, generated shapes,
and the random-shift augmentation."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from jdjax.data import images
from jdjax.data.pipeline import split_indices


@pytest.fixture(scope="module")
def digits8():
    return images.digits_splits(image_size=8, seed=0)


@pytest.fixture(scope="module")
def raw_digits():
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int32)


# ----------------------------------------------------------------------------- digits


def test_digits_split_sizes(digits8):
    assert set(digits8) == {"train", "val", "test"}
    sizes = {k: len(v) for k, v in digits8.items()}
    assert sum(sizes.values()) == 1797
    # 70/10/20 % of 1797, rounded.
    assert sizes == {"train": 1258, "val": 180, "test": 359}


def test_digits_splits_disjoint_and_cover_the_data(digits8, raw_digits):
    raw_images, raw_labels = raw_digits
    parts = split_indices(1797, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0)
    allidx = np.concatenate(list(parts.values()))
    assert len(np.unique(allidx)) == 1797
    expected = raw_images / 8.0 - 1.0
    for name, idx in parts.items():
        src = digits8[name]
        np.testing.assert_array_equal(src.arrays["label"], raw_labels[idx])
        np.testing.assert_allclose(src.arrays["image"][..., 0], expected[idx], atol=1e-6)
    # Independently of the index bookkeeping: the multiset of (image, label) rows is the data set.
    def rows(imgs, labels):
        return sorted(i.tobytes() + bytes([int(y)]) for i, y in zip(imgs, labels))

    got_imgs = np.concatenate([digits8[k].arrays["image"][..., 0] for k in ("train", "val", "test")])
    got_labels = np.concatenate([digits8[k].arrays["label"] for k in ("train", "val", "test")])
    assert rows(got_imgs, got_labels) == rows(expected.astype(np.float32), raw_labels)


def test_digits_values_channels_and_dtypes(digits8):
    for src in digits8.values():
        x, y = src.arrays["image"], src.arrays["label"]
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.shape[1:] == (8, 8, 3)
        assert x.min() >= -1.0 and x.max() <= 1.0
        np.testing.assert_array_equal(x[..., 0], x[..., 1])
        np.testing.assert_array_equal(x[..., 0], x[..., 2])
        assert set(np.unique(y)) <= set(range(10))
    train = digits8["train"].arrays["image"]
    assert train.min() == -1.0 and train.max() == 1.0  # the full [0, 16] range is used
    assert len(np.unique(digits8["train"].arrays["label"])) == 10


def test_digits_upsampled_to_16(digits8):
    d16 = images.digits_splits(image_size=16, seed=0)
    for name in digits8:
        x8, x16 = digits8[name].arrays["image"], d16[name].arrays["image"]
        assert x16.shape == (len(x8), 16, 16, 3)
        # Nearest-neighbour upsampling: every 2x2 block is one original pixel.
        np.testing.assert_array_equal(x16, x8.repeat(2, axis=1).repeat(2, axis=2))
        np.testing.assert_array_equal(d16[name].arrays["label"], digits8[name].arrays["label"])


def test_digits_bad_image_size():
    with pytest.raises(ValueError, match="multiple of 8"):
        images.digits_splits(image_size=12)


def test_digits_class_subsets_relabel_and_stay_in_their_split(digits8):
    low = images.digits_splits(image_size=8, seed=0, classes=(0, 1, 2, 3, 4))
    high = images.digits_splits(image_size=8, seed=0, classes=(9, 5))
    for name, full in digits8.items():
        y = full.arrays["label"]
        np.testing.assert_array_equal(low[name].arrays["label"], y[y < 5])
        np.testing.assert_array_equal(low[name].arrays["image"], full.arrays["image"][y < 5])
        keep = (y == 9) | (y == 5)
        np.testing.assert_array_equal(high[name].arrays["label"], np.where(y[keep] == 9, 0, 1))
    with pytest.raises(ValueError, match="distinct digits"):
        images.digits_splits(classes=(1, 1))


def test_digits_seed_changes_split(digits8):
    other = images.digits_splits(image_size=8, seed=1)
    assert len(other["train"]) == len(digits8["train"])
    assert not np.array_equal(other["test"].arrays["label"], digits8["test"].arrays["label"])


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_shapes_split_deterministic_per_index(image_size):
    a = images.shapes_split("train", 12, image_size=image_size, seed=0)
    b = images.shapes_split("train", 12, image_size=image_size, seed=0)
    np.testing.assert_array_equal(a.arrays["image"], b.arrays["image"])
    np.testing.assert_array_equal(a.arrays["label"], b.arrays["label"])
    # Image i depends only on (seed, split, i), not on how many images are generated.
    short = images.shapes_split("train", 5, image_size=image_size, seed=0)
    np.testing.assert_array_equal(short.arrays["image"], a.arrays["image"][:5])
    x = a.arrays["image"]
    assert x.shape == (12, image_size, image_size, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert len({img.tobytes() for img in x}) == 12, "images should all differ"


def test_shapes_labels_cycle_through_ten_classes():
    src = images.shapes_split("val", 23, image_size=8)
    y = src.arrays["label"]
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, np.arange(23) % 10)
    assert images.NUM_SHAPE_CLASSES == 10


def test_shapes_splits_and_seeds_differ():
    train = images.shapes_split("train", 6, image_size=16, seed=0).arrays["image"]
    val = images.shapes_split("val", 6, image_size=16, seed=0).arrays["image"]
    test = images.shapes_split("test", 6, image_size=16, seed=0).arrays["image"]
    other_seed = images.shapes_split("train", 6, image_size=16, seed=1).arrays["image"]
    for a, b in [(train, val), (train, test), (val, test), (train, other_seed)]:
        for i in range(6):
            assert not np.array_equal(a[i], b[i])


def test_shapes_splits_helper():
    out = images.shapes_splits({"train": 4, "test": 3}, image_size=8, seed=2)
    assert {k: len(v) for k, v in out.items()} == {"train": 4, "test": 3}
    np.testing.assert_array_equal(
        out["test"].arrays["image"], images.shapes_split("test", 3, image_size=8, seed=2).arrays["image"]
    )


def test_shape_image_planted_structure():
    # Replay the documented draws (radius, centre) to recover the class mask; foreground and
    # background then differ by >= 0.35 in mean intensity ([0, 1] units, so 0.7 in [-1, 1]),
    # less a little for clipping the sigma-0.08 noise.
    s = 32
    for seed in range(3):
        for label in range(10):
            img = images.shape_image(label, s, np.random.default_rng([seed, label]))
            assert img.shape == (s, s, 3) and img.dtype == np.float32
            rng = np.random.default_rng([seed, label])
            radius = rng.uniform(0.15, 0.30) * s
            cy, cx = rng.uniform(radius, s - radius, size=2)
            assert 0.3 * s <= 2 * radius <= 0.6 * s
            yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
            mask = images._shape_mask(images.SHAPES[label % 5], yy, xx, cy, cx, radius)
            if label >= 5:
                mask &= ((yy // (max(s / 8, 2.0) / 2)) % 2) == 0
            assert 0 < mask.sum() < s * s
            m = img.mean(-1)
            assert abs(m[mask].mean() - m[~mask].mean()) > 0.6, (seed, label)


# ----------------------------------------------------------------------------- random_shift


def _rngs(n, seed):
    """Per-row uniform draws, as the pipeline hands them to an augmentation."""
    return np.random.default_rng(seed).random((n, 8))


def _batch(b=5, h=6, w=7):
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(b, h, w, 3)).astype(np.float32), "label": np.arange(b)}


def test_random_shift_zero_is_identity():
    batch = _batch()
    out = images.random_shift(0)(batch, _rngs(len(batch["image"]), 1))
    np.testing.assert_array_equal(out["image"], batch["image"])
    np.testing.assert_array_equal(out["label"], batch["label"])


@pytest.mark.parametrize("max_shift", [1, 2])
def test_random_shift_is_an_edge_padded_translation(max_shift):
    batch = _batch()
    out = images.random_shift(max_shift)(batch, _rngs(len(batch["image"]), 3))
    assert out["image"].shape == batch["image"].shape and out["image"].dtype == np.float32
    np.testing.assert_array_equal(out["label"], batch["label"])
    m = max_shift
    padded = np.pad(batch["image"], ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
    h, w = batch["image"].shape[1:3]
    shifts = []
    for i, img in enumerate(out["image"]):
        matches = [
            (dy, dx)
            for dy in range(2 * m + 1)
            for dx in range(2 * m + 1)
            if np.array_equal(img, padded[i, dy : dy + h, dx : dx + w])
        ]
        assert matches, f"image {i} is not a translation of the input by at most {m} pixels"
        shifts.append(matches[0])
    # Deterministic given the rng.
    again = images.random_shift(max_shift)(batch, _rngs(len(batch["image"]), 3))
    np.testing.assert_array_equal(again["image"], out["image"])


def test_random_shift_actually_shifts():
    batch = _batch(b=16)
    out = images.random_shift(2)(batch, _rngs(len(batch["image"]), 0))
    changed = [not np.array_equal(o, i) for o, i in zip(out["image"], batch["image"])]
    assert sum(changed) >= 8
