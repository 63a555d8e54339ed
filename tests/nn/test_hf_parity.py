"""The layouts express Hugging Face ViT and CLIP exactly: tiny random models, weights copied over.

No download: the torch models are built from small configs with random weights. The weights are
mapped by the package's converters (jdjax.nn.convert: Hugging Face 4.x and 5.x key names);
tests/nn/test_convert.py covers the other checkpoint formats.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.nn.clip import CLIP
from jdjax.nn.convert import from_hf_clip, from_hf_vit
from jdjax.nn.vit import ViT
from jdjax.testing import random_images, randomize_torch, torch_nchw, torch_numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WIDTH, HEADS, MLP, LAYERS = 32, 2, 64, 2


def test_vit_matches_transformers_vit():
    cfg = transformers.ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
        image_size=16, patch_size=4, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    hf = randomize_torch(transformers.ViTForImageClassification(cfg))
    params = jax.tree.map(jnp.asarray, {"params": from_hf_vit(hf.state_dict(), hf_config=cfg).params})
    model = ViT(num_classes=5, patch_size=4, width=WIDTH, depth=LAYERS, num_heads=HEADS, mlp_dim=MLP,
                ln_eps=cfg.layer_norm_eps, pos_interpolation="bicubic")
    apply = jax.jit(lambda p, x: model.apply(p, x, return_info=True))
    for size in (16, 24):  # the training resolution, and a larger one with interpolated positions
        images = random_images((2, size, size, 3))
        with torch.no_grad():
            ref = hf(torch_nchw(images), interpolate_pos_encoding=size != 16, output_hidden_states=True)
            ref_tokens = hf.vit(torch_nchw(images), interpolate_pos_encoding=size != 16).last_hidden_state
        logits, info = apply(params, images)
        np.testing.assert_allclose(logits, torch_numpy(ref.logits), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(info["tokens"], torch_numpy(ref_tokens), rtol=1e-4, atol=1e-4)


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
    hf = randomize_torch(transformers.CLIPModel(cfg))
    params = jax.tree.map(jnp.asarray, {"params": from_hf_clip(hf.state_dict(), hf_config=cfg).params})
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
    images = random_images((2, 16, 16, 3))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), pixel_values=torch_nchw(images),
                 attention_mask=torch.from_numpy(mask))
    out = jax.jit(model.apply)(params, images, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    norm = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(norm(np.asarray(out["image_embeds"])), torch_numpy(ref.image_embeds), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(norm(np.asarray(out["text_embeds"])), torch_numpy(ref.text_embeds), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["logits_per_image"], torch_numpy(ref.logits_per_image), rtol=1e-4, atol=1e-4)
    _, info = jax.jit(lambda p, x: model.apply(p, x, return_info=True, method=CLIP.encode_image))(params, images)
    np.testing.assert_allclose(info["tokens"], torch_numpy(ref.vision_model_output.last_hidden_state), rtol=1e-4, atol=1e-4)
