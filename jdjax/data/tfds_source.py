"""Real image data sets through `tfds.data_source` (prepared ArrayRecord files; TensorFlow is
never imported). Prepare a data set once, on any machine with TensorFlow, with
`tfds build <name> --data_dir=DIR --file_format=array_record`, then point
`--config.data.data_dir=DIR` at it.
"""

from __future__ import annotations

import os

import numpy as np

from jdjax.data.pipeline import RecordSource

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(image_uint8: np.ndarray, normalization: str) -> np.ndarray:
    """uint8 [H, W, 3] -> float32: 'imagenet' mean/std, or 'minus_one_one' ([-1, 1])."""
    x = image_uint8.astype(np.float32) / 255.0
    if normalization == "imagenet":
        return (x - IMAGENET_MEAN) / IMAGENET_STD
    if normalization == "minus_one_one":
        return x * 2.0 - 1.0
    raise ValueError(f"normalization must be 'imagenet' or 'minus_one_one', got {normalization!r}.")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, 3], bicubic, grey replicated to 3 channels."""
    from PIL import Image

    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return image


def image_decoder(image_size: int, normalization: str, image_key: str = "image", label_key: str = "label"):
    def decode(record: dict) -> dict[str, np.ndarray]:
        image = resize_image(np.asarray(record[image_key]), image_size)
        return {"image": normalize(image, normalization), "label": np.int32(record[label_key])}

    return decode


def tfds_image_splits(
    name: str, data_dir: str, splits: dict[str, str], image_size: int, normalization: str = "imagenet"
) -> dict[str, RecordSource]:
    """{our split name: tfds split string} -> sources of {'image' [S, S, 3] float32, 'label' int32}."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data_dir {data_dir!r} does not exist. Prepare the data set as ArrayRecord with "
            f"`tfds build {name} --data_dir=DIR --file_format=array_record` and pass --config.data.data_dir=DIR."
        )
    import tensorflow_datasets as tfds  # optional extra: pip install -e .[tfds]

    decode = image_decoder(image_size, normalization)
    return {ours: RecordSource(tfds.data_source(name, split=theirs, data_dir=data_dir, download=False), decode) for ours, theirs in splits.items()}
