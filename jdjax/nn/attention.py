"""Multi-head self-attention with an optional additive key bias (proportional attention)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def logical(init, axes: tuple):
    """Shorthand for an initializer annotated with logical axis names."""
    return nn.with_logical_partitioning(init, axes)


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused q/k/v projection (timm / OpenAI-CLIP layout).

    Attributes:
      num_heads: H; the width C must divide by it.
      qkv_bias: whether the fused projection has a bias.
    """

    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_bias=None, mask=None):
        """Attends over the token axis.

        Args:
          x: [B, N, C] tokens.
          key_bias: optional [B, N] additive bias on the key axis (e.g. log token size),
            broadcast over heads and queries.
          mask: optional boolean mask broadcastable to [B, H, N, N]; False blocks attention.

        Returns:
          (out, keys): out [B, N, C]; keys [B, N, H, Dh] before the 1/sqrt(Dh) scaling (the
          token-merging metric is their mean over heads).
        """
        c = x.shape[-1]
        if c % self.num_heads:
            raise ValueError(f"width {c} is not divisible by num_heads={self.num_heads}.")
        head_dim = c // self.num_heads
        qkv = nn.DenseGeneral(
            (3, self.num_heads, head_dim),
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), ("embed", "qkv", "heads", "kv")),
            bias_init=logical(nn.initializers.zeros, ("qkv", "heads", "kv")),
            name="qkv",
        )(x)  # [B, N, 3, H, Dh]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, Dh] each
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)
        if key_bias is not None:
            logits = logits + key_bias.astype(jnp.float32)[:, None, None, :]
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [B, H, N, N]
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # [B, N, H, Dh]
        out = nn.DenseGeneral(
            c,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="out",
        )(out)
        return out, k

