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
    block{i}/attn/qkv_lora/{a [C, rank], b [rank, 3, H, Dh]}     (lora_rank > 0)
    block{i}/ln2/{scale, bias} [C]     block{i}/mlp/fc1/{kernel [C, M], bias [M]}   mlp/fc2/{kernel [M, C], bias [C]}
    block{i}/merge/{pyra_w_r [r_i, 1], pyra_w_d [C], pyra_norm_scale [C], pyra_norm_bias [C]}  (merge_mode='pyra', r_i > 0)
    encoder_norm/{scale, bias} [C]     head/{kernel [C, K], bias [K]}

With `scan=True` the blocks are one module `blocks` whose parameters have a leading [L] axis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdjax.merging import pyra, schedules, tome
from jdjax.nn.attention import MultiHeadAttention, logical
from jdjax.nn.lora import LoRA, check_lora_targets

Dtype = Any

# name: (width, depth, heads, mlp_dim)
VIT_SIZES = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # exact (erf) GELU: Google ViT, timm, HF ViT
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "relu": nn.relu,
}

MERGE_MODES = ("tome", "pyra")


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


def merge_schedule(merge_r: int | Sequence[int], depth: int) -> list[int]:
    """One r per layer: an int gives the same r everywhere; a list is zero-padded to `depth`.

    For ToMe's decreasing schedule pass `schedules.parse_r((r, inflect), depth)`.
    """
    if isinstance(merge_r, Sequence) and not isinstance(merge_r, str):
        return schedules.parse_r(list(merge_r), depth)
    return schedules.parse_r(merge_r, depth)


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
    prefix, grid = table[:num_prefix_tokens], table[num_prefix_tokens:].reshape(*old_grid, -1)  # [h, w, C]
    wh = jnp.asarray(resize_matrix(old_grid[0], new_grid[0], method, cubic_a), jnp.float32)  # [h', h]
    ww = jnp.asarray(resize_matrix(old_grid[1], new_grid[1], method, cubic_a), jnp.float32)  # [w', w]
    hi = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("Hh,Ww,hwc->HWc", wh, ww, grid.astype(jnp.float32), precision=hi)  # [h', w', C]
    out = jnp.concatenate([prefix.astype(jnp.float32), grid.reshape(-1, grid.shape[-1])], axis=0).astype(pos.dtype)
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
    b, height, width_px, _ = images.shape
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
    return x.reshape(b, -1, width), (height // p, width_px // p)


# ----------------------------------------------------------------------------- blocks


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> activation -> Dropout -> Dense(C), optional LoRA on fc1 / fc2."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "gelu"
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: Sequence[str] = ("qkv",)

    @nn.compact
    def __call__(self, x, deterministic: bool = True):  # [B, N, C] -> [B, N, C]
        c = x.shape[-1]
        targets = check_lora_targets(self.lora_targets) if self.lora_rank else ()

        def dense(h, features, axes, name):
            y = nn.Dense(
                features,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=logical(nn.initializers.xavier_uniform(), axes),
                bias_init=logical(nn.initializers.normal(1e-6), axes[1:]),
                name=name,
            )(h)
            if name in targets:
                y = y + LoRA(
                    (features,), self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                    in_names=axes[:1], out_names=axes[1:], dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"{name}_lora",
                )(h, deterministic)
            return y

        h = activation_fn(self.activation)(dense(x, self.mlp_dim, ("embed", "mlp"), "fc1"))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return dense(h, c, ("mlp", "embed"), "fc2")


class TokenMerger(nn.Module):
    """The token-reduction hook: ToMe bipartite matching + size-weighted merge of r tokens.

    mode 'tome': `tome.merge_wavg`. mode 'pyra': `pyra.pyra_merge_wavg` with this layer's
    parameters pyra_w_r [r, 1] ~ U(-1, 1), pyra_w_d [C] = 0, pyra_norm_scale [C] = 1,
    pyra_norm_bias [C] = 0 (LayerNorm eps `pyra_ln_eps`); at init it equals ToMe.
    r is the static request; the 50% clamp gives the r actually merged (PYRA's W_r has that
    many rows, so a PYRA schedule should not hit the clamp).

    Replace it by passing another module class with the same attributes and call signature
    as the `merger` attribute of EncoderBlock / ViT / CLIP.
    """

    r: int
    mode: str = "tome"
    class_token: bool = True
    distill_token: bool = False
    trace_source: bool = False
    pyra_ln_eps: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, keys, size=None, source=None, deterministic: bool = True):
        """x [B, N, C], keys [B, N, H, Dh], size [B, N, 1] or None, source [B, N, N0] or None
        -> (x [B, N - r, C], size [B, N - r, 1] float32, source [B, N - r, N0] or None)."""
        if self.mode not in MERGE_MODES:
            raise ValueError(f"merge_mode must be one of {MERGE_MODES}, got {self.mode!r}.")
        metric = keys.astype(jnp.float32).mean(axis=2)  # [B, N, Dh]
        matching = tome.bipartite_soft_matching(
            metric, self.r, class_token=self.class_token, distill_token=self.distill_token
        )
        if matching.r == 0:
            return x, size, source
        if self.mode == "tome":
            merged, size_out = tome.merge_wavg(x, size, matching)
        else:
            c = x.shape[-1]
            uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0).astype(dtype)  # noqa: E731
            w_r = self.param("pyra_w_r", logical(uniform, (None, None)), (matching.r, 1), self.param_dtype)
            w_d = self.param("pyra_w_d", logical(nn.initializers.zeros, ("embed",)), (c,), self.param_dtype)
            scale = self.param("pyra_norm_scale", logical(nn.initializers.ones, ("norm",)), (c,), self.param_dtype)
            bias = self.param("pyra_norm_bias", logical(nn.initializers.zeros, ("norm",)), (c,), self.param_dtype)
            merged, size_out = pyra.pyra_merge_wavg(x, size, matching, w_r, w_d, scale, bias, eps=self.pyra_ln_eps)
        if self.trace_source:
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
      merge_mode: 'tome' or 'pyra'; merger: the hook's module class (default TokenMerger).
      prop_attn: add log(size) to the attention logits once sizes exist.
      class_token / distill_token: protected tokens at index 0 / 1.
      trace_source: carry the [B, N, N0] source map through merges.
      lora_*: LoRA rank (0 = off), alpha (None = no scaling), input dropout, and targets
        among 'qkv', 'out', 'fc1', 'fc2'.
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
    merge_mode: str = "tome"
    merger: Any = None
    prop_attn: bool = True
    class_token: bool = True
    distill_token: bool = False
    trace_source: bool = False
    pyra_ln_eps: float = 1e-5
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: Sequence[str] = ("qkv",)

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
        if self.r and mask is not None:
            raise ValueError("token merging (r > 0) cannot be combined with an attention mask.")
        lora = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                    lora_targets=tuple(self.lora_targets))
        key_bias = tome.proportional_attention_bias(size) if (self.prop_attn and size is not None) else None
        h = layer_norm("ln1", self.ln_eps, self.dtype, self.param_dtype)(x)
        h, keys = MultiHeadAttention(
            self.num_heads, qkv_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            attention_dropout=self.attention_dropout, name="attn", **lora,
        )(h, key_bias=key_bias, mask=mask, deterministic=deterministic)  # [B, N, C], [B, N, H, Dh]
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        x = x + drop_path(self, h, self.drop_path, deterministic)
        if self.r > 0:
            merger = self.merger or TokenMerger
            x, size, source = merger(
                self.r, mode=self.merge_mode, class_token=self.class_token, distill_token=self.distill_token,
                trace_source=self.trace_source, pyra_ln_eps=self.pyra_ln_eps, param_dtype=self.param_dtype,
                name="merge",
            )(x, keys, size, source, deterministic)  # [B, N - r, C]
        h = layer_norm("ln2", self.ln_eps, self.dtype, self.param_dtype)(x)
        h = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, activation=self.activation,
                     name="mlp", **lora)(h, deterministic)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return x + drop_path(self, h, self.drop_path, deterministic), size, source


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
    scan: bool = False,
):
    """Runs len(schedule) EncoderBlocks inside the calling compact method (children `block{i}`,
    or one scanned `blocks` with a leading layer axis).

    Args:
      x: [B, N, C]; block_kwargs: EncoderBlock attributes other than r and name.
      schedule: r per layer (static ints).
      remat: rematerialise each block in the backward pass (saves activation memory).
      scan: `nn.scan` over layers (one compiled block, stacked parameters). Only for a schedule
        of zeros: a merge changes the token count, which a scan carry cannot.

    Returns:
      (x [B, N_L, C], size, source).
    """
    block_cls = nn.remat(EncoderBlock, static_argnums=(5,)) if remat else EncoderBlock  # (self, x, size, source, mask, det)
    if scan:
        if any(schedule):
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
        x, size, source = block_cls(**block_kwargs, r=int(r), name=f"block{i}")(x, size, source, mask, deterministic)
    return x, size, source


def final_sizes(x, size):
    """size, or ones [B, N, 1] float32 if no merge happened."""
    return jnp.ones(x.shape[:2] + (1,), jnp.float32) if size is None else size


# ----------------------------------------------------------------------------- ViT


class ViT(nn.Module):
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
      merge_r: tokens merged per layer: an int (every layer) or a list of ints (zero-padded).
      merge_mode, merger, prop_attn, trace_source, pyra_ln_eps: the token-reduction hook.
      lora_rank, lora_alpha, lora_dropout, lora_targets: LoRA (see jdjax.nn.lora).
      remat, scan: rematerialised blocks; nn.scan over layers (only without merging).
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
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    merge_r: int | Sequence[int] = 0
    merge_mode: str = "tome"
    merger: Any = None
    prop_attn: bool = True
    trace_source: bool = False
    pyra_ln_eps: float = 1e-5
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: Sequence[str] = ("qkv",)
    remat: bool = False
    scan: bool = False

    def schedule(self) -> list[int]:
        """The requested r per layer (before the 50% clamp)."""
        return merge_schedule(self.merge_r, self.depth)

    def token_counts(self, image_size: int | tuple[int, int] | None = None) -> list[int]:
        """[N_0, N_1, ..., N_L]: tokens entering the first block and leaving each block (static)."""
        grid = image_grid(image_size if image_size is not None else self.image_size, self.patch_size)
        if grid is None:
            raise ValueError("token_counts needs an image_size (argument or model attribute).")
        n0 = 1 + grid[0] * grid[1]
        return [n0] + schedules.token_counts(self.schedule(), n0, protected=1)

    def block_kwargs(self) -> dict:
        return dict(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout, ln_eps=self.ln_eps,
            dtype=self.dtype, param_dtype=self.param_dtype, activation=self.activation, qkv_bias=self.qkv_bias,
            attention_dropout=self.attention_dropout, drop_path=self.drop_path, merge_mode=self.merge_mode,
            merger=self.merger, prop_attn=self.prop_attn, class_token=True, trace_source=self.trace_source,
            pyra_ln_eps=self.pyra_ln_eps, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout, lora_targets=tuple(self.lora_targets),
        )

    @nn.compact
    def __call__(self, images, train: bool = False, return_info: bool = False):
        """images: [B, H, W, 3] -> logits [B, num_classes] (float32).

        With return_info, returns (logits, info) with info['tokens'] [B, N_L, C] (after the final
        LayerNorm, = Hugging Face ViTModel's last_hidden_state), info['size'] [B, N_L, 1] float32
        and, with trace_source, info['source'] [B, N_L, N_0].
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
        x, size, source = encoder_stack(
            x, self.block_kwargs(), self.schedule(), deterministic=not train, remat=self.remat, scan=self.scan
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
        if not return_info:
            return out
        info = {"tokens": x, "size": final_sizes(x, size)}
        if self.trace_source:
            info["source"] = source if source is not None else jnp.broadcast_to(
                jnp.eye(x.shape[1], dtype=jnp.float32), (b, x.shape[1], x.shape[1]))
        return out, info
