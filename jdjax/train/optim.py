"""Optimizers from config: AdamW, Adam with L2 or SGD; warmup + cosine or OneCycle; clipping, decay and
trainable masks."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam_l2", "sgd")
SCHEDULES = ("cosine", "constant", "onecycle")
# OneCycle as SCPNet runs PyTorch's OneCycleLR: pct_start 0.2 (PyTorch's default is 0.3), div_factor 25,
# final_div_factor 1e4, anneal 'cos', three_phase False, cycle_momentum between 0.85 and 0.95.
ONECYCLE = dict(pct_start=0.2, div_factor=25.0, final_div_factor=1e4, base_momentum=0.85, max_momentum=0.95)


def onecycle(start: float, peak: float, end: float, num_steps: int, pct_start: float) -> optax.Schedule:
    """PyTorch OneCycleLR's two cosine phases (three_phase=False), step for step.

    Phase 1 runs start -> peak over steps [0, e1], phase 2 peak -> end over [e1, e2], with
    e1 = pct_start * num_steps - 1 (a float, as in PyTorch) and e2 = num_steps - 1; within a phase
    from a to b, value = b + (a - b) / 2 * (cos(pi * pct) + 1), pct the fraction of the phase done.
    Steps after e2 keep `end` (PyTorch raises there). optax.cosine_onecycle_schedule puts the
    phase ends one step later (at pct_start * num_steps and num_steps), so it is not used.
    """
    e1, e2 = pct_start * num_steps - 1.0, num_steps - 1.0
    if not 0 < e1 < e2:
        raise ValueError(
            f"the onecycle schedule over {num_steps} steps with pct_start={pct_start} has no room for its two "
            "phases (it needs pct_start * steps > 1 and pct_start < 1); raise optimizer.schedule_steps "
            "(or num_train_steps)."
        )

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        first = t <= e1
        pct = jnp.clip(jnp.where(first, t / e1, (t - e1) / (e2 - e1)), 0.0, 1.0)
        a, b = jnp.where(first, start, peak), jnp.where(first, peak, end)
        return b + (a - b) * jnp.cos(jnp.pi / 2 * pct) ** 2  # (cos(pi pct) + 1) / 2, no cancellation near pct = 1

    return schedule


def learning_rate_schedule(cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup from `cfg.warmup_init` to `cfg.learning_rate`, then cosine (or constant); or
    OneCycle (`onecycle`, ONECYCLE settings, no separate warmup): learning_rate / 25 up to
    learning_rate over the first 20% of the steps, then down to learning_rate / 25 / 1e4.

    cfg fields: learning_rate, warmup_steps, schedule ('cosine' | 'constant' | 'onecycle'), min_lr_ratio.
    """
    peak = cfg.learning_rate
    if cfg.schedule == "onecycle":
        low = peak / ONECYCLE["div_factor"]
        return onecycle(low, peak, low / ONECYCLE["final_div_factor"], num_steps, ONECYCLE["pct_start"])
    warmup = min(int(cfg.warmup_steps), max(num_steps - 1, 0))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1), alpha=cfg.min_lr_ratio)
    else:
        raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}.")
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(cfg.warmup_init, peak, warmup)
    return optax.join_schedules([ramp, after], [warmup])


def path_names(tree) -> dict:
    """A pytree of '/'-joined parameter paths, same structure as `tree`."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "/".join(_key(k) for k in p), tree)


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def trainable_mask(params, pattern: str):
    """True for parameters whose path matches the regex `pattern` ('' or '.*' trains all)."""
    if not pattern:
        return jax.tree.map(lambda _: True, params)
    regex = re.compile(pattern)
    return jax.tree.map(lambda name: bool(regex.search(name)), path_names(params))


def decay_mask(params):
    """Weight decay on matrices and kernels only: biases, norms and other 1-D parameters are skipped."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def adam_b1(cfg, num_steps: int) -> float | optax.Schedule:
    """Adam's b1: cfg.b1, or under `onecycle` PyTorch's cycle_momentum (which overrides b1): 0.95 -> 0.85
    while the learning rate rises, 0.85 -> 0.95 while it falls (the same cosine phases)."""
    if cfg.schedule != "onecycle":
        return cfg.b1
    return onecycle(ONECYCLE["max_momentum"], ONECYCLE["base_momentum"], ONECYCLE["max_momentum"], num_steps,
                    ONECYCLE["pct_start"])


def _base_optimizer(cfg, schedule, b1):
    """adamw: decoupled decay, u = -lr (Adam(g) + wd p); adam_l2: coupled L2 as PyTorch Adam's weight_decay,
    u = -lr Adam(g + wd p); sgd: u = -lr SGD(g + wd p). Decay on decay_mask parameters only; a scheduled
    b1 goes through optax.inject_hyperparams (it is then in the optimizer state)."""
    if cfg.name in ("adamw", "adam_l2"):
        kwargs = dict(b1=b1, b2=cfg.b2, eps=cfg.eps)
        adam = (optax.inject_hyperparams(optax.scale_by_adam) if callable(b1) else optax.scale_by_adam)(**kwargs)
        decay = optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask)
        steps = (adam, decay) if cfg.name == "adamw" else (decay, adam)
        return optax.chain(*steps, optax.scale_by_learning_rate(schedule))
    if cfg.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
        )
    raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {cfg.name!r}.")


def make_optimizer(cfg, num_steps: int, trainable: str = "", lr_multipliers=()):
    """Builds the optax transformation.

    Args:
      cfg: the config's `optimizer` section.
      num_steps: total training steps; the schedules span `cfg.schedule_steps` steps instead when
        it is non-zero (SCPNet: OneCycle over total_epochs, training stops at epochs).
      trainable: regex of trainable parameter paths; the rest are frozen and get no optimizer
        state (their updates are zero).
      lr_multipliers: (regex, factor) pairs: matching trainable parameters use `factor` x the
        learning rate (first match wins), e.g. PYRA's separate learning rate or SCPNet's gcn_lr
        (OneCycle per group as PyTorch's max_lr list: every value of the schedule is scaled).

    Returns:
      (tx, schedule): the transformation and the base learning-rate schedule (for logging).
    """
    steps = int(cfg.schedule_steps) or num_steps
    schedule = learning_rate_schedule(cfg, steps)
    b1 = adam_b1(cfg, steps)
    groups = {"frozen": optax.set_to_zero(), "train": _base_optimizer(cfg, schedule, b1)}
    for i, (_, factor) in enumerate(lr_multipliers):
        groups[f"group{i}"] = _base_optimizer(cfg, lambda s, f=factor: f * schedule(s), b1)

    def label(name: str, is_trainable: bool) -> str:
        if not is_trainable:
            return "frozen"
        for i, (pattern, _) in enumerate(lr_multipliers):
            if re.search(pattern, name):
                return f"group{i}"
        return "train"

    def labels(params):
        return jax.tree.map(label, path_names(params), trainable_mask(params, trainable))

    tx = optax.multi_transform(groups, labels)
    if cfg.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx, schedule


def count_params(params, mask=None) -> int:
    leaves = jax.tree.leaves(params)
    if mask is None:
        return int(sum(p.size for p in leaves))
    return int(sum(p.size for p, m in zip(leaves, jax.tree.leaves(mask)) if m))
