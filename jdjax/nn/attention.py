"""Multi-head self-attention with an optional additive key bias (proportional attention) and LoRA."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.lora import LoRA, check_lora_targets

Dtype = Any


def logical(init, axes: tuple):
    """Shorthand for an initializer annotated with logical axis names."""
    return nn.with_logical_partitioning(init, axes)


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused q/k/v projection (timm / OpenAI-CLIP layout).

    Parameters: `qkv/kernel` [C, 3, H, Dh] (+ `qkv/bias` [3, H, Dh]) and `out/kernel`
    [H, Dh, C], `out/bias` [C]. The fused axis is (q, k, v), then heads, then the per-head
    width: torch's `in_proj_weight` [3C, C] is `kernel.reshape(C, 3C).T`.
    With LoRA, `qkv_lora/{a [C, rank], b [rank, 3, H, Dh]}` (and `out_lora/{a [H, Dh, rank],
    b [rank, C]}` if 'out' is a target) add their low-rank delta to the projection.

    Attributes:
      num_heads: H; the width C must divide by it.
      qkv_bias: whether the fused projection has a bias.
      attention_dropout: dropout on the attention weights (train mode).
      lora_rank: 0 (off) or the LoRA rank.
      lora_alpha: None (no scaling, PYRA/TempMe) or alpha (scale alpha / rank).
      lora_dropout: dropout on the LoRA input.
      lora_targets: which projections carry LoRA; here 'qkv' and/or 'out'.
      kernel_init / out_kernel_init: initialisers of the qkv and output kernels.
    """

    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_dropout: float = 0.0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: Sequence[str] = ("qkv",)
    kernel_init: Any = nn.initializers.xavier_uniform()
    out_kernel_init: Any = nn.initializers.xavier_uniform()

    def _lora(self, name, features, num_in_axes, in_names, out_names):
        return LoRA(
            features,
            self.lora_rank,
            num_in_axes=num_in_axes,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            in_names=in_names,
            out_names=out_names,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, x, key_bias=None, mask=None, deterministic: bool = True):
        """Attends over the token axis.

        Args:
          x: [B, N, C] tokens.
          key_bias: optional [B, N] additive bias on the key axis (e.g. log token size),
            broadcast over heads and queries.
          mask: optional boolean mask broadcastable to [B, H, N, N]; False blocks attention.
          deterministic: disables attention and LoRA dropout.

        Returns:
          (out, keys): out [B, N, C]; keys [B, N, H, Dh] before the 1/sqrt(Dh) scaling and
          including the LoRA delta (the token-merging metric is their mean over heads).
        """
        c = x.shape[-1]
        if c % self.num_heads:
            raise ValueError(f"width {c} is not divisible by num_heads={self.num_heads}.")
        targets = check_lora_targets(self.lora_targets) if self.lora_rank else ()
        head_dim = c // self.num_heads
        qkv = nn.DenseGeneral(
            (3, self.num_heads, head_dim),
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(self.kernel_init, ("embed", "qkv", "heads", "kv")),
            bias_init=logical(nn.initializers.zeros, ("qkv", "heads", "kv")),
            name="qkv",
        )(x)  # [B, N, 3, H, Dh]
        if "qkv" in targets:
            qkv = qkv + self._lora("qkv_lora", (3, self.num_heads, head_dim), 1, ("embed",), ("qkv", "heads", "kv"))(
                x, deterministic
            )
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, Dh] each
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)
        if key_bias is not None:
            logits = logits + key_bias.astype(jnp.float32)[:, None, None, :]
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [B, H, N, N]
        weights = nn.Dropout(self.attention_dropout)(weights, deterministic=deterministic)
        heads = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # [B, N, H, Dh]
        out = nn.DenseGeneral(
            c,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(self.out_kernel_init, ("heads", "kv", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="out",
        )(heads)  # [B, N, C]
        if "out" in targets:
            out = out + self._lora("out_lora", (c,), 2, ("heads", "kv"), ("embed",))(heads, deterministic)
        return out, k
