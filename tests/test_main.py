"""The entry point: config validation (before anything is compiled or written) and exit codes."""

import os

import pytest

from configs import vit
from jdjax import cli, testing
from jdjax import tasks as jtasks


def config(**overrides):
    cfg = vit.get_config("smoke")
    cfg.update_from_flattened_dict(overrides)
    return cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 12}, "batch_size=12 must be a positive multiple of the data-parallel size 8"),
        ({"eval_batch_size": 20}, "eval_batch_size=20 must be a positive multiple"),
        ({"mesh.data": 3}, "has 3 devices but 8 are present"),
        ({"mesh.model": 3}, "does not fit 8 devices"),
        ({"mesh.data": 2, "mesh.fsdp": 2}, "has 4 devices but 8 are present"),
        ({"data.data_dir": "/nonexistent/data"}, "data.data_dir='/nonexistent/data' does not exist"),
        ({"optimizer.name": "adam"}, "optimizer.name must be one of"),
        ({"model.num_heads": 3}, "not divisible by model.num_heads=3"),
        ({"model.patch_size": 3}, "not divisible by model.patch_size=3"),
        ({"sharding_rules": "zero3"}, "unknown sharding rule set 'zero3'"),
        ({"num_train_steps": 0}, "num_train_steps must be positive"),
        ({"init_from": "/nonexistent/ckpt"}, "init_from='/nonexistent/ckpt' does not exist"),
    ],
)
def test_invalid_configs_are_reported_before_anything_is_written(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    with pytest.raises(jtasks.UsageError, match="invalid config") as err:
        jtasks.run(config(**overrides), str(workdir))
    assert message in str(err.value)
    assert not workdir.exists()


def test_every_problem_is_listed_at_once():
    errors = jtasks.validate(config(batch_size=12, **{"optimizer.name": "adam"}))
    assert len(errors) == 2


def test_unknown_task(tmp_path):
    with pytest.raises(jtasks.UsageError, match="not a known task"):
        jtasks.run(config(task="nope"), str(tmp_path / "run"))


def test_good_config_validates():
    assert jtasks.validate(config()) == []


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.optimizer.lrate=0.1", "lrate"),  # misspelt key: the config is locked
        ("--config.batch_size=abc", "batch_size"),  # wrong type
        ("--config.mesh.data=3", "has 3 devices but 2 are present"),
        ("--config.data.data_dir=/nonexistent", "does not exist"),
    ],
)
def test_cli_errors_exit_2_and_write_nothing(tmp_path, flag, message):
    workdir = tmp_path / "run"
    proc = testing.run_main("configs/vit.py:smoke", str(workdir), flag, num_devices=2)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()


def test_default_workdir_names_config_and_variant():
    assert cli.default_workdir("configs/vit.py") == os.path.join("runs", "vit-default")
    assert cli.default_workdir("configs/pyra.py:vit_b16,high") == os.path.join("runs", "pyra-vit_b16_high")


def test_sweep_task_with_bad_batch_size_exits_2_and_writes_nothing(tmp_path):
    """A task that trains several runs (ad blending's click models) gets the loop's checks up front."""
    workdir = tmp_path / "run"
    proc = testing.run_main("configs/ad_blending.py:smoke", str(workdir), "--config.batch_size=12", num_devices=8)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "batch_size=12 must be a positive multiple of the data-parallel size 8" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()
