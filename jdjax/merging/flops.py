"""Analytic multiply-accumulate counts (MACs) of a ViT forward pass with a token-merging schedule.

One MAC is one multiply-add; XLA and most profilers report FLOPs = 2 x MACs for the matrix
products. "G" below is 1e9 MACs (not 2^30; PYRA's GFLOPs column divides fvcore's count by 2^30).

What `ViTMacs.total` counts (this is the convention behind the spec's figures, spec
`vision_token_merging.md` §3.1 and §5.8; it is fvcore's convention for a timm ViT minus the head):

  patch embedding    (H/P)(W/P) * P^2 * 3 * C
  per block l, with N_l tokens entering and r_l removed (after the 50% clamp):
    qkv projection   3 N_l C^2
    attention        2 N_l^2 C      (logits Q K^T and the weighted sum A V, each N_l^2 * C)
    out projection   N_l C^2
    MLP              2 (N_l - r_l) C M   (the merge sits between attention and MLP, spec §1.1)

Reported apart and *not* in `total`:
  head       C * num_classes on the class token (the spec's figures are without it: with a
             1000-class head ViT-L "high" would be 17.92 G, not 17.91 G);
  matching   ceil(N_l/2) * floor(N_l/2) * Dh per merging layer, the A.B^T similarity scores of
             bipartite soft matching (spec §6: "(N/2)^2 * Dh"); counting it would move ViT-B/16
             r=16 from 8.771 to 8.774 G and ViT-S r=13 from 2.702 to 2.706 G.
Never counted: biases, LayerNorm, softmax, GELU, the position-embedding add, the proportional-
attention bias, the size-weighted merge arithmetic (O(N C) per layer), and PYRA's modulation
(about 4 r C per layer).

These rules reproduce every figure of the spec to the printed precision: ViT-B/16 at 224 dense
17.56 G, ToMe r=16 8.77 G, r=13 10.37 G, PYRA-B "high" 5.07 G; ViT-S/16 r=13 2.70 G; ViT-L/16
dense 61.55 G, "low" 30.96 G, "high" 17.91 G; CLIP B/32 (image tower, 12 frames) dense 52.90 G.

    from jdjax.merging.flops import vit_macs
    from jdjax.nn.vit import MergeConfig, ViT, vit_config
    vit_macs(**vit_config("B/16"), image_size=224, merge_r=16).gmacs    # 8.771
    count_model(ViT(num_classes=1000, **vit_config("B/16"), merge=MergeConfig(r=16)), 224).head   # 768000
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jdjax.merging import schedules


@dataclasses.dataclass(frozen=True)
class ViTMacs:
    """MACs of one image through a ViT, by term (plain ints, summed over layers).

    Attributes:
      patch_embed, qkv, attention, out_proj, mlp: the terms of `total` (see the module docstring).
      matching: bipartite-matching similarity MACs, summed over merging layers (not in `total`).
      head: classifier MACs (not in `total`).
      per_block: `total`'s block terms (qkv + attention + out_proj + mlp) of every block.
      schedule: r actually merged per block (after the 50% clamp).
      token_counts: [N_0, N_1, ..., N_L], tokens entering the first block and leaving each block.
    """

    patch_embed: int
    qkv: int
    attention: int
    out_proj: int
    mlp: int
    matching: int
    head: int
    per_block: tuple[int, ...]
    schedule: tuple[int, ...]
    token_counts: tuple[int, ...]

    @property
    def blocks(self) -> int:
        return self.qkv + self.attention + self.out_proj + self.mlp

    @property
    def total(self) -> int:
        """Patch embedding + blocks: the convention of the spec's figures."""
        return self.patch_embed + self.blocks

    @property
    def total_with_extras(self) -> int:
        """`total` + matching + head."""
        return self.total + self.matching + self.head

    @property
    def gmacs(self) -> float:
        """`total` / 1e9."""
        return self.total / 1e9

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(blocks=self.blocks, total=self.total, total_with_extras=self.total_with_extras)
        return out


def _grid(image_size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    if h % patch_size or w % patch_size:
        raise ValueError(f"image_size {h}x{w} is not divisible by patch_size={patch_size}.")
    return h // patch_size, w // patch_size


def vit_macs(
    *,
    image_size: int | Sequence[int],
    patch_size: int,
    width: int,
    depth: int,
    num_heads: int,
    mlp_dim: int,
    merge_r: int | tuple[int, float] | Sequence[int] = 0,
    num_classes: int = 0,
    distill_token: bool = False,
) -> ViTMacs:
    """Counts the MACs of one image through a ViT that merges tokens with ToMe.

    Args:
      image_size: side or (height, width) in pixels.
      patch_size, width, depth, num_heads, mlp_dim: P, C, L, H, M (`**jdjax.nn.vit.vit_config(name)`).
      merge_r: the schedule as `schedules.parse_r` takes it: an int (every layer), a tuple
        (r, inflect) (ToMe's decreasing schedule) or a list of per-layer r (zero-padded).
      num_classes: head outputs, counted in `head` only.
      distill_token: DeiT's extra protected token (N_0 = 2 + patches).

    Returns:
      ViTMacs; `.total` is the spec's figure, `.gmacs` the same in G (1e9).
    """
    if width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads={num_heads}.")
    gh, gw = _grid(image_size, patch_size)
    protected = 1 + int(distill_token)
    n = protected + gh * gw
    requested = schedules.parse_r(merge_r if isinstance(merge_r, (int, tuple)) else list(merge_r), depth)
    schedule = schedules.clamp_schedule(requested, n, protected=protected)
    c, m, dh = width, mlp_dim, width // num_heads
    qkv = attention = out_proj = mlp = matching = 0
    per_block, counts = [], [n]
    for r in schedule:
        block = (3 * n * c * c, 2 * n * n * c, n * c * c, 2 * (n - r) * c * m)
        qkv, attention, out_proj, mlp = (t + b for t, b in zip((qkv, attention, out_proj, mlp), block))
        per_block.append(sum(block))
        if r:
            matching += ((n + 1) // 2) * (n // 2) * dh
        n -= r
        counts.append(n)
    return ViTMacs(
        patch_embed=gh * gw * patch_size * patch_size * 3 * c,
        qkv=qkv,
        attention=attention,
        out_proj=out_proj,
        mlp=mlp,
        matching=matching,
        head=c * num_classes,
        per_block=tuple(per_block),
        schedule=tuple(schedule),
        token_counts=tuple(counts),
    )


def count_model(model, image_size: int | Sequence[int] | None = None) -> ViTMacs:
    """MACs of a `jdjax.nn.vit.ViT` instance (its merge schedule, dims and head) for one image.

    image_size defaults to the model's `image_size` attribute. The model is read by its attributes
    (this layer does not import jdjax.nn).
    """
    size = image_size if image_size is not None else model.image_size
    if size is None:
        raise ValueError("count_model needs an image_size (argument or model attribute).")
    return vit_macs(
        image_size=size,
        patch_size=model.patch_size,
        width=model.width,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_dim=model.mlp_dim,
        merge_r=model.merge.schedule(model.depth),
        num_classes=model.num_classes,
    )


def video_macs(plan, *, image_size: int | Sequence[int], patch_size: int, width: int, num_heads: int,
               mlp_dim: int, num_frames: int) -> ViTMacs:
    """MACs of one video through a TempMe / CLIP video tower (the visual tower only, as the paper's
    GFLOPs), from its static plan (`jdjax.merging.tempme.plan_layers`).

    Per layer l with F_l sequences per video, N_l tokens in attention and N_l - r_l in the MLP:
    F_l (3 N_l C^2 + 2 N_l^2 C + N_l C^2 + 2 (N_l - r_l) C M), plus T patch embeddings. The
    class-token projection and the matching are not counted (as in `vit_macs`); `matching` holds
    the similarity MACs of the cross-clip (C-wide residual metric) and intra-clip (Dh-wide keys)
    merges apart. `token_counts` lists N_0 and the
    tokens leaving every layer per sequence; `schedule` the tokens each layer removes per sequence.
    Released B/32: 34.70 G vs 52.90 G dense (spec §2.2).
    """
    gh, gw = _grid(image_size, patch_size)
    c, m = width, mlp_dim
    qkv = attention = out_proj = mlp = matching = 0
    per_block = []
    for p in plan:
        n, f = p.tokens_attn, p.clips
        block = (f * 3 * n * c * c, f * 2 * n * n * c, f * n * c * c, f * 2 * p.tokens_out * c * m)
        qkv, attention, out_proj, mlp = (t + b for t, b in zip((qkv, attention, out_proj, mlp), block))
        per_block.append(sum(block))
        for r, tokens, dim in ((p.cross_r, n + p.cross_r, c), (p.intra_r, n, c // num_heads)):
            if r:
                patches = tokens - p.num_cls
                matching += f * ((patches + 1) // 2) * (patches // 2) * dim
    return ViTMacs(
        patch_embed=num_frames * gh * gw * patch_size * patch_size * 3 * c,
        qkv=qkv, attention=attention, out_proj=out_proj, mlp=mlp, matching=matching, head=0,
        per_block=tuple(per_block),
        schedule=tuple(p.cross_r + p.intra_r for p in plan),
        token_counts=(plan[0].tokens_in,) + tuple(p.tokens_out for p in plan),
    )
