"""The CTR MLP tower and its activations: PReLU and Dice (DIN).

Dense kernels alternate their logical axes ('embed', 'mlp') / ('mlp', 'embed') layer by layer
(Megatron style), so under the 'tensor_parallel' rules consecutive layers split the hidden
width over `model` without any kernel naming the same mesh axis twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ACTIVATIONS = ("relu", "prelu", "dice", "sigmoid")


class PReLU(nn.Module):
    """max(x, 0) + alpha * min(x, 0) with a learned alpha per feature; x [..., F]."""

    init_alpha: float = 0.25
    axis_name: str = "mlp"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.constant(self.init_alpha), (self.axis_name,))
        alpha = self.param("alpha", init, (x.shape[-1],), self.param_dtype).astype(x.dtype)
        return jnp.where(x >= 0, x, alpha * x)


class Dice(nn.Module):
    """Data-adaptive activation (DIN): p(x) x + (1 - p(x)) alpha x, p(x) = sigmoid((x - E x) / sqrt(Var x + eps)).

    Training uses the statistics of the batch (over every axis but the last) and, when the
    'batch_stats' collection is mutable, updates running averages; evaluation uses the running
    averages, so an example's output does not depend on the rest of its batch. x [..., F].
    """

    momentum: float = 0.99
    epsilon: float = 1e-8
    axis_name: str = "mlp"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        init = nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,))
        alpha = self.param("alpha", init, (features,), self.param_dtype).astype(x.dtype)
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if train:
            axes = tuple(range(x.ndim - 1))
            m = jnp.mean(x.astype(jnp.float32), axes)
            v = jnp.var(x.astype(jnp.float32), axes)
            if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
                mean.value = self.momentum * mean.value + (1 - self.momentum) * m
                var.value = self.momentum * var.value + (1 - self.momentum) * v
        else:
            m, v = mean.value, var.value
        p = jax.nn.sigmoid((x - m.astype(x.dtype)) * jax.lax.rsqrt(v + self.epsilon).astype(x.dtype))
        return p * x + (1 - p) * alpha * x


def activate(name: str, x: jax.Array, train: bool, axis_name: str, param_dtype: Dtype, module_name: str) -> jax.Array:
    """Applies the activation `name` (one of ACTIVATIONS) inside a compact module."""
    if name == "relu":
        return nn.relu(x)
    if name == "sigmoid":
        return nn.sigmoid(x)
    if name == "prelu":
        return PReLU(axis_name=axis_name, param_dtype=param_dtype, name=module_name)(x)
    if name == "dice":
        return Dice(axis_name=axis_name, param_dtype=param_dtype, name=module_name)(x, train)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}.")


class MLP(nn.Module):
    """Dense -> activation -> dropout for each hidden width, then an optional linear output.

    Attributes:
      hidden: hidden widths, e.g. (200, 80).
      activation: one of ACTIVATIONS.
      out_features: width of a final linear layer without activation (None: no output layer).
      dropout: dropout rate after each hidden activation (train mode, 'dropout' rng).
      in_axis: logical name of the input width ('embed').
    """

    hidden: Sequence[int]
    activation: str = "prelu"
    out_features: int | None = None
    dropout: float = 0.0
    in_axis: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x [..., D_in] -> [..., hidden[-1]] (or [..., out_features])."""
        axis = self.in_axis
        for i, width in enumerate(self.hidden):
            out_axis = "mlp" if axis != "mlp" else "embed"
            x = self._dense(width, (axis, out_axis), f"dense_{i}")(x)
            x = activate(self.activation, x, train, out_axis, self.param_dtype, f"act_{i}")
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
            axis = out_axis
        if self.out_features is not None:
            x = self._dense(self.out_features, (axis, "classes"), "out")(x)
        return x

    def _dense(self, width: int, axes: tuple[str, str], name: str) -> nn.Dense:
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
            name=name,
        )


class CrossNetwork(nn.Module):
    """DCN's cross network (Wang et al., ADKDD 2017): explicit feature crosses of bounded degree.

        'vector' (DCN):     x_{l+1} = x_0 (x_l^T w_l) + b_l + x_l          w_l, b_l [D]
        'matrix' (DCN-V2):  x_{l+1} = x_0 * (W_l x_l + b_l) + x_l          W_l [D, D]

    Layer l holds every cross of the input features up to degree l + 1; the output keeps the
    input's width. x [..., D] -> [..., D].

    Attributes:
      num_layers: cross layers.
      parameterization: 'vector' or 'matrix'.
    """

    num_layers: int = 3
    parameterization: str = "vector"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x0: jax.Array) -> jax.Array:
        if self.parameterization not in ("vector", "matrix"):
            raise ValueError(f"CrossNetwork: parameterization must be 'vector' or 'matrix', got {self.parameterization!r}.")
        d = x0.shape[-1]
        x0 = x0.astype(self.dtype)
        x = x0
        for i in range(self.num_layers):
            bias = self.param(f"bias_{i}", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype)
            if self.parameterization == "vector":
                w = self.param(f"kernel_{i}", nn.with_logical_partitioning(nn.initializers.normal(d ** -0.5), ("embed",)),
                               (d,), self.param_dtype)
                x = x0 * jnp.einsum("...d,d->...", x, w.astype(self.dtype))[..., None] + bias.astype(self.dtype) + x
            else:
                w = self.param(f"kernel_{i}", nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
                               (d, d), self.param_dtype)
                x = x0 * (x @ w.astype(self.dtype) + bias.astype(self.dtype)) + x
        return x
