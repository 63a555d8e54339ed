"""Optimizers from config: AdamW or SGD, warmup + cosine, clipping, decay and trainable masks."""

from __future__ import annotations

import re

import jax
import optax


def learning_rate_schedule(cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup from `cfg.warmup_init` to `cfg.learning_rate`, then cosine (or constant).

    cfg fields: learning_rate, warmup_steps, schedule ('cosine' | 'constant'), min_lr_ratio.
    """
    peak = cfg.learning_rate
    warmup = min(int(cfg.warmup_steps), max(num_steps - 1, 0))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1), alpha=cfg.min_lr_ratio)
    else:
        raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {cfg.schedule!r}.")
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


def _base_optimizer(cfg, schedule, param_groups: dict[str, float] | None = None):
    if cfg.name == "adamw":
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
        )
    raise ValueError(f"optimizer.name must be 'adamw' or 'sgd', got {cfg.name!r}.")


def make_optimizer(cfg, num_steps: int, trainable: str = "", lr_multipliers=()):
    """Builds the optax transformation.

    Args:
      cfg: the config's `optimizer` section.
      num_steps: total training steps (for the schedule).
      trainable: regex of trainable parameter paths; the rest are frozen and get no optimizer
        state (their updates are zero).
      lr_multipliers: (regex, factor) pairs: matching trainable parameters use `factor` x the
        learning rate (first match wins), e.g. PYRA's separate learning rate.

    Returns:
      (tx, schedule): the transformation and the base learning-rate schedule (for logging).
    """
    schedule = learning_rate_schedule(cfg, num_steps)
    groups = {"frozen": optax.set_to_zero(), "train": _base_optimizer(cfg, schedule)}
    for i, (_, factor) in enumerate(lr_multipliers):
        groups[f"group{i}"] = _base_optimizer(cfg, lambda s, f=factor: f * schedule(s))

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
