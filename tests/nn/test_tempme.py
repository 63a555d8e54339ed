"""TempMe's video tower and text-video CLIP: spec shapes, parameter count, init equivalence, order."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.merging import tempme
from jdjax.merging.tempme import TemporalConfig
from jdjax.models.tempme import TempMeCLIP
from jdjax.nn.clip import CLIP, clip_config, l2_normalize
from jdjax.nn.lora import LoRAConfig, lora_trainable_pattern
from jdjax.train.optim import path_names

# 16x16 frames of 4x4 patches: 17 tokens per frame; 4 layers; 4 frames.
TINY = dict(embed_dim=24, image_size=16, patch_size=4, vision_width=32, vision_layers=4, vision_heads=2,
            context_length=8, vocab_size=50, text_width=32, text_layers=2, text_heads=2)
T = 4
TEMPME = TemporalConfig(T, 1, (2, 3), (2, 2), 0.3, 0.1)
IDS = jnp.asarray([[48, 3, 7, 49, 0, 0, 0, 0], [48, 5, 49, 0, 0, 0, 0, 0]], jnp.int32)


def _videos(seed=0, b=2):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (b, T, 16, 16, 3)), jnp.float32)


def _params(nn_helpers, temporal, **kw):
    model = TempMeCLIP(**TINY, temporal=temporal, **kw)
    return model, nn_helpers.random_params(model, _videos(), IDS, zero=r"(_lora/b|clip_pos_embedding)$")


def test_b32_trainable_parameters_and_output_tokens():
    """PEFT mode of the released B/32: 507,648 trainable parameters; 1 x 97 tokens out, 12 CLS."""
    temporal = TemporalConfig(12, 2, (8, 9, 10), (2, 2, 3), 0.30, 0.10)
    model = TempMeCLIP(**clip_config("ViT-B/32"), temporal=temporal, lora=LoRAConfig(rank=8))
    videos, ids = jnp.zeros((2, 12, 224, 224, 3)), jnp.zeros((2, 77), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), videos, ids))
    names = jax.tree.leaves(path_names(variables["params"]))
    sizes = dict(zip(names, (int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))))
    trainable = re.compile(lora_trainable_pattern(("clip_pos_embedding",)))
    counts = {"visual": 0, "text": 0, "pos": 0}
    for name, n in sizes.items():
        if trainable.search(name):
            counts["pos" if "clip_pos" in name else name.split("/")[0]] += n
    assert counts == {"visual": 294_912, "text": 196_608, "pos": 16_128}
    assert sum(counts.values()) == 507_648
    _, info = jax.eval_shape(lambda v: model.apply(v, videos, method=TempMeCLIP.encode_video, return_info=True),
                             variables)
    assert info["tokens"].shape == (2, 97, 768)  # B x 1 clip, 97 tokens (12 of them CLS)
    assert tempme.output_shape(model.plan()) == (1, 97) and model.plan()[-1].num_cls == 12


def test_identity_config_is_dense_clip_with_mean_pooling(nn_helpers):
    """r = 0, both ratios 0, every grouping factor 1, LoRA B = 0, clip embeddings 0: exactly the
    dense CLIP of each frame, normalised, averaged, normalised (CLIP4Clip mean pooling)."""
    identity = TemporalConfig(T, 0, (1, 2), (1, 1), 0.0, 0.0)
    model, params = _params(nn_helpers, identity, lora=LoRAConfig(rank=4))
    videos = _videos(1)
    ours = model.apply(params, videos, method=TempMeCLIP.encode_video)
    clip_params = {"params": {k: v for k, v in params["params"].items()}}
    clip_params["params"]["visual"] = {k: {n: w for n, w in v.items() if n != "pre_merge"} if isinstance(v, dict) else v
                                       for k, v in params["params"]["visual"].items()}
    clip = CLIP(**TINY, lora=LoRAConfig(rank=4))
    frames = clip.apply(clip_params, videos.reshape(-1, 16, 16, 3), method=CLIP.encode_image).reshape(2, T, -1)
    expected = l2_normalize(l2_normalize(frames).mean(1))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_token_shapes_follow_the_plan(nn_helpers):
    model, params = _params(nn_helpers, TEMPME)
    video, info = jax.jit(lambda p, v: model.apply(p, v, method=TempMeCLIP.encode_video, return_info=True))(
        params, _videos())
    plan = model.plan()
    clips, tokens = tempme.output_shape(plan)
    chex.assert_shape(info["tokens"], (2 * clips, tokens, 32))
    chex.assert_shape(info["frame_embeds"], (2, T, 24))
    chex.assert_shape(video, (2, 24))
    # sizes: every token of every frame is still accounted for
    np.testing.assert_allclose(np.asarray(info["size"]).reshape(2, -1).sum(1), T * 17)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(video), axis=-1), 1.0, rtol=1e-5)


def test_frame_order_matters_only_with_temporal_modelling(nn_helpers):
    """Mean pooling is blind to frame order; TempMe's clip position embeddings and cross-frame
    attention are not."""
    videos = _videos(2)
    both = jnp.concatenate([videos, videos[:, ::-1]])  # the videos, then their reversals

    def encode(temporal, perturb=""):
        model, params = _params(nn_helpers, temporal)
        params = nn_helpers.perturb(params, perturb, scale=0.5) if perturb else params
        out = jax.jit(lambda p, v: model.apply(p, v, method=TempMeCLIP.encode_video))(params, both)
        return np.asarray(out[:2]), np.asarray(out[2:])

    forward, backward = encode(TemporalConfig(T))
    np.testing.assert_allclose(forward, backward, rtol=1e-5, atol=1e-6)
    forward, backward = encode(TEMPME, r"clip_pos_embedding$")
    assert np.abs(forward - backward).max() > 1e-3


def test_gradients_reach_lora_and_clip_positions(nn_helpers):
    model, params = _params(nn_helpers, TEMPME, lora=LoRAConfig(rank=2))
    params = nn_helpers.perturb(params, r"_lora/b$", scale=0.1)

    def loss(p):
        out = model.apply(p, _videos(), IDS)
        return -jnp.trace(jax.nn.log_softmax(out["logits_per_text"], axis=1))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    grads = grads["params"]
    assert np.isfinite(float(value))
    for layer in (2, 3):  # both ClipMe layers merge across clips (M0 > 0), so their embedding is used
        assert np.abs(np.asarray(grads["visual"][f"block{layer}"]["pre_merge"]["clip_pos_embedding"])).sum() > 0
    assert np.abs(np.asarray(grads["visual"]["block0"]["attn"]["qkv_lora"]["a"])).sum() > 0
    assert np.abs(np.asarray(grads["text"]["block0"]["attn"]["qkv_lora"]["a"])).sum() > 0


def test_wrong_frame_count_and_merge_schedule_are_refused(nn_helpers):
    model, params = _params(nn_helpers, TEMPME)
    with pytest.raises(ValueError, match="num_frames"):
        model.apply(params, _videos()[:, :3], method=TempMeCLIP.encode_video)
    from jdjax.nn.vit import MergeConfig

    bad = TempMeCLIP(**TINY, temporal=TEMPME, merge=MergeConfig(r=2))
    with pytest.raises(ValueError, match="temporal"):
        bad.apply(params, _videos(), method=TempMeCLIP.encode_video)
