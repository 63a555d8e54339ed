"""VTAB-1k readers (jdjax/data/vtab.py) on tfds mock data, the derived labels on hand-made records,
the split slices against the TFDS split sizes, the VTAB average, and the sweep tool."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from jdjax import testing
from jdjax.data import vtab
from jdjax.data.tfds_source import IMAGENET_MEAN, IMAGENET_STD

tfds = pytest.importorskip("tensorflow_datasets")

# TFDS split sizes of the builders (tfds catalog), to place the slices. The mock ignores slices
# (every split has `num_examples` rows), so the 800 / 200 counts are checked here, on paper.
SPLIT_SIZES = {
    "caltech101": {"train": 3060, "test": 6084},
    "cifar100": {"train": 50000, "test": 10000},
    "dtd": {"train": 1880, "validation": 1880, "test": 1880},
    "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
    "oxford_iiit_pet": {"train": 3680, "test": 3669},
    "svhn_cropped": {"train": 73257, "test": 26032},
    "sun397/tfds": {"train": 76128, "validation": 10875, "test": 21750},
    "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768},
    "eurosat/rgb": {"train": 27000},
    "resisc45": {"train": 31500},
    "diabetic_retinopathy_detection/btgraham-300": {"train": 35126, "validation": 10906, "test": 42670},
    "clevr": {"train": 70000, "validation": 15000, "test": 15000},
    "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
    "dsprites": {"train": 737280},
    "kitti": {"train": 6347, "validation": 423, "test": 711},
    "smallnorb": {"train": 24300, "test": 24300},
}
# Tasks whose val200 the reference carves out of TFDS train at P% (task_adaptation): (P, test rows).
CARVED = {
    "caltech101": (90, 6084), "cifar100": (90, 10000), "oxford_iiit_pet": (80, 3669), "svhn": (90, 26032),
    "eurosat": (60, 5400), "resisc45": (60, 6300), "clevr_count": (90, 15000), "clevr_distance": (90, 15000),
    "dsprites_location": (80, 73728), "dsprites_orientation": (80, 73728),
}


def test_registry_has_the_19_tasks_in_three_groups():
    assert len(vtab.TASKS) == 19
    counts = {g: sum(t.group == g for t in vtab.TASKS.values()) for g in vtab.GROUPS}
    assert counts == {"natural": 7, "specialized": 4, "structured": 8}
    classes = {n: t.num_classes for n, t in vtab.TASKS.items()}
    assert classes == {
        "caltech101": 102, "cifar100": 100, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
        "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
        "clevr_count": 8, "clevr_distance": 6, "dmlab": 6, "dsprites_location": 16, "dsprites_orientation": 16,
        "kitti_distance": 4, "smallnorb_azimuth": 18, "smallnorb_elevation": 9,
    }
    assert set(SPLIT_SIZES) == {t.builder for t in vtab.TASKS.values()}


@pytest.mark.parametrize("name", list(vtab.TASKS))
def test_split_slices_are_800_200_disjoint_and_inside_the_data(name):
    task = vtab.TASKS[name]
    sizes = {s: types.SimpleNamespace(num_examples=n) for s, n in SPLIT_SIZES[task.builder].items()}

    def rows(spec):
        (instr,) = tfds.core.ReadInstruction.from_spec(spec).to_absolute(sizes)
        end = sizes[instr.splitname].num_examples if instr.to is None else instr.to
        return instr.splitname, set(range(instr.from_ or 0, end))

    (train_split, train), (val_split, val), (test_split, test) = rows(task.train), rows(task.val), rows(task.test)
    assert train_split == "train" and train == set(range(800))
    assert len(val) == 200 and len(test) > 200
    for (a_split, a), (b_split, b) in [((train_split, train), (val_split, val)), ((train_split, train), (test_split, test)),
                                       ((val_split, val), (test_split, test))]:
        if a_split == b_split:
            assert not a & b
    if name in CARVED:  # val200 starts where the reference's own train part ends
        percent, test_rows = CARVED[name]
        start = percent * SPLIT_SIZES[task.builder]["train"] // 100
        assert task.val == f"train[{start}:{start + 200}]" and len(test) == test_rows


def _hand_decode(raw_image: np.ndarray, size: int) -> np.ndarray:
    """PIL bicubic resize, grey replicated to RGB, then (x / 255 - mean) / std."""
    img = np.asarray(raw_image)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return (img.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


# One task per group, plus dsprites: a derived (binned) label and 0/1 pixels.
@pytest.mark.parametrize("name", ["dtd", "eurosat", "smallnorb_elevation", "dsprites_orientation"])
def test_reader_on_mock_data(name, mock_dir):
    task = vtab.TASKS[name]
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE, data_dir=mock_dir):
        splits = vtab.vtab_splits(name, mock_dir)  # 224 px
        assert set(splits) == {"train", "val", "test"}
        raw = [dict(splits["train"].records[i]) for i in range(3)]
        batch = splits["train"].get_batch(np.arange(3))
        val = splits["val"].get_batch(np.array([0, 1]))
        test = splits["test"].get_batch(np.array([0]))
    assert batch["image"].shape == (3, 224, 224, 3) and batch["image"].dtype == np.float32
    assert val["image"].shape == (2, 224, 224, 3) and test["image"].shape == (1, 224, 224, 3)
    assert batch["label"].dtype == np.int32
    for labels in (batch["label"], val["label"], test["label"]):
        assert np.all((labels >= 0) & (labels < task.num_classes))
    np.testing.assert_array_equal(batch["label"], [task.label(r) for r in raw])
    if name == "dsprites_orientation":  # 40 orientations binned into 16: floor(v / 2.5)
        np.testing.assert_array_equal(batch["label"], [int(np.floor(int(r["label_orientation"]) / 2.5)) for r in raw])
    else:  # ImageNet normalisation after a bicubic resize, by hand
        for i, r in enumerate(raw):
            np.testing.assert_allclose(batch["image"][i], _hand_decode(r["image"], 224), atol=1e-4)
    assert "tensorflow" not in sys.modules


def test_dsprites_binary_pixels_become_0_and_255():
    """dSprites stores 0/1 pixels; the reference multiplies by 255 before the usual preprocessing."""
    decode = vtab.decoder(vtab.TASKS["dsprites_location"], 64)  # native size: no resize
    img = np.zeros((64, 64, 1), np.uint8)
    img[10:20, 30:40] = 1
    out = decode({"image": img, "label_x_position": np.int64(31)})
    pixels = out["image"] * IMAGENET_STD + IMAGENET_MEAN
    np.testing.assert_allclose(pixels[15, 35], 1.0, atol=1e-5)
    np.testing.assert_allclose(pixels[0, 0], 0.0, atol=1e-5)
    assert out["label"] == 15


def test_out_of_range_label_is_an_error():
    decode = vtab.decoder(vtab.TASKS["clevr_count"], 8)
    with pytest.raises(ValueError, match="clevr_count.*label 9 outside"):
        decode({"image": np.zeros((8, 8, 3), np.uint8), "objects": {"size": np.zeros(12)}})


def test_label_features_are_the_ones_the_labels_read():
    for task in vtab.TASKS.values():
        record = {task.label_feature: 0}
        if task.label_feature == "objects":
            continue  # nested: checked by test_derived_labels_on_hand_made_records
        assert task.label(record) == 0, task.name


def test_derived_labels_on_hand_made_records():
    count = vtab.TASKS["clevr_count"].label
    assert count({"objects": {"size": np.zeros(3)}}) == 0 and count({"objects": {"size": np.zeros(10)}}) == 7
    dist = vtab.TASKS["clevr_distance"].label
    coords = lambda *z: {"objects": {"pixel_coords": np.array([[0.0, 0.0, d] for d in z])}}
    # thresholds 0, 8, 8.5, 9, 9.5, 10, 100: the closest object decides; a value on a threshold is in the lower bin
    assert dist(coords(12.0, 7.9)) == 0 and dist(coords(8.2)) == 1 and dist(coords(9.7, 20.0)) == 4
    assert dist(coords(10.5)) == 5 and dist(coords(8.0)) == 0 and dist(coords(8.5)) == 1
    loc = vtab.TASKS["dsprites_location"].label
    assert [loc({"label_x_position": x}) for x in (0, 1, 2, 31)] == [0, 0, 1, 15]
    ori = vtab.TASKS["dsprites_orientation"].label
    assert [ori({"label_orientation": o}) for o in (0, 2, 3, 5, 39)] == [0, 0, 1, 2, 15]
    kitti = vtab.TASKS["kitti_distance"].label

    def scene(kinds, zs):
        return {"objects": {"type": np.array(kinds), "location": np.array([[0.0, 0.0, z] for z in zs])}}

    # types 0-2 (car, van, truck) are vehicles; bins (-100, 8], (8, 20], (20, 999], none: 1000 m -> 3
    assert kitti(scene([0, 3], [5.0, 1.0])) == 0  # the pedestrian at 1 m does not count
    assert kitti(scene([1, 2], [30.0, 12.0])) == 1
    assert kitti(scene([2], [25.0])) == 2 and kitti(scene([4], [3.0])) == 3 and kitti(scene([], [])) == 3
    azimuth, elevation = vtab.TASKS["smallnorb_azimuth"].label, vtab.TASKS["smallnorb_elevation"].label
    assert azimuth({"label_azimuth": 17, "label_elevation": 2}) == 17
    assert elevation({"label_azimuth": 17, "label_elevation": 2}) == 2
    assert vtab.TASKS["dmlab"].label({"label": np.int64(5)}) == 5


def test_vtab_average_is_the_mean_of_group_means():
    accs = dict.fromkeys(vtab.TASKS, 0.0)
    # natural: 7 tasks, specialized: 4, structured: 8 -- a plain mean over the 19 would weight them 7:4:8
    accs.update(cifar100=70.0, dtd=77.0)  # natural mean (70 + 77) / 7 = 21
    accs.update(eurosat=40.0)  # specialized mean 40 / 4 = 10
    accs.update(dmlab=24.0)  # structured mean 24 / 8 = 3
    out = vtab.vtab_average(accs)
    assert out == pytest.approx({"natural": 21.0, "specialized": 10.0, "structured": 3.0, "average": 34.0 / 3})
    assert np.mean(list(accs.values())) == pytest.approx(211 / 19)  # not the VTAB average
    paper = {n: {"natural": 72.87, "specialized": 80.78, "structured": 57.64}[t.group] for n, t in vtab.TASKS.items()}
    assert vtab.vtab_average(paper)["average"] == pytest.approx(70.43, abs=5e-3)
    assert vtab.vtab_average({"dtd": 50.0}) == {"natural": 50.0}  # no average without every group
    with pytest.raises(ValueError, match="unknown VTAB"):
        vtab.vtab_average({"imagenet": 1.0})


def test_missing_data_and_unknown_task_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as err:
        vtab.vtab_splits("dtd", missing)
    assert "'dtd'" in str(err.value) and missing in str(err.value) and "tfds build dtd" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:  # exists but not prepared: no download is attempted
        vtab.vtab_splits("eurosat", str(empty))
    msg = str(err.value)
    assert "'eurosat'" in msg and str(empty / "eurosat" / "rgb") in msg and "does not exist" in msg
    assert f"tfds build eurosat/rgb --data_dir={empty} --file_format=array_record" in msg
    assert not any(empty.iterdir())
    with pytest.raises(ValueError, match="known: caltech101, cifar100"):
        vtab.get_task("imagenet")


def test_classification_validate_checks_task_and_class_count():
    from configs import vit
    from jdjax.tasks import classification

    c = vit.get_config("smoke")
    c.data.update(name="vtab", vtab_task="dtd", num_classes=10, data_dir="/somewhere")
    (err,) = classification.validate(c)
    assert "47" in err and "num_classes" in err
    c.data.num_classes = 47
    assert classification.validate(c) == []
    c.data.vtab_task = "dtdx"
    (err,) = classification.validate(c)
    assert "dtdx" in err and "caltech101" in err


# ----------------------------------------------------------------------------- the sweep tool


def test_sweep_table_and_finished_tasks(tmp_path):
    from jdjax.tools import vtab_sweep

    single = {"status": "completed", "test/accuracy": 0.5, "val/accuracy": 0.75, "selected_step": 7}
    assert vtab_sweep.task_results(single) == {"model": {"test": 0.5, "val": 0.75, "selected_step": 7}}
    rows = [{"run": "pyra-low", "val_accuracy": 0.6, "test_accuracy": 0.4, "selected_step": 9}]
    several = {"status": "completed", "runs": rows}  # configs/pyra.py: several runs per task
    assert vtab_sweep.task_results(several) == {"pyra-low": {"test": 0.4, "val": 0.6, "selected_step": 9}}

    res = lambda test: {"test": test, "val": None, "selected_step": 1}
    per_task = {"dtd": {"a": res(0.6), "b": res(0.8)}, "cifar100": {"a": res(0.4), "b": res(0.6)},
                "eurosat": {"a": res(0.9), "b": res(0.95)}, "dmlab": {"a": res(0.3)}}
    md, js = vtab_sweep.table(per_task)
    assert js["summary"]["a"] == pytest.approx({"natural": 50.0, "specialized": 90.0, "structured": 30.0,
                                                "average": 170 / 3})
    assert "average" not in js["summary"]["b"]  # no structured task
    assert "| dtd | natural | 60.00 | 80.00 |" in md and "| dmlab | structured | 30.00 | - |" in md
    assert "| **average** | | 56.67 | - |" in md


SWEEP_DRIVER = """
import sys, tensorflow_datasets as tfds
from jdjax.tools import vtab_sweep
data_dir, sys.argv = sys.argv[1], ["vtab_sweep"] + sys.argv[2:]
with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE, data_dir=data_dir):
    vtab_sweep.cli_main()
"""


def test_sweep_trains_unfinished_tasks_skips_finished_ones_and_writes_the_table(tmp_path):
    """configs/vit.py:smoke at 16 px over two mock tasks; eurosat has finished already and is skipped."""
    data_dir, workdir = str(tmp_path / "tfds"), tmp_path / "sweep"
    os.makedirs(data_dir)
    (workdir / "eurosat").mkdir(parents=True)
    (workdir / "eurosat" / "results.json").write_text(
        json.dumps({"status": "completed", "test/accuracy": 0.25, "val/accuracy": 0.5, "selected_step": 2}))
    cmd = [sys.executable, "-c", SWEEP_DRIVER, data_dir, "--config=configs/vit.py:smoke", f"--workdir={workdir}",
           "--tasks=dtd,eurosat", f"--data_dir={data_dir}", "--config.data.image_size=16",
           "--config.model.patch_size=8", "--config.num_train_steps=2", "--config.eval_every_steps=2",
           "--config.checkpoint.every_steps=2", "--config.eval_batch_size=8", "--config.batch_size=8"]
    proc = subprocess.run(cmd, cwd=testing.REPO_ROOT, env=testing.subprocess_env(1), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "vtab_sweep: dtd ->" in proc.stdout and "vtab_sweep: eurosat ->" not in proc.stdout
    trained = json.loads((workdir / "dtd" / "results.json").read_text())
    assert trained["selected_by"] == "val/accuracy"
    config = json.loads((workdir / "dtd" / "config.json").read_text())
    assert config["data"]["name"] == "vtab" and config["data"]["vtab_task"] == "dtd"
    assert config["data"]["num_classes"] == 47 and config["data"]["data_dir"] == data_dir
    results = json.loads((workdir / "vtab_results.json").read_text())
    assert results["failed"] == {} and sorted(results["tasks"]) == ["dtd", "eurosat"]
    assert results["tasks"]["dtd"]["model"] == {"test": trained["test/accuracy"], "val": trained["val/accuracy"],
                                                "selected_step": trained["selected_step"]}
    assert results["summary"]["model"] == pytest.approx({"natural": 100 * trained["test/accuracy"], "specialized": 25.0})
    md = (workdir / "vtab_results.md").read_text()
    assert f"| dtd | natural | {100 * trained['test/accuracy']:.2f} |" in md and "| eurosat | specialized | 25.00 |" in md


def test_sweep_usage_errors(tmp_path):
    from configs import vit
    from jdjax.tools import vtab_sweep

    c = vit.get_config("smoke")
    c.data.data_dir = str(tmp_path)
    assert vtab_sweep.usage_errors(c, ["dtd", "svhn"]) == []
    c.data.data_dir = str(tmp_path / "nope")
    c.checkpoint.best_metric = "test/accuracy"
    unknown, missing, on_test = vtab_sweep.usage_errors(c, ["dtd", "imagenet"])
    assert "['imagenet']" in unknown and "caltech101" in unknown
    assert "nope" in missing and "--data_dir" in missing
    assert "never on test" in on_test
    assert "empty" in vtab_sweep.usage_errors(c, [])[0]
    # the command line: a config problem every task would hit ends the sweep before any training, exit status 2
    proc = subprocess.run([sys.executable, "-m", "jdjax.tools.vtab_sweep", "--config=configs/vit.py:smoke",
                           f"--workdir={tmp_path / 'w'}", "--tasks=dtd", f"--data_dir={tmp_path}",
                           "--config.model.num_heads=3"],
                          cwd=testing.REPO_ROOT, env=testing.subprocess_env(1), capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2 and "invalid config" in proc.stderr and "num_heads=3" in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "w")


# ----------------------------------------------------------------------------- bad input (issue 16)


def test_wrong_split_names_the_task_split_and_dir(tmp_path):
    """A prepared dtd without its validation split (dataset_info.json only, no shards): the val200 slice is refused."""
    folder = tmp_path / "dtd" / "3.0.1"
    folder.mkdir(parents=True)
    split = lambda name: {"name": name, "numBytes": "1", "shardLengths": ["1880"],  # noqa: E731
                          "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"}
    info = {"name": "dtd", "version": "3.0.1", "fileFormat": "array_record", "splits": [split("train"), split("test")]}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(FileNotFoundError) as err:
        vtab.vtab_splits("dtd", str(tmp_path))
    msg = str(err.value)
    assert msg.startswith(f"VTAB task 'dtd': dtd split 'train[:800]' in data_dir '{tmp_path}': cannot read its first "
                          "record"), msg  # train is opened first: its shard files are missing
    assert f"tfds build dtd --data_dir={tmp_path} --file_format=array_record" in msg
    task = vtab.TASKS["dtd"]
    with pytest.raises(FileNotFoundError) as err:
        vtab.open_split(task.builder, task.val, str(tmp_path), vtab.decoder(task, 8), context="VTAB task 'dtd': ")
    assert ("dtd has no split 'validation'; the prepared splits are train (1,880 examples), test (1,880 examples)"
            in str(err.value))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["3.0.1", "dataset_info.json", "dtd"]


def test_malformed_records_name_the_task_split_and_fix():
    decode = vtab.decoder(vtab.TASKS["clevr_count"], 8, "train[:800]", "/data/tfds")
    where = "VTAB task 'clevr_count' (clevr split 'train[:800]' in /data/tfds)"
    fix = "Prepare it again with `tfds build clevr --data_dir=/data/tfds --file_format=array_record`"
    with pytest.raises(ValueError) as err:
        decode({"objects": {"size": np.zeros(4)}, "file_name": b"x.png"})
    assert str(err.value).startswith(f"{where}: a record without the 'image' feature (it has 'file_name', 'objects'). "
                                     f"{fix}"), str(err.value)
    with pytest.raises(ValueError) as err:
        decode({"image": np.zeros((8, 8, 3), np.uint8)})
    assert str(err.value).startswith(f"{where}: a record without the 'objects' feature (it has 'image')"), str(err.value)
    with pytest.raises(ValueError) as err:  # a feature of the wrong structure
        decode({"image": np.zeros((8, 8, 3), np.uint8), "objects": {"color": np.zeros(4)}})
    assert str(err.value).startswith(f"{where}: cannot read the label from the 'objects' feature of a record "
                                     "(KeyError: 'size')"), str(err.value)
    with pytest.raises(ValueError) as err:
        decode({"image": np.zeros((2, 8, 8, 3), np.uint8), "objects": {"size": np.zeros(4)}})
    assert str(err.value).startswith(f"{where}: an image of shape (2, 8, 8, 3) and dtype uint8; expected [H, W] or "
                                     "[H, W, 1 or 3] pixels"), str(err.value)
    plain = vtab.decoder(vtab.TASKS["dtd"], 8)  # without a split: the task and builder only
    with pytest.raises(ValueError, match=r"^VTAB task 'dtd' \(dtd\): a record without the 'label' feature"):
        plain({"image": np.zeros((8, 8, 3), np.uint8)})
