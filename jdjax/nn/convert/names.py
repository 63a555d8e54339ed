"""Model names and keyword arguments of the converted models: 'B/16', 'ViT-B-32-quickgelu',
'google/vit-base-patch16-224' ... -> `jdjax.nn.vit.ViT` / `jdjax.nn.clip.CLIP` dims, and the
completion of a shape-inferred config (head counts the shapes cannot tell, explicit overrides).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from jdjax.nn.convert.readers import ConversionError

VIT_KEYS = ("num_classes", "patch_size", "width", "depth", "num_heads", "mlp_dim", "ln_eps", "image_size",
            "activation", "qkv_bias")
CLIP_KEYS = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
             "vision_mlp_dim", "context_length", "vocab_size", "text_width", "text_layers", "text_heads",
             "text_mlp_dim", "ln_eps", "activation", "eot_token_id")


def model_desc(model: str, cfg: Mapping) -> str:
    """'ViT(patch_size=16, width=768, ...)': the model and its main dims, for messages."""
    keys = (("patch_size", "width", "depth", "num_heads", "mlp_dim", "image_size", "num_classes") if model == "ViT"
            else ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                  "text_width", "text_layers", "text_heads", "context_length", "vocab_size"))
    return f"{model}(" + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg) + ")"


_VIT_SIZE_WORDS = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}
# Head counts of the standard widths (ViT-Ti/S/B/L/H); other widths need --num_heads.
_VIT_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# open_clip models whose head width is not 64: (vision heads, text heads).
_OPEN_CLIP_HEADS = {"ViT-H-14": (16, 16), "ViT-g-14": (16, 16), "ViT-bigG-14": (16, 20)}


def vit_name_config(name: str) -> dict:
    """ViT dims from a name: 'B/16', 'ViT-B_16' (Google npz), 'vit_base_patch16_384' (timm),
    'google/vit-base-patch16-224-in21k' (Hugging Face). Includes image_size when the name has it."""
    from jdjax.nn.vit import vit_config

    n = name.strip()
    m = re.search(r"(?:^|[^A-Za-z])(?:ViT-)?(Ti|S|B|L|H)[/_-](\d+)(?:$|[^0-9])", n)
    image = None
    if m:
        size, patch = m.group(1), m.group(2)
    else:
        m = re.search(r"vit[_-](tiny|small|base|large|huge)[_-]patch(\d+)(?:[_-](\d+))?", n, re.IGNORECASE)
        if not m:
            raise ConversionError(
                f"unknown ViT model name {name!r}; use e.g. 'B/16', 'ViT-B_16', 'vit_base_patch16_224' or "
                "'google/vit-base-patch16-224', or give the dims (--num_heads) and no name."
            )
        size, patch, image = _VIT_SIZE_WORDS[m.group(1).lower()], m.group(2), m.group(3)
    cfg = vit_config(f"{size}/{patch}")
    if image:
        cfg["image_size"] = int(image)
    return cfg


def clip_name_config(name: str) -> tuple[dict, str | None]:
    """CLIP dims from 'ViT-B/32', 'ViT-B-32-quickgelu', 'ViT-L-14-336', 'ViT-L/14@336px', 'RN50',
    'RN50-quickgelu', 'RN101', 'RN50x4' or 'openai/clip-vit-base-patch32' -> (kwargs (all dims, or only the
    head counts for open_clip's big models), activation implied by an open_clip name or None)."""
    from jdjax.nn.clip import clip_config

    n = name.strip()
    activation = "quick_gelu" if n.endswith("-quickgelu") else None
    n = n.removesuffix("-quickgelu")
    m = re.search(r"clip-vit-(base|large)-patch(\d+)(?:-(\d+))?", n, re.IGNORECASE)
    if m:
        n = f"ViT-{_VIT_SIZE_WORDS[m.group(1).lower()]}/{m.group(2)}" + (f"@{m.group(3)}px" if m.group(3) else "")
    elif n in _OPEN_CLIP_HEADS:
        vh, th = _OPEN_CLIP_HEADS[n]
        return {"vision_heads": vh, "text_heads": th}, activation
    else:
        m = re.fullmatch(r"(?:ViT-)?(B|L)[-/](\d+)(?:[-@](\d+)(?:px)?)?", n)
        if m:
            n = f"ViT-{m.group(1)}/{m.group(2)}" + (f"@{m.group(3)}px" if m.group(3) and m.group(3) != "224" else "")
    try:
        return clip_config(n), activation
    except ValueError as e:
        raise ConversionError(
            f"unknown CLIP model name {name!r}: {e} open_clip names like 'ViT-B-32-quickgelu', 'RN50', 'ViT-H-14' and "
            "Hugging Face names like 'openai/clip-vit-base-patch32' work too; or give --num_heads / --text_heads."
        ) from e


_HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "relu": "relu"}


def hf_activation(act) -> str:
    """A Hugging Face `hidden_act` -> the jdjax activation name."""
    if act not in _HF_ACT:
        raise ConversionError(f"Hugging Face hidden_act={act!r} has no jdjax equivalent; known: {sorted(_HF_ACT)}.")
    return _HF_ACT[act]


def hf_config_dict(hf_config) -> dict | None:
    """A transformers config object, its dict, or None -> a dict or None."""
    if hf_config is None:
        return None
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    return dict(hf_config)


def _heads_note(width: int, heads: int, where: str) -> str:
    return f"{where}: num_heads={heads} inferred from width {width} (pass --model or explicit heads if that is wrong)"


def check_overrides(overrides: Mapping | None, allowed: Sequence[str]) -> dict:
    """The overrides as a dict; a name not in `allowed` is an error."""
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise ConversionError(f"unknown model options {bad}; this model takes {sorted(allowed)}.")
    return overrides


def finish_vit_config(cfg: dict, model: str | None, overrides: dict, fmt: str, notes: list) -> dict:
    """Shape-inferred ViT dims + the model name's dims + overrides -> ViT kwargs (VIT_KEYS); the head
    count comes from the standard width table when nothing gave it (a note is appended)."""
    if model:
        cfg.update(vit_name_config(model))
    cfg.update(overrides)
    if cfg.get("num_heads") is None:
        heads = _VIT_HEADS_BY_WIDTH.get(cfg["width"])
        if heads is None:
            raise ConversionError(
                f"cannot tell the head count of this {fmt} checkpoint (width {cfg['width']} is not a standard ViT "
                "width); pass --model (e.g. B/16) or --num_heads."
            )
        cfg["num_heads"] = heads
        notes.append(_heads_note(cfg["width"], heads, "ViT"))
    return {k: cfg[k] for k in VIT_KEYS}


def finish_clip_config(cfg: dict, model: str | None, overrides: dict, fmt: str, notes: list) -> dict:
    """Shape-inferred CLIP dims + the model name's dims / activation + overrides -> CLIP kwargs
    (CLIP_KEYS); missing head counts are width // 64 as OpenAI's (a ResNet's attention pool: 32 x the stem
    width // 64), and a note is appended."""
    if model:
        named, act = clip_name_config(model)
        cfg.update(named)
        if act:
            cfg["activation"] = act
    cfg.update(overrides)
    resnet = isinstance(cfg["vision_layers"], (tuple, list))  # heads over the attention pool's 32 x stem width
    for tower, width_key in (("vision_heads", "vision_width"), ("text_heads", "text_width")):
        if cfg.get(tower) is None:
            width = cfg[width_key] * (32 if resnet and tower == "vision_heads" else 1)
            wide_heads = fmt == "open_clip" and tower == "vision_heads" and width in (1280, 1408, 1664)
            if width % 64 or width < 64 or wide_heads:
                flag = "--num_heads" if tower == "vision_heads" else "--text_heads"
                raise ConversionError(
                    f"cannot tell the {tower.split('_')[0]} head count of this {fmt} checkpoint from width {width}; "
                    f"pass --model (e.g. ViT-B/32, ViT-H-14) or {flag}."
                )
            cfg[tower] = width // 64  # OpenAI's build_model: heads = width // 64
            notes.append(_heads_note(width, width // 64, tower.split("_")[0] + " tower (width // 64, as OpenAI)"))
    return {k: cfg[k] for k in CLIP_KEYS}

