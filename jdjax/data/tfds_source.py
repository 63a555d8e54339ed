"""Real image data sets through `tfds.data_source` (prepared ArrayRecord files; TensorFlow is
never imported). Prepare a data set once, on any machine with TensorFlow, with
`tfds build <name> --data_dir=DIR --file_format=array_record`, then point
`--config.data.data_dir=DIR` at it.

Bad input fails when the splits are opened, before anything is compiled: a data_dir without the
prepared data set, a version or split that was not prepared, a TFRecord-only build and missing
ArrayRecord files are a FileNotFoundError naming the data set, split, directory and the `tfds
build` command; a first record without the image or label feature, or with an image that is not
[H, W] / [H, W, 1 or 3], is a ValueError naming the same (and any later such record when read).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

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


IMAGE_DATA_FIX = "Use an image classification data set (features 'image' and 'label')"


def build_command(name: str, data_dir: str = "DIR") -> str:
    return f"tfds build {name} --data_dir={data_dir} --file_format=array_record"


def resize_image(image: np.ndarray, size: int, where: str = "", fix: str = IMAGE_DATA_FIX) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, 3], bicubic, grey replicated to 3 channels.
    `where` names the record's data set / split for the error on any other shape."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3)) or 0 in image.shape:
        raise ValueError(
            f"{where or 'image'}: an image of shape {image.shape} and dtype {image.dtype}; expected [H, W] or "
            f"[H, W, 1 or 3] pixels (not a video, a batch, RGBA or encoded bytes). {fix}."
        )
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return image


def feature(record, key: str, where: str, fix: str = IMAGE_DATA_FIX):
    """record[key], or a ValueError naming the features the record has and `fix`."""
    if not hasattr(record, "keys") or key not in record:
        has = ", ".join(map(repr, sorted(record))) if hasattr(record, "keys") else type(record).__name__
        raise ValueError(f"{where}: a record without the {key!r} feature (it has {has}). {fix}.")
    return record[key]


def image_decoder(image_size: int, normalization: str, image_key: str = "image", label_key: str = "label",
                  where: str = "a record"):
    def decode(record: dict) -> dict[str, np.ndarray]:
        image = resize_image(np.asarray(feature(record, image_key, where)), image_size, where)
        label = np.asarray(feature(record, label_key, where))
        if label.ndim or label.dtype.kind not in "iub":
            raise ValueError(f"{where}: the {label_key!r} feature is {label.dtype} {label.shape}; expected one "
                             "integer class per record.")
        return {"image": normalize(image, normalization), "label": np.int32(label)}

    return decode


def _split_names(split: str) -> list[str]:
    """'train[:800]+validation' -> ['train', 'validation']."""
    return [part.split("[")[0].strip() for part in split.split("+")]


def _why_not_readable(tfds, name: str, split: str, data_dir: str, error: Exception) -> tuple[str, str | None]:
    """(what is wrong with `data_dir` for `name` / `split`, the fix or None for `tfds build`), read from
    the directory and its dataset_info.json."""
    reason = f"tfds: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300].rstrip('.')}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:  # an unknown or malformed name
        return (f"tfds does not know the data set {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                "Check the data set name against the TFDS catalog (tfds_name / the VTAB task)")
    where = os.path.join(data_dir, name.split(":")[0])
    if not os.path.isdir(where):
        return f"{where} does not exist: {name} is not prepared in this data_dir", None
    if not os.path.isdir(builder.data_path):
        found = sorted(d for d in os.listdir(where) if re.fullmatch(r"\d+\.\d+\.\d+", d))
        return (f"{builder.data_path} does not exist: this tfds reads version {builder.version} of {name}, the "
                f"data_dir has {found or 'no prepared version'}"), None
    info = builder.info
    if not info.splits:
        return f"{builder.data_path} has no dataset_info.json with splits: the preparation did not finish", None
    fmt = getattr(info.file_format, "value", info.file_format)
    if str(fmt) != "array_record":
        return f"{builder.data_path} was prepared as {fmt}; tfds.data_source reads ArrayRecord only", None
    prepared = ", ".join(f"{k} ({v.num_examples:,} examples)" for k, v in info.splits.items())
    unknown = [n for n in _split_names(split) if n not in info.splits]
    fix = "Name one of the prepared splits (a slice like train[:800] must fit in its split)"
    if unknown:
        return f"{name} has no split {', '.join(map(repr, unknown))}; the prepared splits are {prepared}", fix
    return f"{reason}; the prepared splits are {prepared}", fix


def open_split(name: str, split: str, data_dir: str, decode: Callable[[dict], dict], context: str = "",
               command: str | None = None) -> RecordSource:
    """`tfds.data_source(name, split)` of a prepared ArrayRecord `data_dir` as a RecordSource, its first
    record decoded as a check. A data set, version, split or file that is not there is a
    FileNotFoundError naming them and the `tfds build` command; a bad first record is decode's ValueError."""
    import tensorflow_datasets as tfds  # optional extra: pip install -e .[tfds]

    command = command or build_command(name, data_dir)
    head = f"{context}{name} split {split!r} in data_dir {data_dir!r}"
    try:
        records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for a missing, partial or TFRecord-only build
        why, fix = _why_not_readable(tfds, name, split, data_dir, e)
        raise FileNotFoundError(f"{head}: {why}. {fix or f'Prepare it with `{command}`'}.") from e
    if len(records) == 0:
        raise FileNotFoundError(f"{head}: the split has no records. Prepare it again with `{command}`.")
    try:
        first = records[0]
    except Exception as e:  # e.g. an ArrayRecord shard that is missing or cut short
        raise FileNotFoundError(
            f"{head}: cannot read its first record ({type(e).__name__}: {str(e).strip()[:300]}); the prepared "
            f"files are incomplete. Prepare them again with `{command}`."
        ) from e
    decode(first)
    return RecordSource(records, decode)


def tfds_image_splits(
    name: str, data_dir: str, splits: dict[str, str], image_size: int, normalization: str = "imagenet"
) -> dict[str, RecordSource]:
    """{our split name: tfds split string} -> sources of {'image' [S, S, 3] float32, 'label' int32}."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data_dir {data_dir!r} does not exist. Prepare the data set as ArrayRecord with "
            f"`{build_command(name)}` and pass --config.data.data_dir=DIR."
        )
    normalize(np.zeros((1, 1, 3), np.uint8), normalization)  # a bad name fails before any reading
    return {
        ours: open_split(name, theirs, data_dir,
                         image_decoder(image_size, normalization, where=f"{name} split {theirs!r} in {data_dir}"))
        for ours, theirs in splits.items()
    }
