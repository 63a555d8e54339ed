"""PYRA modulation of ToMe merges (spec `vision_token_merging.md` §3.2).

Before the size-weighted sum, each source token is re-activated with a rank-1 weight
computed from its matched pair:

    S   = X_A[src_idx] + X_B[dst_idx]        # [r, C], X = x * s, pairs in rank order
    M   = LayerNorm(S)                        # eps 1e-5
    w_c = 2 sigmoid(W_r^T M)                  # [1, C], channel weight in (0, 2)
    w_t = 2 sigmoid(M W_D^T) - 1              # [r, 1], token weight in (-1, 1)
    src' = src * (1 + w_c * w_t)

Sizes merge unmodulated. With W_D = 0 (its init) w_t = 0 and the merge equals ToMe.
The parameters are plain arrays; the matching carries no gradient.
"""

from functools import partial

import jax
import jax.numpy as jnp

from jdjax.merging.tome import Matching, _check_tokens, merge


def _modulation_one(xs, src_idx, dst_idx, w_r, w_d, ln_scale, ln_bias, *, eps):
    """xs [N, C] size-weighted tokens -> w_c [1, C], w_t [r, 1]."""
    pair = xs[0::2][src_idx] + xs[1::2][dst_idx]  # [r, C]
    mean = pair.mean(axis=-1, keepdims=True)  # [r, 1]
    var = jnp.square(pair - mean).mean(axis=-1, keepdims=True)  # [r, 1]
    m = (pair - mean) * jax.lax.rsqrt(var + eps) * ln_scale + ln_bias  # [r, C]
    w_c = 2.0 * jax.nn.sigmoid(jnp.sum(w_r[:, None] * m, axis=0, keepdims=True))  # [1, C]
    w_t = 2.0 * jax.nn.sigmoid(jnp.sum(m * w_d, axis=-1, keepdims=True)) - 1.0  # [r, 1]
    return w_c, w_t


def _modulation(x_weighted, matching, params, eps):
    """x_weighted [B, N, C] float32 -> w_c [B, 1, C], w_t [B, r, 1]."""
    w_r, w_d, ln_scale, ln_bias = params
    modulation = partial(_modulation_one, w_r=w_r, w_d=w_d, ln_scale=ln_scale, ln_bias=ln_bias, eps=eps)
    return jax.vmap(modulation)(x_weighted, matching.src_idx, matching.dst_idx)


def _scale_rows(x, rows, gain):
    """x [N, C], rows [r] distinct, gain [r, C] -> x with x[rows] *= gain."""
    return x.at[rows].multiply(gain, unique_indices=True)


def _flat_params(matching, w_r, w_d, ln_scale, ln_bias, channels):
    """Validates the parameter shapes and returns them flat in float32."""
    expected = {"w_r": (matching.r,), "w_d": (channels,), "ln_scale": (channels,), "ln_bias": (channels,)}
    params = {"w_r": w_r, "w_d": w_d, "ln_scale": ln_scale, "ln_bias": ln_bias}
    flat = {}
    for name, value in params.items():
        if value.size != expected[name][0] or value.ndim > 2:
            raise ValueError(
                f"PYRA parameter {name} has shape {tuple(value.shape)}, expected {expected[name][0]} "
                f"entries (r={matching.r}, C={channels}). If r differs, the schedule hit the 50% clamp "
                "(see schedules.clamp_schedule); PYRA schedules must not, as W_r has one row per pair."
            )
        flat[name] = value.reshape(expected[name]).astype(jnp.float32)
    return flat["w_r"], flat["w_d"], flat["ln_scale"], flat["ln_bias"]


def pyra_modulation(
    x_weighted: jax.Array,
    matching: Matching,
    w_r: jax.Array,
    w_d: jax.Array,
    ln_scale: jax.Array,
    ln_bias: jax.Array,
    eps: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """PYRA weights of one merge.

    Args:
      x_weighted: [B, N, C] size-weighted tokens x * s.
      matching: ToMe matching with r > 0 pairs.
      w_r: [r, 1] or [r] pair weights W_r.
      w_d: [1, C] or [C] channel weights W_D.
      ln_scale, ln_bias: [C] LayerNorm parameters.
      eps: LayerNorm epsilon.

    Returns:
      w_c [B, 1, C] in (0, 2) and w_t [B, r, 1] in (-1, 1), float32.
    """
    _check_tokens("x_weighted", x_weighted, matching)
    params = _flat_params(matching, w_r, w_d, ln_scale, ln_bias, x_weighted.shape[-1])
    return _modulation(x_weighted.astype(jnp.float32), matching, params, eps)


def pyra_merge_wavg(
    x: jax.Array,
    size: jax.Array | None,
    matching: Matching,
    w_r: jax.Array,
    w_d: jax.Array,
    ln_scale: jax.Array,
    ln_bias: jax.Array,
    eps: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Size-weighted ToMe merge with PYRA-modulated sources.

    Args:
      x: [B, N, C] tokens.
      size: [B, N, 1] token sizes or None (ones).
      matching: from `tome.bipartite_soft_matching`.
      w_r, w_d, ln_scale, ln_bias, eps: see `pyra_modulation`.

    Returns:
      ([B, N - r, C] merged tokens in x's dtype, [B, N - r, 1] float32 sizes). With r == 0
      (and an empty w_r) x and the sizes are returned unchanged.
    """
    _check_tokens("x", x, matching)
    params = _flat_params(matching, w_r, w_d, ln_scale, ln_bias, x.shape[-1])
    if size is None:
        size = jnp.ones(x.shape[:2] + (1,), jnp.float32)
    size = size.astype(jnp.float32)  # [B, N, 1]
    if matching.r == 0:
        return x, size
    size_merged = merge(size, matching, "sum")  # [B, N - r, 1]
    x_weighted = x.astype(jnp.float32) * size  # [B, N, C]
    w_c, w_t = _modulation(x_weighted, matching, params, eps)  # [B, 1, C], [B, r, 1]
    x_weighted = jax.vmap(_scale_rows)(x_weighted, 2 * matching.src_idx, 1.0 + w_c * w_t)
    x_merged = merge(x_weighted, matching, "sum") / size_merged  # [B, N - r, C]
    return x_merged.astype(x.dtype), size_merged
