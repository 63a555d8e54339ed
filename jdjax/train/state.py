"""The train state pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: the model's parameter pytree; opt_state: optax state
    (holds nothing for frozen parameters)."""

    step: jax.Array
    params: Any
    opt_state: Any
