"""VTAB-1k: the 19 tasks of the Visual Task Adaptation Benchmark, 1,000-example version.

Each task trains on 800 images, selects the checkpoint on 200 validation images and reports
accuracy on the task's full test split (PYRA and the PEFT literature train on all 1,000; here
the 200 are kept for model selection, never the test split). Images are resized straight to
`image_size` x `image_size` (bicubic) and normalised with the ImageNet mean/std, as in PYRA's
scripts (spec `vision_token_merging.md` §3.3).

Data come from prepared TFDS ArrayRecord directories through `tfds.data_source` (no
TensorFlow at training time). Prepare each builder once on a machine with TensorFlow:

    tfds build caltech101 dtd ... --data_dir=$HOME/tfds --file_format=array_record

Split slices and derived labels follow google-research/task_adaptation
(`task_adaptation/data/*.py`): facts re-stated, code written here. Where the 800/200 come from
one split, train800 = first 800 of the task's train part and val200 = first 200 of its
validation part. [R] marks a slice reconstructed from memory of those files, not re-checked
against them in this session: verify before publishing numbers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from jdjax.data.pipeline import RecordSource
from jdjax.data.tfds_source import normalize, resize_image

GROUPS = ("natural", "specialized", "structured")


def _label(key: str) -> Callable[[dict], int]:
    return lambda record: int(record[key])


def _binned(key: str, num_values: int, num_bins: int) -> Callable[[dict], int]:
    """An integer factor with `num_values` values coarsened to `num_bins` equal bins (dSprites)."""
    return lambda record: int(np.floor(int(record[key]) * num_bins / num_values))


def _thresholded(value: Callable[[dict], float], thresholds: tuple[float, ...]) -> Callable[[dict], int]:
    """Index of the last threshold strictly below the value: bins [t_0, t_1), [t_1, t_2), ..."""

    def label(record):
        v = value(record)
        return int(np.max(np.nonzero(np.asarray(thresholds) < v)[0]))

    return label


def _clevr_count(record) -> int:
    return len(np.asarray(record["objects"]["size"])) - 3  # 3..10 objects -> 0..7


def _clevr_closest_depth(record) -> float:
    return float(np.min(np.asarray(record["objects"]["pixel_coords"])[:, 2]))


def _kitti_closest_vehicle(record) -> float:
    """Depth (z) of the closest car, van or truck (types 0-2); 1000 when there is none."""
    kind = np.asarray(record["objects"]["type"])
    z = np.asarray(record["objects"]["location"]).reshape(-1, 3)[:, 2]
    vehicles = z[kind < 3]
    return float(vehicles.min()) if len(vehicles) else 1000.0


@dataclasses.dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task: TFDS builder, split slices (train800 / val200 / test), label and class count."""

    name: str
    group: str
    builder: str
    train: str
    val: str
    test: str
    num_classes: int
    label: Callable[[dict], int] = _label("label")
    image_key: str = "image"


TASKS: dict[str, VtabTask] = {
    t.name: t
    for t in [
        # natural
        VtabTask("caltech101", "natural", "caltech101", "train[:800]", "train[2754:2954]", "test", 102),
        VtabTask("cifar100", "natural", "cifar100", "train[:800]", "train[45000:45200]", "test", 100),
        VtabTask("dtd", "natural", "dtd", "train[:800]", "validation[:200]", "test", 47),
        VtabTask("oxford_flowers102", "natural", "oxford_flowers102", "train[:800]", "validation[:200]", "test", 102),
        VtabTask("oxford_iiit_pet", "natural", "oxford_iiit_pet", "train[:800]", "train[2944:3144]", "test", 37),
        VtabTask("svhn", "natural", "svhn_cropped", "train[:800]", "train[65931:66131]", "test", 10),
        VtabTask("sun397", "natural", "sun397/tfds", "train[:800]", "validation[:200]", "test", 397),
        # specialized
        VtabTask("patch_camelyon", "specialized", "patch_camelyon", "train[:800]", "validation[:200]", "test", 2),
        VtabTask("eurosat", "specialized", "eurosat/rgb", "train[:800]", "train[16200:16400]", "train[21600:]", 10),
        VtabTask("resisc45", "specialized", "resisc45", "train[:800]", "train[18900:19100]", "train[25200:]", 45),
        VtabTask("diabetic_retinopathy", "specialized", "diabetic_retinopathy_detection/btgraham-300",
                 "train[:800]", "validation[:200]", "test", 5),
        # structured
        VtabTask("clevr_count", "structured", "clevr", "train[:800]", "train[63000:63200]", "validation", 8,
                 label=_clevr_count),
        VtabTask("clevr_distance", "structured", "clevr", "train[:800]", "train[63000:63200]", "validation", 6,
                 label=_thresholded(_clevr_closest_depth, (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0))),
        VtabTask("dmlab", "structured", "dmlab", "train[:800]", "validation[:200]", "test", 6),
        VtabTask("dsprites_location", "structured", "dsprites", "train[:800]", "train[589824:590024]",
                 "train[663552:]", 16, label=_binned("label_x_position", 32, 16)),
        VtabTask("dsprites_orientation", "structured", "dsprites", "train[:800]", "train[589824:590024]",
                 "train[663552:]", 16, label=_binned("label_orientation", 40, 16)),
        VtabTask("kitti_distance", "structured", "kitti", "train[:800]", "validation[:200]", "test", 4,
                 label=_thresholded(_kitti_closest_vehicle, (-100.0, 8.0, 20.0, 999.0))),
        VtabTask("smallnorb_azimuth", "structured", "smallnorb", "train[:800]", "test[:200]", "test[50%:]", 18,
                 label=_label("label_azimuth")),
        VtabTask("smallnorb_elevation", "structured", "smallnorb", "train[:800]", "test[:200]", "test[50%:]", 9,
                 label=_label("label_elevation")),
    ]
}


def get_task(name: str) -> VtabTask:
    if name not in TASKS:
        raise ValueError(f"unknown VTAB-1k task {name!r}; known: {', '.join(TASKS)}.")
    return TASKS[name]


def vtab_splits(name: str, data_dir: str, image_size: int = 224) -> dict[str, RecordSource]:
    """{'train' (800), 'val' (200), 'test'} sources of {'image' [S, S, 3] float32 ImageNet-normalised
    after a bicubic resize, 'label' int32} for the VTAB-1k task `name`."""
    task = get_task(name)
    builder = task.builder
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"VTAB task {name!r}: data_dir {data_dir!r} does not exist. Prepare it with "
            f"`tfds build {builder} --data_dir=DIR --file_format=array_record` and pass --config.data.data_dir=DIR."
        )
    import tensorflow_datasets as tfds  # optional extra: pip install -e .[tfds]

    def decode(record: dict) -> dict[str, np.ndarray]:
        image = resize_image(np.asarray(record[task.image_key]), image_size)
        return {"image": normalize(image, "imagenet"), "label": np.int32(task.label(record))}

    out = {}
    for split, spec in (("train", task.train), ("val", task.val), ("test", task.test)):
        try:
            records = tfds.data_source(task.builder, split=spec, data_dir=data_dir)
        except Exception as e:  # tfds raises several types for a missing or partial build
            raise FileNotFoundError(
                f"VTAB task {name!r}: could not open {task.builder} split {spec!r} in {data_dir} ({type(e).__name__}: "
                f"{e}). Prepare it with `tfds build {builder} --data_dir={data_dir} --file_format=array_record`."
            ) from e
        out[split] = RecordSource(records, decode)
    return out


def vtab_average(accuracies: dict[str, float]) -> dict[str, float]:
    """Group means (natural, specialized, structured) over the tasks present and their mean, the
    "VTAB average" of the PEFT papers (e.g. 72.87, 80.78, 57.64 -> 70.43)."""
    unknown = sorted(set(accuracies) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown VTAB tasks {unknown}.")
    out = {}
    for group in GROUPS:
        values = [v for k, v in accuracies.items() if TASKS[k].group == group]
        if values:
            out[group] = float(np.mean(values))
    if len(out) == len(GROUPS):
        out["average"] = float(np.mean([out[g] for g in GROUPS]))
    return out
