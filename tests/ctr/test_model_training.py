"""Behaviour CTR models learn: one batch overfitted; KFAtt returns the prior through the model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdjax.data import clicklog
from jdjax.data.features import FeatureMap
from jdjax.models.din import BehaviourCTR

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


@pytest.mark.parametrize("name", ["din_kfatt_base", "transformer_kfatt_base"])
def test_overfits_one_batch(data, name):
    fmap, batch, labels = data
    model = _model(fmap, name)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), batch)["params"])
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        def loss(p):
            return optax.sigmoid_binary_cross_entropy(model.apply({"params": p}, batch)[0], labels).mean()

        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    state = tx.init(params)
    for _ in range(150):
        params, state, value = step(params, state)
    assert value < 0.05


def test_empty_history_gives_the_prior_through_the_model(data):
    """With every behaviour masked, KFAtt's pooled vector is the prior mean whatever the history ids."""
    fmap, batch, _ = data
    model = _model(fmap, "kfatt_base")
    empty = {**batch, "hist_item": jnp.zeros_like(batch["hist_item"]), "hist_cat": jnp.zeros_like(batch["hist_cat"])}
    params = model.init(jax.random.key(0), empty)
    _, aux = model.apply(params, empty)
    np.testing.assert_allclose(aux["weights"][:, 0], 1.0)
