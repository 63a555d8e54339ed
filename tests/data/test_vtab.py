"""VTAB-1k readers (jdjax/data/vtab.py) on tfds mock data, the derived labels on hand-made records,
the split arithmetic, the VTAB average, and the sweep tool on two mock tasks."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from jdjax import testing
from jdjax.data import vtab
from jdjax.data.tfds_source import IMAGENET_MEAN, IMAGENET_STD

tfds = pytest.importorskip("tensorflow_datasets")


def test_registry_has_the_19_tasks_in_three_groups():
    assert len(vtab.TASKS) == 19
    counts = {g: sum(t.group == g for t in vtab.TASKS.values()) for g in vtab.GROUPS}
    assert counts == {"natural": 7, "specialized": 4, "structured": 8}
    assert vtab.TASKS["sun397"].num_classes == 397 and vtab.TASKS["clevr_count"].num_classes == 8


@pytest.mark.parametrize("name", list(vtab.TASKS))
def test_splits_are_800_train_200_val_and_disjoint(name):
    """Each split string parses as tfds does, and selects 800 / 200 examples of a split large enough."""
    task = vtab.TASKS[name]
    sizes = {s: types.SimpleNamespace(num_examples=1_000_000) for s in ("train", "validation", "test")}

    def rows(spec):
        (instr,) = tfds.core.ReadInstruction.from_spec(spec).to_absolute(sizes)
        return instr.splitname, set(range(instr.from_ or 0, 1_000_000 if instr.to is None else instr.to))

    (train_split, train), (val_split, val) = rows(task.train), rows(task.val)
    assert len(train) == 800 and len(val) == 200
    if train_split == val_split:
        assert not train & val
    test_split, test = rows(task.test)
    if test_split == train_split:
        assert not test & train
    if test_split == val_split:
        assert not test & val


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("name", ["dtd", "eurosat", "dsprites_orientation", "smallnorb_elevation"])
def test_reader_on_mock_data(name, mock_dir):
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE, data_dir=mock_dir):
        splits = vtab.vtab_splits(name, mock_dir, image_size=24)
        assert set(splits) == {"train", "val", "test"}
        batch = splits["train"].get_batch(np.arange(4))
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert np.all((batch["label"] >= 0) & (batch["label"] < vtab.TASKS[name].num_classes))
    # ImageNet normalisation: un-normalised pixels lie in [0, 1]
    pixels = batch["image"] * IMAGENET_STD + IMAGENET_MEAN
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert "tensorflow" not in sys.modules


def test_derived_labels_on_hand_made_records():
    count = vtab.TASKS["clevr_count"].label
    assert count({"objects": {"size": np.zeros(3)}}) == 0 and count({"objects": {"size": np.zeros(10)}}) == 7
    dist = vtab.TASKS["clevr_distance"].label
    coords = lambda *z: {"objects": {"pixel_coords": np.array([[0.0, 0.0, d] for d in z])}}  # noqa: E731
    # thresholds 0, 8, 8.5, 9, 9.5, 10, 100: the closest object decides
    assert dist(coords(12.0, 7.9)) == 0 and dist(coords(8.2)) == 1 and dist(coords(9.7, 20.0)) == 4
    assert dist(coords(10.5)) == 5
    loc = vtab.TASKS["dsprites_location"].label
    assert [loc({"label_x_position": x}) for x in (0, 1, 2, 31)] == [0, 0, 1, 15]
    ori = vtab.TASKS["dsprites_orientation"].label
    assert [ori({"label_orientation": o}) for o in (0, 2, 3, 39)] == [0, 0, 1, 15]
    kitti = vtab.TASKS["kitti_distance"].label

    def scene(types, zs):
        return {"objects": {"type": np.array(types), "location": np.array([[0.0, 0.0, z] for z in zs])}}

    # types 0-2 are vehicles; bins (-100, 8], (8, 20], (20, 999]: the closest vehicle's depth
    assert kitti(scene([0, 3], [5.0, 1.0])) == 0  # the pedestrian at 1 m does not count
    assert kitti(scene([1, 2], [30.0, 12.0])) == 1
    assert kitti(scene([2], [25.0])) == 2 and kitti(scene([4], [3.0])) == 3  # no vehicle: 1000 m


def test_vtab_average_is_the_mean_of_group_means():
    groups = {"natural": 72.87, "specialized": 80.78, "structured": 57.64}
    accs = {}
    for group, value in groups.items():
        names = [n for n, t in vtab.TASKS.items() if t.group == group]
        accs.update({n: value + (1.0 if i % 2 else -1.0) * (i < len(names) - len(names) % 2) for i, n in enumerate(names)})
    out = vtab.vtab_average(accs)
    for group, value in groups.items():
        assert out[group] == pytest.approx(np.mean([accs[n] for n in accs if vtab.TASKS[n].group == group]))
    assert out["average"] == pytest.approx(np.mean([out[g] for g in vtab.GROUPS]))
    assert vtab.vtab_average({n: groups[t.group] for n, t in vtab.TASKS.items()})["average"] == pytest.approx(70.43, abs=1e-2)
    with pytest.raises(ValueError, match="unknown VTAB"):
        vtab.vtab_average({"imagenet": 1.0})


def test_missing_data_and_unknown_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build dtd"):
        vtab.vtab_splits("dtd", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="known: caltech101"):
        vtab.get_task("imagenet")


SWEEP_DRIVER = """
import sys, tensorflow_datasets as tfds
from absl import app
from jdjax import main as jmain
from jdjax.tools import vtab_sweep
with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE, data_dir=sys.argv[1]):
    app.run(vtab_sweep.main, argv=["vtab_sweep"] + sys.argv[2:], flags_parser=jmain.parse_flags)
"""


def test_sweep_runs_tasks_and_writes_the_table(tmp_path):
    """Two mock tasks with a smoke ViT at 16 px: per-task runs, the table, and a rerun that skips them."""
    data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "sweep")
    os.makedirs(data_dir)
    cmd = [sys.executable, "-c", SWEEP_DRIVER, data_dir, "--config=configs/vit.py:smoke", f"--workdir={workdir}",
           "--tasks=dtd,eurosat", f"--config.data.data_dir={data_dir}", "--config.data.image_size=16",
           "--config.model.patch_size=8", "--config.num_train_steps=4", "--config.eval_every_steps=2",
           "--config.checkpoint.every_steps=2", "--config.eval_batch_size=8", "--config.batch_size=8"]
    run = lambda: subprocess.run(cmd, cwd=testing.REPO_ROOT, env=testing.subprocess_env(1), capture_output=True,  # noqa: E731
                                 text=True, timeout=300, check=False)
    proc = run()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(os.path.join(workdir, "vtab_results.json")) as f:
        results = json.load(f)
    assert sorted(results["tasks"]) == ["dtd", "eurosat"] and results["failed"] == []
    assert set(results["summary"]["model"]) == {"natural", "specialized"}  # no structured task: no average
    with open(os.path.join(workdir, "vtab_results.md")) as f:
        md = f.read()
    assert "| dtd | natural |" in md and "| **specialized** |" in md
    rerun = run()
    assert rerun.returncode == 0 and "[vtab_sweep] dtd ->" not in rerun.stdout
