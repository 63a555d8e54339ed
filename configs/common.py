"""Config sections shared by every method: mesh, sharding, optimizer, checkpoints, logging."""

import ml_collections


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
    """Parses a config argument such as 'smoke' or 'vit_b16,high' into flags.

    Each comma-separated word must be a key of `defaults` (a bool flag is switched on by its
    name; `key=value` sets other types). Returns a ConfigDict of the resulting values.
    """
    out = dict(defaults)
    for word in filter(None, (arg or "").split(",")):
        key, _, value = word.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config variant {key!r}; known: {sorted(defaults)}.")
        out[key] = True if not value and isinstance(defaults[key], bool) else type(defaults[key])(value)
    return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = ""
    c.seed = 0
    c.batch_size = 128  # global, over all devices and processes
    c.eval_batch_size = 256
    c.num_train_steps = 1000
    c.eval_every_steps = 250
    c.trainable = ""  # regex of trainable parameter paths; '' trains everything
    c.init_from = ""
    # Exponential moving average of the weights (parameters and model state), per-step decay; 0.0 = off.
    # Validation scores the raw and the averaged weights at every eval and keeps the better.
    c.ema_decay = 0.0

    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=1e-3,
            warmup_steps=100,
            warmup_init=0.0,
            schedule="cosine",
            schedule_steps=0,  # length of the schedule; 0 = num_train_steps (may exceed it: training stops early)
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            momentum=0.9,
            nesterov=False,
            weight_decay=1e-4,
            grad_clip_norm=1.0,
        )
    )
    # Mesh axis sizes; one may be -1 (all remaining devices).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    # 'data_parallel', 'fsdp' or 'tensor_parallel' (jdjax/train/sharding.py), or explicit
    # ((logical_axis, mesh_axes), ...) pairs in a config file.
    c.sharding_rules = "data_parallel"
    c.checkpoint = ml_collections.ConfigDict(
        dict(every_steps=500, keep=2, best_metric="val/accuracy", best_mode="max", async_save=True)
    )
    c.logging = ml_collections.ConfigDict(dict(every_steps=50, tensorboard=True))
    # Multi-host: set initialize=True (or JDJAX_DISTRIBUTED=1); empty fields are auto-detected
    # on TPU pods and under SLURM.
    c.distributed = ml_collections.ConfigDict(
        dict(initialize=False, coordinator_address="", num_processes=-1, process_id=-1)
    )
    return c


def shrink_for_smoke(c: ml_collections.ConfigDict, steps: int = 40) -> None:
    """A run that finishes in seconds on 2 CPU cores (big_vision's `runlocal`)."""
    c.num_train_steps = steps
    c.eval_every_steps = steps // 2
    c.checkpoint.every_steps = steps // 2
    c.logging.every_steps = 10
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps // 4)
