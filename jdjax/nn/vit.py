"""Vision Transformer in the Google/timm layout: pre-LN blocks, exact GELU, LN eps 1e-6, class token."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jdjax.nn.attention import MultiHeadAttention, logical

Dtype = Any

# name: (width, depth, heads, mlp_dim)
VIT_SIZES = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}


def layer_norm(name: str, eps: float, dtype, param_dtype):
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nn.initializers.ones, ("norm",)),
        bias_init=logical(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> GELU (exact) -> Dense(C)."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):  # [B, N, C] -> [B, N, C]
        c = x.shape[-1]
        dense = lambda features, axes, name: nn.Dense(  # noqa: E731
            features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), axes),
            bias_init=logical(nn.initializers.normal(1e-6), axes[1:]),
            name=name,
        )
        h = nn.gelu(dense(self.mlp_dim, ("embed", "mlp"), "fc1")(x), approximate=False)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return dense(c, ("mlp", "embed"), "fc2")(h)


class EncoderBlock(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):  # [B, N, C] -> [B, N, C]
        h = layer_norm("ln1", self.ln_eps, self.dtype, self.param_dtype)(x)
        h, _ = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(h)
        x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = layer_norm("ln2", self.ln_eps, self.dtype, self.param_dtype)(x)
        h = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, name="mlp")(h, deterministic)
        return x + nn.Dropout(self.dropout)(h, deterministic=deterministic)


class ViT(nn.Module):
    """Image classifier: patch embedding, class token, learned positions, encoder, head on the class token.

    Attributes:
      num_classes: classifier outputs (0 returns the final class-token feature [B, C]).
      patch_size: P; image sides must divide by it.
      width, depth, num_heads, mlp_dim: C, L, H and the MLP hidden width.
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

    @nn.compact
    def __call__(self, images, train: bool = False):
        """images: [B, H, W, 3] -> logits [B, num_classes] (float32)."""
        p = self.patch_size
        b, height, width_px, _ = images.shape
        if height % p or width_px % p:
            raise ValueError(f"image size {height}x{width_px} is not divisible by patch_size={p}.")
        x = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="embedding",
        )(images.astype(self.dtype))  # [B, H/P, W/P, C]
        x = x.reshape(b, -1, self.width)  # [B, N-1, C]
        cls = self.param("cls", logical(nn.initializers.zeros, (None, None, "embed")), (1, 1, self.width), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)  # [B, N, C]
        pos = self.param(
            "pos_embedding",
            logical(nn.initializers.normal(0.02), (None, "pos", "embed")),
            (1, x.shape[1], self.width),
            self.param_dtype,
        )
        x = nn.Dropout(self.dropout)(x + pos.astype(x.dtype), deterministic=not train)
        for i in range(self.depth):
            x = EncoderBlock(
                self.num_heads, self.mlp_dim, self.dropout, self.ln_eps, self.dtype, self.param_dtype, name=f"block{i}"
            )(x, deterministic=not train)
        x = layer_norm("encoder_norm", self.ln_eps, self.dtype, self.param_dtype)(x)
        feature = x[:, 0]  # [B, C]
        if not self.num_classes:
            return feature.astype(jnp.float32)
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.zeros, ("embed", "classes")),
            bias_init=logical(nn.initializers.zeros, ("classes",)),
            name="head",
        )(feature)
        return logits.astype(jnp.float32)
