"""User-behaviour attention blocks: masked softmax pooling, DIN's local activation unit and a
Transformer behaviour encoder (self-attention within sessions).

Shapes: B batch, T behaviours, D widths; `mask` [B, T] is True on real behaviours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.ctr.layers import MLP

Dtype = Any


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax of `scores` [..., T] over the positions where `mask` [..., T] is True.

    Rows with no valid position get all-zero weights (not NaN).
    """
    scores = scores.astype(jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    shifted = jnp.where(mask, scores, neg)
    shifted = shifted - jax.lax.stop_gradient(jnp.max(shifted, axis=-1, keepdims=True))
    e = jnp.where(mask, jnp.exp(shifted), 0.0)
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def softmax_pool(scores: jax.Array, values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Vanilla attention: sum_t softmax_t(scores) v_t over valid behaviours.

    Args:
      scores: [B, T] unnormalised scores (e.g. q^T k_t).
      values: [B, T, Dv].
      mask: [B, T] bool.

    Returns:
      (pooled [B, Dv] (zero for an empty history), weights [B, T]).
    """
    w = masked_softmax(scores, mask)
    return jnp.einsum("bt,btd->bd", w, values.astype(jnp.float32)).astype(values.dtype), w


class LocalActivationUnit(nn.Module):
    """DIN's attention score: MLP([q, k_t, q - k_t, q * k_t]) -> one unnormalised score per behaviour.

    The DIEN reference code (which KFAtt follows) uses widths 80-40 with sigmoid activations.
    """

    hidden: Sequence[int] = (80, 40)
    activation: str = "sigmoid"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query: jax.Array, keys: jax.Array) -> jax.Array:
        """query [B, D], keys [B, T, D] -> scores [B, T]."""
        q = jnp.broadcast_to(query[:, None, :], keys.shape)
        x = jnp.concatenate([q, keys, q - keys, q * keys], axis=-1)  # [B, T, 4D]
        mlp = MLP(self.hidden, self.activation, out_features=1, dtype=self.dtype, param_dtype=self.param_dtype)
        return mlp(x)[..., 0]


class BehaviourEncoder(nn.Module):
    """KFAtt-trans encoder: positions added to keys and values, multi-head self-attention within
    sessions whose queries and keys are projections of the keys K and whose values are
    projections of V, then a fully connected layer: H [B, T, out_dim].

    Attributes:
      num_heads, head_dim: attention heads and their width.
      out_dim: width of H.
      max_len: number of learned positions (>= T).
    """

    num_heads: int
    head_dim: int
    out_dim: int
    max_len: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, keys: jax.Array, values: jax.Array, mask: jax.Array, session: jax.Array | None = None) -> jax.Array:
        """keys [B, T, Dk], values [B, T, Dv], mask [B, T], session [B, T] ids (None: one session).

        Returns H [B, T, out_dim]; rows of padding positions are zero.
        """
        t = keys.shape[1]
        if t > self.max_len:
            raise ValueError(f"BehaviourEncoder: {t} behaviours exceed max_len={self.max_len}.")
        emb = nn.initializers.normal(0.02)
        pos_k = self.param("pos_keys", nn.with_logical_partitioning(emb, ("pos", "embed")), (self.max_len, keys.shape[-1]), self.param_dtype)
        pos_v = self.param("pos_values", nn.with_logical_partitioning(emb, ("pos", "embed")), (self.max_len, values.shape[-1]), self.param_dtype)
        k = (keys + pos_k[:t].astype(keys.dtype)).astype(self.dtype)
        v = (values + pos_v[:t].astype(values.dtype)).astype(self.dtype)

        def proj(name, x):
            return nn.DenseGeneral(
                (self.num_heads, self.head_dim), dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "heads", "kv")), name=name,
            )(x)  # [B, T, H, Dh]

        q_, k_, v_ = proj("query", k), proj("key", k), proj("value", v)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q_, k_).astype(jnp.float32) / jnp.sqrt(self.head_dim)
        pair = mask[:, :, None] & mask[:, None, :]  # [B, T, T]
        if session is not None:
            pair &= session[:, :, None] == session[:, None, :]
        w = masked_softmax(logits, pair[:, None])  # [B, H, T, T]
        heads = jnp.einsum("bhqk,bkhd->bqhd", w.astype(self.dtype), v_)
        out = nn.DenseGeneral(
            self.out_dim, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("heads", "kv", "embed")), name="out",
        )(heads)  # [B, T, out_dim]
        h = nn.relu(nn.Dense(
            self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)), name="fc",
        )(out))
        return h * mask[..., None].astype(h.dtype)
