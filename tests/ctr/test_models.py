"""Behaviour CTR models: shapes and finite loss and gradients for every scorer and pooling."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdjax.data import clicklog
from jdjax.data.features import FeatureMap
from jdjax.models.din import MODELS, BehaviourCTR

B = 16


@pytest.fixture(scope="module")
def data():
    log = clicklog.generate("tiny", seed=0)
    fmap = FeatureMap.fit(clicklog.features(8, clicklog.SIZES["tiny"].maxlen), log["train"])
    enc = fmap.encode({k: log["train"][k][:B] for k in ("user", "item", "cat", "hist_item", "hist_cat")})
    batch = {k: jnp.asarray(v) for k, v in enc.items()}
    return fmap, batch, jnp.asarray(log["train"]["label"][:B])


def _model(fmap, name, **kw):
    return BehaviourCTR(fmap.features, fmap.tables(), name, mlp_hidden=(16, 8), din_hidden=(8, 4), head_dim=4,
                        prior_hidden=8, **kw)


# Every scorer and every pooling (din_kfatt_base and transformer_kfatt_base: tests/ctr/test_model_training.py).
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"din_kfatt_base", "transformer_kfatt_base"}))
def test_shapes_and_finite_gradients(data, name):
    fmap, batch, labels = data
    model = _model(fmap, name)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])

    def loss(p):
        logits, aux = model.apply({"params": p}, batch)
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), (logits, aux)

    (value, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    chex.assert_shape(logits, (B,))
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    if name != "sum":
        w = np.asarray(aux["weights"])
        np.testing.assert_allclose(w.sum(-1)[batch["hist_item"].any(-1) | ("kfatt" in name)], 1.0, atol=1e-5)
