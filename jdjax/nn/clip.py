"""CLIP (OpenAI layout): image and text towers built from the ViT encoder block, and the joint model.

Both towers use `jdjax.nn.vit.EncoderBlock` with QuickGELU and LayerNorm eps 1e-5; the image
tower has the same token-reduction hook as the ViT (ToMe / PYRA, `merge: MergeConfig`). With
`vision_layers` as 4 stage depths (clip_config('RN50'), ...) the image tower is CLIP's ResNet
instead: `visual/` then holds the tree of `jdjax.nn.clip_resnet.ModifiedResNet`, and its BatchNorm
statistics are the 'batch_stats' collection.

Parameter tree of `CLIP` (C = vision width, D = text width, E = embed_dim, P patch,
N = 1 + (S/P)^2, T = context_length, V = vocab_size, M = 4C / 4D):

    visual/conv1/kernel [P, P, 3, C]             (no bias)
    visual/class_embedding [C]   visual/positional_embedding [N, C]   visual/ln_pre/{scale, bias} [C]
    visual/block{i}/...                          (EncoderBlock, see jdjax/nn/vit.py; mlp_dim M)
    visual/ln_post/{scale, bias} [C]             visual/proj [C, E]
    text/token_embedding/embedding [V, D]        text/positional_embedding [T, D]
    text/block{i}/...                            text/ln_final/{scale, bias} [D]   text/text_projection [D, E]
    logit_scale []                               (log of the temperature; init log(1/0.07))

OpenAI checkpoint keys map one to one: conv1.weight (C, 3, P, P) -> transpose(2, 3, 1, 0);
attn.in_proj_weight (3C, C) -> .T.reshape(C, 3, H, Dh); attn.out_proj.weight (C, C) ->
.T.reshape(H, Dh, C); mlp.c_fc / c_proj -> mlp/fc1 / fc2 (.T); ln_1 / ln_2 -> ln1 / ln2.
Hugging Face CLIPModel: q/k/v_proj are stacked into the fused qkv; pre_layrnorm -> ln_pre,
post_layernorm -> ln_post, final_layer_norm -> ln_final, visual/text_projection (.T).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jdjax.nn.attention import logical
from jdjax.nn.clip_resnet import ModifiedResNet
from jdjax.nn.lora import LoRAConfig
from jdjax.nn.vit import (
    ImageEncoder,
    MergeConfig,
    encoder_block_kwargs,
    encoder_stack,
    grid_pos_embedding,
    image_grid,
    image_token_counts,
    layer_norm,
    merge_info,
    patch_embedding,
)

Dtype = Any

# name: (embed_dim, image_size, patch, vision width, vision layers, vision heads,
#        context_length, vocab_size, text width, text layers, text heads)
# ResNets (OpenAI's build_model): no patch, 4 stage depths, width = the stem width W, heads = 32 W / 64.
CLIP_SIZES = {
    "ViT-B/32": (512, 224, 32, 768, 12, 12, 77, 49408, 512, 12, 8),
    "ViT-B/16": (512, 224, 16, 768, 12, 12, 77, 49408, 512, 12, 8),
    "ViT-L/14": (768, 224, 14, 1024, 24, 16, 77, 49408, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 14, 1024, 24, 16, 77, 49408, 768, 12, 12),
    "RN50": (1024, 224, None, 64, (3, 4, 6, 3), 32, 77, 49408, 512, 12, 8),
    "RN101": (512, 224, None, 64, (3, 4, 23, 3), 32, 77, 49408, 512, 12, 8),
    "RN50x4": (640, 288, None, 80, (4, 6, 10, 6), 40, 77, 49408, 640, 12, 10),
    "RN50x16": (768, 384, None, 96, (6, 8, 18, 8), 48, 77, 49408, 768, 12, 12),
    "RN50x64": (1024, 448, None, 128, (3, 15, 36, 10), 64, 77, 49408, 1024, 12, 16),
}


def clip_config(name: str) -> dict:
    """'ViT-B/32' (or 'B/32'), 'RN50', 'RN101', 'RN50x4', ... -> the CLIP keyword arguments of that OpenAI model."""
    key = name.strip()
    if not key.startswith(("ViT-", "RN")):
        key = "ViT-" + key
    if key not in CLIP_SIZES:
        raise ValueError(f"unknown CLIP model {name!r}; known: {sorted(CLIP_SIZES)}.")
    e, s, p, vw, vl, vh, t, v, tw, tl, th = CLIP_SIZES[key]
    return dict(
        embed_dim=e, image_size=s, patch_size=p, vision_width=vw, vision_layers=vl, vision_heads=vh,
        context_length=t, vocab_size=v, text_width=tw, text_layers=tl, text_heads=th,
    )


def _normal(std: float):
    return nn.initializers.normal(std)


class CLIPVisionTower(ImageEncoder):
    """Patches (no bias) + class embedding + positions -> ln_pre -> blocks -> ln_post(CLS) -> proj.

    Attributes: see CLIP; attention_dropout, drop_path, merge, lora, remat, remat_policy, scan are
    keyword-only (jdjax.nn.vit.ImageEncoder).
    """

    embed_dim: int = 512
    image_size: int | tuple[int, int] | None = 224
    patch_size: int = 32
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None
    ln_eps: float = 1e-5
    activation: str = "quick_gelu"
    pos_interpolation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False, return_info: bool = False):
        """images [B, H, W, 3] -> projected features [B, E] (float32, not normalised).

        With return_info: (features, info) with info['tokens'] [B, N_L, C] (encoder output before
        ln_post, = Hugging Face's vision last_hidden_state), info['size'] [B, N_L, 1] and, with
        merge.trace_source, info['source'].
        """
        x = image_tokens(self, images)  # [B, N, C]
        x, size, source = encoder_stack(
            x, encoder_block_kwargs(self, self.num_heads, self.mlp_dim or 4 * self.width, merge=self.merge),
            self.merge.schedule(self.depth), deterministic=not train, remat=self.remat,
            remat_policy=self.remat_policy, scan=self.scan,
        )  # [B, N_L, C]
        out = project_class_tokens(self, x[:, 0])  # [B, E]
        return (out, merge_info(x, size, source, self.merge.trace_source)) if return_info else out


def image_tokens(tower: CLIPVisionTower, images):
    """The tower's input tokens, inside its compact method: images [B, H, W, 3] -> conv1 patches
    (no bias), class embedding first, + positions, ln_pre -> [B, 1 + (H/P)(W/P), C]."""
    b, c = images.shape[0], tower.width
    scale = c**-0.5
    x, grid = patch_embedding(images, tower.patch_size, c, use_bias=False, name="conv1", dtype=tower.dtype,
                              param_dtype=tower.param_dtype)  # [B, N-1, C]
    cls = tower.param("class_embedding", logical(_normal(scale), ("embed",)), (c,), tower.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c)), x], axis=1)  # [B, N, C]
    pos = grid_pos_embedding(
        tower, "positional_embedding", _normal(scale), ("pos", "embed"), grid, c,
        model_grid=image_grid(tower.image_size, tower.patch_size), interpolation=tower.pos_interpolation,
        leading_one=False,
    )  # [N, C]
    x = x + pos.astype(x.dtype)[None]
    return layer_norm("ln_pre", tower.ln_eps, tower.dtype, tower.param_dtype)(x)


def project_class_tokens(tower: CLIPVisionTower, cls):
    """ln_post, then @ proj: class tokens [..., C] -> [..., E] float32 (not normalised)."""
    pooled = layer_norm("ln_post", tower.ln_eps, tower.dtype, tower.param_dtype)(cls)
    proj = tower.param("proj", logical(_normal(tower.width**-0.5), ("embed", None)), (tower.width, tower.embed_dim),
                       tower.param_dtype)
    return (pooled @ proj.astype(tower.dtype)).astype(jnp.float32)


class CLIPTextTower(nn.Module):
    """Token + positional embedding -> causal (+ padding) blocks -> ln_final -> EOT token -> projection.

    Attributes:
      eot_token_id: None pools at argmax(ids) (OpenAI, and HF when eos_token_id == 2: the EOT
        token has the largest id); an int pools at the first position holding that id (HF).
      Others: see CLIP.
    """

    embed_dim: int = 512
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int | None = None
    ln_eps: float = 1e-5
    activation: str = "quick_gelu"
    eot_token_id: int | None = None
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    lora: LoRAConfig = LoRAConfig()
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask=None, train: bool = False, return_info: bool = False, embeddings=None):
        """ids [B, T] int token ids (T <= context_length); mask [B, T] (1/True = real token) or None.

        embeddings [B, T, D] (optional) replace the token-embedding lookup (prompt learning, e.g.
        CoOp's learned context vectors in place of some tokens); `ids` still set the EOT pooling
        position, and the token table is still created at init.

        Attention is causal; with `mask`, padded keys are masked too (Hugging Face). Returns the
        projected EOT feature [B, E] (float32), or (features, info) with info['tokens'] [B, T, D]
        after ln_final (= Hugging Face's text last_hidden_state).
        """
        b, t = ids.shape
        d = self.width
        if t > self.context_length:
            raise ValueError(f"text has {t} tokens but context_length is {self.context_length}.")
        x = nn.Embed(
            self.vocab_size, d, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=logical(_normal(0.02), ("vocab", "embed")), name="token_embedding",
        )(ids)  # [B, T, D]
        if embeddings is not None:
            if embeddings.shape != x.shape:
                raise ValueError(f"embeddings have shape {embeddings.shape}; the ids {ids.shape} need {x.shape}.")
            x = embeddings.astype(x.dtype)
        pos = self.param("positional_embedding", logical(_normal(0.01), ("pos", "embed")),
                         (self.context_length, d), self.param_dtype)
        x = x + pos[:t].astype(x.dtype)[None]
        attn_mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, T, T]
        if mask is not None:
            attn_mask = attn_mask & mask.astype(bool)[:, None, None, :]  # [B, 1, T, T]
        x, _, _ = encoder_stack(
            x, encoder_block_kwargs(self, self.num_heads, self.mlp_dim or 4 * d), [0] * self.depth,
            mask=attn_mask, deterministic=not train, remat=self.remat, remat_policy=self.remat_policy, scan=self.scan,
        )  # [B, T, D]
        x = layer_norm("ln_final", self.ln_eps, self.dtype, self.param_dtype)(x)
        if self.eot_token_id is None:
            eot = jnp.argmax(ids, axis=-1)  # [B]
        else:
            eot = jnp.argmax(ids == self.eot_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]  # [B, D]
        proj = self.param("text_projection", logical(_normal(d**-0.5), ("embed", None)), (d, self.embed_dim),
                          self.param_dtype)
        out = (pooled @ proj.astype(self.dtype)).astype(jnp.float32)  # [B, E]
        return (out, {"tokens": x}) if return_info else out


def l2_normalize(x, eps: float = 1e-12):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def resnet_tower(*, embed_dim: int, image_size, width: int, depth, num_heads: int, pos_interpolation=None,
                 remat: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, merge: MergeConfig = MergeConfig(),
                 lora: LoRAConfig = LoRAConfig(), attention_dropout: float = 0.0, drop_path: float = 0.0,
                 scan: bool = False, remat_policy: str = "nothing_saveable", patch_size=None, mlp_dim=None,
                 ln_eps=None, activation=None) -> ModifiedResNet:
    """CLIP's image-tower keyword arguments -> ModifiedResNet(layers=depth, width, heads=num_heads,
    output_dim=embed_dim, ...). patch_size, mlp_dim, ln_eps and activation have no meaning in a ResNet
    and are ignored; the ViT-only options (merge, lora, attention_dropout, drop_path, scan, remat_policy: the
    ResNet's remat recomputes whole Bottlenecks) must be off."""
    used = {name: value for name, value, off in (("merge", merge, MergeConfig()), ("lora", lora, LoRAConfig()),
                                                 ("attention_dropout", attention_dropout, 0.0),
                                                 ("drop_path", drop_path, 0.0), ("scan", scan, False),
                                                 ("remat_policy", remat_policy, "nothing_saveable"))
            if value != off}
    if used:
        raise ValueError(f"the ResNet image tower (vision_layers={tuple(depth)}) has no transformer blocks, so "
                         f"{sorted(used)} cannot apply; leave them at their defaults.")
    return ModifiedResNet(layers=tuple(depth), output_dim=embed_dim, heads=num_heads, image_size=image_size,
                          width=width, pos_interpolation=pos_interpolation, remat=remat, dtype=dtype,
                          param_dtype=param_dtype)


class CLIP(nn.Module):
    """Image and text towers and the learned temperature.

    Attributes:
      embed_dim: E, the joint embedding width.
      image_size, patch_size, vision_width, vision_layers, vision_heads, vision_mlp_dim: image tower
        (mlp_dim None = 4 x width). vision_layers as 4 stage depths, e.g. (3, 4, 6, 3), makes it CLIP's
        ResNet (jdjax.nn.clip_resnet.ModifiedResNet, as OpenAI's build_model): vision_width is the stem
        width W, vision_heads the attention-pool heads (32 W / 64), patch_size is unused (None);
        BatchNorm statistics live in 'batch_stats' (mutable with train=True).
      context_length, vocab_size, text_width, text_layers, text_heads, text_mlp_dim: text tower.
      ln_eps, activation: 1e-5 and 'quick_gelu' for OpenAI CLIP (HF: layer_norm_eps, hidden_act).
      eot_token_id: text pooling position; None = argmax(ids) (see CLIPTextTower).
      pos_interpolation: resample the image position embedding for another resolution.
      merge: the image tower's token merging (MergeConfig; the text tower never merges).
      lora: LoRA in both towers (LoRAConfig; text_lora=False: image tower only).
      remat, remat_policy, scan, dtype, param_dtype: as in ViT (remat_policy: the transformer towers only).
    """

    embed_dim: int = 512
    image_size: int | tuple[int, int] | None = 224
    patch_size: int | None = 32
    vision_width: int = 768
    vision_layers: int | tuple[int, int, int, int] = 12
    vision_heads: int = 12
    vision_mlp_dim: int | None = None
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int | None = None
    ln_eps: float = 1e-5
    activation: str = "quick_gelu"
    eot_token_id: int | None = None
    pos_interpolation: str | None = None
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    merge: MergeConfig = MergeConfig()
    lora: LoRAConfig = LoRAConfig()
    text_lora: bool = True
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.visual, self.text = self.towers()
        self.logit_scale = self.param(
            "logit_scale", logical(nn.initializers.constant(math.log(1 / 0.07)), ()), (), self.param_dtype
        )

    @nn.nowrap
    def towers(self) -> tuple[nn.Module, CLIPTextTower]:
        """(image tower, text tower) as this CLIP builds them, unbound: a model that reuses CLIP's towers
        (e.g. SCPNet) holds them as fields named 'visual' and 'text', so CLIP checkpoints load into it."""
        common = dict(embed_dim=self.embed_dim, ln_eps=self.ln_eps, activation=self.activation,
                      attention_dropout=self.attention_dropout, drop_path=self.drop_path, remat=self.remat,
                      remat_policy=self.remat_policy, scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype)
        visual = self.vision_tower(
            image_size=self.image_size, patch_size=self.patch_size, width=self.vision_width, depth=self.vision_layers,
            num_heads=self.vision_heads, mlp_dim=self.vision_mlp_dim, pos_interpolation=self.pos_interpolation,
            merge=self.merge, lora=self.lora, **common,
        )
        text = CLIPTextTower(
            context_length=self.context_length, vocab_size=self.vocab_size, width=self.text_width,
            depth=self.text_layers, num_heads=self.text_heads, mlp_dim=self.text_mlp_dim,
            eot_token_id=self.eot_token_id, lora=self.lora if self.text_lora else LoRAConfig(), **common,
        )
        return visual, text

    @nn.nowrap
    def vision_tower(self, **kwargs) -> nn.Module:
        """The image tower built in setup: CLIPVisionTower, or `resnet_tower` when `depth` (vision_layers)
        gives 4 stage depths; a subclass may return another (e.g. a video tower)."""
        if isinstance(kwargs["depth"], (tuple, list)):
            return resnet_tower(**kwargs)
        return CLIPVisionTower(**kwargs)

    def token_counts(self, image_size=None) -> list[int]:
        """Image tower tokens [N_0, ..., N_L] (static, from the schedule); ViT towers only."""
        if isinstance(self.vision_layers, (tuple, list)):
            raise ValueError("token_counts: the ResNet image tower (vision_layers "
                             f"{tuple(self.vision_layers)}) has no token sequence; only ViT towers have one.")
        size = image_size if image_size is not None else self.image_size
        return image_token_counts(size, self.patch_size, self.vision_layers, self.merge)

    def encode_image(self, images, train: bool = False, return_info: bool = False):
        """[B, H, W, 3] -> [B, E] (not normalised); see CLIPVisionTower / ModifiedResNet."""
        return self.visual(images, train=train, return_info=return_info)

    def encode_text(self, ids, mask=None, train: bool = False, return_info: bool = False):
        """[B, T] ids (+ [B, T] padding mask) -> [B, E] (not normalised); see CLIPTextTower."""
        return self.text(ids, mask, train=train, return_info=return_info)

    def __call__(self, images, ids, mask=None, train: bool = False):
        """Returns {'image_embeds' [B_i, E], 'text_embeds' [B_t, E] (projected, not normalised),
        'logit_scale' [] (the log temperature), 'logits_per_image' [B_i, B_t] =
        exp(logit_scale) * cos(image, text)} (float32)."""
        image = self.encode_image(images, train=train)
        text = self.encode_text(ids, mask, train=train)
        logits = jnp.exp(self.logit_scale.astype(jnp.float32)) * l2_normalize(image) @ l2_normalize(text).T
        return {"image_embeds": image, "text_embeds": text, "logit_scale": self.logit_scale, "logits_per_image": logits}
