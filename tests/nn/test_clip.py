"""CLIP: configs, parameter layout, text masks and EOT pooling, merging in the image tower, bf16, scan."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.nn.clip import CLIP, CLIPTextTower, clip_config
from jdjax.nn.lora import LoRAConfig, fold_lora
from jdjax.nn.vit import MergeConfig
from jdjax.train import sharding as shd

TINY = dict(
    embed_dim=24, image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_heads=2,
    context_length=8, vocab_size=50, text_width=32, text_layers=2, text_heads=2,
)
EOT = 49  # the largest id, as OpenAI's <|endoftext|>
TEXT = dict(context_length=8, vocab_size=50, width=32, depth=2, num_heads=2, embed_dim=24)


def _ids(rng, lengths, t=8):
    """SOT-like first token, random words, EOT at position len-1, then padding 0."""
    ids = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        ids[i, 0] = 48
        ids[i, 1 : n - 1] = rng.integers(1, 48, size=n - 2)
        ids[i, n - 1] = EOT
    return jnp.asarray(ids)


@pytest.fixture(scope="module")
def inputs(nn_helpers):
    rng = np.random.default_rng(0)
    return jnp.asarray(nn_helpers.images((2, 16, 16, 3))), _ids(rng, [5, 8, 3])


@pytest.fixture(scope="module")
def params(nn_helpers, inputs):
    return nn_helpers.random_params(CLIP(**TINY), *inputs)


@pytest.fixture(scope="module")
def text_params(params):
    return {"params": params["params"]["text"]}


def test_clip_config():
    b32 = clip_config("ViT-B/32")
    assert (b32["patch_size"], b32["vision_width"], b32["vision_layers"], b32["embed_dim"]) == (32, 768, 12, 512)
    assert (b32["text_width"], b32["text_heads"], b32["context_length"], b32["vocab_size"]) == (512, 8, 77, 49408)
    assert clip_config("B/16")["patch_size"] == 16
    l14 = clip_config("ViT-L/14")
    assert (l14["vision_width"], l14["vision_layers"], l14["vision_heads"], l14["text_width"], l14["embed_dim"]) == (
        1024, 24, 16, 768, 768)
    assert CLIP(**clip_config("ViT-B/32")).token_counts()[0] == 50
    assert CLIP(**clip_config("ViT-B/16")).token_counts()[0] == 197
    with pytest.raises(ValueError, match="unknown CLIP model"):
        clip_config("ViT-H/14")


def _block(width, mlp):
    return {
        "ln1": {"scale": (width,), "bias": (width,)},
        "attn": {"qkv": {"kernel": (width, 3, 2, width // 2), "bias": (3, 2, width // 2)},
                 "out": {"kernel": (2, width // 2, width), "bias": (width,)}},
        "ln2": {"scale": (width,), "bias": (width,)},
        "mlp": {"fc1": {"kernel": (width, mlp), "bias": (mlp,)}, "fc2": {"kernel": (mlp, width), "bias": (width,)}},
    }


EXPECTED_TREE = {
    "logit_scale": (),
    "visual": {
        "conv1": {"kernel": (4, 4, 3, 32)},
        "class_embedding": (32,),
        "positional_embedding": (17, 32),
        "ln_pre": {"scale": (32,), "bias": (32,)},
        "block0": _block(32, 128),
        "block1": _block(32, 128),
        "ln_post": {"scale": (32,), "bias": (32,)},
        "proj": (32, 24),
    },
    "text": {
        "token_embedding": {"embedding": (50, 32)},
        "positional_embedding": (8, 32),
        "block0": _block(32, 128),
        "block1": _block(32, 128),
        "ln_final": {"scale": (32,), "bias": (32,)},
        "text_projection": (32, 24),
    },
}


def test_param_tree_and_logical_names(inputs):
    boxed = jax.eval_shape(lambda: CLIP(**TINY).init(jax.random.key(0), *inputs))
    shapes = jax.tree.map(lambda s: tuple(s.shape), nn.meta.unbox(boxed))["params"]
    assert shapes == EXPECTED_TREE
    is_box = lambda b: isinstance(b, nn.LogicallyPartitioned)  # noqa: E731
    for leaf in jax.tree.leaves(boxed, is_leaf=is_box):
        assert is_box(leaf), "every parameter carries logical axis names"
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) - {None} <= set(shd.LOGICAL_AXES)
    for name, rules in shd.RULE_SETS.items():
        mesh = shd.make_mesh({"data": 1, "fsdp": -1} if name == "fsdp" else {"data": -1})
        shd.logical_shardings(boxed, mesh, rules)


def test_forward_shapes_and_logits(params, inputs):
    model = CLIP(**TINY)
    out = jax.jit(model.apply)(params, *inputs)
    chex.assert_shape(out["image_embeds"], (2, 24))
    chex.assert_shape(out["text_embeds"], (3, 24))
    chex.assert_shape(out["logits_per_image"], (2, 3))
    img = out["image_embeds"] / np.linalg.norm(out["image_embeds"], axis=-1, keepdims=True)
    txt = out["text_embeds"] / np.linalg.norm(out["text_embeds"], axis=-1, keepdims=True)
    expected = np.exp(params["params"]["logit_scale"]) * img @ txt.T
    np.testing.assert_allclose(out["logits_per_image"], expected, rtol=1e-5, atol=1e-5)
    image_only = jax.jit(lambda p, x: model.apply(p, x, method=CLIP.encode_image))(params, inputs[0])
    np.testing.assert_allclose(image_only, out["image_embeds"], rtol=1e-5, atol=1e-6)
    text_only, info = jax.jit(lambda p, i: model.apply(p, i, return_info=True, method=CLIP.encode_text))(
        params, inputs[1])
    chex.assert_shape(info["tokens"], (3, 8, 32))
    np.testing.assert_allclose(text_only, out["text_embeds"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- text tower


def _text_tokens(text_params, ids, mask=None, **kw):
    model = CLIPTextTower(**TEXT, **kw)
    return jax.jit(lambda p, i, m: model.apply(p, i, m, return_info=True))(text_params, ids, mask)


def test_text_causal_mask(text_params):
    ids = _ids(np.random.default_rng(1), [8, 8])
    _, a = _text_tokens(text_params, ids)
    _, b = _text_tokens(text_params, ids.at[:, 4].set(7))
    np.testing.assert_array_equal(a["tokens"][:, :4], b["tokens"][:, :4])  # earlier positions do not see it
    assert not np.allclose(a["tokens"][:, 4:], b["tokens"][:, 4:], atol=1e-4)


def test_text_eot_pooling_ignores_tokens_after_eot(text_params):
    ids = _ids(np.random.default_rng(2), [4, 6])
    mask = (jnp.arange(8)[None, :] < jnp.asarray([[4], [6]])).astype(jnp.int32)
    noisy = jnp.where(mask == 1, ids, jnp.asarray(np.random.default_rng(3).integers(1, 48, size=ids.shape)))
    for m in (None, mask):
        out, info = _text_tokens(text_params, ids, m)
        out2, _ = _text_tokens(text_params, noisy, m)
        np.testing.assert_allclose(out, out2, rtol=1e-6, atol=1e-6)
        proj = text_params["params"]["text_projection"]
        pooled = info["tokens"][jnp.arange(2), jnp.asarray([3, 5])]  # the EOT positions
        np.testing.assert_allclose(out, pooled @ proj, rtol=1e-5, atol=1e-5)
    # with padding after EOT the mask changes nothing up to EOT (causality already hides it)
    np.testing.assert_allclose(_text_tokens(text_params, ids, mask)[0], _text_tokens(text_params, ids)[0],
                               rtol=1e-6, atol=1e-6)


def test_text_padding_mask_hides_keys(text_params):
    ids = _ids(np.random.default_rng(4), [7, 7])
    mask = jnp.ones((2, 8), jnp.int32).at[:, 2].set(0).at[:, 7].set(0)  # key 2 masked out
    out, _ = _text_tokens(text_params, ids, mask)
    out2, _ = _text_tokens(text_params, ids.at[:, 2].set(11), mask)
    np.testing.assert_allclose(out, out2, rtol=1e-6, atol=1e-6)
    unmasked, _ = _text_tokens(text_params, ids.at[:, 2].set(11))
    assert not np.allclose(out, unmasked, atol=1e-4)


def test_text_eot_token_id_first_occurrence(text_params):
    ids = _ids(np.random.default_rng(5), [5, 7]).at[:, 1].set(9).at[:, 3].set(9)
    out, info = _text_tokens(text_params, ids, eot_token_id=9)
    pooled = info["tokens"][:, 1]
    np.testing.assert_allclose(out, pooled @ text_params["params"]["text_projection"], rtol=1e-5, atol=1e-5)


def test_text_longer_than_context_rejected(text_params):
    with pytest.raises(ValueError, match="context_length"):
        CLIPTextTower(**TEXT).apply(text_params, jnp.zeros((1, 9), jnp.int32))


# ----------------------------------------------------------------------------- hook, LoRA, dtype, scan


def test_image_tower_merging_and_lora(nn_helpers, inputs):
    model = CLIP(**TINY, merge=MergeConfig(r=[3, 2], trace_source=True), lora=LoRAConfig(rank=2), text_lora=False)
    assert model.token_counts() == [17, 14, 12]
    p = nn_helpers.perturb(nn_helpers.random_params(model, *inputs, zero="_lora/b$"), "_lora/b$")
    assert "qkv_lora" in p["params"]["visual"]["block0"]["attn"]
    assert "qkv_lora" not in p["params"]["text"]["block0"]["attn"]
    apply = jax.jit(lambda p, x: model.apply(p, x, return_info=True, method=CLIP.encode_image))
    feats, info = apply(p, inputs[0])
    chex.assert_shape(feats, (2, 24))
    chex.assert_shape(info["tokens"], (2, 12, 32))
    chex.assert_shape(info["source"], (2, 12, 17))
    np.testing.assert_array_equal(np.asarray(info["size"]).sum((1, 2)), 17.0)
    plain = CLIP(**TINY, merge=MergeConfig(r=[3, 2]))
    folded = jax.jit(lambda p, x: plain.apply(p, x, method=CLIP.encode_image))(
        {"params": fold_lora(p["params"])}, inputs[0])
    np.testing.assert_allclose(feats, folded, rtol=1e-4, atol=1e-5)


def test_bf16_and_scan(params, inputs):
    ref = jax.jit(CLIP(**TINY).apply)(params, *inputs)
    bf = jax.jit(CLIP(**TINY, dtype=jnp.bfloat16).apply)(params, *inputs)
    for k in ("image_embeds", "text_embeds"):
        assert bf[k].dtype == jnp.float32 and np.all(np.isfinite(bf[k]))
        np.testing.assert_allclose(bf[k], ref[k], atol=0.05 * float(np.abs(ref[k]).max()) + 1e-2)

    def stack(tower):
        t = dict(tower)
        blocks = [t.pop(f"block{i}") for i in range(2)]
        t["blocks"] = jax.tree.map(lambda *a: np.stack(a), *blocks)
        return t

    p = params["params"]
    stacked = {"params": {"logit_scale": p["logit_scale"], "visual": stack(p["visual"]), "text": stack(p["text"])}}
    mask = jnp.ones((3, 8), jnp.int32)
    ref_masked = jax.jit(CLIP(**TINY).apply)(params, *inputs, mask)
    scanned = jax.jit(CLIP(**TINY, scan=True, remat=True).apply)(stacked, *inputs, mask)
    for k in ("image_embeds", "text_embeds"):
        np.testing.assert_allclose(scanned[k], ref_masked[k], rtol=1e-5, atol=1e-5)
