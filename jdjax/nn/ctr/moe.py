"""Multi-gate mixture of experts (MMoE, Ma et al. KDD 2018).

E expert MLPs share the input; each of S tasks (scenes) mixes them with its own softmax gate:
h_s = sum_i g_{s,i}(x) e_i(x), g_s = softmax(x W_s). The experts are one vmapped MLP whose
parameters carry a leading 'experts' axis (sharded over `model` under 'tensor_parallel').
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.ctr.layers import MLP

Dtype = Any


class MMoE(nn.Module):
    """Attributes:
      num_experts: E.
      num_tasks: S (one gate each).
      expert_hidden: hidden widths of every expert MLP.
      activation: expert activation ('relu' or 'prelu'; Dice is not vmapped over experts).
    """

    num_experts: int
    num_tasks: int
    expert_hidden: Sequence[int]
    activation: str = "relu"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """x [B, D] -> (per-task mixtures [B, S, H], gates [B, S, E]); H = expert_hidden[-1]."""
        if self.activation == "dice":
            raise ValueError("MMoE: use 'relu' or 'prelu' experts; Dice's running statistics are not vmapped.")
        experts = nn.vmap(
            MLP,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=None,
            out_axes=1,
            axis_size=self.num_experts,
            metadata_params={nn.PARTITION_NAME: "experts"},
        )(self.expert_hidden, self.activation, dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype, name="experts")
        e = experts(x, train)  # [B, E, H]
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))
        kernel = self.param(
            "gate_kernel", nn.with_logical_partitioning(init, ("embed", None, "experts")),
            (x.shape[-1], self.num_tasks, self.num_experts), self.param_dtype,
        )
        gates = jax.nn.softmax(jnp.einsum("bd,dse->bse", x.astype(jnp.float32), kernel.astype(jnp.float32)), axis=-1)
        mixed = jnp.einsum("bse,beh->bsh", gates.astype(e.dtype), e)
        return mixed, gates
