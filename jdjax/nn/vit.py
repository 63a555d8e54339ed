"""Vision Transformer in the Google/timm layout, and the encoder block shared with CLIP.

Block (pre-LN), with the token-reduction hook of ToMe / PYRA between attention and MLP
(spec `vision_token_merging.md` §1.1, §3.1):

    x = x + Attn(LN1 x, key_bias = log(size) if prop_attn and tokens were merged before)
    x, size, source = merge r_l tokens (metric = keys averaged over heads)   # skipped if r_l = 0
    x = x + MLP(LN2 x)

The per-layer schedule [r_0, ..., r_{L-1}] is static (Python ints), so every shape is static.
With r_l = 0 in every layer the model runs exactly the ops of the plain ViT.

Parameter tree of `ViT` (C width, P patch, N = 1 + (S/P)^2 tokens, M mlp_dim, K classes):

    embedding/{kernel [P, P, 3, C], bias [C]}      cls [1, 1, C]      pos_embedding [1, N, C]
    block{i}/ln1/{scale, bias} [C]
    block{i}/attn/qkv/{kernel [C, 3, H, Dh], bias [3, H, Dh]}   attn/out/{kernel [H, Dh, C], bias [C]}
    block{i}/attn/qkv_lora/{a [C, rank], b [rank, 3, H, Dh]}     (lora.rank > 0)
    block{i}/ln2/{scale, bias} [C]     block{i}/mlp/fc1/{kernel [C, M], bias [M]}   mlp/fc2/{kernel [M, C], bias [C]}
    block{i}/merge/{pyra_w_r [r_i, 1], pyra_w_d [C], pyra_norm_scale [C], pyra_norm_bias [C]}  (merge.mode='pyra', r_i > 0)
    encoder_norm/{scale, bias} [C]     head/{kernel [C, K], bias [K]}

With `scan=True` the blocks are one module `blocks` whose parameters have a leading [L] axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdjax.merging import pyra, schedules, tome
from jdjax.nn.attention import MultiHeadAttention, logical
from jdjax.nn.lora import LoRAConfig, lora_delta

Dtype = Any

# name: (width, depth, heads, mlp_dim)
VIT_SIZES = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


def exact_gelu(x):
    """x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, the exact GELU of Google ViT, timm and Hugging Face ViT,
    written with erf as torch does. `jax.nn.gelu(approximate=False)` (written with erfc) gives the
    same values to 1e-7 but, fused beside the MLP's matmuls, ran the ViT-B/16 MLP's forward 1.4x and
    its backward 2x slower on XLA:CPU (benchmarks/roofline.py, ablation rows)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


ACTIVATIONS = {
    "gelu": exact_gelu,
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "relu": nn.relu,
}

MERGE_MODES = ("tome", "pyra")

# What a rematerialised block keeps from its forward pass (jax.checkpoint_policies); the rest is recomputed.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Token merging in the encoder blocks (ToMe / PYRA); hashable, so a Flax module attribute.

    Attributes:
      r: tokens merged per layer, in `schedules.parse_r`'s forms: an int (every layer); ToMe's
        tuple (r, inflect), e.g. (16, -1) = 32 in the first layer down to 0 in the last, (16, 0)
        = 16 in every layer; or a list of ints, one per layer, zero-padded to the depth (stored
        as a hashable `schedules.PerLayer`, which is never read as (r, inflect), so
        `dataclasses.replace` keeps the meaning). 0 merges nothing.
      mode: 'tome' (size-weighted average) or 'pyra' (PYRA's modulated merge, with parameters).
      prop_attn: add log(size) to the attention logits once tokens were merged.
      trace_source: carry the [B, N, N0] source map through the merges (info['source']).
      pyra_ln_eps: epsilon of PYRA's LayerNorm.
      class_token / distill_token: protected tokens at index 0 / 1 (ViT and CLIP: class token only).
    """

    r: int | tuple[int, float] | schedules.PerLayer = 0
    mode: str = "tome"
    prop_attn: bool = True
    trace_source: bool = False
    pyra_ln_eps: float = 1e-5
    class_token: bool = True
    distill_token: bool = False

    def __post_init__(self):
        if self.mode not in MERGE_MODES:
            raise ValueError(f"MergeConfig.mode must be one of {MERGE_MODES}, got {self.mode!r}.")
        if not self.pyra_ln_eps > 0:
            raise ValueError(f"MergeConfig.pyra_ln_eps must be positive, got {self.pyra_ln_eps!r}.")
        if isinstance(self.r, tuple) and not isinstance(self.r, schedules.PerLayer):
            try:  # ToMe's (r, inflect): its shape and sign do not depend on the depth (>= 2)
                schedules.parse_r(self.r, 2)
            except ValueError as e:
                raise ValueError(f"MergeConfig.r={self.r!r}: a tuple is ToMe's (r, inflect) schedule; {e} "
                                 f"For one r per layer pass a list, e.g. r={list(self.r)!r}.") from None
        elif isinstance(self.r, Sequence) and not isinstance(self.r, str):
            object.__setattr__(self, "r", schedules.PerLayer(self.r))
            if self.r:
                schedules.parse_r(list(self.r), len(self.r))  # raises on entries that are not ints >= 0
        else:
            schedules.parse_r(self.r, 1)  # raises unless an int >= 0

    @property
    def protected(self) -> int:
        """Tokens the matching never merges (class + distill)."""
        return int(self.class_token) + int(self.distill_token)

    def schedule(self, depth: int) -> list[int]:
        """The requested r of each of `depth` layers (before the 50% clamp)."""
        return schedules.parse_r(self.r, depth)


def vit_config(name: str) -> dict:
    """'B/16' -> dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072).

    Sizes Ti, S, B, L, H; any patch size. Use as `ViT(num_classes, **vit_config('B/16'))`.
    """
    m = re.fullmatch(r"(?:ViT-)?(Ti|S|B|L|H)/(\d+)", name.strip())
    if not m:
        raise ValueError(f"unknown ViT name {name!r}; use '<size>/<patch>' with size in {sorted(VIT_SIZES)}, e.g. 'B/16'.")
    width, depth, heads, mlp_dim = VIT_SIZES[m.group(1)]
    return dict(patch_size=int(m.group(2)), width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim)


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def checkpoint_policy(name: str):
    """'dots_saveable' -> jax.checkpoint_policies.dots_saveable (the `policy` of nn.remat); one of REMAT_POLICIES."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={name!r} is unknown; choose one of {list(REMAT_POLICIES)} "
                         "(names in jax.checkpoint_policies; 'nothing_saveable' recomputes the whole block).")
    return getattr(jax.checkpoint_policies, name)


def layer_norm(name: str, eps: float, dtype, param_dtype):
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nn.initializers.ones, ("norm",)),
        bias_init=logical(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def drop_path(module: nn.Module, x, rate: float, deterministic: bool):
    """Stochastic depth: zeroes whole examples of a residual branch with probability `rate`."""
    if rate == 0.0 or deterministic:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


# ----------------------------------------------------------------------------- position embeddings


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """torch's bicubic coefficients for taps at offsets -1, 0, 1, 2 (t in [0, 1))."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def resize_matrix(in_size: int, out_size: int, method: str = "bicubic", cubic_a: float = -0.75) -> np.ndarray:
    """[out_size, in_size] float64 matrix of 1-D interpolation, as torch F.interpolate with
    align_corners=False, antialias=False (half-pixel centres, edge taps clamped)."""
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    src = scale * (dst + 0.5) - 0.5
    w = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    if method == "bilinear":
        src = np.maximum(src, 0.0)
        x0 = np.floor(src).astype(int)
        x1 = np.minimum(x0 + 1, in_size - 1)
        lam = src - x0
        np.add.at(w, (rows, x0), 1.0 - lam)
        np.add.at(w, (rows, x1), lam)
    elif method == "bicubic":
        x0 = np.floor(src).astype(int)
        coeffs = _cubic_weights(src - x0, cubic_a)  # [out, 4]
        for k in range(4):
            np.add.at(w, (rows, np.clip(x0 - 1 + k, 0, in_size - 1)), coeffs[:, k])
    else:
        raise ValueError(f"interpolation method must be 'bicubic' or 'bilinear', got {method!r}.")
    return w


def interpolate_pos_embedding(
    pos: jax.Array,
    new_grid: int | tuple[int, int],
    old_grid: int | tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    method: str = "bicubic",
    cubic_a: float = -0.75,
) -> jax.Array:
    """Resamples a learned position embedding to another patch grid (e.g. 224 -> 384 px).

    The prefix (class) tokens are kept as they are; the patch part, read row-major as
    [old_h, old_w, C], is resized separably on the grid with torch's `F.interpolate(mode=method,
    align_corners=False, antialias=False)` arithmetic (bicubic uses a = -0.75 like torch; a = -0.5
    is PIL / jax.image). This equals Hugging Face ViT/CLIP `interpolate_pos_encoding`; timm's
    `resample_abs_pos_embed` uses antialias=True and differs slightly (no antialiasing here).

    Args:
      pos: [N, C] or [1, N, C] with N = num_prefix_tokens + old_h * old_w.
      new_grid, old_grid: patch grids (h, w) or a side; old_grid None means square.
      method: 'bicubic' (default) or 'bilinear'.

    Returns:
      The embedding for the new grid, same rank and dtype as `pos`; `pos` itself if the grids match.
    """
    as_pair = lambda g: (g, g) if isinstance(g, int) else tuple(int(v) for v in g)  # noqa: E731
    if pos.ndim not in (2, 3) or (pos.ndim == 3 and pos.shape[0] != 1):
        raise ValueError(f"pos must be [N, C] or [1, N, C], got shape {tuple(pos.shape)}.")
    table = pos.reshape(pos.shape[-2:])  # [N, C]
    num_patches = table.shape[0] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"pos has {num_patches} patch positions, not a square grid; pass old_grid=(h, w)."
            )
        old_grid = side
    old_grid, new_grid = as_pair(old_grid), as_pair(new_grid)
    if old_grid[0] * old_grid[1] != num_patches:
        raise ValueError(f"old_grid {old_grid} does not hold the {num_patches} patch positions of pos.")
    if old_grid == new_grid:
        return pos
    prefix = table[:num_prefix_tokens]  # [num_prefix_tokens, C]
    grid = einops.rearrange(table[num_prefix_tokens:], "(h w) c -> h w c", h=old_grid[0])  # [h, w, C]
    wh = jnp.asarray(resize_matrix(old_grid[0], new_grid[0], method, cubic_a), jnp.float32)  # [h', h]
    ww = jnp.asarray(resize_matrix(old_grid[1], new_grid[1], method, cubic_a), jnp.float32)  # [w', w]
    hi = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("Hh,Ww,hwc->HWc", wh, ww, grid.astype(jnp.float32), precision=hi)  # [h', w', C]
    grid = einops.rearrange(grid, "h w c -> (h w) c")  # [h' w', C]
    out = jnp.concatenate([prefix.astype(jnp.float32), grid], axis=0).astype(pos.dtype)
    return out[None] if pos.ndim == 3 else out


def grid_pos_embedding(
    module: nn.Module,
    name: str,
    init,
    axes: tuple,
    grid: tuple[int, int],
    width: int,
    *,
    model_grid: tuple[int, int] | None,
    interpolation: str | None,
    leading_one: bool,
):
    """A learned [1?, 1 + h*w, C] position embedding, resampled if the input grid differs.

    The stored grid is `model_grid` (from the model's image_size) if given, else the grid of the
    existing parameter (square) or of the input at init.
    """
    lead = (1,) if leading_one else ()
    stored_grid = model_grid or grid
    if module.has_variable("params", name):
        stored = nn.meta.unbox(module.get_variable("params", name))
        n = stored.shape[-2] - 1
        if stored_grid[0] * stored_grid[1] != n:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(
                    f"{name} holds {n} patch positions, which is neither the grid {stored_grid} nor square; "
                    "set image_size to the resolution the parameters were trained at."
                )
            stored_grid = (side, side)
    pos = module.param(name, logical(init, axes), lead + (1 + stored_grid[0] * stored_grid[1], width), module.param_dtype)
    if tuple(stored_grid) != tuple(grid):
        if interpolation is None:
            raise ValueError(
                f"the images give a {grid[0]}x{grid[1]} patch grid but the position embedding is for "
                f"{stored_grid[0]}x{stored_grid[1]}. Set pos_interpolation='bicubic' to resample it on the fly, "
                "or resample the checkpoint once with jdjax.nn.vit.interpolate_pos_embedding and set image_size."
            )
        pos = interpolate_pos_embedding(pos, grid, stored_grid, method=interpolation)
    return pos


def image_grid(image_size: int | Sequence[int] | None, patch_size: int) -> tuple[int, int] | None:
    if image_size is None:
        return None
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"image_size {h}x{w} is not divisible by patch_size={patch_size}.")
    return h // patch_size, w // patch_size


def patch_embedding(images, patch_size: int, width: int, *, use_bias: bool, name: str, dtype, param_dtype,
                    kernel_init=None):
    """images [B, H, W, 3] -> (tokens [B, (H/P)(W/P), C], grid (H/P, W/P)); kernel [P, P, 3, C] (HWIO)."""
    p = patch_size
    _, height, width_px, _ = images.shape
    if height % p or width_px % p:
        raise ValueError(f"image size {height}x{width_px} is not divisible by patch_size={p}.")
    x = nn.Conv(
        width,
        (p, p),
        strides=(p, p),
        padding="VALID",
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(kernel_init or nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name=name,
    )(images.astype(dtype))  # [B, H/P, W/P, C]
    return einops.rearrange(x, "b h w c -> b (h w) c"), (height // p, width_px // p)


# ----------------------------------------------------------------------------- blocks


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> activation -> Dropout -> Dense(C), optional LoRA on fc1 / fc2."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "gelu"
    lora: LoRAConfig = LoRAConfig()

    @nn.compact
    def __call__(self, x, deterministic: bool = True):  # [B, N, C] -> [B, N, C]
        c = x.shape[-1]

        def dense(h, features, axes, name):
            y = nn.Dense(
                features,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=logical(nn.initializers.xavier_uniform(), axes),
                bias_init=logical(nn.initializers.normal(1e-6), axes[1:]),
                name=name,
            )(h)
            if self.lora.applies_to(name):
                y = y + lora_delta(self.lora, name, h, (features,), axes[:1], axes[1:], dtype=self.dtype,
                                   param_dtype=self.param_dtype, deterministic=deterministic)
            return y

        h = activation_fn(self.activation)(dense(x, self.mlp_dim, ("embed", "mlp"), "fc1"))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return dense(h, c, ("mlp", "embed"), "fc2")


class TokenMerger(nn.Module):
    """The token-reduction hook: ToMe bipartite matching + size-weighted merge of r tokens.

    mode 'tome': `tome.merge_wavg`. mode 'pyra': `pyra.pyra_merge_wavg` with this layer's
    parameters pyra_w_r [r, 1] ~ U(-1, 1), pyra_w_d [C] = 0, pyra_norm_scale [C] = 1,
    pyra_norm_bias [C] = 0 (LayerNorm eps `merge.pyra_ln_eps`); at init it equals ToMe.
    r is the static request; the 50% clamp gives the r actually merged (PYRA's W_r has that
    many rows, so a PYRA schedule should not hit the clamp). Another merger replaces it per
    block through EncoderBlock's `post_attention`.
    """

    r: int
    merge: MergeConfig = MergeConfig()
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, keys, size=None, source=None, deterministic: bool = True):
        """x [B, N, C], keys [B, N, H, Dh], size [B, N, 1] or None, source [B, N, N0] or None
        -> (x [B, N - r, C], size [B, N - r, 1] float32, source [B, N - r, N0] or None)."""
        metric = keys.astype(jnp.float32).mean(axis=2)  # [B, N, Dh]
        matching = tome.bipartite_soft_matching(
            metric, self.r, class_token=self.merge.class_token, distill_token=self.merge.distill_token
        )
        if matching.r == 0:
            return x, size, source
        if self.merge.mode == "tome":
            merged, size_out = tome.merge_wavg(x, size, matching)
        else:
            c = x.shape[-1]
            uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0).astype(dtype)  # noqa: E731
            w_r = self.param("pyra_w_r", logical(uniform, (None, None)), (matching.r, 1), self.param_dtype)
            w_d = self.param("pyra_w_d", logical(nn.initializers.zeros, ("embed",)), (c,), self.param_dtype)
            scale = self.param("pyra_norm_scale", logical(nn.initializers.ones, ("norm",)), (c,), self.param_dtype)
            bias = self.param("pyra_norm_bias", logical(nn.initializers.zeros, ("norm",)), (c,), self.param_dtype)
            eps = self.merge.pyra_ln_eps
            merged, size_out = pyra.pyra_merge_wavg(x, size, matching, w_r, w_d, scale, bias, eps=eps)
        if self.merge.trace_source:
            source = tome.merge_source(matching, x, source)
        return merged, size_out, source


class EncoderBlock(nn.Module):
    """x + Attn(LN1 x) -> merge r tokens -> x + MLP(LN2 x); shared by ViT and both CLIP towers.

    Attributes:
      num_heads, mlp_dim: H and the MLP hidden width.
      dropout: after attention, inside and after the MLP (Google ViT placement).
      ln_eps: LayerNorm epsilon (1e-6 Google/timm, 1e-5 CLIP, 1e-12 Hugging Face ViT).
      activation: 'gelu' (exact), 'quick_gelu' (CLIP), 'gelu_tanh' or 'relu'.
      qkv_bias: bias on the fused qkv projection.
      attention_dropout: on the attention weights. drop_path: stochastic depth rate.
      r: tokens this block merges (static); 0 skips the hook entirely.
      merge: the token-reduction hook (mode, prop_attn, trace_source, ...); its r is the
        model's schedule, of which this block gets `r`.
      lora: LoRA on the block's projections (targets among 'qkv', 'out', 'fc1', 'fc2').
      pre_attention: optional hook on the residual stream before LN1, a module factory called as
        `pre_attention(name="pre_merge")(x, size, source, deterministic) -> (x, size, source)`;
        it may change the batch and token axes (TempMe's clip grouping and cross-clip merge).
      post_attention: optional module factory replacing the ToMe / PYRA merger (built from r and
        merge), called as `post_attention(name="merge")(x, keys, size, source, deterministic)`.
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "gelu"
    qkv_bias: bool = True
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    r: int = 0
    merge: MergeConfig = MergeConfig()
    lora: LoRAConfig = LoRAConfig()
    pre_attention: Any = None
    post_attention: Any = None

    @nn.compact
    def __call__(self, x, size=None, source=None, mask=None, deterministic: bool = True):
        """Args:
          x: [B, N, C] tokens.
          size: [B, N, 1] float32 token sizes, or None (all ones; no proportional-attention bias).
          source: [B, N, N0] source map or None.
          mask: boolean attention mask broadcastable to [B, H, N, N] (not with r > 0).
          deterministic: disables dropout, drop path and LoRA dropout.

        Returns:
          (x [B, N - r, C], size, source): size and source stay None until a merge happens.
        """
        merger = self.post_attention
        if merger is None and self.r > 0:
            merger = functools.partial(TokenMerger, self.r, self.merge, self.param_dtype)
        if (merger or self.pre_attention) and mask is not None:
            raise ValueError("token merging cannot be combined with an attention mask.")
        if self.pre_attention is not None:
            x, size, source = self.pre_attention(name="pre_merge")(x, size, source, deterministic)
        key_bias = tome.proportional_attention_bias(size) if (self.merge.prop_attn and size is not None) else None
        h = layer_norm("ln1", self.ln_eps, self.dtype, self.param_dtype)(x)
        h, keys = MultiHeadAttention(
            self.num_heads, qkv_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            attention_dropout=self.attention_dropout, lora=self.lora, name="attn",
        )(h, key_bias=key_bias, mask=mask, deterministic=deterministic)  # [B, N, C], [B, N, H, Dh]
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        x = x + drop_path(self, h, self.drop_path, deterministic)
        if merger is not None:
            x, size, source = merger(name="merge")(x, keys, size, source, deterministic)  # [B, N - r, C]
        h = layer_norm("ln2", self.ln_eps, self.dtype, self.param_dtype)(x)
        h = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, activation=self.activation,
                     lora=self.lora, name="mlp")(h, deterministic)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return x + drop_path(self, h, self.drop_path, deterministic), size, source


def encoder_block_kwargs(model: nn.Module, num_heads: int, mlp_dim: int, **extra) -> dict:
    """EncoderBlock attributes read from `model` (ln_eps, dtype, param_dtype, activation,
    attention_dropout, drop_path, lora), plus num_heads, mlp_dim and `extra`; shared by ViT and
    the CLIP towers."""
    return dict(
        num_heads=num_heads, mlp_dim=mlp_dim, ln_eps=model.ln_eps, dtype=model.dtype, param_dtype=model.param_dtype,
        activation=model.activation, attention_dropout=model.attention_dropout, drop_path=model.drop_path,
        lora=model.lora, **extra,
    )


def encoder_stack(
    x,
    block_kwargs: dict,
    schedule: Sequence[int],
    *,
    size=None,
    source=None,
    mask=None,
    deterministic: bool = True,
    remat: bool = False,
    remat_policy: str = "nothing_saveable",
    scan: bool = False,
    layer_kwargs: Sequence[dict] | None = None,
):
    """Runs len(schedule) EncoderBlocks inside the calling compact method (children `block{i}`,
    or one scanned `blocks` with a leading layer axis).

    Args:
      x: [B, N, C]; block_kwargs: EncoderBlock attributes other than r and name.
      schedule: r per layer (static ints).
      remat: rematerialise each block in the backward pass (saves activation memory).
      remat_policy: what a rematerialised block saves, a name in REMAT_POLICIES (checked even without remat).
      scan: `nn.scan` over layers (one compiled block, stacked parameters). Only for a schedule
        of zeros: a merge changes the token count, which a scan carry cannot.
      layer_kwargs: per layer, extra EncoderBlock attributes (e.g. the pre/post-attention hooks).

    Returns:
      (x [B, N_L, C], size, source).
    """
    policy = checkpoint_policy(remat_policy)  # raises on an unknown name, with or without remat
    # remat: (self, x, size, source, mask, deterministic), deterministic static
    block_cls = nn.remat(EncoderBlock, static_argnums=(5,), policy=policy) if remat else EncoderBlock
    if scan:
        if any(schedule) or any(layer_kwargs or ()):
            raise ValueError(
                f"scan=True needs a merge schedule of zeros (merging changes the token count per layer), got "
                f"{list(schedule)}; set scan=False to merge tokens."
            )

        def body(block, carry, mask):
            y, _, _ = block(carry, None, None, mask, deterministic)
            return y, None

        scanned = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,),
            length=len(schedule),
            metadata_params={nn.PARTITION_NAME: None},
        )
        x, _ = scanned(block_cls(**block_kwargs, r=0, name="blocks"), x, mask)
        return x, size, source
    for i, r in enumerate(schedule):
        extra = layer_kwargs[i] if layer_kwargs else {}
        x, size, source = block_cls(**block_kwargs, **extra, r=int(r), name=f"block{i}")(
            x, size, source, mask, deterministic)
    return x, size, source


def image_token_counts(image_size: int | Sequence[int] | None, patch_size: int, depth: int,
                       merge: MergeConfig) -> list[int]:
    """[N_0, N_1, ..., N_L] of a class-token image encoder: tokens entering the first block and
    leaving each block (static; the schedule after the 50% clamp)."""
    grid = image_grid(image_size, patch_size)
    if grid is None:
        raise ValueError("token_counts needs an image_size (argument or model attribute).")
    n0 = 1 + grid[0] * grid[1]
    return [n0] + schedules.token_counts(merge.schedule(depth), n0, protected=merge.protected)


def merge_info(x, size, source, trace_source: bool) -> dict:
    """{'tokens': x [B, N, C], 'size': [B, N, 1] float32 (ones if nothing merged)} and, with
    trace_source, 'source' [B, N, N0] (the identity if nothing merged)."""
    b, n = x.shape[:2]
    info = {"tokens": x, "size": jnp.ones((b, n, 1), jnp.float32) if size is None else size}
    if trace_source:
        info["source"] = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (b, n, n)) if source is None else source
    return info


class ImageEncoder(nn.Module, kw_only=True):
    """The keyword-only attributes and token counts shared by the class-token image encoders that
    merge tokens (ViT, CLIPVisionTower); a subclass has image_size, patch_size and depth.

    Attributes:
      attention_dropout, drop_path: as in EncoderBlock.
      merge: token merging (MergeConfig: schedule r, mode, prop_attn, trace_source, ...).
      lora: LoRA in every block (jdjax.nn.lora.LoRAConfig).
      remat, scan: rematerialised blocks; nn.scan over layers (only without merging).
      remat_policy: what a rematerialised block saves from its forward pass (a name in REMAT_POLICIES).
    """

    attention_dropout: float = 0.0
    drop_path: float = 0.0
    merge: MergeConfig = MergeConfig()
    lora: LoRAConfig = LoRAConfig()
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False

    def token_counts(self, image_size: int | tuple[int, int] | None = None) -> list[int]:
        """[N_0, N_1, ..., N_L]: tokens entering the first block and leaving each block (static)."""
        size = image_size if image_size is not None else self.image_size
        return image_token_counts(size, self.patch_size, self.depth, self.merge)


# ----------------------------------------------------------------------------- ViT


class ViT(ImageEncoder):
    """Image classifier: patch embedding, class token, learned positions, encoder, head on the class token.

    Google/timm layout (pre-LN, exact GELU, LN eps 1e-6, qkv bias). Hugging Face ViT is the same
    model with ln_eps=1e-12.

    Attributes:
      num_classes: classifier outputs (0 returns the final class-token feature [B, C]).
      patch_size: P; image sides must divide by it.
      width, depth, num_heads, mlp_dim: C, L, H and the MLP hidden width.
      dropout, ln_eps, dtype, param_dtype: as in EncoderBlock; dtype is the compute dtype.
      image_size: resolution the position embedding is built for (None: the input's at init).
      pos_interpolation: None (a different input grid is an error), 'bicubic' or 'bilinear'
        to resample the position embedding on the fly (see interpolate_pos_embedding).
      activation, qkv_bias: as in EncoderBlock.
      attention_dropout, drop_path, merge, lora, remat, remat_policy, scan: keyword-only, see ImageEncoder.
    """

    num_classes: int
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    image_size: int | tuple[int, int] | None = None
    pos_interpolation: str | None = None
    activation: str = "gelu"
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, images, train: bool = False, return_info: bool = False):
        """images: [B, H, W, 3] -> logits [B, num_classes] (float32).

        With return_info, returns (logits, info) with info['tokens'] [B, N_L, C] (after the final
        LayerNorm, = Hugging Face ViTModel's last_hidden_state), info['size'] [B, N_L, 1] float32
        and, with merge.trace_source, info['source'] [B, N_L, N_0].
        """
        b = images.shape[0]
        x, grid = patch_embedding(images, self.patch_size, self.width, use_bias=True, name="embedding",
                                  dtype=self.dtype, param_dtype=self.param_dtype)  # [B, N-1, C]
        cls = self.param("cls", logical(nn.initializers.zeros, (None, None, "embed")), (1, 1, self.width), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)  # [B, N, C]
        pos = grid_pos_embedding(
            self, "pos_embedding", nn.initializers.normal(0.02), (None, "pos", "embed"), grid, self.width,
            model_grid=image_grid(self.image_size, self.patch_size), interpolation=self.pos_interpolation,
            leading_one=True,
        )  # [1, N, C]
        x = nn.Dropout(self.dropout)(x + pos.astype(x.dtype), deterministic=not train)
        blocks = encoder_block_kwargs(self, self.num_heads, self.mlp_dim, dropout=self.dropout, qkv_bias=self.qkv_bias,
                                      merge=self.merge)
        x, size, source = encoder_stack(
            x, blocks, self.merge.schedule(self.depth), deterministic=not train, remat=self.remat,
            remat_policy=self.remat_policy, scan=self.scan,
        )  # [B, N_L, C]
        x = layer_norm("encoder_norm", self.ln_eps, self.dtype, self.param_dtype)(x)
        feature = x[:, 0]  # [B, C]
        if not self.num_classes:
            out = feature.astype(jnp.float32)
        else:
            out = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=logical(nn.initializers.zeros, ("embed", "classes")),
                bias_init=logical(nn.initializers.zeros, ("classes",)),
                name="head",
            )(feature).astype(jnp.float32)
        return (out, merge_info(x, size, source, self.merge.trace_source)) if return_info else out
