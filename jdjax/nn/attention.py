"""Multi-head self-attention with an optional additive key bias (proportional attention) and LoRA,
and query-over-memory attention with a decoding cache (encoder-decoder models)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.lora import LoRAConfig, lora_delta

Dtype = Any


def logical(init, axes: tuple):
    """Shorthand for an initializer annotated with logical axis names."""
    return nn.with_logical_partitioning(init, axes)


def output_projection(module: nn.Module, heads, width: int):
    """The heads [B, N, H, Dh] projected back to [B, N, width] by `module`'s submodule 'out'
    (kernel [H, Dh, C], bias [C]); call it inside the module's compact __call__."""
    return nn.DenseGeneral(
        width,
        axis=(-2, -1),
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernel_init=logical(module.out_kernel_init, ("heads", "kv", "embed")),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name="out",
    )(heads)


def attend(q, k, v, *, key_bias=None, mask=None, dtype=jnp.float32, dropout=None):
    """softmax(q k^T / sqrt(Dh) + key_bias, masked) v for every head, in the head-major layout.

    Args:
      q: [B, H, Nq, Dh] queries; k, v: [B, H, Nk, Dh] keys and values.
      key_bias: optional [B, Nk] additive bias on the key axis, broadcast over heads and queries.
      mask: optional boolean, broadcastable to [B, H, Nq, Nk]; False blocks attention.
      dtype: dtype of the weights fed to the value product (logits and softmax stay float32).
      dropout: optional function applied to those weights (attention dropout).

    Returns:
      (heads [B, Nq, H, Dh], weights [B, H, Nq, Nk] float32 softmax before dropout).

    The head-major layout matters on CPU: the same products written over token-major
    [B, N, H, Dh] operands ("bqhd,bkhd->bhqk") run about 5x slower on XLA:CPU (ViT-B/16 at
    batch 8: 45 ms against 9 ms per block), see benchmarks/roofline.py.
    """
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    if key_bias is not None:
        logits = logits + key_bias.astype(jnp.float32)[:, None, None, :]
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)  # [B, H, Nq, Nk]
    dropped = weights.astype(dtype) if dropout is None else dropout(weights.astype(dtype))
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", dropped, v.astype(dtype)), 1, 2), weights


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
      lora: LoRA on the projections; here the targets 'qkv' and/or 'out' apply.
      kernel_init / out_kernel_init: initialisers of the qkv and output kernels.
    """

    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_dropout: float = 0.0
    lora: LoRAConfig = LoRAConfig()
    kernel_init: Any = nn.initializers.xavier_uniform()
    out_kernel_init: Any = nn.initializers.xavier_uniform()

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
        lora_kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, deterministic=deterministic)
        if self.lora.applies_to("qkv"):
            qkv = qkv + lora_delta(self.lora, "qkv", x, (3, self.num_heads, head_dim), ("embed",),
                                   ("qkv", "heads", "kv"), **lora_kw)
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # [B, H, N, Dh] each
        dropout = nn.Dropout(self.attention_dropout)
        heads, _ = attend(q, k, v, key_bias=key_bias, mask=mask, dtype=self.dtype,
                          dropout=lambda w: dropout(w, deterministic=deterministic))  # [B, N, H, Dh]
        out = output_projection(self, heads, c)  # [B, N, C]
        if self.lora.applies_to("out"):
            out = out + lora_delta(self.lora, "out", heads, (c,), ("heads", "kv"), ("embed",), **lora_kw)
        return out, jnp.swapaxes(k, 1, 2)


class Attention(nn.Module):
    """Multi-head attention of queries `x` over `memory` (default `x`), with an optional K/V cache.

    One module for a decoder's causal self-attention (memory None, causal mask from the caller,
    `cache` for incremental decoding) and its cross-attention over encoder states (padding mask).
    Parameters, ParlAI's q_lin / k_lin / v_lin / out_lin split by heads:
    `query|key|value/kernel` [C or Cm, H, Dh] (+ bias [H, Dh]), `out/kernel` [H, Dh, C], `out/bias` [C].

    Attributes:
      num_heads: H; the query width C must divide by it (Dh = C // H).
      use_bias: biases on the q/k/v projections.
      attention_dropout: dropout on the attention weights (train mode).
      kernel_init / out_kernel_init: initialisers of the q/k/v and output kernels (applied to the
        flattened [in, out] matrix, as DenseGeneral does).
    """

    num_heads: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_dropout: float = 0.0
    kernel_init: Any = nn.initializers.xavier_uniform()
    out_kernel_init: Any = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x, memory=None, mask=None, cache=None, index=None, deterministic: bool = True):
        """Args:
          x: [B, Nq, C] queries.
          memory: [B, Nk, Cm] keys/values source; None attends over `x` itself.
          mask: boolean, broadcastable to [B, H, Nq, Nk] (Nk = T with a cache); False blocks.
          cache: optional {'key', 'value'} [B, T, H, Dh]: this call's keys/values are written at
            positions [index, index + Nq) and the queries attend over all T slots, so `mask` must
            block the slots not written yet.
          index: int32 scalar write position (with `cache`).
          deterministic: disables attention dropout.

        Returns:
          (out [B, Nq, C], weights [B, H, Nq, Nk] float32 softmax before dropout, new cache or None).
        """
        c = x.shape[-1]
        if c % self.num_heads:
            raise ValueError(f"width {c} is not divisible by num_heads={self.num_heads}.")
        head_dim = c // self.num_heads
        memory = x if memory is None else memory

        def project(h, name):  # [B, N, C] -> [B, N, H, Dh]
            return nn.DenseGeneral(
                (self.num_heads, head_dim),
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=logical(self.kernel_init, ("embed", "heads", "kv")),
                bias_init=logical(nn.initializers.zeros, ("heads", "kv")),
                name=name,
            )(h)

        q, k, v = project(x, "query"), project(memory, "key"), project(memory, "value")
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["key"], k.astype(cache["key"].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["value"], v.astype(cache["value"].dtype), index, axis=1)
            cache = {"key": k, "value": v}  # [B, T, H, Dh] each
        dropout = nn.Dropout(self.attention_dropout)
        heads, weights = attend(*(jnp.swapaxes(t, 1, 2) for t in (q, k, v)), mask=mask, dtype=self.dtype,
                                dropout=lambda w: dropout(w, deterministic=deterministic))  # [B, Nq, H, Dh]
        out = output_projection(self, heads, c)  # [B, Nq, C]
        return out, weights, cache
