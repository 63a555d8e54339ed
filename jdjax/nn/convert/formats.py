"""One key mapping per checkpoint format -> `Converted` (a jdjax ViT / CLIP parameter tree).

Each `from_<format>(state_dict, model=None, **overrides)` infers the architecture from the shapes
(plus a model name or explicit dims where shapes cannot tell, e.g. the head count), lists where
every jdjax parameter comes from, and lets `mapping.assemble` check it; `convert(src, format)`
reads the file first.

Formats and the layouts they read (C width, H heads, Dh = C / H, P patch):

  openai_clip     TorchScript archive (`torch.jit.load(...).state_dict()`) or a plain state dict.
                  visual.conv1.weight [C, 3, P, P]; visual.transformer.resblocks.{i}.attn.in_proj_weight
                  [3C, C] (rows q; k; v, each (H, Dh)); mlp.c_fc / c_proj; ln_1 / ln_2; text
                  transformer.resblocks.{i}; visual.proj / text_projection used as x @ proj.
                  `input_resolution`, `context_length`, `vocab_size` are dropped. QuickGELU, eps 1e-5.
                  ResNet CLIPs (RN50, ...; jdjax.nn.clip_resnet): visual.conv1/2/3 + bn1/2/3 (stem),
                  visual.layer{n}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0 (conv),downsample.1 (BN)},
                  visual.attnpool.{positional_embedding, q_proj, k_proj, v_proj, c_proj}; conv weights OIHW ->
                  HWIO, BN weight / bias -> params scale / bias, running_mean / running_var -> batch_stats
                  mean / var, num_batches_tracked dropped; stage depths, stem width and image size from the
                  shapes, attention-pool heads 32 W / 64 (OpenAI) unless --model / --num_heads say otherwise.
  open_clip       the same names (optionally under {'state_dict': ...} with a 'module.' prefix from DDP);
                  the text `attn_mask` buffer is dropped; a Linear `text_projection.weight` is accepted.
                  Activation: exact GELU (open_clip's default) unless the model name ends in
                  '-quickgelu' or --activation says otherwise.
  timm_vit        patch_embed.proj, cls_token, pos_embed, blocks.{i}.{norm1, attn.qkv [3C, C], attn.proj,
                  norm2, mlp.fc1, mlp.fc2}, norm, head (optional); old in21k `pre_logits.fc` is dropped.
  google_vit_npz  the google-research/vision_transformer npz (NumPy only, no torch): embedding/kernel
                  HWIO, cls, Transformer/posembed_input/pos_embedding, Transformer/encoderblock_{i}/
                  {LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value} [C, H, Dh], out [H, Dh, C],
                  LayerNorm_2, MlpBlock_3/Dense_{0,1}}, Transformer/encoder_norm, head; `pre_logits` dropped.
  hf_vit          transformers ViTModel / ViTForImageClassification (4.x and 5.x key names); a state
                  dict file, a .safetensors file, or a save_pretrained directory (config.json is read).
                  ViTModel's `pooler` (the in21k pre-logits) is dropped.
  hf_clip         transformers CLIPModel, same sources as hf_vit.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

from jdjax.nn.convert.mapping import FORMATS, Converted, Source, assemble
from jdjax.nn.convert.names import (
    CLIP_KEYS,
    VIT_KEYS,
    check_overrides,
    finish_clip_config,
    finish_vit_config,
    hf_activation,
    hf_config_dict,
    model_desc,
)
from jdjax.nn.convert.readers import ConversionError, read_hf, read_npz, read_state_dict, sample_keys


def _count(src: Source, pattern: str, what: str) -> int:
    """The number of blocks: 1 + the largest index `pattern` captures over the keys."""
    idx = src.indices(pattern)
    if not idx:
        raise ConversionError(f"the {src.fmt} checkpoint has no {what} (keys matching {pattern!r}); "
                              f"its keys: {sample_keys(sorted(src.arrays))}.")
    return idx[-1] + 1


def _mlp_dim(src: Source, what: str, fc1: Sequence[str], fc2: Sequence[str]) -> int:
    """The MLP hidden size, voted over every block's fc1 weight / bias and fc2 weight (Linear names)."""
    axes = [(f"{p}.weight", 0) for p in fc1] + [(f"{p}.bias", 0) for p in fc1] + [(f"{p}.weight", 1) for p in fc2]
    return src.dim(what, axes)


def _grid_image_size(num_tokens: int, patch: int, key: str, shape) -> int:
    """The image side of a position embedding with 1 class token + a square grid of `patch`-pixel patches."""
    side = math.isqrt(num_tokens - 1)
    if side * side != num_tokens - 1:
        raise ConversionError(
            f"{key!r} has shape {tuple(shape)}: {num_tokens} positions are not 1 class token + a square patch grid; "
            "non-square position embeddings are not supported."
        )
    return side * patch


def _ln(path: str, prefix: str, w: str = "weight", b: str = "bias", sep: str = ".") -> list:
    """The mapping of a LayerNorm (scale, bias)."""
    return [(f"{path}/scale", [f"{prefix}{sep}{w}"], "copy"), (f"{path}/bias", [f"{prefix}{sep}{b}"], "copy")]


def _linear(path: str, prefix: str, bias: bool = True) -> list:
    """The mapping of a torch Linear onto a Dense (kernel transposed, bias)."""
    out = [(f"{path}/kernel", [f"{prefix}.weight"], "linear")]
    return out + ([(f"{path}/bias", [f"{prefix}.bias"], "copy")] if bias else [])


def _block_torch(jp: str, ln1: str, ln2: str, fc1: str, fc2: str, out: str, qkv: Sequence[str] | str,
                 qkv_bias: bool = True) -> list:
    """An EncoderBlock from torch names; `qkv` is one fused in_proj-style prefix or three q/k/v Linear prefixes.
    A fused prefix is given as (weight key, bias key)."""
    m = _ln(f"{jp}/ln1", ln1) + _ln(f"{jp}/ln2", ln2)
    if isinstance(qkv, str):  # timm: attn.qkv Linear
        m.append((f"{jp}/attn/qkv/kernel", [f"{qkv}.weight"], "in_proj"))
        if qkv_bias:
            m.append((f"{jp}/attn/qkv/bias", [f"{qkv}.bias"], "in_proj_bias"))
    elif len(qkv) == 2:  # OpenAI: attn.in_proj_weight / in_proj_bias
        m.append((f"{jp}/attn/qkv/kernel", [qkv[0]], "in_proj"))
        m.append((f"{jp}/attn/qkv/bias", [qkv[1]], "in_proj_bias"))
    else:  # Hugging Face: separate q / k / v
        m.append((f"{jp}/attn/qkv/kernel", [f"{p}.weight" for p in qkv], "split_qkv"))
        m.append((f"{jp}/attn/qkv/bias", [f"{p}.bias" for p in qkv], "split_qkv_bias"))
    m.append((f"{jp}/attn/out/kernel", [f"{out}.weight"], "out_proj"))
    m.append((f"{jp}/attn/out/bias", [f"{out}.bias"], "copy"))
    return m + _linear(f"{jp}/mlp/fc1", fc1) + _linear(f"{jp}/mlp/fc2", fc2)


# ----------------------------------------------------------------------------- CLIP (OpenAI / open_clip)


def _bn(path: str, prefix: str) -> tuple[list, list]:
    """The mapping of a torch BatchNorm: (params scale / bias, batch_stats mean / var)."""
    return ([(f"{path}/scale", [f"{prefix}.weight"], "copy"), (f"{path}/bias", [f"{prefix}.bias"], "copy")],
            [(f"{path}/mean", [f"{prefix}.running_mean"], "copy"), (f"{path}/var", [f"{prefix}.running_var"], "copy")])


def _clip_vit_dims(src: Source) -> dict:
    """The image-tower dims of a ViT CLIP (visual.conv1 patches, visual.transformer)."""
    patch = src.shape("visual.conv1.weight", "the patch size", ndim=4)[2]
    pos_shape = src.shape("visual.positional_embedding", "the image size", ndim=2)
    vl = _count(src, r"visual\.transformer\.resblocks\.(\d+)\.", "visual blocks")
    vb = "visual.transformer.resblocks.{}.mlp."
    return dict(
        image_size=_grid_image_size(pos_shape[0], patch, "visual.positional_embedding", pos_shape),
        patch_size=patch, vision_layers=vl, vision_heads=None,
        vision_width=src.dim("vision_width", [("visual.conv1.weight", 0), ("visual.class_embedding", 0),
                                              ("visual.positional_embedding", 1), ("visual.ln_pre.weight", 0),
                                              ("visual.ln_post.weight", 0), ("visual.proj", 0)]),
        vision_mlp_dim=_mlp_dim(src, "vision_mlp_dim", [vb.format(i) + "c_fc" for i in range(vl)],
                                [vb.format(i) + "c_proj" for i in range(vl)]),
    )


def _clip_resnet_dims(src: Source) -> dict:
    """The image-tower dims of a ResNet CLIP (visual.layer{1-4}, visual.attnpool): stage depths, the stem
    width W, the image size from the attention-pool positions (1 + (S/32)^2)."""
    pos_shape = src.shape("visual.attnpool.positional_embedding", "the image size", ndim=2)
    return dict(
        image_size=_grid_image_size(pos_shape[0], 32, "visual.attnpool.positional_embedding", pos_shape),
        patch_size=None, vision_heads=None, vision_mlp_dim=None,
        vision_layers=tuple(_count(src, rf"visual\.layer{n}\.(\d+)\.", f"visual layer{n} blocks") for n in range(1, 5)),
        vision_width=src.dim("vision_width", [("visual.layer1.0.conv1.weight", 0), ("visual.layer1.0.conv1.weight", 1),
                                              ("visual.conv3.weight", 0), ("visual.bn3.weight", 0)]),
    )


def _clip_resnet_mapping(layers: Sequence[int]) -> tuple[list, list]:
    """(params, batch_stats) mappings of CLIP's ModifiedResNet (jdjax.nn.clip_resnet) from visual.* names."""
    params, stats = [], []

    def conv_bn(conv: str, bn: str, torch_conv: str, torch_bn: str):
        params.append((f"visual/{conv}/kernel", [f"visual.{torch_conv}.weight"], "conv"))
        p, s = _bn(f"visual/{bn}", f"visual.{torch_bn}")
        params.extend(p)
        stats.extend(s)

    for i in (1, 2, 3):
        conv_bn(f"conv{i}", f"bn{i}", f"conv{i}", f"bn{i}")
    for n, depth in enumerate(layers, start=1):
        for i in range(depth):
            ours, theirs = f"layer{n}_{i}", f"layer{n}.{i}"
            for c in (1, 2, 3):
                conv_bn(f"{ours}/conv{c}", f"{ours}/bn{c}", f"{theirs}.conv{c}", f"{theirs}.bn{c}")
            if i == 0:  # the first block of every stage changes the width (and stride): a projected shortcut
                conv_bn(f"{ours}/downsample_conv", f"{ours}/downsample_bn", f"{theirs}.downsample.0",
                        f"{theirs}.downsample.1")
    a, t = "visual/attnpool", "visual.attnpool"
    params.append((f"{a}/positional_embedding", [f"{t}.positional_embedding"], "copy"))
    for name in ("q_proj", "k_proj", "v_proj"):
        params += [(f"{a}/{name}/kernel", [f"{t}.{name}.weight"], "linear_heads"),
                   (f"{a}/{name}/bias", [f"{t}.{name}.bias"], "heads_bias")]
    params += [(f"{a}/c_proj/kernel", [f"{t}.c_proj.weight"], "out_proj"),
               (f"{a}/c_proj/bias", [f"{t}.c_proj.bias"], "copy")]
    return params, stats


def _from_clip_layout(state_dict: Mapping, fmt: str, model: str | None, overrides: dict) -> Converted:
    """OpenAI / open_clip names (they share one layout) -> CLIP params (+ batch_stats for ResNet towers)."""
    src = Source(state_dict, fmt)
    src.expect_any(["visual.conv1.weight", "visual.layer1.0.conv1.weight"])
    resnet = src.has("visual.layer1.0.conv1.weight")
    linear_proj = not src.has("text_projection") and src.has("text_projection.weight")
    tp_key = "text_projection.weight" if linear_proj else "text_projection"
    tl = _count(src, r"transformer\.resblocks\.(\d+)\.", "text blocks")
    tb = "transformer.resblocks.{}.mlp."
    vision = _clip_resnet_dims(src) if resnet else _clip_vit_dims(src)
    image_proj = [("visual.attnpool.c_proj.weight", 0), ("visual.attnpool.c_proj.bias", 0)] if resnet else [
        ("visual.proj", 1)]
    cfg = dict(
        embed_dim=src.dim("embed_dim", image_proj + [(tp_key, 0 if linear_proj else 1)]), **vision,
        context_length=src.dim("context_length", [("positional_embedding", 0), ("attn_mask", 0)]),
        vocab_size=src.dim("vocab_size", [("token_embedding.weight", 0)]),
        text_width=src.dim("text_width", [("ln_final.weight", 0), ("token_embedding.weight", 1),
                                          ("positional_embedding", 1), (tp_key, 1 if linear_proj else 0)]),
        text_layers=tl, text_heads=None,
        text_mlp_dim=_mlp_dim(src, "text_mlp_dim", [tb.format(i) + "c_fc" for i in range(tl)],
                              [tb.format(i) + "c_proj" for i in range(tl)]),
        ln_eps=1e-5, activation="quick_gelu" if fmt == "openai_clip" else "gelu", eot_token_id=None,
    )
    notes = []
    if fmt == "open_clip" and "activation" not in overrides and not (model or "").endswith("-quickgelu"):
        notes.append("open_clip: exact GELU (open_clip's default); OpenAI-trained weights need "
                     "--model=<name>-quickgelu or --activation=quick_gelu")
    cfg = finish_clip_config(cfg, model, overrides, fmt, notes)
    for name, counted in (("vision_layers", vision["vision_layers"]), ("text_layers", tl)):
        if cfg[name] != counted:
            what = "blocks per ResNet stage" if isinstance(counted, tuple) else f"{name.split('_')[0]} blocks"
            raise ConversionError(f"the checkpoint has {counted} {what} but the chosen model "
                                  f"{model_desc('CLIP', cfg)} has {name}={cfg[name]}.")

    m = [("text/token_embedding/embedding", ["token_embedding.weight"], "copy"),
         ("text/positional_embedding", ["positional_embedding"], "copy"),
         *_ln("text/ln_final", "ln_final"),
         ("text/text_projection", [tp_key], "linear" if linear_proj else "copy"),
         ("logit_scale", ["logit_scale"], "copy")]
    stats = []
    towers = [("text", "transformer", cfg["text_layers"])]
    if resnet:
        visual, stats = _clip_resnet_mapping(cfg["vision_layers"])
        m += visual
    else:
        m += [("visual/conv1/kernel", ["visual.conv1.weight"], "conv"),
              ("visual/class_embedding", ["visual.class_embedding"], "copy"),
              ("visual/positional_embedding", ["visual.positional_embedding"], "copy"),
              *_ln("visual/ln_pre", "visual.ln_pre"), *_ln("visual/ln_post", "visual.ln_post"),
              ("visual/proj", ["visual.proj"], "copy")]
        towers.append(("visual", "visual.transformer", cfg["vision_layers"]))
    for tower, prefix, depth in towers:
        for i in range(depth):
            p = f"{prefix}.resblocks.{i}"
            m += _block_torch(f"{tower}/block{i}", f"{p}.ln_1", f"{p}.ln_2", f"{p}.mlp.c_fc", f"{p}.mlp.c_proj",
                              f"{p}.attn.out_proj", (f"{p}.attn.in_proj_weight", f"{p}.attn.in_proj_bias"))
    drop = [r"^(input_resolution|context_length|vocab_size)$"] if fmt == "openai_clip" else [r"^attn_mask$"]
    drop.append(r"\.num_batches_tracked$")  # BatchNorm's step counter (momentum is fixed)
    return assemble(src, "CLIP", cfg, m, drop, notes, stats)


def from_openai_clip(state_dict: Mapping, model: str | None = None, **overrides) -> Converted:
    """An OpenAI CLIP state dict (`torch.jit.load('ViT-B-32.pt').state_dict()`) -> CLIP params.

    Heads default to width // 64 (as OpenAI's build_model). `overrides`: any of the CLIP keyword
    arguments (vision_heads, text_heads, activation, ln_eps, eot_token_id, ...)."""
    return _from_clip_layout(state_dict, "openai_clip", model, check_overrides(overrides, CLIP_KEYS))


def from_open_clip(state_dict: Mapping, model: str | None = None, **overrides) -> Converted:
    """An open_clip CLIP state dict -> CLIP params. The activation is exact GELU unless the model name
    ends in '-quickgelu' or activation='quick_gelu' is given."""
    return _from_clip_layout(state_dict, "open_clip", model, check_overrides(overrides, CLIP_KEYS))


# ----------------------------------------------------------------------------- timm ViT


def from_timm_vit(state_dict: Mapping, model: str | None = None, **overrides) -> Converted:
    """A timm VisionTransformer state dict -> ViT params (eps 1e-6, exact GELU).

    The head count comes from `model` ('vit_base_patch16_224', 'B/16'), `num_heads`, or the standard
    width table (192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16)."""
    overrides = check_overrides(overrides, VIT_KEYS)
    src = Source(state_dict, "timm_vit")
    src.expect_any(["patch_embed.proj.weight", "cls_token"])
    patch = src.shape("patch_embed.proj.weight", "the patch size", ndim=4)[2]
    pos = src.shape("pos_embed", "the image size", ndim=3)
    depth = _count(src, r"blocks\.(\d+)\.", "blocks")
    cfg = dict(
        num_classes=src.dim("num_classes", [("head.weight", 0), ("head.bias", 0)]) if src.has("head.weight") else 0,
        patch_size=patch, depth=depth, num_heads=None, ln_eps=1e-6,
        width=src.dim("width", [("patch_embed.proj.weight", 0), ("patch_embed.proj.bias", 0), ("cls_token", 2),
                                ("pos_embed", 2), ("norm.weight", 0), ("norm.bias", 0), ("head.weight", 1)]),
        mlp_dim=_mlp_dim(src, "mlp_dim", [f"blocks.{i}.mlp.fc1" for i in range(depth)],
                         [f"blocks.{i}.mlp.fc2" for i in range(depth)]),
        image_size=_grid_image_size(pos[1], patch, "pos_embed", pos), activation="gelu",
        qkv_bias=src.has("blocks.0.attn.qkv.bias"),
    )
    notes = []
    cfg = finish_vit_config(cfg, model, overrides, "timm_vit", notes)
    _check_depth(cfg, depth)
    m = [("embedding/kernel", ["patch_embed.proj.weight"], "conv"),
         ("embedding/bias", ["patch_embed.proj.bias"], "copy"),
         ("cls", ["cls_token"], "copy"), ("pos_embedding", ["pos_embed"], "copy"), *_ln("encoder_norm", "norm")]
    if cfg["num_classes"]:
        m += _linear("head", "head")
    for i in range(cfg["depth"]):
        p = f"blocks.{i}"
        m += _block_torch(f"block{i}", f"{p}.norm1", f"{p}.norm2", f"{p}.mlp.fc1", f"{p}.mlp.fc2", f"{p}.attn.proj",
                          f"{p}.attn.qkv", qkv_bias=cfg["qkv_bias"])
    return assemble(src, "ViT", cfg, m, [r"^pre_logits\."], notes)


def _check_depth(cfg: dict, counted: int) -> None:
    """The chosen ViT depth must equal the blocks the checkpoint has."""
    if cfg["depth"] != counted:
        raise ConversionError(f"the checkpoint has {counted} blocks but the chosen model "
                              f"{model_desc('ViT', cfg)} has depth={cfg['depth']}.")


# ----------------------------------------------------------------------------- Google ViT npz


def from_google_vit(arrays: Mapping, model: str | None = None, **overrides) -> Converted:
    """The arrays of a google-research/vision_transformer .npz -> ViT params (NumPy only).

    The head count is read from the query kernel [C, H, Dh]; `pre_logits/*` is dropped."""
    overrides = check_overrides(overrides, VIT_KEYS)
    src = Source(arrays, "google_vit_npz")
    src.expect_any(["embedding/kernel", "Transformer/posembed_input/pos_embedding"])
    patch = src.shape("embedding/kernel", "the patch size", ndim=4)[0]
    pos_key = "Transformer/posembed_input/pos_embedding"
    pos = src.shape(pos_key, "the image size", ndim=3)
    blk = "Transformer/encoderblock_{}/"
    att = blk + "MultiHeadDotProductAttention_1/"
    depth = _count(src, r"Transformer/encoderblock_(\d+)/", "encoder blocks")
    q = src.shape(att.format(0) + "query/kernel")
    qkv = [att.format(i) + n for i in range(depth) for n in ("query", "key", "value")]
    heads = [(k + "/kernel", 1) for k in qkv if src.has(k + "/kernel") and src.arrays[k + "/kernel"].ndim == 3]
    mlp = blk + "MlpBlock_3/Dense_{}/"
    cfg = dict(
        num_classes=src.dim("num_classes", [("head/kernel", 1), ("head/bias", 0)]) if src.has("head/kernel") else 0,
        patch_size=patch, depth=depth,
        width=src.dim("width", [("embedding/kernel", 3), ("embedding/bias", 0), ("cls", 2), (pos_key, 2),
                                ("Transformer/encoder_norm/scale", 0), ("Transformer/encoder_norm/bias", 0)]),
        num_heads=src.dim("num_heads", heads + [(k + "/bias", 0) for k in qkv]) if len(q) == 3 else None,
        mlp_dim=src.dim("mlp_dim", [(mlp.format(i, 0) + "kernel", 1) for i in range(depth)]
                        + [(mlp.format(i, 0) + "bias", 0) for i in range(depth)]
                        + [(mlp.format(i, 1) + "kernel", 0) for i in range(depth)]),
        ln_eps=1e-6, image_size=_grid_image_size(pos[1], patch, pos_key, pos), activation="gelu", qkv_bias=True,
    )
    notes = []
    cfg = finish_vit_config(cfg, model, overrides, "google_vit_npz", notes)
    _check_depth(cfg, depth)
    m = [("embedding/kernel", ["embedding/kernel"], "copy"), ("embedding/bias", ["embedding/bias"], "copy"),
         ("cls", ["cls"], "copy"), ("pos_embedding", [pos_key], "copy"),
         *_ln("encoder_norm", "Transformer/encoder_norm", "scale", "bias", "/")]
    if cfg["num_classes"]:
        m += [("head/kernel", ["head/kernel"], "copy"), ("head/bias", ["head/bias"], "copy")]
    for i in range(cfg["depth"]):
        b, a = blk.format(i), att.format(i)
        m += [*_ln(f"block{i}/ln1", b + "LayerNorm_0", "scale", "bias", "/"),
              (f"block{i}/attn/qkv/kernel", [a + n + "/kernel" for n in ("query", "key", "value")], "npz_qkv"),
              (f"block{i}/attn/qkv/bias", [a + n + "/bias" for n in ("query", "key", "value")], "npz_qkv_bias"),
              (f"block{i}/attn/out/kernel", [a + "out/kernel"], "copy"),
              (f"block{i}/attn/out/bias", [a + "out/bias"], "copy"),
              *_ln(f"block{i}/ln2", b + "LayerNorm_2", "scale", "bias", "/")]
        for j, name in enumerate(("fc1", "fc2")):
            d = b + f"MlpBlock_3/Dense_{j}/"
            m += [(f"block{i}/mlp/{name}/kernel", [d + "kernel"], "copy"),
                  (f"block{i}/mlp/{name}/bias", [d + "bias"], "copy")]
    return assemble(src, "ViT", cfg, m, [r"^pre_logits/"], notes)


# ----------------------------------------------------------------------------- Hugging Face


def from_hf_vit(state_dict: Mapping, model: str | None = None, hf_config=None, **overrides) -> Converted:
    """A transformers ViTModel / ViTForImageClassification state dict (4.x or 5.x names) -> ViT params.

    hf_config: the ViTConfig (or its dict / config.json contents), which gives the head count,
    layer_norm_eps and hidden_act; without it heads come from `model` / `num_heads` / the width
    table, eps is transformers' default 1e-12 and the activation exact GELU."""
    overrides = check_overrides(overrides, VIT_KEYS)
    src = Source(state_dict, "hf_vit")
    p = "vit." if any(k.startswith("vit.") for k in src.arrays) else ""
    src.expect_any([f"{p}embeddings.cls_token"])
    new = src.has(f"{p}layers.0.attention.q_proj.weight")
    patch_key = f"{p}embeddings.patch_embeddings.projection.weight"
    patch = src.shape(patch_key, "the patch size", ndim=4)[2]
    pos_key = f"{p}embeddings.position_embeddings"
    pos = src.shape(pos_key, "the image size", ndim=3)
    layer = f"{p}layers.{{}}" if new else f"{p}encoder.layer.{{}}"
    depth = _count(src, re.escape(layer.split("{")[0]) + r"(\d+)\.", "encoder layers")
    fc1 = (layer + ".mlp.fc1") if new else (layer + ".intermediate.dense")
    fc2 = (layer + ".mlp.fc2") if new else (layer + ".output.dense")
    q_name = (layer + ".attention.q_proj") if new else (layer + ".attention.attention.query")
    classes = [("classifier.weight", 0), ("classifier.bias", 0)]
    cfg = dict(
        num_classes=src.dim("num_classes", classes) if src.has("classifier.weight") else 0, patch_size=patch,
        width=src.dim("width", [(patch_key, 0), (f"{p}embeddings.patch_embeddings.projection.bias", 0),
                                (f"{p}embeddings.cls_token", 2), (pos_key, 2), (f"{p}layernorm.weight", 0),
                                (f"{p}layernorm.bias", 0), ("classifier.weight", 1)]),
        depth=depth, num_heads=None, ln_eps=1e-12,
        mlp_dim=_mlp_dim(src, "mlp_dim", [fc1.format(i) for i in range(depth)], [fc2.format(i) for i in range(depth)]),
        image_size=_grid_image_size(pos[1], patch, pos_key, pos), activation="gelu",
        qkv_bias=src.has(q_name.format(0) + ".bias"),
    )
    hc = hf_config_dict(hf_config)
    if hc:
        cfg.update(num_heads=hc.get("num_attention_heads"), ln_eps=hc.get("layer_norm_eps", 1e-12),
                   activation=hf_activation(hc.get("hidden_act", "gelu")))
    notes = []
    cfg = finish_vit_config(cfg, model, overrides, "hf_vit", notes)
    _check_depth(cfg, depth)
    if not cfg["qkv_bias"]:
        raise ConversionError("Hugging Face ViT without qkv bias is not supported.")
    m = [("embedding/kernel", [patch_key], "conv"),
         ("embedding/bias", [f"{p}embeddings.patch_embeddings.projection.bias"], "copy"),
         ("cls", [f"{p}embeddings.cls_token"], "copy"), ("pos_embedding", [pos_key], "copy"),
         *_ln("encoder_norm", f"{p}layernorm")]
    if cfg["num_classes"]:
        m += _linear("head", "classifier")
    for i in range(cfg["depth"]):
        lp = layer.format(i)
        if new:
            qkv = [f"{lp}.attention.{n}_proj" for n in "qkv"]
            out = f"{lp}.attention.o_proj"
        else:
            qkv = [f"{lp}.attention.attention.{n}" for n in ("query", "key", "value")]
            out = f"{lp}.attention.output.dense"
        m += _block_torch(f"block{i}", f"{lp}.layernorm_before", f"{lp}.layernorm_after", fc1.format(i),
                          fc2.format(i), out, qkv)
    return assemble(src, "ViT", cfg, m, [r"(^|\.)pooler\.", r"position_ids$", r"embeddings\.mask_token$"], notes)


def from_hf_clip(state_dict: Mapping, model: str | None = None, hf_config=None, **overrides) -> Converted:
    """A transformers CLIPModel state dict -> CLIP params.

    hf_config (CLIPConfig or its dict) gives head counts, eps, activation and the EOT id
    (eos_token_id 2 = legacy argmax pooling); without it heads are width // 64 unless given,
    eps 1e-5, QuickGELU, argmax pooling."""
    overrides = check_overrides(overrides, CLIP_KEYS)
    src = Source(state_dict, "hf_clip")
    src.expect_any(["vision_model.embeddings.patch_embedding.weight"])
    v, t = "vision_model", "text_model"
    patch = src.shape(f"{v}.embeddings.patch_embedding.weight", "the patch size", ndim=4)[2]
    pos = src.shape(f"{v}.embeddings.position_embedding.weight", "the image size", ndim=2)
    vl = _count(src, rf"{v}\.encoder\.layers\.(\d+)\.", "vision layers")
    tl = _count(src, rf"{t}\.encoder\.layers\.(\d+)\.", "text layers")
    vb, tb = f"{v}.encoder.layers.{{}}.mlp.", f"{t}.encoder.layers.{{}}.mlp."
    cfg = dict(
        embed_dim=src.dim("embed_dim", [("visual_projection.weight", 0), ("text_projection.weight", 0)]),
        image_size=_grid_image_size(pos[0], patch, f"{v}.embeddings.position_embedding.weight", pos),
        patch_size=patch, vision_layers=vl, vision_heads=None,
        vision_width=src.dim("vision_width", [(f"{v}.embeddings.patch_embedding.weight", 0),
                                              (f"{v}.embeddings.class_embedding", 0),
                                              (f"{v}.embeddings.position_embedding.weight", 1),
                                              (f"{v}.pre_layrnorm.weight", 0), (f"{v}.post_layernorm.weight", 0),
                                              ("visual_projection.weight", 1)]),
        vision_mlp_dim=_mlp_dim(src, "vision_mlp_dim", [vb.format(i) + "fc1" for i in range(vl)],
                                [vb.format(i) + "fc2" for i in range(vl)]),
        context_length=src.dim("context_length", [(f"{t}.embeddings.position_embedding.weight", 0)]),
        vocab_size=src.dim("vocab_size", [(f"{t}.embeddings.token_embedding.weight", 0)]),
        text_width=src.dim("text_width", [(f"{t}.final_layer_norm.weight", 0),
                                          (f"{t}.embeddings.token_embedding.weight", 1),
                                          (f"{t}.embeddings.position_embedding.weight", 1),
                                          ("text_projection.weight", 1)]),
        text_layers=tl, text_heads=None,
        text_mlp_dim=_mlp_dim(src, "text_mlp_dim", [tb.format(i) + "fc1" for i in range(tl)],
                              [tb.format(i) + "fc2" for i in range(tl)]),
        ln_eps=1e-5, activation="quick_gelu", eot_token_id=None,
    )
    hc = hf_config_dict(hf_config)
    if hc:
        vc, tc = hc.get("vision_config") or {}, hc.get("text_config") or {}
        acts = {hf_activation(c.get("hidden_act", "quick_gelu")) for c in (vc, tc)}
        epss = {float(c.get("layer_norm_eps", 1e-5)) for c in (vc, tc)}
        if len(acts) > 1 or len(epss) > 1:
            raise ConversionError(f"the two CLIP towers differ in hidden_act {acts} / layer_norm_eps {epss}; "
                                  "jdjax CLIP uses one of each.")
        eos = tc.get("eos_token_id")
        cfg.update(vision_heads=vc.get("num_attention_heads"), text_heads=tc.get("num_attention_heads"),
                   activation=acts.pop(), ln_eps=epss.pop(), eot_token_id=None if eos in (None, 2) else int(eos))
    notes = []
    cfg = finish_clip_config(cfg, model, overrides, "hf_clip", notes)
    m = [("visual/conv1/kernel", [f"{v}.embeddings.patch_embedding.weight"], "conv"),
         ("visual/class_embedding", [f"{v}.embeddings.class_embedding"], "copy"),
         ("visual/positional_embedding", [f"{v}.embeddings.position_embedding.weight"], "copy"),
         *_ln("visual/ln_pre", f"{v}.pre_layrnorm"), *_ln("visual/ln_post", f"{v}.post_layernorm"),
         ("visual/proj", ["visual_projection.weight"], "linear"),
         ("text/token_embedding/embedding", [f"{t}.embeddings.token_embedding.weight"], "copy"),
         ("text/positional_embedding", [f"{t}.embeddings.position_embedding.weight"], "copy"),
         *_ln("text/ln_final", f"{t}.final_layer_norm"),
         ("text/text_projection", ["text_projection.weight"], "linear"),
         ("logit_scale", ["logit_scale"], "copy")]
    for tower, prefix, depth, counted in (("visual", v, cfg["vision_layers"], vl), ("text", t, cfg["text_layers"], tl)):
        if depth != counted:
            raise ConversionError(f"the checkpoint has {counted} {tower} layers but the chosen model "
                                  f"{model_desc('CLIP', cfg)} has {depth}.")
        for i in range(depth):
            lp = f"{prefix}.encoder.layers.{i}"
            m += _block_torch(f"{tower}/block{i}", f"{lp}.layer_norm1", f"{lp}.layer_norm2", f"{lp}.mlp.fc1",
                              f"{lp}.mlp.fc2", f"{lp}.self_attn.out_proj", [f"{lp}.self_attn.{n}_proj" for n in "qkv"])
    return assemble(src, "CLIP", cfg, m, [r"position_ids$"], notes)


# ----------------------------------------------------------------------------- files -> Converted

_FROM = {
    "openai_clip": from_openai_clip,
    "open_clip": from_open_clip,
    "timm_vit": from_timm_vit,
    "google_vit_npz": from_google_vit,
    "hf_vit": from_hf_vit,
    "hf_clip": from_hf_clip,
}


def convert(src: str, format: str, model: str | None = None, allow_pickle: bool = False,
            **overrides) -> Converted:
    """Reads `src` in `format` (one of FORMATS) and converts it (layouts in the module docstring).

    overrides: model keyword arguments that shapes cannot tell or that should be forced, e.g.
    num_heads (ViT), vision_heads / text_heads (CLIP), activation, ln_eps, eot_token_id.
    allow_pickle: let torch unpickle arbitrary objects (only for files you trust).
    """
    if format not in FORMATS:
        raise ConversionError(f"unknown --format={format!r}; choose one of {', '.join(FORMATS)}.")
    if not os.path.exists(src):
        raise ConversionError(f"--src={src} does not exist.")
    if format == "google_vit_npz":
        if os.path.isdir(src):
            raise ConversionError(f"--src={src} is a directory; google_vit_npz expects an .npz file.")
        return from_google_vit(read_npz(src), model, **overrides)
    if format in ("hf_vit", "hf_clip"):
        sd, hf_config = read_hf(src, allow_pickle)
        return _FROM[format](sd, model, hf_config=hf_config, **overrides)
    return _FROM[format](read_state_dict(src, allow_pickle), model, **overrides)

