"""The loop's config checks, shared by every job that trains with `jdjax.train.loop`.

`loop_config_errors(config)` lists every problem of the sections the loop reads (batch sizes
against the mesh and the process count, the mesh itself, sharding rules, step counts,
optimizer, EMA decay, checkpoint selection, model.remat_policy, data and init_from paths)
before anything is compiled or written. `jdjax.tasks.validate` runs it on every config a task
will hand to the loop, and `train_and_evaluate` runs it again as a guard for callers that reach
the loop directly.
"""

from __future__ import annotations

import math

import jax

from jdjax import io
from jdjax.nn.vit import checkpoint_policy
from jdjax.train import sharding as shd
from jdjax.train.optim import OPTIMIZERS, SCHEDULES


class UsageError(Exception):
    """A problem in the user's config or files; the message says how to fix it."""


def loop_config_errors(config) -> list[str]:
    """Every problem of `config`'s loop sections visible before compiling; empty when good."""
    errors = []
    try:
        sizes = dict(zip(shd.MESH_AXES, shd.resolve_mesh_shape(dict(config.mesh), jax.device_count())))
    except ValueError as e:
        return [str(e)]
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
    if config.optimizer.name not in OPTIMIZERS:
        errors.append(f"optimizer.name must be one of {OPTIMIZERS}, got {config.optimizer.name!r}.")
    if config.optimizer.schedule not in SCHEDULES:
        errors.append(f"optimizer.schedule must be one of {SCHEDULES}, got {config.optimizer.schedule!r}.")
    if not 0.0 <= config.ema_decay < 1.0:
        errors.append(f"ema_decay must be in [0, 1) (0 = no moving average; per step, e.g. 0.999), got "
                      f"{config.ema_decay}.")
    if config.checkpoint.best_mode not in ("max", "min"):
        errors.append(f"checkpoint.best_mode must be 'max' or 'min', got {config.checkpoint.best_mode!r}.")
    if "model" in config and "remat_policy" in config.model:
        try:
            checkpoint_policy(config.model.remat_policy)
        except ValueError as e:
            errors.append(f"model.{e}")
    data_dir = config.data.get("data_dir", "") if "data" in config else ""
    if data_dir and not io.as_path(data_dir).is_dir():
        errors.append(f"data.data_dir={data_dir!r} does not exist; point it at the prepared data directory.")
    if config.init_from and not io.as_path(config.init_from).exists():
        errors.append(f"init_from={config.init_from!r} does not exist.")
    return errors


def check_loop_config(config) -> None:
    """Raises UsageError listing every problem of `config`'s loop sections."""
    errors = loop_config_errors(config)
    if errors:
        raise UsageError("invalid config:\n  - " + "\n  - ".join(errors))
