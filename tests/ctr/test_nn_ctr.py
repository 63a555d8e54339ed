"""Feature map, embedding tables, MLP/PReLU/Dice, DIN unit, behaviour encoder and MMoE."""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.data.features import FeatureMap
from jdjax.nn import ctr
from jdjax.nn.ctr.features import OOV_ID, PAD_ID

FEATURES = (
    ctr.SparseFeat("user", 4),
    ctr.SparseFeat("item", 6),
    ctr.VarLenFeat("hist_item", maxlen=3, embedding_dim=6, embedding_name="item"),
    ctr.DenseFeat("price", 1),
)
TRAIN = {
    "user": np.array([10, 11, 10, 12]),
    "item": np.array([100, 101, 102, 100]),
    "hist_item": np.array([[103, -1, -1], [100, 104, -1], [-1, -1, -1], [101, 101, 101]]),
    "price": np.array([1.0, 2.0, 3.0, 4.0]),
}


def test_vocabulary_is_shared_and_built_over_all_features_of_a_table():
    fm = FeatureMap.fit(FEATURES, TRAIN)
    np.testing.assert_array_equal(fm.vocabularies["item"], [100, 101, 102, 103, 104])  # item and hist_item
    assert [(t.name, t.rows, t.dim) for t in fm.tables()] == [("user", 5, 4), ("item", 7, 6)]
    enc = fm.encode({"user": np.array([12, 99]), "item": np.array([104, 7]),
                     "hist_item": np.array([[103, 999, -1], [-1, -1, -1]]), "price": np.array([5.0, 6.0])})
    np.testing.assert_array_equal(enc["user"], [4, OOV_ID])  # 12 is the third user id -> row 2 + 2
    np.testing.assert_array_equal(enc["item"], [6, OOV_ID])
    np.testing.assert_array_equal(enc["hist_item"], [[5, OOV_ID, PAD_ID], [PAD_ID] * 3])
    assert enc["price"].shape == (2, 1) and enc["price"].dtype == np.float32


def test_feature_map_json_round_trip(tmp_path):
    feats = FEATURES + (ctr.SparseFeat("brand", 3, min_count=2),)
    train = {**TRAIN, "brand": np.array(["a", "b", "a", "c"])}
    fm = FeatureMap.fit(feats, train)
    np.testing.assert_array_equal(fm.vocabularies["brand"], ["a"])  # b and c are seen once < min_count
    path = str(tmp_path / "feature_map.json")
    fm.save(path)
    back = FeatureMap.load(path)
    assert back.features == fm.features and back.tables() == fm.tables()
    for name in ("user", "item", "hist_item", "brand"):
        np.testing.assert_array_equal(back.encode(train)[name], fm.encode(train)[name])


def test_feature_map_errors(tmp_path):
    with pytest.raises(ValueError, match="share the table 'item' but differ in width"):
        FeatureMap.fit((ctr.SparseFeat("item", 4), ctr.VarLenFeat("h", 3, 5, "item")), TRAIN)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureMap.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        FeatureMap.load(str(bad))
    bad.write_text(json.dumps({"version": 0}))
    with pytest.raises(ValueError, match="version"):
        FeatureMap.load(str(bad))
    fm = FeatureMap.fit(FEATURES, TRAIN)
    with pytest.raises(ValueError, match="expected raw shape"):
        fm.encode({**TRAIN, "hist_item": np.zeros((4, 5), int)})


def test_embeddings_share_tables_and_zero_padding():
    fm = FeatureMap.fit(FEATURES, TRAIN)
    module = ctr.Embeddings(fm.features, fm.tables(), row_multiple=8)
    batch = {k: jnp.asarray(v) for k, v in fm.encode(TRAIN).items()}
    variables = module.init(jax.random.key(0), batch)
    table = variables["params"]["item"]
    assert isinstance(table, nn.Partitioned) and table.names == ("table_rows", "embed")
    assert table.value.shape == (8, 6)  # 7 rows padded to a multiple of 8
    out = module.apply(variables, batch)
    chex.assert_shape([out["user"], out["item"], out["hist_item"], out["price"]], [(4, 4), (4, 6), (4, 3, 6), (4, 1)])
    np.testing.assert_array_equal(out["hist_item"][1, 0], out["item"][0])  # item 100 in both, one table
    assert np.all(np.asarray(out["hist_item"])[2] == 0)  # an empty history embeds to zeros


def test_pool():
    x = jnp.arange(12.0).reshape(1, 3, 4)
    mask = jnp.array([[True, False, True]])
    np.testing.assert_allclose(ctr.pool(x, mask, "sum"), [[8.0, 10.0, 12.0, 14.0]])
    np.testing.assert_allclose(ctr.pool(x, mask, "mean"), [[4.0, 5.0, 6.0, 7.0]])


def test_mlp_alternates_logical_axes_and_prelu():
    mlp = ctr.MLP((8, 4), "prelu", out_features=1)
    variables = mlp.init(jax.random.key(0), jnp.ones((2, 5)))
    p = variables["params"]
    assert p["dense_0"]["kernel"].names == ("embed", "mlp")
    assert p["dense_1"]["kernel"].names == ("mlp", "embed")
    assert p["out"]["kernel"].names == ("embed", "classes")
    assert p["act_0"]["alpha"].names == ("mlp",)
    prelu = ctr.PReLU(init_alpha=0.25)
    y = prelu.apply(prelu.init(jax.random.key(0), jnp.ones(3)), jnp.array([-2.0, 0.0, 3.0]))
    np.testing.assert_allclose(y, [-0.5, 0.0, 3.0])


def test_dice_uses_batch_statistics_in_training_and_running_averages_in_eval():
    dice = ctr.Dice(momentum=0.5)
    x = jnp.array([[1.0, -2.0], [3.0, 4.0], [-1.0, 0.0]])
    variables = dice.init(jax.random.key(0), x, train=False)
    params = {"params": {"alpha": jnp.array([0.5, 0.5])}}
    y, state = dice.apply({**variables, **params}, x, train=True, mutable=["batch_stats"])
    m, v = np.asarray(x).mean(0), np.asarray(x).var(0)
    p = 1 / (1 + np.exp(-(np.asarray(x) - m) / np.sqrt(v + 1e-8)))
    np.testing.assert_allclose(y, p * x + (1 - p) * 0.5 * x, rtol=1e-5)
    np.testing.assert_allclose(state["batch_stats"]["mean"], 0.5 * m, rtol=1e-6)
    # Eval: each example alone gives the same output as in a batch (running statistics).
    full = dice.apply({**params, **state}, x, train=False)
    single = dice.apply({**params, **state}, x[:1], train=False)
    np.testing.assert_allclose(full[:1], single, rtol=1e-6)


def test_local_activation_unit_shapes():
    lau = ctr.LocalActivationUnit((8, 4))
    q, k = jnp.ones((2, 5)), jnp.ones((2, 3, 5))
    s = lau.apply(lau.init(jax.random.key(0), q, k), q, k)
    chex.assert_shape(s, (2, 3))


def test_behaviour_encoder_attends_within_sessions_only():
    enc = ctr.BehaviourEncoder(num_heads=2, head_dim=4, out_dim=6, max_len=5)
    rng = np.random.default_rng(0)
    k, v = jnp.asarray(rng.normal(size=(1, 5, 3))), jnp.asarray(rng.normal(size=(1, 5, 6)))
    mask = jnp.array([[True, True, True, True, False]])
    session = jnp.array([[0, 0, 1, 1, 1]])
    params = enc.init(jax.random.key(0), k, v, mask, session)
    h = enc.apply(params, k, v, mask, session)
    chex.assert_shape(h, (1, 5, 6))
    assert np.all(np.asarray(h)[0, 4] == 0)  # padding rows are zero
    h2 = enc.apply(params, k.at[0, 3].set(9.0), v.at[0, 3].set(9.0), mask, session)  # change session 1 only
    np.testing.assert_allclose(h2[0, :2], h[0, :2], atol=1e-6)
    assert not np.allclose(h2[0, 2], h[0, 2])
    h3 = enc.apply(params, k, v.at[0, 4].set(9.0), mask, session)  # change padding only
    np.testing.assert_allclose(h3, h, atol=1e-6)


def test_mmoe_with_one_expert_is_the_shared_bottom_mlp():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
    mmoe = ctr.MMoE(num_experts=1, num_tasks=3, expert_hidden=(8, 6))
    variables = mmoe.init(jax.random.key(0), x)
    mixed, gates = mmoe.apply(variables, x)
    np.testing.assert_allclose(gates, 1.0)
    expert = jax.tree.map(lambda p: p[0], nn.meta.unbox(variables["params"]["experts"]))
    bottom = ctr.MLP((8, 6), "relu").apply({"params": expert}, x)
    for s in range(3):
        np.testing.assert_allclose(mixed[:, s], bottom, rtol=1e-6, atol=1e-6)


def test_mmoe_gates_are_distributions_over_experts():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)), jnp.float32)
    mmoe = ctr.MMoE(num_experts=3, num_tasks=2, expert_hidden=(8,))
    variables = mmoe.init(jax.random.key(0), x)
    assert variables["params"]["experts"]["dense_0"]["kernel"].names == ("experts", "embed", "mlp")
    mixed, gates = mmoe.apply(variables, x)
    chex.assert_shape([mixed, gates], [(4, 2, 8), (4, 2, 3)])
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("parameterization", ["vector", "matrix"])
def test_cross_network_matches_numpy_reference(parameterization):
    x0 = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    net = ctr.CrossNetwork(num_layers=3, parameterization=parameterization)
    params = nn.meta.unbox(net.init(jax.random.key(0), x0)["params"])
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero biases too
    out = net.apply({"params": params}, x0)
    chex.assert_shape(out, (5, 6))
    x = x0.astype(np.float64)
    for i in range(3):
        w, b = np.asarray(params[f"kernel_{i}"], np.float64), np.asarray(params[f"bias_{i}"], np.float64)
        x = x0 * (x @ w)[:, None] + b + x if parameterization == "vector" else x0 * (x @ w + b) + x
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


def test_cross_network_degree_is_bounded_by_layers():
    """With zero biases, one layer on a scaled input is a polynomial of degree 2: f(2x) = 2 x + 4 (cross)."""
    net = ctr.CrossNetwork(num_layers=1)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)
    params = net.init(jax.random.key(0), x)
    lin = x
    cross = net.apply(params, x) - lin
    np.testing.assert_allclose(net.apply(params, 2 * x), 2 * lin + 4 * cross, rtol=1e-5, atol=1e-5)
