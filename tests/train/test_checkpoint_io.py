"""Workdir I/O through etils.epath: str, pathlib.Path and epath.Path workdirs train, resume and are
read back; JSON and metrics I/O also on gs://, served by an in-memory fsspec filesystem."""

import json
import os
import pathlib

import fsspec
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry

from configs import vit
from jdjax import io
from jdjax.data.pipeline import ArraySource
from jdjax.train import loop, sweep
from jdjax.train.checkpoint import Checkpointer, CheckpointError, read_state, saved_steps
from jdjax.train.logging import MetricWriter, save_config
from jdjax.train.task import Task


class _MemoryGCS(MemoryFileSystem):
    """gs:// kept in memory: what epath opens for gs:// (through fsspec when TensorFlow is absent)."""

    protocol = ("gs", "gcs")
    store = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        return super()._strip_protocol(path.removeprefix("gs://").removeprefix("gcs://"))


@pytest.fixture
def bucket(monkeypatch):
    """gs://bucket/run on the in-memory filesystem, emptied afterwards."""
    monkeypatch.setenv("EPATH_USE_TF", "0")
    for name in _MemoryGCS.protocol:
        monkeypatch.setitem(_registry, name, _MemoryGCS)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield epath.Path("gs://bucket/run")
    _MemoryGCS.store.clear()
    _MemoryGCS.pseudo_dirs[:] = [""]
    backend.fsspec_backend._get_filesystem.cache_clear()


def _quadratic_task() -> Task:
    """loss = (w - 1)^2 from w = 3; val accuracy = -|w - 1| improves every step."""
    source = ArraySource({"x": np.zeros((64, 1), np.float32)})
    return Task(
        init=lambda rng: {"w": jnp.array(3.0)},
        loss=lambda params, batch, rng: ((params["w"] - 1.0) ** 2 + 0.0 * batch["x"].sum(), {}),
        predict=lambda params, batch: {"w": jnp.broadcast_to(params["w"], batch["x"].shape[:1])},
        summarize=lambda out: {"accuracy": float(-np.mean(np.abs(out["w"] - 1.0)))},
        train_source=source,
        eval_sources={"val": source},
    )


def _config(steps: int):
    cfg = vit.get_config("smoke")
    cfg.update_from_flattened_dict({"num_train_steps": steps, "eval_every_steps": 2, "checkpoint.every_steps": 2,
                                    "checkpoint.async_save": False, "logging.every_steps": 1,
                                    "optimizer.name": "sgd", "optimizer.momentum": 0.0,
                                    "optimizer.learning_rate": 0.1, "optimizer.warmup_steps": 0,
                                    "optimizer.schedule": "constant", "optimizer.weight_decay": 0.0,
                                    "optimizer.grad_clip_norm": 0.0})
    return cfg


@pytest.mark.parametrize("kind", ["pathlib", "epath", "relative"])
def test_workdir_path_types_train_resume_and_read_back(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    workdir = {"pathlib": pathlib.Path(tmp_path, "run"), "epath": epath.Path(tmp_path, "run"), "relative": "run"}[kind]
    first = loop.train_and_evaluate(_config(4), workdir, _quadratic_task())
    assert first["status"] == "completed" and first["step"] == 4
    # A longer run on the same workdir resumes from step 4 (orbax got an absolute path either way).
    results = loop.train_and_evaluate(_config(6), workdir, _quadratic_task())
    assert results["step"] == 6

    run = tmp_path / "run"
    assert saved_steps(workdir) == [4, 6] and saved_steps(workdir, "best") == [6]
    w = 3.0
    for _ in range(6):
        w -= 0.1 * 2 * (w - 1.0)
    np.testing.assert_allclose(read_state(workdir)["params"]["w"], w, rtol=1e-6)
    assert json.loads((run / "results.json").read_text()) == sweep.read_results(workdir) == results
    assert json.loads((run / "config.json").read_text())["num_train_steps"] == 6
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s > 4][-1] == 6 and steps.count(1) == 2  # both runs' lines (compile time, train)
    assert not [p for p in os.listdir(run) if ".tmp-" in p]


def test_json_config_and_metrics_on_a_bucket(bucket):
    bucket.mkdir(parents=True, exist_ok=True)
    io.write_json(bucket / "results.json", {"status": "preempted", "step": 3})
    assert sweep.read_results(bucket) is None
    io.write_json(bucket / "results.json", {"status": "completed", "step": 5, "loss": float("nan")})
    done = sweep.read_results(bucket)
    assert done["step"] == 5 and np.isnan(done["loss"])

    save_config(_config(5), bucket)
    assert io.read_json(bucket / "config.json")["num_train_steps"] == 5

    writer = MetricWriter(bucket, tensorboard=False)
    writer.write(1, {"train/loss": 2.0})
    writer.write(2, {"train/loss": float("inf")})
    assert not (bucket / "metrics.jsonl").exists()  # uploaded every REMOTE_UPLOAD_SECONDS and at close
    writer.close()
    resumed = MetricWriter(bucket, tensorboard=False)  # a bucket cannot append: the old lines are kept
    resumed.REMOTE_UPLOAD_SECONDS = 0.0
    resumed.write(3, {"val/accuracy": 0.5})
    lines = [json.loads(line) for line in (bucket / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": "inf"}, {"step": 3, "val/accuracy": 0.5}]
    resumed.close()

    # Orbax's layout, as saved_steps lists it: finished steps only, not the temporary directories.
    for name in ["3", "10", "12.orbax-checkpoint-tmp-1"]:
        io.write_text(bucket / "ckpt" / name / "state" / "manifest.ocdbt", "")
    assert saved_steps(bucket) == [3, 10] and saved_steps(bucket, "best") == []
    assert sorted(p.name for p in bucket.iterdir()) == ["ckpt", "config.json", "metrics.jsonl", "results.json"]


def test_tensorboard_on_a_bucket_without_its_client_names_the_fix(bucket):
    from tensorboardX import record_writer

    if record_writer.GCS_ENABLED:
        pytest.skip("google-cloud-storage is installed: tensorboardX would reach the real gs://")
    with pytest.raises(ImportError, match="google-cloud-storage.*logging.tensorboard=False"):
        MetricWriter(bucket, tensorboard=True)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    io.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        io.write_text(path, 123)  # fails after the temporary file was opened
    assert io.read_json(path) == {"a": 1}
    io.write_bytes(tmp_path / "frontier.png", b"\x89PNG")
    assert (tmp_path / "frontier.png").read_bytes() == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["frontier.png", "results.json"]


def test_orbax_unsupported_scheme_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="local directory.*gs://"):
        Checkpointer("s3://bucket/run", keep=1, best_metric="val/accuracy", best_mode="max")


def test_json_files_are_strict_and_non_finite_floats_round_trip(tmp_path):
    """results.json used to hold a bare NaN (not JSON for jq, browsers or other languages)."""
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in {text!r}"))

    results = {"test/auc": float("nan"), "test/logloss": np.float64("inf"), "slices": [float("-inf"), 0.5],
               "status": "completed"}
    io.write_json(tmp_path / "results.json", results)
    text = (tmp_path / "results.json").read_text()
    assert strict(text) == {"test/auc": "nan", "test/logloss": "inf", "slices": ["-inf", 0.5], "status": "completed"}
    back = io.read_json(tmp_path / "results.json")
    assert np.isnan(back["test/auc"]) and back["test/logloss"] == float("inf") and back["slices"] == [float("-inf"), 0.5]

    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(1, {"val/auc": float("nan"), "val/logloss": 0.25})
    writer.close()
    lines = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "val/auc": "nan", "val/logloss": 0.25}]
    assert np.isnan(io.loads((tmp_path / "metrics.jsonl").read_text())["val/auc"])
