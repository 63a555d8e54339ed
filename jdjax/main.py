"""Entry point: `python -m jdjax.main --config=configs/<method>.py[:variant] [--workdir=DIR]`.

The config is validated before anything is compiled or written; a bad config, a missing data
directory or an unreadable checkpoint ends the run with one message naming the fix and exit
status 2. Rerunning the same command on the same workdir resumes from the last checkpoint.
"""

from __future__ import annotations

import math
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit.py:smoke.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>-<variant>).")

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem in the user's config or files; the message says how to fix it."""


def fail(message: str) -> None:
    print(f"jdjax: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def default_workdir(config_arg: str) -> str:
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}-{variant.replace(',', '_').replace('=', '') or 'default'}")


def maybe_initialize_distributed(config) -> None:
    """jax.distributed.initialize when config.distributed.initialize or JDJAX_DISTRIBUTED=1."""
    d = config.get("distributed")
    if not ((d is not None and d.initialize) or os.environ.get("JDJAX_DISTRIBUTED") == "1"):
        return
    import jax

    # Collectives between CPU devices of different processes (tests, local runs); no effect on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if d is not None:  # empty fields: auto-detected (TPU pods, SLURM)
        if d.coordinator_address:
            kwargs["coordinator_address"] = d.coordinator_address
        if d.num_processes > 0:
            kwargs["num_processes"] = d.num_processes
        if d.process_id >= 0:
            kwargs["process_id"] = d.process_id
    jax.distributed.initialize(**kwargs)


def validate(config, task_module) -> list[str]:
    """Every problem visible before compiling; empty when the config is good."""
    import jax

    from jdjax.train import sharding as shd

    errors = []
    if hasattr(task_module, "validate"):
        errors += task_module.validate(config)
    if not hasattr(task_module, "build"):
        return errors
    try:
        sizes = dict(zip(shd.MESH_AXES, shd.resolve_mesh_shape(dict(config.mesh), jax.device_count())))
    except ValueError as e:
        return errors + [str(e)]
    dp = sizes["data"] * sizes["fsdp"]
    multiple = math.lcm(dp, jax.process_count())
    for name in ("batch_size", "eval_batch_size"):
        value = config[name]
        if value <= 0 or value % multiple:
            errors.append(
                f"{name}={value} must be a positive multiple of the data-parallel size {dp} "
                f"(mesh data x fsdp = {sizes['data']} x {sizes['fsdp']}) and of the process count "
                f"{jax.process_count()}; e.g. --config.{name}={max(multiple, round(value / multiple) * multiple)}."
            )
    try:
        shd.rules_from_config(config.sharding_rules)
    except ValueError as e:
        errors.append(str(e))
    for name in ("num_train_steps", "eval_every_steps"):
        if config[name] <= 0:
            errors.append(f"{name} must be positive, got {config[name]}.")
    if config.checkpoint.every_steps <= 0 or config.logging.every_steps <= 0:
        errors.append("checkpoint.every_steps and logging.every_steps must be positive.")
    if config.optimizer.name not in ("adamw", "sgd"):
        errors.append(f"optimizer.name must be 'adamw' or 'sgd', got {config.optimizer.name!r}.")
    if config.optimizer.schedule not in ("cosine", "constant"):
        errors.append(f"optimizer.schedule must be 'cosine' or 'constant', got {config.optimizer.schedule!r}.")
    if config.checkpoint.best_mode not in ("max", "min"):
        errors.append(f"checkpoint.best_mode must be 'max' or 'min', got {config.checkpoint.best_mode!r}.")
    data_dir = config.get("data", {}).get("data_dir", "") if "data" in config else ""
    if data_dir and not os.path.isdir(data_dir):
        errors.append(f"data.data_dir={data_dir!r} does not exist; point it at the prepared data directory.")
    if config.init_from and not os.path.exists(config.init_from):
        errors.append(f"init_from={config.init_from!r} does not exist.")
    return errors


def run(config, workdir: str) -> dict:
    """Validates `config`, then trains (or simulates) it in `workdir`; raises UsageError on bad input."""
    from jdjax import tasks

    try:
        module = tasks.get_task_module(config.task)
    except KeyError:
        raise UsageError(f"config.task={config.task!r} is not a known task; known tasks: {sorted(tasks.TASKS)}.")
    errors = validate(config, module)
    if errors:
        raise UsageError("invalid config:\n  - " + "\n  - ".join(errors))
    if hasattr(module, "run"):
        try:
            return module.run(config, workdir)
        except FileNotFoundError as e:  # data or checkpoint files named in the config
            raise UsageError(str(e)) from e
    from jdjax.train.checkpoint import CheckpointError
    from jdjax.train.loop import train_and_evaluate

    try:
        task = module.build(config)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    try:
        return train_and_evaluate(config, workdir, task)
    except CheckpointError as e:
        raise UsageError(str(e)) from e


def parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        fail(f"could not apply the flags {bad or argv[1:]}: {type(e).__name__}: {e}\nConfig overrides must name "
             "existing keys (the config is locked) with values of the same type, e.g. "
             "--config.optimizer.learning_rate=3e-4; `python -m jdjax.main --helpfull` lists the flags.")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; pass everything as --flags.")
    config = _CONFIG.value
    if config is None:
        fail("--config is required, e.g. --config=configs/vit.py:smoke")
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize().partition("=")[2])
    maybe_initialize_distributed(config)
    from jdjax.train.loop import NonFiniteLossError

    try:
        run(config, workdir)
    except UsageError as e:
        fail(str(e))
    except NonFiniteLossError as e:
        print(f"jdjax: stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
