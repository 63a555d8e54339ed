"""TempMe kernels: matching that skips k class tokens, clip grouping, and the static per-layer plan.

Temporal token merging (Shen et al., ICLR 2025), spec `vision_token_merging.md` §2.1-2.2, 2.7.
A video of T frames runs as T sequences of N0 tokens (one class token each). Sequences are
grouped into clips as the layers go, so a sequence carries k class tokens in front (k = frames
per clip): layout `[CLS_1 .. CLS_k, patches]`.

Matching (`match`, one example in `_match_one`, vmapped): the class tokens are dropped from
the metric; the patch tokens P alternate into A and B with the parity of the full sequence's
ToMe alternation, A = P[1::2], B = P[0::2] if k is odd, else A = P[0::2], B = P[1::2]. The r
A tokens with the most similar B partner (cosine) are merged into it; the output is
`[all CLS, kept A (sorted), B]` with N - r tokens. With k = 1 this is exactly ToMe with a class
token (`jdjax.merging.tome`; a test says so). The released matcher has no r clamp (its callers
clamp); here r is clamped to (N - k) // 2, which no released setting reaches.

Grouping (`group_clips`): f neighbouring sequences of the same video become one,
`[CLS of member 1..f (k each), patches of member 1..f]`, so k <- f k and N <- f N; sizes are
regrouped the same way.

Plan (`plan_layers`): the static token bookkeeping of a TempMe video tower, per layer:
  ImgMe layer (before the first ClipMe layer): merge `imgme_r` after attention (keys metric).
  ClipMe layer with factor f: group f clips; cross-clip merge of
      M0 = min(int(f N rho_c), (f N - f k) // 2)            before attention, on the residual stream
    then intra-clip merge of M1 = min(int(N' rho_i), (N' - f k) // 2), N' = f N - M0, after attention.
  Later non-ClipMe layers: intra-clip merge of min(int(N rho_i), (N - k) // 2) after attention.
Counts include the class tokens and use int() floors exactly as the released code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import einops
import flax.struct
import jax
import jax.numpy as jnp

LAYER_KINDS = ("dense", "imgme", "clipme", "intra")


@flax.struct.dataclass
class ClipMatching:
    """Matching of a batch of sequences with `num_cls` leading class tokens.

    Attributes:
      src_idx: [B, r] A-indices (into the patch part's A set) merged away, most similar first.
      dst_idx: [B, r] B-indices they merge into (duplicates allowed).
      unm_idx: [B, |A| - r] kept A-indices, ascending.
      num_tokens: N before the merge (class tokens included).
      num_cls: k leading class tokens, never merged and not in the metric.
      r: tokens removed (after the clamp).
    """

    src_idx: jax.Array
    dst_idx: jax.Array
    unm_idx: jax.Array
    num_tokens: int = flax.struct.field(pytree_node=False)
    num_cls: int = flax.struct.field(pytree_node=False)
    r: int = flax.struct.field(pytree_node=False)


def clamped_r(r: int, num_tokens: int, num_cls: int) -> int:
    """min(r, (N - k) // 2), and 0 for r <= 0."""
    return max(0, min(int(r), (num_tokens - num_cls) // 2))


def _split(p, num_cls: int):
    """Patch tokens [P, ...] -> (A, B) with the parity of the full sequence's alternation."""
    return (p[1::2], p[0::2]) if num_cls % 2 else (p[0::2], p[1::2])


def _match_one(metric, *, r, num_cls):
    """metric [N, D] -> src_idx [r], dst_idx [r], unm_idx [|A| - r] (int32)."""
    m = jax.lax.stop_gradient(metric[num_cls:]).astype(jnp.float32)  # [P, D]
    m = m / jnp.linalg.norm(m, axis=-1, keepdims=True)
    a, b = _split(m, num_cls)  # [Na, D], [Nb, D]
    scores = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)  # [Na, Nb]
    node_max, node_idx = scores.max(axis=-1), scores.argmax(axis=-1)  # [Na]
    edge_idx = jnp.argsort(-node_max, stable=True)  # descending, ties keep order
    src_idx = edge_idx[:r]
    unm_idx = jnp.sort(edge_idx[r:])
    return src_idx.astype(jnp.int32), node_idx[src_idx].astype(jnp.int32), unm_idx.astype(jnp.int32)


def _merge_one(x, src_idx, dst_idx, unm_idx, *, num_cls):
    """x [N, C] -> [N - r, C]: [CLS, kept A, B with the sources summed in]."""
    a, b = _split(x[num_cls:], num_cls)
    dst = b.at[dst_idx].add(a[src_idx])  # [Nb, C]
    return jnp.concatenate([x[:num_cls], a[unm_idx], dst], axis=0)


def match(metric: jax.Array, r: int, num_cls: int) -> ClipMatching:
    """Bipartite soft matching of metric [B, N, D] (class tokens 0..k-1 excluded); r is static."""
    if metric.ndim != 3:
        raise ValueError(f"metric must be [B, N, D], got shape {tuple(metric.shape)}.")
    batch, num_tokens, _ = metric.shape
    if not 1 <= num_cls < num_tokens:
        raise ValueError(f"num_cls={num_cls} must be in [1, N={num_tokens}).")
    r = clamped_r(r, num_tokens, num_cls)
    num_a = (num_tokens - num_cls + (num_cls % 2 == 0)) // 2
    if r == 0:
        empty = jnp.zeros((batch, 0), jnp.int32)
        unm = jnp.broadcast_to(jnp.arange(num_a, dtype=jnp.int32), (batch, num_a))
        return ClipMatching(empty, empty, unm, num_tokens, num_cls, 0)
    src, dst, unm = jax.vmap(partial(_match_one, r=r, num_cls=num_cls))(metric)
    return ClipMatching(src, dst, unm, num_tokens, num_cls, r)


def merge_wavg(x: jax.Array, size: jax.Array | None, matching: ClipMatching) -> tuple[jax.Array, jax.Array | None]:
    """Size-weighted average merge: x [B, N, C], size [B, N, 1] or None (ones) ->
    (x' [B, N - r, C] in x's dtype, size' [B, N - r, 1] float32). With r == 0 both pass through."""
    if x.shape[:2] != (matching.src_idx.shape[0], matching.num_tokens):
        raise ValueError(f"x has shape {tuple(x.shape)}, the matching is for "
                         f"[{matching.src_idx.shape[0]}, {matching.num_tokens}, C].")
    if matching.r == 0:
        return x, size
    size = jnp.ones(x.shape[:2] + (1,), jnp.float32) if size is None else size.astype(jnp.float32)
    merge = jax.vmap(partial(_merge_one, num_cls=matching.num_cls))
    idx = (matching.src_idx, matching.dst_idx, matching.unm_idx)
    size_out = merge(size, *idx)  # [B, N - r, 1]
    x_out = merge(x.astype(jnp.float32) * size, *idx) / size_out  # [B, N - r, C]
    return x_out.astype(x.dtype), size_out


def merge_tokens(x, metric, size, r: int, num_cls: int):
    """One TempMe merge: `match` on metric [B, N, D], then `merge_wavg` of x [B, N, C]."""
    return merge_wavg(x, size, match(metric, r, num_cls))


def group_clips(x: jax.Array, factor: int, num_cls: int) -> jax.Array:
    """[B F, N, C] -> [B F / f, f N, C]: f consecutive sequences (clips of one video, in order)
    become one, their class tokens first (member order), then their patches (member order)."""
    if factor == 1:
        return x
    if x.shape[0] % factor:
        raise ValueError(f"{x.shape[0]} sequences do not group by {factor}.")
    x = einops.rearrange(x, "(s f) n c -> s f n c", f=factor)
    cls = einops.rearrange(x[:, :, :num_cls], "s f k c -> s (f k) c")
    patches = einops.rearrange(x[:, :, num_cls:], "s f p c -> s (f p) c")
    return jnp.concatenate([cls, patches], axis=1)


# ----------------------------------------------------------------------------- static plan


@dataclasses.dataclass(frozen=True)
class TemporalConfig:
    """TempMe's token reduction in a CLIP video tower (hashable: a Flax module attribute).

    Attributes:
      num_frames: T frames per video.
      imgme_r: tokens each ImgMe layer merges within a frame (B/32: 2; B/16: 10 [R]).
      clip_layers: ClipMe layer indices, ascending (released B/32: 8, 9, 10); () = none, so
        every layer is an ImgMe layer (the "ImgMe only" baseline when imgme_r > 0).
      group_factors: clips grouped at each ClipMe layer (released: 2, 2, 3); each must divide
        the clip count it meets.
      cross_ratio: rho_c of the cross-clip merge (released 0.30).
      intra_ratio: rho_i of the intra-clip merge (released 0.10).
    """

    num_frames: int = 12
    imgme_r: int = 0
    clip_layers: tuple[int, ...] = ()
    group_factors: tuple[int, ...] = ()
    cross_ratio: float = 0.0
    intra_ratio: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "clip_layers", tuple(int(v) for v in self.clip_layers))
        object.__setattr__(self, "group_factors", tuple(int(v) for v in self.group_factors))
        errors = temporal_errors(self)
        if errors:
            raise ValueError(" ".join(errors))


def temporal_errors(t: TemporalConfig, depth: int | None = None) -> list[str]:
    """Problems of a TemporalConfig (with `depth`: also layers beyond the model)."""
    errors = []
    if t.num_frames < 1:
        errors.append(f"num_frames must be >= 1, got {t.num_frames}.")
    if t.imgme_r < 0:
        errors.append(f"imgme_r must be >= 0, got {t.imgme_r}.")
    if len(t.clip_layers) != len(t.group_factors):
        errors.append(f"clip_layers {list(t.clip_layers)} and group_factors {list(t.group_factors)} must have "
                      "the same length (one grouping factor per ClipMe layer).")
    if list(t.clip_layers) != sorted(set(t.clip_layers)) or any(v < 0 for v in t.clip_layers):
        errors.append(f"clip_layers must be distinct ascending layer indices, got {list(t.clip_layers)}.")
    if depth is not None and t.clip_layers and t.clip_layers[-1] >= depth:
        errors.append(f"clip_layers {list(t.clip_layers)} reach beyond the {depth} layers of the model.")
    if not 0.0 <= t.cross_ratio < 1.0 or not 0.0 <= t.intra_ratio < 1.0:
        errors.append(f"cross_ratio and intra_ratio must be in [0, 1), got {t.cross_ratio}, {t.intra_ratio}.")
    clips = t.num_frames
    for layer, f in zip(t.clip_layers, t.group_factors):
        if f < 1 or clips % f:
            errors.append(f"group factor {f} at ClipMe layer {layer} does not divide the {clips} clips of a "
                          f"video there (num_frames={t.num_frames}, group_factors={list(t.group_factors)}).")
            break
        clips //= f
    return errors


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static bookkeeping of one layer, per sequence (class tokens included in every count).

    Attributes:
      kind: 'dense' (no merge), 'imgme', 'clipme' or 'intra' (intra-clip merge after a ClipMe).
      clips: sequences per video entering attention (after any grouping).
      num_cls: class tokens per sequence entering attention.
      group: clips grouped before attention (1 = none).
      tokens_in: tokens per sequence entering the block (before grouping).
      cross_r: tokens removed by the cross-clip merge before attention (ClipMe only).
      tokens_attn: tokens per sequence in attention.
      intra_r: tokens removed after attention (ImgMe / intra-clip merge).
      tokens_out: tokens per sequence leaving the block (= tokens in the MLP).
    """

    kind: str
    clips: int
    num_cls: int
    group: int
    tokens_in: int
    cross_r: int
    tokens_attn: int
    intra_r: int
    tokens_out: int


def plan_layers(t: TemporalConfig, tokens_per_frame: int, depth: int) -> tuple[LayerPlan, ...]:
    """The per-layer plan of a video tower of `depth` layers whose frames have N0 tokens
    (1 class token each). The released B/32 config gives 50 -> ... -> 1 x 97 (spec §2.2)."""
    errors = temporal_errors(t, depth)
    if errors:
        raise ValueError(" ".join(errors))
    factors = dict(zip(t.clip_layers, t.group_factors))
    first_clip = t.clip_layers[0] if t.clip_layers else depth
    clips, n, k = t.num_frames, tokens_per_frame, 1
    plan = []
    for layer in range(depth):
        tokens_in, group, cross_r = n, 1, 0
        if layer in factors:
            group = factors[layer]
            clips, n, k = clips // group, n * group, k * group
            cross_r = min(int(n * t.cross_ratio), (n - k) // 2)
            n -= cross_r
            intra_r = min(int(n * t.intra_ratio), (n - k) // 2)
            kind = "clipme"
        elif layer > first_clip:
            intra_r, kind = min(int(n * t.intra_ratio), (n - k) // 2), "intra"
        else:
            intra_r = clamped_r(t.imgme_r, n, k)
            kind = "imgme" if intra_r else "dense"
        plan.append(LayerPlan(kind, clips, k, group, tokens_in, cross_r, n, intra_r, n - intra_r))
        n -= intra_r
    return tuple(plan)


def output_shape(plan: Sequence[LayerPlan]) -> tuple[int, int]:
    """(sequences per video, tokens per sequence) leaving the last layer: (1, 97) for B/32."""
    return plan[-1].clips, plan[-1].tokens_out
