"""TempMe's CLIP video tower and the text-video CLIP around it (spec `vision_token_merging.md` §2).

A video [B, T, H, W, 3] runs as B*T frame sequences through OpenAI CLIP's image tower whose
blocks carry TempMe's hooks (`jdjax.nn.vit.EncoderBlock` pre/post-attention), following the
static plan of `jdjax.merging.tempme.plan_layers`:

  ImgMe layer      x + Attn(LN1 x) -> merge imgme_r tokens per frame (keys metric) -> x + MLP(LN2 x)
  ClipMe layer     group f clips -> cross-clip merge of M0 tokens (metric: the residual stream,
                   detached; then the layer's clip position embedding is added if M0 > 0)
                   -> x + Attn(LN1 x, log size) -> intra-clip merge of M1 (keys) -> x + MLP(LN2 x)
  later layers     x + Attn -> intra-clip merge (keys) -> x + MLP

Proportional attention (log size on the key axis) once tokens have been merged. The video
feature is built from the T per-frame class tokens that stay at the front of the final
sequence: ln_post, @ proj, L2-normalise per frame, masked mean over frames, L2-normalise.
With no merging (TemporalConfig()) the tower is CLIP4Clip's mean pooling of per-frame CLIP
features, the dense baseline; imgme_r alone is the "ImgMe only" baseline.

Parameters: those of `jdjax.nn.clip.CLIP` (OpenAI layout, so converted CLIP checkpoints load)
plus one `visual/block{l}/pre_merge/clip_pos_embedding` [clips entering layer l, C] per ClipMe
layer, zero-initialised (the released `TVPt_Video_Positional_embedding`, (1, F, 1, C)).
"""

from __future__ import annotations

import functools

import einops
import flax.linen as nn
import jax.numpy as jnp

from jdjax.merging import tempme
from jdjax.merging.tempme import LayerPlan, TemporalConfig
from jdjax.nn.attention import logical
from jdjax.nn.clip import CLIP, CLIPVisionTower, image_tokens, l2_normalize, project_class_tokens
from jdjax.nn.vit import encoder_block_kwargs, encoder_stack


class ClipMerger(nn.Module):
    """Pre-attention hook of a ClipMe layer: group clips, cross-clip merge, clip positions.

    Attributes:
      plan: the layer's LayerPlan (group f, cross_r M0, num_cls after grouping, clips after).
      param_dtype: of the clip position embedding.
    """

    plan: LayerPlan
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size, source, deterministic: bool = True):
        """x [B F, N, C], size [B F, N, 1] or None -> ([B F/f, f N - M0, C], size, source)."""
        p = self.plan
        clips_before, cls_before = p.clips * p.group, p.num_cls // p.group
        pos = self.param("clip_pos_embedding", logical(nn.initializers.zeros, (None, "embed")),
                         (clips_before, x.shape[-1]), self.param_dtype)  # [F, C]
        metric = tempme.group_clips(x, p.group, cls_before)  # [B F/f, f N, C]
        if size is not None:
            size = tempme.group_clips(size, p.group, cls_before)
        if p.cross_r == 0:
            return metric, size, source
        x = einops.rearrange(x, "(b f) n c -> b f n c", f=clips_before) + pos.astype(x.dtype)[None, :, None]
        x = tempme.group_clips(einops.rearrange(x, "b f n c -> (b f) n c"), p.group, cls_before)
        x, size = tempme.merge_tokens(x, metric, size, p.cross_r, p.num_cls)
        return x, size, source


class IntraMerger(nn.Module):
    """Post-attention hook: merge `plan.intra_r` tokens within each sequence on the head-mean keys
    (ImgMe within a frame, intra-clip within a clip); the class tokens stay in front."""

    plan: LayerPlan

    @nn.compact
    def __call__(self, x, keys, size, source, deterministic: bool = True):
        """x [S, N, C], keys [S, N, H, Dh] -> (x [S, N - r, C], size [S, N - r, 1], source)."""
        metric = keys.astype(jnp.float32).mean(axis=2)  # [S, N, Dh]
        x, size = tempme.merge_tokens(x, metric, size, self.plan.intra_r, self.plan.num_cls)
        return x, size, source


def layer_hooks(plan: LayerPlan, param_dtype) -> dict:
    """EncoderBlock hook attributes of one planned layer."""
    hooks = {}
    if plan.kind == "clipme":
        hooks["pre_attention"] = functools.partial(ClipMerger, plan, param_dtype)
    if plan.intra_r:
        hooks["post_attention"] = functools.partial(IntraMerger, plan)
    return hooks


class TempMeVisionTower(CLIPVisionTower):
    """CLIP image tower over the frames of a video with TempMe's merging (module docstring).

    Attributes: those of CLIPVisionTower, plus
      temporal: TemporalConfig (frames, ImgMe r, ClipMe layers and factors, rho_c, rho_i).
    `merge` only contributes prop_attn; its schedule must be empty (use `temporal`).
    """

    temporal: TemporalConfig = TemporalConfig()

    @nn.compact
    def __call__(self, videos, video_mask=None, train: bool = False, return_info: bool = False):
        """videos [B, T, H, W, 3], video_mask [B, T] (1 = real frame) or None -> video features
        [B, E] (float32, unit norm). With return_info also {'tokens' [B F_L, N_L, C], 'size',
        'frame_embeds' [B, T, E] (unit norm per frame)}."""
        b, t = videos.shape[:2]
        if t != self.temporal.num_frames:
            raise ValueError(f"videos have {t} frames but temporal.num_frames={self.temporal.num_frames}.")
        if any(self.merge.schedule(self.depth)) or self.merge.trace_source:
            raise ValueError("TempMeVisionTower merges by `temporal`; leave merge.r empty and trace_source off.")
        x = image_tokens(self, einops.rearrange(videos, "b t h w c -> (b t) h w c"))  # [B T, N0, C]
        plan = tempme.plan_layers(self.temporal, x.shape[1], self.depth)
        x, size, _ = encoder_stack(
            x, encoder_block_kwargs(self, self.num_heads, self.mlp_dim or 4 * self.width, merge=self.merge),
            [0] * self.depth, deterministic=not train, remat=self.remat, remat_policy=self.remat_policy,
            layer_kwargs=[layer_hooks(p, self.param_dtype) for p in plan],
        )  # [B F_L, N_L, C]
        cls = einops.rearrange(x[:, : plan[-1].num_cls], "(b f) k c -> b (f k) c", b=b)  # [B, T, C], frame order
        frames = l2_normalize(project_class_tokens(self, cls))  # [B, T, E]
        mask = jnp.ones((b, t), jnp.float32) if video_mask is None else video_mask.astype(jnp.float32)
        video = l2_normalize(jnp.einsum("bt,bte->be", mask, frames) / jnp.maximum(mask.sum(1, keepdims=True), 1.0))
        if not return_info:
            return video
        return video, {"tokens": x, "size": size, "frame_embeds": frames}


class TempMeCLIP(CLIP):
    """CLIP with TempMe's video tower (`visual`) and the text tower (`text`).

    Attributes: those of jdjax.nn.clip.CLIP, plus `temporal` (TemporalConfig). LoRA (`lora`,
    `text_lora`) on both towers as in CLIP; TempMe's PEFT mode is rank 8 on qkv, no scaling.
    """

    temporal: TemporalConfig = TemporalConfig()

    @nn.nowrap
    def vision_tower(self, **kwargs) -> nn.Module:
        return TempMeVisionTower(temporal=self.temporal, **kwargs)

    def plan(self, image_size=None) -> tuple[LayerPlan, ...]:
        """The video tower's static per-layer plan at `image_size` (default: the model's)."""
        return tempme.plan_layers(self.temporal, self.token_counts(image_size)[0], self.vision_layers)

    def encode_video(self, videos, video_mask=None, train: bool = False, return_info: bool = False):
        """[B, T, H, W, 3] (+ [B, T] frame mask) -> [B, E] unit-norm video features."""
        return self.visual(videos, video_mask, train=train, return_info=return_info)

    def __call__(self, videos, ids, video_mask=None, text_mask=None, train: bool = False):
        """Returns {'video_embeds' [B_v, E] (unit norm), 'text_embeds' [B_t, E] (not normalised),
        'logit_scale' [], 'logits_per_text' [B_t, B_v] = exp(logit_scale) cos(text, video)}."""
        video = self.encode_video(videos, video_mask, train=train)
        text = self.encode_text(ids, text_mask, train=train)
        logits = jnp.exp(self.logit_scale.astype(jnp.float32)) * l2_normalize(text) @ video.T
        return {"video_embeds": video, "text_embeds": text, "logit_scale": self.logit_scale, "logits_per_text": logits}
