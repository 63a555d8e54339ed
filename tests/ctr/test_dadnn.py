"""DADNN invariants (spec §3.4): one scene without KT is a plain MLP CTR model, MMoE with one expert
is the shared bottom, a sample's label reaches only its own head, KT reaches the other heads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdjax.data import clicklog
from jdjax.models import dadnn
from jdjax.nn.ctr.embedding import Embeddings
from jdjax.nn.ctr.features import FeatureMap
from jdjax.nn.ctr.layers import MLP

B = 32


@pytest.fixture(scope="module")
def data():
    log = clicklog.generate_scenes("tiny", seed=0)
    fmap = FeatureMap.fit(clicklog.scene_features(4), log["train"])
    raw = {k: v[:B] for k, v in log["train"].items()}
    batch = {k: jnp.asarray(v) for k, v in fmap.encode({k: raw[k] for k in ("user", "item", "cat", "scene")}).items()}
    batch["scene_index"] = jnp.asarray(raw["scene"], jnp.int32)
    return fmap, batch, jnp.asarray(raw["label"])


def _model(fmap, name, **kw):
    kw = {"num_scenes": 4, "bottom_hidden": (16, 8), "head_hidden": (4,), "num_experts": 3,
          "scene": "scene_index", **kw}
    return dadnn.DADNN(fmap.features, fmap.tables(), name, **kw)


def _params(model, batch):
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])


def test_scene_log_layout():
    log = clicklog.generate_scenes("small", seed=0)
    train = log["train"]
    share = np.bincount(train["scene"], minlength=4) / len(train["scene"])
    np.testing.assert_allclose(share, clicklog.SCENE_SIZES["small"].scene_shares, atol=0.01)
    assert train["scene3"].sum() == (train["scene"] == 3).sum()


def test_one_scene_without_kt_is_a_plain_mlp(data):
    fmap, batch, _ = data
    one = {**batch, "scene_index": jnp.zeros_like(batch["scene_index"])}
    model = _model(fmap, "shared_bottom", num_scenes=1)
    params = _params(model, one)
    logit, aux = model.apply({"params": params}, one)
    assert "losses" not in aux
    # The same weights as one embedding layer and one MLP 16-8-4-1.
    emb = Embeddings(fmap.features, fmap.tables()).apply({"params": params["embeddings"]}, one)
    x = jnp.concatenate([emb[f.name] for f in fmap.features], -1)
    heads = jax.tree.map(lambda p: p[0], params["heads"])
    mlp_params = {**params["bottom"], "dense_2": heads["dense_0"], "out": heads["out"]}
    plain = MLP((16, 8, 4), "relu", out_features=1).apply({"params": mlp_params}, x)[:, 0]
    np.testing.assert_allclose(logit, plain, rtol=1e-6, atol=1e-6)


def test_mmoe_with_one_expert_is_the_shared_bottom(data):
    fmap, batch, _ = data
    mmoe = _model(fmap, "mmoe", num_experts=1)
    params = _params(mmoe, batch)
    shared = _model(fmap, "shared_bottom")
    shared_params = {**params, "bottom": jax.tree.map(lambda p: p[0], params["bottom"]["experts"])}
    out_mmoe, aux = mmoe.apply({"params": params}, batch)
    out_shared, _ = shared.apply({"params": shared_params}, batch)
    np.testing.assert_allclose(aux["gates"], 1.0)
    np.testing.assert_allclose(out_mmoe, out_shared, rtol=1e-6, atol=1e-6)


def _head_grad_norms(model, params, batch, labels, with_kt):
    def loss(p):
        logit, aux = model.apply({"params": p}, batch)
        total = optax.sigmoid_binary_cross_entropy(logit, labels).mean()
        return total + (sum(aux["losses"].values()) if with_kt else 0.0)

    grads = jax.jit(jax.grad(loss))(params)["heads"]
    norm = sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads))  # [S]
    return np.asarray(norm), grads


def test_label_gradient_reaches_only_the_own_scene_head(data):
    fmap, batch, labels = data
    scene0 = {**batch, "scene_index": jnp.zeros_like(batch["scene_index"])}
    model = _model(fmap, "dadnn_mlp", kt_weight=0.5)
    params = _params(model, scene0)
    norms, plain = _head_grad_norms(model, params, scene0, labels, with_kt=False)
    assert norms[0] > 0 and np.all(norms[1:] == 0)
    norms_kt, with_kt = _head_grad_norms(model, params, scene0, labels, with_kt=True)
    assert np.all(norms_kt[1:] > 0)  # the other heads learn from KT only
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(with_kt)):  # the teacher's head: label gradient only
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-7)


def test_mutual_distillation_lets_kt_reach_the_teacher(data):
    fmap, batch, labels = data
    scene0 = {**batch, "scene_index": jnp.zeros_like(batch["scene_index"])}
    model = _model(fmap, "dadnn_mlp", kt_weight=0.5, kt_stop_gradient=False)
    params = _params(model, scene0)
    _, plain = _head_grad_norms(model, params, scene0, labels, with_kt=False)
    _, with_kt = _head_grad_norms(model, params, scene0, labels, with_kt=True)
    assert not np.allclose(jax.tree.leaves(plain)[0][0], jax.tree.leaves(with_kt)[0][0])


def test_kt_loss_vanishes_when_heads_agree():
    logits = jnp.array([[0.3, 0.3, 0.3], [-1.0, -1.0, -1.0]])
    assert float(dadnn.knowledge_transfer_loss(logits, jnp.array([0, 2]))) == pytest.approx(0.0, abs=1e-6)
    assert float(dadnn.knowledge_transfer_loss(logits.at[0, 1].set(2.0), jnp.array([0, 2]))) > 0
