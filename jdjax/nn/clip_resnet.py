"""CLIP's modified ResNet image tower (OpenAI RN50 / RN101 / RN50x4 / RN50x16 / RN50x64).

Three changes to a torchvision ResNet (Radford et al. 2021, OpenAI's and open_clip's `ModifiedResNet`):

- the stem is three 3x3 convolutions (stride 2, 1, 1; widths W/2, W/2, W), each + BatchNorm + ReLU,
  then a 2x2 average pool instead of the max pool (total stride 4);
- anti-aliased strided blocks: every convolution has stride 1; a Bottleneck with stride s > 1
  average-pools s x s after its 3x3 convolution, and its shortcut is avgpool(s) -> 1x1 conv -> BN;
- the global average pool is an attention pool: the feature map [B, h, w, C] (C = 32 W) becomes
  h*w tokens, their mean is prepended, a learned position embedding [1 + h*w, C] is added, and one
  multi-head attention layer (q from the mean token only, k / v from all tokens) followed by the
  output projection c_proj gives the image feature [B, E]:

      x_0 = mean_n x_n,   q = W_q x_0 + b_q,   k_n = W_k x_n + b_k,   v_n = W_v x_n + b_v   (n = 0..hw)
      out = W_c concat_heads(sum_n softmax_n(q . k_n / sqrt(Dh)) v_n) + b_c

Stages n = 1..4 have planes P_n = W 2^(n-1) and output 4 P_n channels; stage 1 has stride 1, stages
2-4 stride 2, so the final grid is S/32. BatchNorm: eps 1e-5, PyTorch momentum 0.1 (Flax 0.9),
running statistics in the 'batch_stats' collection, batch statistics with `train=True` (the
collection must then be mutable). One difference from PyTorch in training: Flax updates the
running variance with the biased batch variance, PyTorch with the unbiased one (a factor
n / (n - 1), n = examples x pixels: 1.003 for 8 RN50 images in the last stage).

Parameter tree (W width, P_n planes, C = 32 W, H heads, Dh = C / H, E output_dim, G = image_size / 32):

    conv1/kernel [3, 3, 3, W/2]  conv2/kernel [3, 3, W/2, W/2]  conv3/kernel [3, 3, W/2, W]   (no biases)
    bn1, bn2, bn3: {scale, bias} params, {mean, var} batch_stats
    layer{n}_{i}/conv1/kernel [1, 1, C_in, P_n]  conv2/kernel [3, 3, P_n, P_n]  conv3/kernel [1, 1, P_n, 4 P_n]
    layer{n}_{i}/bn1, bn2, bn3;  block 0 of every stage: downsample_conv/kernel [1, 1, C_in, 4 P_n], downsample_bn
    attnpool/positional_embedding [1 + G^2, C]
    attnpool/{q,k,v}_proj/{kernel [C, H, Dh], bias [H, Dh]}   attnpool/c_proj/{kernel [H, Dh, E], bias [E]}

OpenAI / open_clip state dicts map one to one (jdjax.nn.convert): conv weights OIHW -> HWIO,
BatchNorm weight / bias / running_mean / running_var -> scale / bias / mean / var, q/k/v_proj.weight
[C, C] -> .T.reshape(C, H, Dh), c_proj.weight [E, C] -> .T.reshape(H, Dh, E).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.attention import logical
from jdjax.nn.vit import grid_pos_embedding, image_grid

Dtype = Any

EXPANSION = 4  # Bottleneck output channels = 4 x planes
DOWNSAMPLE = 32  # total stride of the tower: image_size / 32 = the attention-pool grid


def _conv(features: int, size: int, name: str, dtype, param_dtype, stride: int = 1) -> nn.Conv:
    """A bias-free convolution with PyTorch's symmetric padding (size // 2 on every side)."""
    pad = size // 2
    return nn.Conv(features, (size, size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=logical(nn.initializers.he_normal(), (None, None, None, "embed")), name=name)


def _batch_norm(name: str, train, dtype, param_dtype, zero_scale: bool = False):
    """BatchNorm over [B, H, W, C] (eps 1e-5, PyTorch momentum 0.1) as a function x -> y; zero_scale: the
    scale starts at 0 (the last BatchNorm of every residual branch, as OpenAI's initialisation).

    `train` is a Python bool, or a traced bool scalar (a mode switched inside one compiled step, e.g.
    SCPNet's BatchNorm in eval mode through epoch 0): then both normalisations are computed and the one
    `train` picks is used, and the running statistics are updated either way (the caller keeps the
    update only when `train` is true). XLA:CPU ran the same switch as a lax.cond of the whole network
    about 10x slower than this select."""
    bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=logical(nn.initializers.zeros if zero_scale else nn.initializers.ones, ("norm",)),
                      bias_init=logical(nn.initializers.zeros, ("norm",)))
    if isinstance(train, bool):
        return lambda x: bn(x, use_running_average=not train)

    def switched(x):
        running = bn(x, use_running_average=True)  # first: the batch call below updates the running statistics
        return jnp.where(train, bn(x, use_running_average=False), running)

    return switched


def _avg_pool(x, size: int):
    """[B, H, W, C] -> [B, H // size, W // size, C]: non-overlapping size x size means (PyTorch AvgPool2d(size))."""
    return nn.avg_pool(x, (size, size), strides=(size, size), padding="VALID") if size > 1 else x


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> avgpool(stride) -> 1x1 (x4) convolutions with BatchNorm, + the shortcut, ReLU.

    Attributes:
      planes: P; the block outputs 4 P channels.
      stride: the average-pool size of the branch and of the shortcut (1 = none).
    """

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x [B, H, W, C_in] -> [B, H / stride, W / stride, 4 P]."""
        p, s, kw = self.planes, self.stride, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = nn.relu(_batch_norm("bn1", train, **kw)(_conv(p, 1, "conv1", **kw)(x)))  # [B, H, W, P]
        out = nn.relu(_batch_norm("bn2", train, **kw)(_conv(p, 3, "conv2", **kw)(out)))
        out = _avg_pool(out, s)  # [B, H/s, W/s, P]
        out = _batch_norm("bn3", train, zero_scale=True, **kw)(_conv(EXPANSION * p, 1, "conv3", **kw)(out))
        if s > 1 or x.shape[-1] != EXPANSION * p:
            x = _conv(EXPANSION * p, 1, "downsample_conv", **kw)(_avg_pool(x, s))
            x = _batch_norm("downsample_bn", train, **kw)(x)  # [B, H/s, W/s, 4P]
        return nn.relu(out + x)


class AttentionPool2d(nn.Module):
    """The mean token attends over itself and the h*w feature tokens (see the module docstring).

    Attributes:
      num_heads: H; the input width C must divide by it.
      output_dim: E (None = C).
      image_size: the resolution the position embedding is for (grid image_size / 32); None = the
        grid of the first input.
      pos_interpolation: resample the position embedding for another grid ('bicubic', ...; None = error).
    """

    num_heads: int
    output_dim: int | None = None
    image_size: int | tuple[int, int] | None = 224
    pos_interpolation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x [B, h, w, C] -> [B, E] float32."""
        b, h, w, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"attention pool width {c} is not divisible by num_heads={self.num_heads}.")
        heads, dh = self.num_heads, c // self.num_heads
        tokens = einops.rearrange(x, "b h w c -> b (h w) c")
        tokens = jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)  # [B, 1 + hw, C]
        pos = grid_pos_embedding(self, "positional_embedding", nn.initializers.normal(c**-0.5), ("pos", "embed"),
                                 (h, w), c, model_grid=image_grid(self.image_size, DOWNSAMPLE),
                                 interpolation=self.pos_interpolation, leading_one=False)  # [1 + hw, C]
        tokens = tokens + pos.astype(tokens.dtype)[None]

        def proj(name):
            return nn.DenseGeneral((heads, dh), dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                                   kernel_init=logical(nn.initializers.normal(c**-0.5), ("embed", "heads", "kv")),
                                   bias_init=logical(nn.initializers.zeros, ("heads", "kv")))

        q = proj("q_proj")(tokens[:, 0])  # [B, H, Dh]
        k, v = proj("k_proj")(tokens), proj("v_proj")(tokens)  # [B, 1 + hw, H, Dh]
        logits = jnp.einsum("bhd,bnhd->bhn", q, k).astype(jnp.float32) * dh**-0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [B, H, 1 + hw]
        out = jnp.einsum("bhn,bnhd->bhd", weights, v)  # [B, H, Dh]
        out = nn.DenseGeneral(self.output_dim or c, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=logical(nn.initializers.normal(c**-0.5), ("heads", "kv", None)),
                              bias_init=logical(nn.initializers.zeros, (None,)), name="c_proj")(out)
        return out.astype(jnp.float32)  # [B, E]


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: stem, four Bottleneck stages, attention pool (module docstring).

    Attributes:
      layers: Bottlenecks per stage, e.g. (3, 4, 6, 3) for RN50, (3, 4, 23, 3) for RN101.
      output_dim: E, the joint embedding width (1024 for RN50).
      heads: attention-pool heads (OpenAI: 32 W / 64).
      image_size: the training resolution (a multiple of 32); the position embedding has
        1 + (image_size / 32)^2 rows.
      width: W, the stem width (64 for RN50); the feature width is 32 W.
      pos_interpolation: resample the position embedding for other resolutions (None = error).
      remat: rematerialise every Bottleneck in the backward pass (less memory, more compute).
    """

    layers: Sequence[int] = (3, 4, 6, 3)
    output_dim: int = 1024
    heads: int = 32
    image_size: int | tuple[int, int] | None = 224
    width: int = 64
    pos_interpolation: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False, return_info: bool = False):
        """images [B, S, S, 3] (S / 32 = the attention-pool grid) -> features [B, E] (float32, not normalised).

        train: BatchNorm on batch statistics, updating the running ones ('batch_stats' must be mutable);
        False uses the running statistics; a traced bool scalar switches inside one compiled step (see
        `_batch_norm`). With return_info: (features, info) with info['tokens']
        [B, (S/32)^2, 32 W], the last stage's feature map, which the attention pool reads.
        """
        if len(self.layers) != 4:
            raise ValueError(f"ModifiedResNet.layers must give 4 stages, e.g. (3, 4, 6, 3); got {self.layers!r}.")
        w, kw = self.width, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = images.astype(self.dtype)
        for i, (features, stride) in enumerate(((w // 2, 2), (w // 2, 1), (w, 1)), start=1):
            x = _conv(features, 3, f"conv{i}", stride=stride, **kw)(x)
            x = nn.relu(_batch_norm(f"bn{i}", train, **kw)(x))
        x = _avg_pool(x, 2)  # [B, S/4, S/4, W]
        block = nn.remat(Bottleneck, static_argnums=(2,) if isinstance(train, bool) else ()) if self.remat else Bottleneck
        for n, depth in enumerate(self.layers, start=1):
            for i in range(depth):
                stride = 2 if n > 1 and i == 0 else 1
                x = block(w * 2 ** (n - 1), stride, name=f"layer{n}_{i}", **kw)(x, train)
        # x: [B, S/32, S/32, 32 W]
        out = AttentionPool2d(self.heads, self.output_dim, self.image_size, self.pos_interpolation, name="attnpool",
                              **kw)(x)
        return (out, {"tokens": einops.rearrange(x, "b h w c -> b (h w) c")}) if return_info else out
