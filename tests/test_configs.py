"""Every config file: its :smoke variant validates, names a known task and its docstring shows the
command that runs it; every trainable task builds."""

import ast
import glob
import importlib
import os

import pytest

from jdjax import tasks as jtasks

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
    assert cfg.task in jtasks.TASKS, f"{name}: config.task={cfg.task!r} is not registered"
    assert jtasks.validate(cfg) == []


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_variant_is_rejected(name):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError, match="unknown config variant"):
        module.get_config("smoke,no_such_variant")


def bool_variants(module) -> list[str]:
    """The switch variants of a config (e.g. smoke, fsdp, vit_b16), read from its own error message."""
    with pytest.raises(ValueError, match="unknown config variant") as err:
        module.get_config("no_such_variant")
    known = ast.literal_eval(str(err.value).split("known: ", 1)[1].rstrip("."))
    return [name for name in known if _is_switch(module, name)]


def _is_switch(module, name: str) -> bool:
    """A bare word is a variant only for switches; `model=...`-style keys need a value."""
    try:
        module.get_config(name)
        return True
    except (ValueError, TypeError):
        return False


def every_variant() -> list[str]:
    out = []
    for name in CONFIGS:
        module = importlib.import_module(f"configs.{name}")
        switches = bool_variants(module)
        out += [f"{name}:"] + [f"{name}:{v}" for v in switches] + [f"{name}:smoke,{v}" for v in switches if v != "smoke"]
    return out


@pytest.mark.parametrize("spec", every_variant())
def test_every_variant_rejects_a_bad_batch_size_before_writing(tmp_path, spec):
    """With 8 devices, batch_size=7 cannot be split over any data-parallel mesh: every config that
    trains with the loop (each of its variants) must say so before anything is written, which
    `jdjax.main` turns into exit status 2 (tests/test_main.py checks that on the command line)."""
    name, _, variant = spec.partition(":")
    cfg = importlib.import_module(f"configs.{name}").get_config(variant)
    module = jtasks.get_task_module(cfg.task)
    workdir = tmp_path / "run"
    if not jtasks.loop_configs(cfg, module):
        pytest.skip(f"{cfg.task} trains nothing with the loop")
    cfg.batch_size = 7
    message = "batch_size=7 must be a positive multiple of the data-parallel size"
    assert any(message in e for e in jtasks.validate(cfg))  # checked first: a miss must not start a training
    with pytest.raises(jtasks.UsageError, match=message):
        jtasks.run(cfg, str(workdir))
    assert not workdir.exists()


def smoke(name: str):
    return importlib.import_module(f"configs.{name}").get_config("smoke")


REMAT_CONFIGS = [name for name in CONFIGS if "remat_policy" in smoke(name).get("model", {})]


def test_remat_policy_configs_found():
    assert {"clip", "pyra", "tempme"} <= set(REMAT_CONFIGS)


@pytest.mark.parametrize("name", REMAT_CONFIGS)
def test_unknown_remat_policy_fails_validation(name):
    """A misspelt model.remat_policy is reported with the choices before anything is compiled."""
    cfg = smoke(name)
    cfg.model.remat_policy = "dots"
    assert any(e.startswith("model.remat_policy='dots' is unknown; choose one of") and "'dots_saveable'" in e
               for e in jtasks.validate(cfg))
