"""ToMe: bipartite soft matching, merge / unmerge, token sizes and source tracking.

Token Merging (Bolya et al., ICLR 2023), spec `vision_token_merging.md` §1.2-1.3.

Each kernel is written for one example (`[N, C]`) and vmapped over the batch. `r` is a
static Python int, so every output shape is static under `jit`. Matching runs in float32
under `stop_gradient`; merging computes in float32 and returns the input dtype.

Layout: A = x[0::2] (ceil(N/2) tokens, the class token is A[0]) and B = x[1::2]
(floor(N/2) tokens, the distill token is B[0]). Merging r tokens gives N - r tokens: the
kept A tokens, then all B tokens in their original order; with a distill token the order
is [unm0, dst0, unm1:, dst1:].
"""

from functools import partial
from numbers import Integral
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

MergeMode = Literal["sum", "mean", "amax"]
_MODES = ("sum", "mean", "amax")


@flax.struct.dataclass
class Matching:
    """Bipartite matching of a batch; the index arrays are pytree leaves, the rest static.

    Attributes:
      src_idx: [B, r] A-indices of the tokens merged away, most similar pair first.
      dst_idx: [B, r] B-indices that `src_idx` merge into (duplicates allowed).
      unm_idx: [B, ceil(N/2) - r] A-indices of the kept A tokens, in output order.
      num_tokens: N, the token count before the merge.
      r: tokens removed after the 50% clamp; 0 means every merge is the identity.
      class_token: whether token 0 is a protected class token.
      distill_token: whether token 1 is a protected distillation token.
    """

    src_idx: jax.Array
    dst_idx: jax.Array
    unm_idx: jax.Array
    num_tokens: int = flax.struct.field(pytree_node=False)
    r: int = flax.struct.field(pytree_node=False)
    class_token: bool = flax.struct.field(pytree_node=False)
    distill_token: bool = flax.struct.field(pytree_node=False)

    @property
    def num_merged(self) -> int:
        """Token count after the merge, N - r."""
        return self.num_tokens - self.r


# ----------------------------------------------------------------------------- one example


def _match_one(metric, *, r, class_token, distill_token):
    """metric [N, D] -> src_idx [r], dst_idx [r], unm_idx [ceil(N/2) - r] (int32)."""
    metric = jax.lax.stop_gradient(metric).astype(jnp.float32)
    m = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)  # [N, D]
    a, b = m[0::2], m[1::2]  # [Na, D], [Nb, D]
    scores = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)  # [Na, Nb]
    if class_token:
        scores = scores.at[0, :].set(-jnp.inf)
    if distill_token:
        scores = scores.at[:, 0].set(-jnp.inf)

    node_max = scores.max(axis=-1)  # [Na]
    node_idx = scores.argmax(axis=-1)  # [Na], first index on ties
    edge_idx = jnp.argsort(-node_max, stable=True)  # [Na], descending, ties keep order
    src_idx = edge_idx[:r]  # [r]
    unm_idx = edge_idx[r:]  # [Na - r]
    dst_idx = node_idx[src_idx]  # [r]
    if class_token:
        unm_idx = jnp.sort(unm_idx)  # the class token stays at output index 0
    return src_idx.astype(jnp.int32), dst_idx.astype(jnp.int32), unm_idx.astype(jnp.int32)


def _merge_one(x, src_idx, dst_idx, unm_idx, *, mode, distill_token):
    """x [N, C] -> [N - r, C]; sources are reduced into their destinations with `mode`."""
    a, b = x[0::2], x[1::2]  # [Na, C], [Nb, C]
    unm = a[unm_idx]  # [Na - r, C]
    src = a[src_idx]  # [r, C]
    if mode == "sum":
        dst = b.at[dst_idx].add(src)  # [Nb, C]
    elif mode == "mean":  # the destination itself counts once, as torch's include_self
        count = jnp.ones(b.shape[:1], x.dtype).at[dst_idx].add(1.0)  # [Nb]
        dst = b.at[dst_idx].add(src) / count[:, None]
    else:
        dst = b.at[dst_idx].max(src)
    if distill_token:
        return jnp.concatenate([unm[:1], dst[:1], unm[1:], dst[1:]], axis=0)
    return jnp.concatenate([unm, dst], axis=0)


def _unmerge_one(x, src_idx, dst_idx, unm_idx, *, num_tokens, distill_token):
    """x [N - r, C] -> [N, C]; every source token gets its destination's value."""
    n_unm = unm_idx.shape[0]
    if distill_token:
        unm = jnp.concatenate([x[:1], x[2 : n_unm + 1]], axis=0)  # [Na - r, C]
        dst = jnp.concatenate([x[1:2], x[n_unm + 1 :]], axis=0)  # [Nb, C]
    else:
        unm, dst = x[:n_unm], x[n_unm:]
    src = dst[dst_idx]  # [r, C]
    out = jnp.zeros((num_tokens, x.shape[-1]), x.dtype)
    out = out.at[1::2].set(dst)
    out = out.at[2 * unm_idx].set(unm)
    return out.at[2 * src_idx].set(src)


# ----------------------------------------------------------------------------- batch API


def _check_tokens(name: str, x: jax.Array, matching: Matching) -> None:
    batch = matching.src_idx.shape[0]
    if x.ndim != 3 or x.shape[:2] != (batch, matching.num_tokens):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, but the matching was computed for "
            f"{batch} examples of {matching.num_tokens} tokens; pass a [B, N, C] array with "
            f"B={batch}, N={matching.num_tokens} (the tokens the metric came from)."
        )


def clamped_r(r: int, num_tokens: int, *, class_token: bool = True, distill_token: bool = False) -> int:
    """The r actually merged: min(r, (N - protected) // 2), and 0 for r <= 0."""
    if isinstance(r, bool) or not isinstance(r, Integral):
        raise TypeError(
            f"r must be a static Python int (it fixes the output shape), got {type(r).__name__}; "
            "mark it static in jit (static_argnums) or take it from the config."
        )
    protected = int(class_token) + int(distill_token)
    return max(0, min(int(r), (num_tokens - protected) // 2))


def bipartite_soft_matching(
    metric: jax.Array, r: int, *, class_token: bool = True, distill_token: bool = False
) -> Matching:
    """Matches the r most similar A tokens to their best B partner.

    Args:
      metric: [B, N, D] similarity features (ToMe: the keys averaged over heads). No
        gradient flows into it.
      r: static number of tokens to remove; clamped to (N - protected) // 2.
      class_token: token 0 is never a source.
      distill_token: nothing merges into token 1.

    Returns:
      Matching with src_idx/dst_idx [B, r] and unm_idx [B, ceil(N/2) - r].
    """
    if metric.ndim != 3:
        raise ValueError(f"metric must be [B, N, D], got shape {tuple(metric.shape)}.")
    batch, num_tokens, _ = metric.shape
    r = clamped_r(r, num_tokens, class_token=class_token, distill_token=distill_token)
    if r == 0:
        num_a = (num_tokens + 1) // 2
        empty = jnp.zeros((batch, 0), jnp.int32)
        unm_idx = jnp.broadcast_to(jnp.arange(num_a, dtype=jnp.int32), (batch, num_a))
        return Matching(empty, empty, unm_idx, num_tokens, 0, class_token, distill_token)
    match = partial(_match_one, r=r, class_token=class_token, distill_token=distill_token)
    src_idx, dst_idx, unm_idx = jax.vmap(match)(metric)
    return Matching(src_idx, dst_idx, unm_idx, num_tokens, r, class_token, distill_token)


def merge(x: jax.Array, matching: Matching, mode: MergeMode = "sum") -> jax.Array:
    """Reduces each source token into its destination: [B, N, C] -> [B, N - r, C].

    `mode` is "sum", "mean" (the destination counts once) or "amax". Computes in float32
    and returns x's dtype; with r == 0 it returns x itself.
    """
    if mode not in _MODES:
        raise ValueError(f"merge mode must be one of {_MODES}, got {mode!r}.")
    _check_tokens("x", x, matching)
    if matching.r == 0:
        return x
    merge_fn = partial(_merge_one, mode=mode, distill_token=matching.distill_token)
    out = jax.vmap(merge_fn)(x.astype(jnp.float32), matching.src_idx, matching.dst_idx, matching.unm_idx)
    return out.astype(x.dtype)  # [B, N - r, C]


def unmerge(x_merged: jax.Array, matching: Matching) -> jax.Array:
    """Inverse layout of `merge`: [B, N - r, C] -> [B, N, C].

    Kept tokens return to their positions; each source token gets its destination's value.
    """
    batch = matching.src_idx.shape[0]
    if x_merged.ndim != 3 or x_merged.shape[:2] != (batch, matching.num_merged):
        raise ValueError(
            f"x_merged has shape {tuple(x_merged.shape)}, expected [{batch}, {matching.num_merged}, C] "
            "(the output of merge with this matching)."
        )
    if matching.r == 0:
        return x_merged
    unmerge_fn = partial(_unmerge_one, num_tokens=matching.num_tokens, distill_token=matching.distill_token)
    return jax.vmap(unmerge_fn)(x_merged, matching.src_idx, matching.dst_idx, matching.unm_idx)


def merge_wavg(x: jax.Array, size: jax.Array | None, matching: Matching) -> tuple[jax.Array, jax.Array]:
    """Size-weighted average merge.

    Args:
      x: [B, N, C] tokens.
      size: [B, N, 1] tokens each entry stands for, or None for ones.
      matching: from `bipartite_soft_matching`.

    Returns:
      x' = merge(x*s, sum) / merge(s, sum) as [B, N - r, C] in x's dtype, and
      s' = merge(s, sum) as [B, N - r, 1] float32. With r == 0, x is returned unchanged.
    """
    if size is None:
        size = jnp.ones(x.shape[:2] + (1,), jnp.float32)
    _check_tokens("size", size, matching)
    size = size.astype(jnp.float32)  # [B, N, 1]
    if matching.r == 0:
        return x, size
    size_merged = merge(size, matching, "sum")  # [B, N - r, 1]
    x_merged = merge(x.astype(jnp.float32) * size, matching, "sum") / size_merged  # [B, N - r, C]
    return x_merged.astype(x.dtype), size_merged


def merge_tokens(
    x: jax.Array,
    metric: jax.Array,
    size: jax.Array | None,
    r: int,
    *,
    class_token: bool = True,
    distill_token: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One ToMe step: match on `metric`, then size-weighted merge of `x`.

    Args:
      x: [B, N, C] tokens.
      metric: [B, N, D] matching features.
      size: [B, N, 1] token sizes or None (ones).
      r: static tokens to remove, clamped to (N - protected) // 2.

    Returns:
      ([B, N - r, C] merged tokens in x's dtype, [B, N - r, 1] float32 sizes).
    """
    matching = bipartite_soft_matching(metric, r, class_token=class_token, distill_token=distill_token)
    return merge_wavg(x, size, matching)


def merge_source(matching: Matching, x: jax.Array, source: jax.Array | None = None) -> jax.Array:
    """Tracks which input tokens each merged token covers.

    Args:
      matching: the current step's matching.
      x: [B, N, C] current tokens; only their shape is used when `source` is None.
      source: [B, N, N0] 0/1 map from current to original tokens, or None (identity).

    Returns:
      [B, N - r, N0] float32 map, merged with amax.
    """
    if source is None:
        batch, num_tokens = x.shape[:2]
        source = jnp.broadcast_to(jnp.eye(num_tokens, dtype=jnp.float32), (batch, num_tokens, num_tokens))
    return merge(source.astype(jnp.float32), matching, "amax")


def proportional_attention_bias(size: jax.Array) -> jax.Array:
    """Key-axis attention bias log(s): [B, N, 1] (or [B, N]) -> [B, N] float32.

    Added to the logits QK^T / sqrt(Dh), broadcast over heads and queries, a token of size
    s is attended like s copies of itself.
    """
    size = size.astype(jnp.float32)
    if size.ndim == 3:
        size = size[..., 0]
    return jnp.log(size)
