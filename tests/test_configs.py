"""Every config file: its :smoke variant validates, names a known task and its docstring shows the
command that runs it; every trainable task builds."""

import glob
import importlib
import os

import pytest

from jdjax import main as jmain
from jdjax import tasks

CONFIGS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
)


def test_configs_found():
    assert "vit" in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_variant_validates(name):
    module = importlib.import_module(f"configs.{name}")
    assert f"--config=configs/{name}.py" in module.__doc__, "the docstring must show the run command"
    cfg = module.get_config("smoke")
    assert cfg.task in tasks.TASKS, f"{name}: config.task={cfg.task!r} is not registered"
    assert jmain.validate(cfg, tasks.get_task_module(cfg.task)) == []


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_variant_is_rejected(name):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError, match="unknown config variant"):
        module.get_config("smoke,no_such_variant")
