"""VTAB-1k: the 19 tasks of the Visual Task Adaptation Benchmark, 1,000-example version.

Each task trains on 800 images (`train800`), selects the checkpoint on 200 validation images
(`val200`) and reports accuracy on the task's full test split. PYRA and the PEFT literature
train on all 1,000 (`train800val200`); here the 200 are kept for model selection, so the test
split is never used to choose anything. Images are resized straight to `image_size` x
`image_size` (bicubic) and normalised with the ImageNet mean/std, as in PYRA's scripts (spec
`vision_token_merging.md` §3.3).

Data come from prepared TFDS ArrayRecord directories through `tfds.data_source` (TensorFlow is
not imported, nothing is downloaded at training time); what a missing or malformed preparation
reports is described in `jdjax.data.tfds_source`. Prepare the builders once, on a machine
with TensorFlow (`pip install tensorflow tensorflow-datasets`):

    tfds build caltech101 cifar100 dtd oxford_flowers102 oxford_iiit_pet svhn_cropped sun397/tfds \\
        patch_camelyon eurosat/rgb resisc45 diabetic_retinopathy_detection/btgraham-300 \\
        clevr dmlab dsprites kitti smallnorb --data_dir=$HOME/tfds --file_format=array_record

resisc45 and diabetic_retinopathy_detection need their files downloaded by hand first (the
`tfds build` error names them; pass `--manual_dir`).

Source of the split slices and labels: google-research/task_adaptation,
`task_adaptation/data/<dataset>.py` at commit ed9b417768c38c38e1fea8194d23442bd78eeafd (the
version that defines `train800` / `val200` / `train800val200`); dtd and dmlab, whose stored
upstream copies predate those splits, from the same definitions as vendored in KMnP/vpt
`src/data/vtab_datasets/{dtd,dmlab}.py`. Facts re-stated, code written here. The rule: when the
TFDS builder has a validation split, train800 = `train[:800]` and val200 = `validation[:200]`
(smallnorb: `test[:200]`); otherwise the reference cuts its own train/val at
`train_count = P% of train` and val200 = `train[train_count:train_count+200]`; the numbers below
are those offsets for the TFDS split sizes (caltech101 3,060 x 90%, cifar100 50,000 x 90%,
pets 3,680 x 80%, svhn 73,257 x 90%, eurosat 27,000 x 60%, resisc45 31,500 x 60%, clevr 70,000 x
90%, dsprites 737,280 x 80%).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from jdjax.data.pipeline import RecordSource
from jdjax.data.tfds_source import feature, normalize, open_split, resize_image

GROUPS = ("natural", "specialized", "structured")


def _label(key: str) -> Callable[[dict], int]:
    return lambda record: int(record[key])


def _binned(key: str, num_values: int, num_bins: int) -> Callable[[dict], int]:
    """An integer factor with `num_values` values coarsened to `num_bins` bins: floor(v / (num_values
    / num_bins)), the reference's `floordiv(v, class_division_factor)` (dSprites)."""
    return lambda record: int(record[key]) * num_bins // num_values


def _thresholded(value: Callable[[dict], float], thresholds: tuple[float, ...]) -> Callable[[dict], int]:
    """Index of the last threshold strictly below the value (the reference's
    `reduce_max(where(thrs - v < 0))`): bins (t_0, t_1], (t_1, t_2], ..."""
    thrs = np.asarray(thresholds)

    def label(record):
        return int(np.nonzero(thrs < value(record))[0].max())

    return label


def _clevr_count(record) -> int:
    return len(np.asarray(record["objects"]["size"])) - 3  # 3..10 objects -> classes 0..7


def _clevr_closest_depth(record) -> float:
    return float(np.min(np.asarray(record["objects"]["pixel_coords"])[:, 2]))  # pixel_coords [n, 3]: x, y, depth


def _kitti_closest_vehicle(record) -> float:
    """Depth (z, metres) of the closest car, van or truck (types 0-2); 1000 when there is none."""
    kind = np.asarray(record["objects"]["type"])
    z = np.asarray(record["objects"]["location"]).reshape(-1, 3)[:, 2]  # location [n, 3]: x, y, z
    return float(np.min(z[kind < 3], initial=1000.0))


_PLAIN_LABEL = _label("label")


@dataclasses.dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task: TFDS builder, split slices (train800 / val200 / test), label and class count."""

    name: str
    group: str
    builder: str  # TFDS name[/config]; the reference pinned versions noted in TASKS
    train: str
    val: str
    test: str
    num_classes: int
    label: Callable[[dict], int] = _PLAIN_LABEL
    label_feature: str = "label"  # the record feature `label` reads
    image_key: str = "image"
    binary_image: bool = False  # pixels stored as 0/1 (dSprites): scaled to 0/255 as the reference does


# Reference TFDS versions (task_adaptation): caltech101 3.*, cifar100 3.*, dtd 3.*, oxford_flowers102 2.*,
# oxford_iiit_pet 3.* (tfds 4.9 builds only 4.0.0), svhn_cropped 3.*, sun397/tfds 4.*, patch_camelyon 2.*,
# eurosat/rgb 2.*, resisc45 3.*, diabetic_retinopathy_detection/btgraham-300 3.*, clevr 3.*, dmlab 2.0.1,
# dsprites 2.*, kitti 3.1.0 (tfds 4.9 default 3.3.0, which only adds occlusion labels), smallnorb 2.*.
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
        # structured (CLEVR's test split has no labels: the reference tests on its validation split)
        VtabTask("clevr_count", "structured", "clevr", "train[:800]", "train[63000:63200]", "validation", 8,
                 label=_clevr_count, label_feature="objects"),
        VtabTask("clevr_distance", "structured", "clevr", "train[:800]", "train[63000:63200]", "validation", 6,
                 label=_thresholded(_clevr_closest_depth, (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)),
                 label_feature="objects"),
        VtabTask("dmlab", "structured", "dmlab", "train[:800]", "validation[:200]", "test", 6),
        VtabTask("dsprites_location", "structured", "dsprites", "train[:800]", "train[589824:590024]",
                 "train[663552:]", 16, label=_binned("label_x_position", 32, 16), label_feature="label_x_position",
                 binary_image=True),
        VtabTask("dsprites_orientation", "structured", "dsprites", "train[:800]", "train[589824:590024]",
                 "train[663552:]", 16, label=_binned("label_orientation", 40, 16), label_feature="label_orientation",
                 binary_image=True),
        VtabTask("kitti_distance", "structured", "kitti", "train[:800]", "validation[:200]", "test", 4,
                 label=_thresholded(_kitti_closest_vehicle, (-100.0, 8.0, 20.0, 999.0)), label_feature="objects"),
        VtabTask("smallnorb_azimuth", "structured", "smallnorb", "train[:800]", "test[:200]", "test[50%:]", 18,
                 label=_label("label_azimuth"), label_feature="label_azimuth"),
        VtabTask("smallnorb_elevation", "structured", "smallnorb", "train[:800]", "test[:200]", "test[50%:]", 9,
                 label=_label("label_elevation"), label_feature="label_elevation"),
    ]
}


def get_task(name: str) -> VtabTask:
    if name not in TASKS:
        raise ValueError(f"unknown VTAB-1k task {name!r}; known: {', '.join(TASKS)}.")
    return TASKS[name]


def build_command(name: str, data_dir: str = "DIR") -> str:
    return f"tfds build {get_task(name).builder} --data_dir={data_dir} --file_format=array_record"


def decoder(task: VtabTask, image_size: int, split: str = "", data_dir: str = "DIR"
            ) -> Callable[[dict], dict[str, np.ndarray]]:
    """One TFDS record -> {'image' [S, S, 3] float32 ImageNet-normalised, 'label' int32}; `split` and
    `data_dir` name where a malformed record comes from in its error."""
    where = f"VTAB task {task.name!r} ({task.builder}" + (f" split {split!r} in {data_dir})" if split else ")")
    fix = f"Prepare it again with `{build_command(task.name, data_dir)}` (the TFDS version VTAB uses)"

    def decode(record: dict) -> dict[str, np.ndarray]:
        image = np.asarray(feature(record, task.image_key, where, fix))
        if task.binary_image:
            image = np.where(image > 0, 255, 0).astype(np.uint8)
        feature(record, task.label_feature, where, fix)
        try:
            label, problem = task.label(record), None
        except (KeyError, IndexError, TypeError, ValueError) as e:
            label, problem = None, e
        if problem is not None:
            raise ValueError(f"{where}: cannot read the label from the {task.label_feature!r} feature of a record "
                             f"({type(problem).__name__}: {problem}). {fix}.")
        if not 0 <= label < task.num_classes:
            raise ValueError(
                f"VTAB task {task.name!r}: label {label} outside [0, {task.num_classes}); the prepared "
                f"{task.builder} data do not match the VTAB definition (a different TFDS version?)."
            )
        return {"image": normalize(resize_image(image, image_size, where, fix), "imagenet"), "label": np.int32(label)}

    return decode


def vtab_splits(name: str, data_dir: str, image_size: int = 224) -> dict[str, RecordSource]:
    """{'train' (800), 'val' (200), 'test'} sources of {'image' [S, S, 3] float32 ImageNet-normalised
    after a bicubic resize, 'label' int32} for the VTAB-1k task `name`. A missing data set, version,
    split or file is a FileNotFoundError and a malformed first record a ValueError, each naming the
    task, split, directory and the `tfds build` command."""
    task = get_task(name)
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"VTAB task {name!r}: data_dir {data_dir!r} does not exist. Prepare the data with "
            f"`{build_command(name)}` and pass --config.data.data_dir=DIR."
        )
    out = {}
    for split, spec in (("train", task.train), ("val", task.val), ("test", task.test)):
        decode = decoder(task, image_size, spec, data_dir)
        out[split] = open_split(task.builder, spec, data_dir, decode, context=f"VTAB task {name!r}: ",
                                command=build_command(name, data_dir))
    return out


def vtab_average(accuracies: dict[str, float]) -> dict[str, float]:
    """Group means (natural, specialized, structured) over the tasks present and, when every group has
    a task, their mean: the "VTAB average" of the PEFT papers (e.g. 72.87, 80.78, 57.64 -> 70.43)."""
    unknown = sorted(set(accuracies) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown VTAB tasks {unknown}; known: {', '.join(TASKS)}.")
    out = {}
    for group in GROUPS:
        values = [v for k, v in accuracies.items() if TASKS[k].group == group]
        if values:
            out[group] = float(np.mean(values))
    if len(out) == len(GROUPS):
        out["average"] = float(np.mean([out[g] for g in GROUPS]))
    return out
