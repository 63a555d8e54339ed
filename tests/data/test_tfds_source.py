"""Real image data through tfds.data_source (jdjax/data/tfds_source.py), on tfds mock data."""

import sys

import numpy as np
import pytest
from PIL import Image

from jdjax.data import tfds_source
from jdjax.data.tfds_source import IMAGENET_MEAN, IMAGENET_STD

tfds = pytest.importorskip("tensorflow_datasets")


def _expected_imagenet(grey_uint8: np.ndarray, size: int) -> np.ndarray:
    """Hand computation: bicubic resize of the grey image, replicated to RGB, then (x/255 - mean)/std."""
    grey = grey_uint8[..., 0] if grey_uint8.ndim == 3 else grey_uint8
    resized = np.asarray(Image.fromarray(grey).resize((size, size), Image.BICUBIC)).astype(np.float32)
    x = np.repeat(resized[..., None], 3, axis=-1) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE, data_dir=data_dir):
        splits = tfds_source.tfds_image_splits(
            "mnist", data_dir, {"train": "train", "val": "test"}, image_size=32, normalization="imagenet"
        )
        # Read everything inside the mock context.
        raw = [dict(splits["train"].records[i]) for i in range(len(splits["train"]))]
        batch = splits["train"].get_batch(np.arange(len(splits["train"])))
        val_batch = splits["val"].get_batch(np.array([0, 1]))
    return splits, raw, batch, val_batch


def test_tfds_image_splits_shapes_and_types(mnist):
    splits, raw, batch, val_batch = mnist
    assert set(splits) == {"train", "val"}
    assert len(splits["train"]) == 6
    assert raw[0]["image"].shape == (28, 28, 1)  # mnist is grey 28x28
    assert batch["image"].shape == (6, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
    assert val_batch["image"].shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(batch["label"], [int(r["label"]) for r in raw])


def test_tfds_grey_replicated_to_three_channels(mnist):
    _, _, batch, _ = mnist
    x = batch["image"]
    # Identical grey values, normalised per channel: (x - mean_c) / std_c, so x * std + mean is
    # the same in all three channels.
    unnorm = x * IMAGENET_STD + IMAGENET_MEAN
    np.testing.assert_allclose(unnorm[..., 0], unnorm[..., 1], atol=1e-5)
    np.testing.assert_allclose(unnorm[..., 0], unnorm[..., 2], atol=1e-5)


def test_tfds_imagenet_normalisation_matches_hand_computation(mnist):
    _, raw, batch, _ = mnist
    assert np.asarray(raw[0]["image"]).std() > 0  # mock images are random, not constant
    for i, record in enumerate(raw):
        np.testing.assert_allclose(batch["image"][i], _expected_imagenet(np.asarray(record["image"]), 32), atol=1e-5)


def test_tensorflow_not_imported(mnist):
    assert "tensorflow" not in sys.modules
    assert not [m for m in sys.modules if m.startswith("tensorflow.")]


def test_missing_data_dir_raises_with_build_hint(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as err:
        tfds_source.tfds_image_splits("mnist", missing, {"train": "train"}, image_size=32)
    msg = str(err.value)
    assert missing in msg
    assert "tfds build mnist" in msg and "array_record" in msg


# ----------------------------------------------------------------------------- decode helpers


def test_normalize_hand_numbers():
    img = np.zeros((2, 2, 3), np.uint8)
    img[0, 0] = 255
    img[0, 1] = (0, 128, 255)
    out = tfds_source.normalize(img, "imagenet")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[1, 1], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    np.testing.assert_allclose(out[0, 0], [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-6)
    np.testing.assert_allclose(
        out[0, 1], [-0.485 / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-6
    )
    mo = tfds_source.normalize(img, "minus_one_one")
    np.testing.assert_allclose(mo[0, 1], [-1.0, 128 / 255 * 2 - 1, 1.0], atol=1e-6)
    np.testing.assert_allclose(mo[1, 1], [-1.0, -1.0, -1.0])
    with pytest.raises(ValueError, match="normalization"):
        tfds_source.normalize(img, "bogus")


def test_resize_image_grey_and_rgb():
    rng = np.random.default_rng(0)
    grey2d = rng.integers(0, 256, size=(10, 10), dtype=np.uint8)
    out = tfds_source.resize_image(grey2d, 10)  # no resize, just channels
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey2d)
    rgb = rng.integers(0, 256, size=(12, 9, 3), dtype=np.uint8)
    up = tfds_source.resize_image(rgb, 16)
    assert up.shape == (16, 16, 3) and up.dtype == np.uint8
    expected = np.asarray(Image.fromarray(rgb).resize((16, 16), Image.BICUBIC))
    np.testing.assert_array_equal(up, expected)


def test_image_decoder_on_a_record():
    img = np.full((4, 4, 1), 51, np.uint8)  # 0.2 after /255
    decode = tfds_source.image_decoder(4, "minus_one_one")
    out = decode({"image": img, "label": np.int64(7)})
    assert out["image"].shape == (4, 4, 3) and out["image"].dtype == np.float32
    np.testing.assert_allclose(out["image"], 0.2 * 2 - 1, rtol=1e-6)
    assert out["label"] == 7 and out["label"].dtype == np.int32
