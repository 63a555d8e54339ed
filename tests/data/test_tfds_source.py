"""Real image data through tfds.data_source (jdjax/data/tfds_source.py), on tfds mock data."""

import json
import pathlib
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


# ----------------------------------------------------------------------------- bad input (issue 16)


def _prepared(data_dir, name="mnist", version="3.0.1", file_format="array_record", splits=(("train", 4), ("test", 2))):
    """A data_dir whose `name` looks prepared: its dataset_info.json only (no ArrayRecord shards), a few hundred bytes."""
    folder = data_dir / name / version
    folder.mkdir(parents=True)
    info = {"name": name, "version": version, "fileFormat": file_format, "splits": [
        {"name": s, "numBytes": "100", "shardLengths": [str(n)], "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"}
        for s, n in splits]}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return str(data_dir)


def _refused(data_dir, splits, *expected):
    before = sorted(str(p) for p in pathlib.Path(data_dir).rglob("*"))
    with pytest.raises(FileNotFoundError) as err:
        tfds_source.tfds_image_splits("mnist", data_dir, splits, image_size=8)
    msg = str(err.value)
    for text in expected:
        assert text in msg, msg
    assert sorted(str(p) for p in pathlib.Path(data_dir).rglob("*")) == before  # nothing written, nothing downloaded
    return msg


def test_data_dir_without_the_data_set(tmp_path):
    msg = _refused(str(tmp_path), {"train": "train"}, f"mnist split 'train' in data_dir '{tmp_path}'",
                   f"{tmp_path / 'mnist'} does not exist", f"`tfds build mnist --data_dir={tmp_path} --file_format=array_record`")
    assert "TFRECORD" not in msg  # tfds' own message blames a TFRecord build that is not there


def test_wrong_split_names_the_prepared_ones(tmp_path):
    data_dir = _prepared(tmp_path)
    _refused(data_dir, {"val": "validation"}, "mnist split 'validation'", "mnist has no split 'validation'",
             "the prepared splits are train (4 examples), test (2 examples)", "Name one of the prepared splits")
    _refused(data_dir, {"train": "train[10:20]"}, "slice [10:20] incompatible with 4 examples")


def test_missing_shards_tfrecord_build_and_other_version(tmp_path):
    _refused(_prepared(tmp_path / "a"), {"train": "train"}, "cannot read its first record",
             "mnist-train.array_record-00000-of-00001", "the prepared files are incomplete", "tfds build mnist")
    _refused(_prepared(tmp_path / "b", file_format="tfrecord"), {"train": "train"}, "was prepared as tfrecord",
             "reads ArrayRecord only", "--file_format=array_record")
    _refused(_prepared(tmp_path / "c", version="1.0.0"), {"train": "train"},
             f"{tmp_path / 'c' / 'mnist' / '3.0.1'} does not exist", "the data_dir has ['1.0.0']")


def test_records_without_image_or_label_and_images_of_the_wrong_rank(tmp_path):
    # a data set without an image feature (tfds mock data of a text data set): refused when the split is opened
    mock = tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE, data_dir=str(tmp_path))
    with mock, pytest.raises(ValueError) as err:
        tfds_source.tfds_image_splits("imdb_reviews", str(tmp_path), {"train": "train"}, image_size=8)
    assert str(err.value) == (f"imdb_reviews split 'train' in {tmp_path}: a record without the 'image' feature (it has "
                              "'label', 'text'). Use an image classification data set (features 'image' and 'label').")
    decode = tfds_source.image_decoder(8, "imagenet", where="mnist split 'train' in /data")
    with pytest.raises(ValueError, match=r"^mnist split 'train' in /data: a record without the 'label' feature \(it has 'image'\)"):
        decode({"image": np.zeros((4, 4, 1), np.uint8)})
    for shape in [(4,), (2, 4, 4, 3), (4, 4, 4), (0, 4, 3)]:
        with pytest.raises(ValueError) as err:
            decode({"image": np.zeros(shape, np.uint8), "label": np.int64(1)})
        assert str(err.value).startswith(f"mnist split 'train' in /data: an image of shape {shape} and dtype uint8; "
                                         "expected [H, W] or [H, W, 1 or 3] pixels"), str(err.value)
    with pytest.raises(ValueError, match="the 'label' feature is float32"):
        decode({"image": np.zeros((4, 4), np.uint8), "label": np.float32(1.5)})
