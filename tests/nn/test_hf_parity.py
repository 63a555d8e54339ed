"""The layouts express Hugging Face ViT and CLIP exactly: tiny random models, weights copied over.

No download: the torch models are built from small configs with random weights. The weight
mapping here is a minimal test-local converter (Hugging Face 4.x and 5.x key names); the
package's checkpoint converters live in jdjax/tools.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.nn.clip import CLIP
from jdjax.nn.vit import ViT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WIDTH, HEADS, MLP, LAYERS = 32, 2, 64, 2


def _np(t):
    return t.detach().float().numpy()


def _randomize(model, seed=0, scale=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def _ln(sd, prefix):
    return {"scale": _np(sd[prefix + ".weight"]), "bias": _np(sd[prefix + ".bias"])}


def _dense(sd, prefix):
    return {"kernel": _np(sd[prefix + ".weight"]).T, "bias": _np(sd[prefix + ".bias"])}


def _attention(sd, q, k, v, o, heads):
    """Separate torch q/k/v/out Linear layers -> the fused qkv [C, 3, H, Dh] and out [H, Dh, C]."""
    w = [_np(sd[n + ".weight"]).T for n in (q, k, v)]  # [C_in, C_out] each
    c = w[0].shape[0]
    dh = c // heads
    return {
        "qkv": {
            "kernel": np.stack(w, axis=1).reshape(c, 3, heads, dh),
            "bias": np.stack([_np(sd[n + ".bias"]) for n in (q, k, v)]).reshape(3, heads, dh),
        },
        "out": {"kernel": _np(sd[o + ".weight"]).T.reshape(heads, dh, c), "bias": _np(sd[o + ".bias"])},
    }


def _patch_kernel(w):
    return _np(w).transpose(2, 3, 1, 0)  # [C, 3, P, P] -> [P, P, 3, C]


def convert_hf_vit(sd, num_layers, heads):
    new = "vit.layers.0.attention.q_proj.weight" in sd  # transformers >= 5
    params = {
        "embedding": {"kernel": _patch_kernel(sd["vit.embeddings.patch_embeddings.projection.weight"]),
                      "bias": _np(sd["vit.embeddings.patch_embeddings.projection.bias"])},
        "cls": _np(sd["vit.embeddings.cls_token"]),
        "pos_embedding": _np(sd["vit.embeddings.position_embeddings"]),
        "encoder_norm": _ln(sd, "vit.layernorm"),
        "head": _dense(sd, "classifier"),
    }
    for i in range(num_layers):
        if new:
            pre = f"vit.layers.{i}."
            names = [pre + f"attention.{n}_proj" for n in "qkvo"]
            fc1, fc2 = pre + "mlp.fc1", pre + "mlp.fc2"
        else:
            pre = f"vit.encoder.layer.{i}."
            names = [pre + f"attention.attention.{n}" for n in ("query", "key", "value")]
            names.append(pre + "attention.output.dense")
            fc1, fc2 = pre + "intermediate.dense", pre + "output.dense"
        params[f"block{i}"] = {
            "ln1": _ln(sd, pre + "layernorm_before"),
            "attn": _attention(sd, *names, heads),
            "ln2": _ln(sd, pre + "layernorm_after"),
            "mlp": {"fc1": _dense(sd, fc1), "fc2": _dense(sd, fc2)},
        }
    return {"params": params}


def _clip_tower_blocks(sd, prefix, num_layers, heads):
    blocks = {}
    for i in range(num_layers):
        pre = f"{prefix}.encoder.layers.{i}."
        blocks[f"block{i}"] = {
            "ln1": _ln(sd, pre + "layer_norm1"),
            "attn": _attention(sd, *(pre + f"self_attn.{n}_proj" for n in ("q", "k", "v", "out")), heads),
            "ln2": _ln(sd, pre + "layer_norm2"),
            "mlp": {"fc1": _dense(sd, pre + "mlp.fc1"), "fc2": _dense(sd, pre + "mlp.fc2")},
        }
    return blocks


def convert_hf_clip(sd, num_layers, heads):
    visual = {
        "conv1": {"kernel": _patch_kernel(sd["vision_model.embeddings.patch_embedding.weight"])},
        "class_embedding": _np(sd["vision_model.embeddings.class_embedding"]),
        "positional_embedding": _np(sd["vision_model.embeddings.position_embedding.weight"]),
        "ln_pre": _ln(sd, "vision_model.pre_layrnorm"),
        "ln_post": _ln(sd, "vision_model.post_layernorm"),
        "proj": _np(sd["visual_projection.weight"]).T,
        **_clip_tower_blocks(sd, "vision_model", num_layers, heads),
    }
    text = {
        "token_embedding": {"embedding": _np(sd["text_model.embeddings.token_embedding.weight"])},
        "positional_embedding": _np(sd["text_model.embeddings.position_embedding.weight"]),
        "ln_final": _ln(sd, "text_model.final_layer_norm"),
        "text_projection": _np(sd["text_projection.weight"]).T,
        **_clip_tower_blocks(sd, "text_model", num_layers, heads),
    }
    return {"params": {"visual": visual, "text": text, "logit_scale": _np(sd["logit_scale"])}}


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def _torch_images(images):
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def test_vit_matches_transformers_vit():
    cfg = transformers.ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
        image_size=16, patch_size=4, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    hf = _randomize(transformers.ViTForImageClassification(cfg))
    params = jax.tree.map(jnp.asarray, convert_hf_vit(hf.state_dict(), LAYERS, HEADS))
    model = ViT(num_classes=5, patch_size=4, width=WIDTH, depth=LAYERS, num_heads=HEADS, mlp_dim=MLP,
                ln_eps=cfg.layer_norm_eps, pos_interpolation="bicubic")
    apply = jax.jit(lambda p, x: model.apply(p, x, return_info=True))
    for size in (16, 24):  # the training resolution, and a larger one with interpolated positions
        images = _images((2, size, size, 3))
        with torch.no_grad():
            ref = hf(_torch_images(images), interpolate_pos_encoding=size != 16, output_hidden_states=True)
            ref_tokens = hf.vit(_torch_images(images), interpolate_pos_encoding=size != 16).last_hidden_state
        logits, info = apply(params, images)
        np.testing.assert_allclose(logits, _np(ref.logits), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(info["tokens"], _np(ref_tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hf_eos", [2, 49])
def test_clip_matches_transformers_clip(hf_eos):
    vocab, ctx = 50, 8
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, vocab_size=vocab, max_position_embeddings=ctx,
                         eos_token_id=hf_eos, bos_token_id=48, pad_token_id=0),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, image_size=16, patch_size=4),
        projection_dim=24,
    )
    torch.manual_seed(0)
    hf = _randomize(transformers.CLIPModel(cfg))
    params = jax.tree.map(jnp.asarray, convert_hf_clip(hf.state_dict(), LAYERS, HEADS))
    model = CLIP(
        embed_dim=24, image_size=16, patch_size=4, vision_width=WIDTH, vision_layers=LAYERS, vision_heads=HEADS,
        vision_mlp_dim=MLP, context_length=ctx, vocab_size=vocab, text_width=WIDTH, text_layers=LAYERS,
        text_heads=HEADS, text_mlp_dim=MLP, eot_token_id=None if hf_eos == 2 else hf_eos,
    )
    rng = np.random.default_rng(0)
    lengths = [3, 8, 5]
    ids = np.zeros((3, ctx), np.int64)
    for i, n in enumerate(lengths):  # SOT, words, EOT (= 49, the largest id), padding 0
        ids[i, 0], ids[i, 1 : n - 1], ids[i, n - 1] = 48, rng.integers(1, 48, size=n - 2), 49
    mask = (np.arange(ctx)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    images = _images((2, 16, 16, 3))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), pixel_values=_torch_images(images),
                 attention_mask=torch.from_numpy(mask))
    out = jax.jit(model.apply)(params, images, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    norm = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(norm(np.asarray(out["image_embeds"])), _np(ref.image_embeds), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(norm(np.asarray(out["text_embeds"])), _np(ref.text_embeds), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["logits_per_image"], _np(ref.logits_per_image), rtol=1e-4, atol=1e-4)
    _, info = jax.jit(lambda p, x: model.apply(p, x, return_info=True, method=CLIP.encode_image))(params, images)
    np.testing.assert_allclose(info["tokens"], _np(ref.vision_model_output.last_hidden_state), rtol=1e-4, atol=1e-4)
