"""Checkpoint converters (jdjax.nn.convert) against an independent PyTorch implementation
(transformers, random weights).

No download: tiny transformers ViT / CLIP models are built from configs with random weights; each
source format is produced from their weights (HF state dicts directly; OpenAI CLIP by renaming HF
CLIP keys into OpenAI names with a fused in_proj_weight, saved as a real TorchScript archive in fp16;
open_clip as a DDP training checkpoint; timm with a fused qkv; the Google npz with per-head q/k/v
kernels and an HWIO patch kernel). The converted jdjax models must reproduce the torch outputs.
The command line is tested in tests/tools/test_convert.py, loading into a fresh model in
tests/train/test_pretrained.py.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.nn import convert as cv
from jdjax.nn.convert.readers import _is_torchscript
from jdjax.testing import random_images, randomize_torch, torch_nchw, torch_numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WIDTH, HEADS, MLP, LAYERS, CLASSES = 32, 2, 64, 2, 5
VOCAB, CTX, EMBED = 50, 8, 24
TOL = dict(rtol=1e-4, atol=1e-4)


def _vit_cfg(**kw):
    return transformers.ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
        image_size=16, patch_size=4, num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6, **kw,  # 1e-6: the Google / timm epsilon the npz and timm converters assume
    )


def _clip_cfg(act="quick_gelu", eos=2):
    tower = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 hidden_act=act)
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=CTX, eos_token_id=eos, bos_token_id=48,
                         pad_token_id=0, **tower),
        vision_config=dict(image_size=16, patch_size=4, **tower), projection_dim=EMBED,
    )


@pytest.fixture(scope="module")
def hf_vit():
    torch.manual_seed(0)
    return randomize_torch(transformers.ViTForImageClassification(_vit_cfg()))


@pytest.fixture(scope="module")
def hf_clip():
    torch.manual_seed(0)
    model = randomize_torch(transformers.CLIPModel(_clip_cfg()))
    with torch.no_grad():  # fp16-representable weights, so the fp16 TorchScript archive is lossless
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def _vit_weights(sd):
    """HF ViT (4.x or 5.x names) -> per-layer torch tensors, the source of the timm / npz layouts."""
    new = "vit.layers.0.attention.q_proj.weight" in sd
    out = []
    for i in range(LAYERS):
        if new:
            p = f"vit.layers.{i}."
            q, k, v, o = (p + f"attention.{n}_proj" for n in "qkvo")
            fc1, fc2 = p + "mlp.fc1", p + "mlp.fc2"
        else:
            p = f"vit.encoder.layer.{i}."
            q, k, v = (p + f"attention.attention.{n}" for n in ("query", "key", "value"))
            o, fc1, fc2 = p + "attention.output.dense", p + "intermediate.dense", p + "output.dense"
        out.append(dict(ln1=p + "layernorm_before", ln2=p + "layernorm_after", q=q, k=k, v=v, o=o, fc1=fc1, fc2=fc2))
    return out


def _timm_state_dict(sd):
    t = {
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "norm.weight": sd["vit.layernorm.weight"], "norm.bias": sd["vit.layernorm.bias"],
        "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"],
    }
    for i, n in enumerate(_vit_weights(sd)):
        b = f"blocks.{i}."
        for ours, theirs in (("norm1", n["ln1"]), ("norm2", n["ln2"]), ("attn.proj", n["o"]), ("mlp.fc1", n["fc1"]),
                             ("mlp.fc2", n["fc2"])):
            t[b + ours + ".weight"], t[b + ours + ".bias"] = sd[theirs + ".weight"], sd[theirs + ".bias"]
        t[b + "attn.qkv.weight"] = torch.cat([sd[n[x] + ".weight"] for x in "qkv"])  # [3C, C]
        t[b + "attn.qkv.bias"] = torch.cat([sd[n[x] + ".bias"] for x in "qkv"])
    return t


def _google_npz_arrays(sd):
    dh = WIDTH // HEADS
    a = {
        "embedding/kernel": torch_numpy(sd["vit.embeddings.patch_embeddings.projection.weight"]).transpose(2, 3, 1, 0),
        "embedding/bias": torch_numpy(sd["vit.embeddings.patch_embeddings.projection.bias"]),
        "cls": torch_numpy(sd["vit.embeddings.cls_token"]),
        "Transformer/posembed_input/pos_embedding": torch_numpy(sd["vit.embeddings.position_embeddings"]),
        "Transformer/encoder_norm/scale": torch_numpy(sd["vit.layernorm.weight"]),
        "Transformer/encoder_norm/bias": torch_numpy(sd["vit.layernorm.bias"]),
        "head/kernel": torch_numpy(sd["classifier.weight"]).T, "head/bias": torch_numpy(sd["classifier.bias"]),
        "pre_logits/kernel": np.ones((WIDTH, WIDTH), np.float32), "pre_logits/bias": np.zeros(WIDTH, np.float32),
    }
    for i, n in enumerate(_vit_weights(sd)):
        b = f"Transformer/encoderblock_{i}/"
        att = b + "MultiHeadDotProductAttention_1/"
        for ln, theirs in (("LayerNorm_0", n["ln1"]), ("LayerNorm_2", n["ln2"])):
            a[b + ln + "/scale"], a[b + ln + "/bias"] = torch_numpy(sd[theirs + ".weight"]), torch_numpy(sd[theirs + ".bias"])
        for name, x in (("query", "q"), ("key", "k"), ("value", "v")):
            a[att + name + "/kernel"] = torch_numpy(sd[n[x] + ".weight"]).T.reshape(WIDTH, HEADS, dh)  # [C, H, Dh]
            a[att + name + "/bias"] = torch_numpy(sd[n[x] + ".bias"]).reshape(HEADS, dh)
        a[att + "out/kernel"] = torch_numpy(sd[n["o"] + ".weight"]).T.reshape(HEADS, dh, WIDTH)  # [H, Dh, C]
        a[att + "out/bias"] = torch_numpy(sd[n["o"] + ".bias"])
        for j, fc in enumerate(("fc1", "fc2")):
            a[b + f"MlpBlock_3/Dense_{j}/kernel"] = torch_numpy(sd[n[fc] + ".weight"]).T
            a[b + f"MlpBlock_3/Dense_{j}/bias"] = torch_numpy(sd[n[fc] + ".bias"])
    return a


def _openai_state_dict(sd):
    """HF CLIPModel -> OpenAI CLIP names (fused in_proj_weight, x @ proj projections)."""
    v, t = "vision_model", "text_model"
    o = {
        "visual.conv1.weight": sd[f"{v}.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd[f"{v}.embeddings.class_embedding"],
        "visual.positional_embedding": sd[f"{v}.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": sd[f"{t}.embeddings.token_embedding.weight"],
        "positional_embedding": sd[f"{t}.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
        "logit_scale": sd["logit_scale"],
    }
    for ours, theirs in (("visual.ln_pre", f"{v}.pre_layrnorm"), ("visual.ln_post", f"{v}.post_layernorm"),
                         ("ln_final", f"{t}.final_layer_norm")):
        o[ours + ".weight"], o[ours + ".bias"] = sd[theirs + ".weight"], sd[theirs + ".bias"]
    for prefix, tower in (("visual.transformer", v), ("transformer", t)):
        for i in range(LAYERS):
            ours, theirs = f"{prefix}.resblocks.{i}.", f"{tower}.encoder.layers.{i}."
            o[ours + "attn.in_proj_weight"] = torch.cat([sd[theirs + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            o[ours + "attn.in_proj_bias"] = torch.cat([sd[theirs + f"self_attn.{x}_proj.bias"] for x in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                o[ours + a + ".weight"], o[ours + a + ".bias"] = sd[theirs + b + ".weight"], sd[theirs + b + ".bias"]
    return o


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _save_torchscript(tensors, path):
    """A TorchScript archive whose state_dict() is `tensors` (nested modules named after the key paths)."""
    root = _Holder()
    for key, value in tensors.items():
        *mods, leaf = key.split(".")
        node = root
        for m in mods:
            if m not in node._modules:
                node.add_module(m, torch.nn.Module())
            node = node._modules[m]
        if value.is_floating_point():
            node.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
        else:
            node.register_buffer(leaf, value.clone())
    torch.jit.script(root).save(str(path))


def _vit_reference(hf, images):
    with torch.no_grad():
        logits = hf(torch_nchw(images)).logits
        tokens = hf.vit(torch_nchw(images)).last_hidden_state
    return torch_numpy(logits), torch_numpy(tokens)


_APPLY_CACHE = {}


def _apply_fn(model_name, config, **kwargs):
    """A jitted `apply` per model config, so tests converting to the same model compile it once."""
    key = (model_name, json.dumps(config, sort_keys=True), tuple(sorted(kwargs.items())))
    if key not in _APPLY_CACHE:
        model = cv.build_model(model_name, config)
        _APPLY_CACHE[key] = jax.jit(lambda p, *args: model.apply({"params": p}, *args, **kwargs))
    return _APPLY_CACHE[key]


def _check_vit(converted, hf, num_classes=CLASSES):
    assert converted.model == "ViT"
    images = random_images((2, 16, 16, 3))
    logits, info = _apply_fn("ViT", converted.config, return_info=True)(converted.params, images)
    ref_logits, ref_tokens = _vit_reference(hf, images)
    if num_classes:
        np.testing.assert_allclose(logits, ref_logits, **TOL)
    np.testing.assert_allclose(info["tokens"], ref_tokens, **TOL)


def _clip_inputs(eos=49):
    rng = np.random.default_rng(0)
    lengths = [3, 8, 5]
    ids = np.zeros((3, CTX), np.int64)
    for i, n in enumerate(lengths):  # SOT 48, words, EOT (49 = the largest id), padding 0
        ids[i, 0], ids[i, 1 : n - 1], ids[i, n - 1] = 48, rng.integers(1, 48, size=n - 2), eos
    mask = (np.arange(CTX)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return random_images((2, 16, 16, 3)), ids, mask


def _check_clip(converted, hf, eos=49):
    assert converted.model == "CLIP"
    images, ids, mask = _clip_inputs(eos)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), pixel_values=torch_nchw(images),
                 attention_mask=torch.from_numpy(mask))
    out = _apply_fn("CLIP", converted.config)(converted.params, images, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    norm = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(norm(np.asarray(out["image_embeds"])), torch_numpy(ref.image_embeds), **TOL)
    np.testing.assert_allclose(norm(np.asarray(out["text_embeds"])), torch_numpy(ref.text_embeds), **TOL)
    np.testing.assert_allclose(out["logits_per_image"], torch_numpy(ref.logits_per_image), **TOL)


# ----------------------------------------------------------------------------- parity per format


def test_hf_vit_state_dict_file(hf_vit, tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(hf_vit.state_dict(), path)
    converted = cv.convert(str(path), "hf_vit", num_heads=HEADS, ln_eps=1e-6)
    assert converted.config["num_classes"] == CLASSES and converted.config["image_size"] == 16
    _check_vit(converted, hf_vit)


def test_hf_vit_model_directory(tmp_path):
    """ViTModel (no classifier; its pooler is dropped) saved with save_pretrained: config.json gives the heads."""
    torch.manual_seed(1)
    hf = randomize_torch(transformers.ViTModel(_vit_cfg()))
    hf.save_pretrained(tmp_path / "hf")
    cv.save_converted(cv.convert(str(tmp_path / "hf"), "hf_vit"), str(tmp_path / "out"))
    params, kwargs = cv.load_converted(str(tmp_path / "out"))
    assert kwargs["num_heads"] == HEADS and kwargs["num_classes"] == 0 and kwargs["ln_eps"] == 1e-6
    assert any("pooler" in k for k in cv.read_info(str(tmp_path / "out"))["dropped"])
    images = random_images((2, 16, 16, 3))
    _, info = _apply_fn("ViT", kwargs, return_info=True)(params, images)
    with torch.no_grad():
        ref = hf(torch_nchw(images)).last_hidden_state
    np.testing.assert_allclose(info["tokens"], torch_numpy(ref), **TOL)


def test_timm_vit(hf_vit, tmp_path):
    sd = _timm_state_dict(hf_vit.state_dict())
    sd["pre_logits.fc.weight"] = torch.zeros(WIDTH, WIDTH)  # old timm in21k checkpoints: dropped
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)  # a DDP training ckpt
    converted = cv.convert(str(path), "timm_vit", num_heads=HEADS)
    assert converted.dropped == ("pre_logits.fc.weight",)
    _check_vit(converted, hf_vit)


def test_google_vit_npz(hf_vit, tmp_path):
    path = tmp_path / "ViT-tiny_4.npz"
    np.savez(path, **_google_npz_arrays(hf_vit.state_dict()))
    dst = tmp_path / "converted"
    cv.save_converted(cv.convert(str(path), "google_vit_npz"), str(dst))  # heads from [C, H, Dh]
    info = cv.read_info(str(dst))
    assert info["model"] == "ViT" and set(info["dropped"]) == {"pre_logits/bias", "pre_logits/kernel"}
    params, kwargs = cv.load_converted(str(dst))
    assert kwargs["num_heads"] == HEADS and kwargs["ln_eps"] == 1e-6
    _check_vit(cv.Converted(params, "ViT", kwargs, "google_vit_npz"), hf_vit)
    # init_from may name the .npz itself: converted in memory (NumPy only)
    raw, raw_kwargs = cv.load_converted(str(path))
    assert raw_kwargs == kwargs
    jax.tree.map(np.testing.assert_array_equal, raw, params)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_openai_clip_torchscript_fp16(hf_clip, tmp_path):
    """A real TorchScript archive (torch.jit.script of a module holding the tensors), fp16 like OpenAI's."""
    sd = {k: v.half() for k, v in _openai_state_dict(hf_clip.state_dict()).items()}
    sd.update(input_resolution=torch.tensor(16), context_length=torch.tensor(CTX), vocab_size=torch.tensor(VOCAB))
    path = tmp_path / "ViT-tiny.pt"
    _save_torchscript(sd, path)
    assert _is_torchscript(str(path))
    converted = cv.convert(str(path), "openai_clip", vision_heads=HEADS, text_heads=HEADS)
    assert set(converted.dropped) == {"input_resolution", "context_length", "vocab_size"}
    assert converted.config["activation"] == "quick_gelu" and converted.config["embed_dim"] == EMBED
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(converted.params))
    _check_clip(converted, hf_clip)


def test_openai_clip_state_dict_saved(hf_clip, tmp_path):
    """The plain (non-TorchScript) state-dict path through orbax and model.json."""
    sd = _openai_state_dict(hf_clip.state_dict())
    path = tmp_path / "clip_sd.pt"
    torch.save(sd, path)
    dst = tmp_path / "out"
    cv.save_converted(cv.convert(str(path), "openai_clip", vision_heads=HEADS, text_heads=HEADS), str(dst))
    params, kwargs = cv.load_converted(str(dst))
    direct = cv.from_openai_clip(sd, vision_heads=HEADS, text_heads=HEADS)  # its parity: the TorchScript test
    assert kwargs == direct.config and cv.read_info(str(dst))["model"] == "CLIP"
    assert np.asarray(params["logit_scale"]).shape == ()
    jax.tree.map(np.testing.assert_array_equal, params, direct.params)


def test_open_clip_training_checkpoint(tmp_path):
    """open_clip: exact GELU by default, 'module.' prefix and the text attn_mask buffer."""
    torch.manual_seed(2)
    hf = randomize_torch(transformers.CLIPModel(_clip_cfg(act="gelu")))
    sd = _openai_state_dict(hf.state_dict())
    sd["attn_mask"] = torch.full((CTX, CTX), float("-inf")).triu(1)
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    converted = cv.convert(str(path), "open_clip", vision_heads=HEADS, text_heads=HEADS)
    assert converted.config["activation"] == "gelu" and converted.dropped == ("attn_mask",)
    _check_clip(converted, hf)
    # an open_clip '-quickgelu' name would pick QuickGELU (and, for a known size, its dims: a mismatch here)
    with pytest.raises(cv.ConversionError, match="has 2 vision blocks but the chosen model"):
        cv.convert(str(path), "open_clip", model="ViT-B-32-quickgelu")


def test_hf_clip_directory_reads_config(tmp_path):
    """save_pretrained directory: heads, eps, activation and the EOT id (49, not legacy 2) from config.json."""
    torch.manual_seed(3)
    hf = randomize_torch(transformers.CLIPModel(_clip_cfg(eos=49)))
    hf.save_pretrained(tmp_path / "hf")
    converted = cv.convert(str(tmp_path / "hf"), "hf_clip")
    assert converted.config["eot_token_id"] == 49 and converted.config["vision_heads"] == HEADS
    _check_clip(converted, hf)


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def timm_sd(hf_vit):
    return _timm_state_dict(hf_vit.state_dict())


def test_missing_key_is_named(timm_sd):
    sd = {k: v for k, v in timm_sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(cv.ConversionError, match=r"no key 'blocks\.1\.mlp\.fc2\.bias'.*block1/mlp/fc2/bias"):
        cv.from_timm_vit(sd, num_heads=HEADS)


def test_unexpected_key_is_named(timm_sd):
    sd = {**timm_sd, "blocks.0.ls1.gamma": torch.ones(WIDTH)}
    with pytest.raises(cv.ConversionError, match=r"unexpected timm_vit keys .*'blocks\.0\.ls1\.gamma' \(32,\)"):
        cv.from_timm_vit(sd, num_heads=HEADS)


def test_wrong_shape_names_key_and_both_shapes(hf_vit, tmp_path):
    path = tmp_path / "vit.npz"
    np.savez(path, **_google_npz_arrays(hf_vit.state_dict()))
    # the file is a 2-layer toy; ViT-Ti/4 wants 192 wide, 12 layers
    with pytest.raises(cv.ConversionError, match=r"12 blocks|depth=12"):
        cv.convert(str(path), "google_vit_npz", model="Ti/4")
    with pytest.raises(cv.ConversionError) as e:
        cv.convert(str(path), "google_vit_npz", model="Ti/4", depth=LAYERS)
    msg = str(e.value)
    assert "'embedding/kernel'" in msg and "(4, 4, 3, 32)" in msg and "(4, 4, 3, 192)" in msg
    # a head count that contradicts the per-head kernels
    with pytest.raises(cv.ConversionError, match=r"query/kernel' has shape \(32, 2, 16\).*\(32, 4, 8\)"):
        cv.convert(str(path), "google_vit_npz", num_heads=4)


def test_heads_needed_for_nonstandard_width(timm_sd):
    with pytest.raises(cv.ConversionError, match="--num_heads"):
        cv.from_timm_vit(timm_sd)


def test_wrong_file_type(hf_vit, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(cv.ConversionError, match="could not read .* as a PyTorch checkpoint"):
        cv.convert(str(text), "timm_vit")
    npz = tmp_path / "vit.npz"
    np.savez(npz, **_google_npz_arrays(hf_vit.state_dict()))
    with pytest.raises(cv.ConversionError, match="looks like google_vit_npz: use --format=google_vit_npz"):
        cv.convert(str(npz), "openai_clip")
    pt = tmp_path / "vit.pt"
    torch.save(hf_vit.state_dict(), pt)
    with pytest.raises(cv.ConversionError, match="looks like a PyTorch checkpoint"):
        cv.convert(str(pt), "google_vit_npz")
    with pytest.raises(cv.ConversionError, match="does not look like a openai_clip.*use --format=hf_vit"):
        cv.convert(str(pt), "openai_clip")
    with pytest.raises(cv.ConversionError, match="not a NumPy .npz archive"):
        cv.convert(str(text), "google_vit_npz")


def test_existing_dst_is_not_overwritten(hf_vit, tmp_path):
    path = tmp_path / "vit.npz"
    np.savez(path, **_google_npz_arrays(hf_vit.state_dict()))
    converted = cv.convert(str(path), "google_vit_npz")
    dst = cv.save_converted(converted, str(tmp_path / "out"))
    with pytest.raises(cv.ConversionError, match="already exists"):
        cv.save_converted(converted, dst)
    cv.save_converted(converted, dst, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out", "vit.npz"]  # no temporary directories left behind
    with pytest.raises(cv.ConversionError, match="not a converted checkpoint"):
        cv.load_converted(str(tmp_path))


# ----------------------------------------------------------------------------- model names


@pytest.mark.parametrize("name, expected", [
    ("B/16", dict(patch_size=16, width=768, num_heads=12)),
    ("imagenet21k_ViT-L_16", dict(patch_size=16, width=1024, depth=24, num_heads=16)),
    ("vit_small_patch16_384.augreg_in21k", dict(patch_size=16, width=384, num_heads=6, image_size=384)),
    ("google/vit-huge-patch14-224-in21k", dict(patch_size=14, width=1280, num_heads=16, image_size=224)),
])
def test_vit_names(name, expected):
    cfg = cv.vit_name_config(name)
    assert {k: cfg[k] for k in expected} == expected


@pytest.mark.parametrize("name, expected, act", [
    ("ViT-B/32", dict(patch_size=32, vision_width=768, vision_heads=12, text_heads=8), None),
    ("ViT-B-16-quickgelu", dict(patch_size=16, vision_heads=12), "quick_gelu"),
    ("ViT-L-14-336", dict(image_size=336, patch_size=14, vision_heads=16, text_heads=12), None),
    ("openai/clip-vit-large-patch14-336", dict(image_size=336, vision_width=1024), None),
    ("ViT-H-14", dict(vision_heads=16, text_heads=16), None),
    ("RN50", dict(vision_layers=(3, 4, 6, 3), vision_width=64, vision_heads=32, patch_size=None, embed_dim=1024), None),
    ("RN50-quickgelu", dict(vision_layers=(3, 4, 6, 3), text_heads=8), "quick_gelu"),
    ("RN50x4", dict(image_size=288, vision_width=80, vision_heads=40, text_width=640), None),
])
def test_clip_names(name, expected, act):
    cfg, activation = cv.clip_name_config(name)
    assert {k: cfg[k] for k in expected} == expected and activation == act


def test_unknown_names():
    with pytest.raises(cv.ConversionError, match="unknown CLIP model name 'RN42'"):
        cv.clip_name_config("RN42")
    with pytest.raises(cv.ConversionError, match="unknown ViT model name"):
        cv.vit_name_config("resnet50")


# ----------------------------------------------------------------------------- damaged files (issue 16)


def _clip_file(hf_clip, tmp_path, **damage):
    """An open_clip training checkpoint of the tiny CLIP with some tensors replaced (`damage`)."""
    sd = {**_openai_state_dict(hf_clip.state_dict()), **damage}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    return str(path)


def test_wrong_text_projection_is_named_not_visual_proj(hf_clip, tmp_path):
    """The embedding size used to be read from text_projection alone, so a damaged text_projection was
    reported as a wrong-shape visual.proj (a fine tensor)."""
    src = _clip_file(hf_clip, tmp_path, text_projection=torch.zeros(WIDTH, EMBED + 1))
    with pytest.raises(cv.ConversionError) as e:
        cv.convert(src, "open_clip", vision_heads=HEADS, text_heads=HEADS)
    msg = str(e.value)
    assert msg.startswith(f"open_clip key 'text_projection' has shape ({WIDTH}, {EMBED + 1}), but CLIP(embed_dim={EMBED}")
    assert f"needs shape ({WIDTH}, {EMBED}) there" in msg
    assert f"embed_dim={EMBED} was read from 'visual.proj' of shape ({WIDTH}, {EMBED})" in msg
    assert "either side may be the damaged one" in msg  # two tensors carry the size: a tie, said so
    # a tensor that is outvoted is named alone: the patch kernel with a wrong width
    src = _clip_file(hf_clip, tmp_path, **{"visual.conv1.weight": torch.zeros(WIDTH + 8, 3, 4, 4)})
    with pytest.raises(cv.ConversionError, match=rf"^open_clip key 'visual\.conv1\.weight' has shape "
                                                 rf"\({WIDTH + 8}, 3, 4, 4\), but .* needs shape \({WIDTH}, 3, 4, 4\)"):
        cv.convert(src, "open_clip", vision_heads=HEADS, text_heads=HEADS)
    # a tensor of the wrong rank where a size is read from it
    src = _clip_file(hf_clip, tmp_path, **{"visual.conv1.weight": torch.zeros(WIDTH, 48)})
    with pytest.raises(cv.ConversionError, match=r"'visual\.conv1\.weight' has shape \(32, 48\), but a 4-D tensor"):
        cv.convert(src, "open_clip", vision_heads=HEADS, text_heads=HEADS)


@pytest.mark.parametrize("fmt, key, shape", [
    ("timm_vit", "blocks.1.mlp.fc1.weight", (MLP + 1, WIDTH)),  # the MLP size is read from every block
    ("timm_vit", "norm.weight", (WIDTH - 1,)),
    ("hf_vit", "vit.embeddings.cls_token", (1, 1, WIDTH + 2)),
    ("hf_clip", "visual_projection.weight", (EMBED, WIDTH + 1)),
])
def test_one_damaged_tensor_is_the_one_named(fmt, key, shape, hf_vit, hf_clip, timm_sd):
    sd = dict(timm_sd) if fmt == "timm_vit" else (hf_vit if fmt == "hf_vit" else hf_clip).state_dict()
    sd = {**sd, key: torch.zeros(shape)}
    convert = {"timm_vit": cv.from_timm_vit, "hf_vit": cv.from_hf_vit, "hf_clip": cv.from_hf_clip}[fmt]
    heads = dict(num_heads=HEADS) if fmt != "hf_clip" else dict(vision_heads=HEADS, text_heads=HEADS)
    with pytest.raises(cv.ConversionError) as e:
        convert(sd, **heads)
    assert str(e.value).startswith(f"{fmt} key {key!r} has shape {shape}, but "), str(e.value)
