"""Checkpoint conversion for the nn towers: OpenAI CLIP, open_clip, timm ViT, Google ViT npz and
Hugging Face ViT / CLIP -> the parameter trees of `jdjax.nn.vit.ViT` and `jdjax.nn.clip.CLIP` (ViT
or ResNet image towers; a ResNet's BatchNorm running statistics become a 'batch_stats' tree).

Every converter reads a source state dict, infers the architecture from its shapes (plus a model
name or explicit dims where shapes cannot tell, e.g. the head count), maps every tensor onto the
model's parameter tree with NumPy and checks the result against that model's `init` shapes. A
missing key, an unexpected key, a shape that does not fit the chosen model or an unreadable file
raises `ConversionError` naming the key and both shapes. Each size (width, embedding, MLP, classes)
is read from every tensor that carries it and the majority wins, so a single damaged tensor is the
one named (with where the size was read); an empty or truncated file is reported as such before
any reader runs. All floating tensors become float32
(OpenAI's fp16 archives included). torch is imported only to read torch files (`pip install -e
.[convert]`); .npz and .safetensors need none.

Modules: `readers` (files -> {name: array}), `names` (model names -> dims), `mapping` (mapping
kinds, `Converted`, the shape check), `formats` (one key mapping per format, `convert`), `store`
(the converted directory: params/ (+ batch_stats/) + model.json). Loading a converted backbone into a fresh model
(`config.init_from`) is `jdjax.train.pretrained`; the command line is the `convert` tool (README).

    c = convert("imagenet21k_ViT-B_16.npz", "google_vit_npz")   # -> Converted
    save_converted(c, "ckpt/vit_b16")
    params, kwargs = load_converted("ckpt/vit_b16")             # ViT(**kwargs), {'params': params}
    trees, kwargs = load_converted("ckpt/clip_rn50")            # CLIP(**kwargs), {'params', 'batch_stats'}
"""

from jdjax.nn.convert.formats import (
    convert,
    from_google_vit,
    from_hf_clip,
    from_hf_vit,
    from_open_clip,
    from_openai_clip,
    from_timm_vit,
)
from jdjax.nn.convert.mapping import (
    FORMATS,
    Converted,
    build_model,
    expected_shapes,
    expected_variables,
    guess_format,
)
from jdjax.nn.convert.names import clip_name_config, vit_name_config
from jdjax.nn.convert.readers import ConversionError, read_hf, read_npz, read_safetensors, read_state_dict, read_torch
from jdjax.nn.convert.store import (
    BATCH_STATS_DIR,
    MODEL_JSON,
    PARAMS_DIR,
    load_converted,
    load_params,
    read_info,
    save_converted,
)

__all__ = [
    "BATCH_STATS_DIR",
    "FORMATS",
    "MODEL_JSON",
    "PARAMS_DIR",
    "ConversionError",
    "Converted",
    "build_model",
    "clip_name_config",
    "convert",
    "expected_shapes",
    "expected_variables",
    "from_google_vit",
    "from_hf_clip",
    "from_hf_vit",
    "from_open_clip",
    "from_openai_clip",
    "from_timm_vit",
    "guess_format",
    "load_converted",
    "load_params",
    "read_hf",
    "read_info",
    "read_npz",
    "read_safetensors",
    "read_state_dict",
    "read_torch",
    "save_converted",
    "vit_name_config",
]
