"""The train state pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: the model's parameter pytree; opt_state: optax state (holds nothing
    for frozen parameters); model_state: {collection name: pytree} of mutable model state such as
    'batch_stats' ({} for a stateless task); ema: None when `ema_decay` is 0, else
    {'params': ..., 'model_state': ...}, an exponential moving average of both (non-float leaves copied)."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any
    ema: Any
