"""CSCNN invariants (spec §2.5), the distinct-image path, and the ad-image click log."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.data import clicklog
from jdjax.data.features import FeatureMap
from jdjax.models import cscnn

K = 5  # prior-table rows


def _images(b=6, s=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, s, s, 3)), jnp.float32)


@pytest.fixture(scope="module")
def tower_and_params():
    tower = cscnn.ImageTower(channels=(4, 6), out_dim=5, attention="cscnn", num_categories=K)
    params = nn.meta.unbox(jax.jit(tower.init)(jax.random.key(0), _images(), jnp.zeros(6, jnp.int32))["params"])
    return tower, params


def test_bypassed_gates_are_the_plain_cnn_bit_for_bit(tower_and_params):
    tower, params = tower_and_params
    cat = jnp.array([0, 1, 2, 3, 4, 0])
    out, maps = tower.apply({"params": params}, _images(), cat, bypass=True)
    plain = cscnn.ImageTower(channels=(4, 6), out_dim=5, attention="cnn")
    conv_only = {k: v for k, v in params.items() if not k.startswith("attention")}
    ref, _ = plain.apply({"params": conv_only}, _images(), cat)
    np.testing.assert_array_equal(out, ref)
    assert maps == []


def test_zero_logits_scale_features_by_a_quarter():
    att = cscnn.CategoryAttention(num_categories=K, prior_channels=3)
    f = _images(4, 8, seed=1)
    cat = jnp.array([0, 1, 2, 3])
    params = nn.meta.unbox(att.init(jax.random.key(0), f, cat)["params"])
    params = {**params, "channel_out": jax.tree.map(jnp.zeros_like, params["channel_out"]),
              "spatial": jax.tree.map(jnp.zeros_like, params["spatial"])}
    out, maps = att.apply({"params": params}, f, cat)
    np.testing.assert_allclose(out, 0.25 * f, rtol=1e-6)
    np.testing.assert_allclose(maps["channel"], 0.5)
    np.testing.assert_allclose(maps["spatial"], 0.5)


def test_category_priors_condition_the_output(tower_and_params):
    tower, params = tower_and_params
    images = jnp.broadcast_to(_images(1), (K, 8, 8, 3))
    cats = jnp.arange(K)
    out, _ = tower.apply({"params": params}, images, cats)
    assert not np.allclose(out[0], out[1])  # different rows -> different outputs
    same = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.broadcast_to(p[:1], p.shape) if "prior" in jax.tree_util.keystr(path) else p, params)
    out_same, _ = tower.apply({"params": same}, images, cats)
    np.testing.assert_allclose(out_same, jnp.broadcast_to(out_same[:1], out_same.shape), rtol=1e-6, atol=1e-6)


def test_gradients_reach_only_present_categories(tower_and_params):
    tower, params = tower_and_params
    cat = jnp.array([1, 3, 3, 1, 1, 3])
    grads = jax.jit(jax.grad(lambda p: jnp.sum(tower.apply({"params": p}, _images(), cat)[0] ** 2)))(params)
    for layer in ("attention_0", "attention_1"):
        for table in ("channel_prior", "spatial_prior"):
            row_norm = np.abs(np.asarray(grads[layer][table])).sum(-1)
            assert np.all(row_norm[[0, 2, 4]] == 0) and row_norm[[1, 3]].sum() > 0


@pytest.fixture(scope="module")
def ads():
    splits, images = clicklog.generate_ads("tiny", seed=0)
    fmap = FeatureMap.fit(clicklog.ad_features(4), splits["train"])
    raw = {k: v[:24] for k, v in splits["train"].items()}
    batch = {k: jnp.asarray(v) for k, v in fmap.encode({k: raw[k] for k in ("user", "ad", "cat")}).items()}
    batch["ad_index"] = jnp.asarray(raw["ad_index"])
    batch["image"] = jnp.asarray(images[raw["ad_index"]])
    return splits, images, fmap, batch


@pytest.mark.parametrize("max_unique", [24, 4])  # enough slots for every distinct ad / too few: every sample
def test_distinct_images_path_matches_every_sample_path(ads, max_unique):
    _, _, fmap, batch = ads
    kw = {"channels": (4, 4), "visual_dim": 4, "mlp_hidden": (8, 4)}
    dedup = cscnn.ImageCTR(fmap.features, fmap.tables(), "cscnn", max_unique_images=max_unique, **kw)
    every = cscnn.ImageCTR(fmap.features, fmap.tables(), "cscnn", **kw)
    params = jax.jit(every.init)(jax.random.key(0), batch)
    assert int(cscnn.distinct_count(batch["ad_index"])) > 4
    ref, _ = jax.jit(every.apply)(params, batch)
    out, _ = jax.jit(dedup.apply)(params, batch)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_ad_log_layout(ads):
    splits, images, _, _ = ads
    size = clicklog.AD_SIZES["tiny"]
    assert images.shape == (size.num_ads, size.image_size, size.image_size, 3)
    train_ads = set(splits["train"]["ad"])
    assert not train_ads & set(splits["test"]["ad"]) and not train_ads & set(splits["val"]["ad"])
    np.testing.assert_array_equal(splits["train"]["ad"], splits["train"]["ad_index"])


@pytest.mark.parametrize("name", ["cnn", "cbam", "cscnn"])
def test_precomputed_visual_serving_path_equals_end_to_end(ads, name):
    """Serving: the tower once per ad offline, a table lookup online, the same logits."""
    splits, images, fmap, batch = ads
    model = cscnn.ImageCTR(fmap.features, fmap.tables(), name, channels=(4, 4), visual_dim=4, mlp_hidden=(8, 4))
    params = jax.jit(model.init)(jax.random.key(0), batch)
    train = splits["train"]
    ad_cat = np.zeros(len(images), np.int32)  # every ad's encoded category (unseen ads: any row, unused)
    ad_cat[train["ad_index"]] = fmap.encode({k: train[k] for k in ("user", "ad", "cat")})["cat"]
    table = cscnn.precompute_visual(model, params, images, ad_cat, batch_size=16)  # 3 chunks + a padded one
    assert table.shape == (len(images), 4)
    end_to_end, _ = jax.jit(model.apply)(params, batch)
    served = {k: v for k, v in batch.items() if k != "image"}  # no image in the request
    served["visual"] = jnp.asarray(table[np.asarray(batch["ad_index"])])
    online, aux = jax.jit(model.apply)(params, served)
    np.testing.assert_allclose(online, end_to_end, rtol=1e-5, atol=1e-6)
    assert "maps" not in aux
    with pytest.raises(ValueError, match="no image tower"):
        cscnn.precompute_visual(cscnn.ImageCTR(fmap.features, fmap.tables(), "no_image"), params, images, ad_cat)
