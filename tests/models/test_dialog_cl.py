"""Group-wise contrastive learning (jdjax/models/dialog_cl.py): the spec's invariants (§P4), a NumPy
twin of the released loss including its clamp, the sampler, and the response matcher."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdjax.models import dialog_cl as cl

LOG2 = float(np.log(2.0))
CLAMPED = float(-np.log(1e-20))  # 46.0517

# Jitted once per shape: eager dispatch compiles every primitive separately and is slower here.
loss_fn = jax.jit(cl.cl_pair_loss)
grad_fn = jax.jit(jax.grad(lambda l_m, l_n, s: cl.cl_pair_loss(l_m, l_n, s).sum(), argnums=(0, 1, 2)))
weight_fn = jax.jit(cl.cl_weight)
group_fn = jax.jit(cl.group_cl_loss)
group_grad_fn = jax.jit(jax.grad(lambda *a: cl.group_cl_loss(*a)[0], argnums=(3, 4)))


def np_cl_pair_loss(l_m, l_n, s):
    """common_things._compute_sample_cl_loss in float64: -log(clamp(-s (0.5 - h) + 0.5, 1e-20, 1e20))."""
    h = 1 / (1 + np.exp(-(np.asarray(l_m, np.float64) - np.asarray(l_n, np.float64))))
    return -np.log(np.clip(-np.asarray(s, np.float64) * (0.5 - h) + 0.5, 1e-20, 1e20))


def _points(seed=0, n=64, scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=n).astype(np.float32) * scale, rng.normal(size=n).astype(np.float32) * scale,
            rng.uniform(-1, 1, n).astype(np.float32))


def test_equal_models_give_log2_for_any_s():
    s = np.linspace(-1, 1, 21, dtype=np.float32)
    l = np.full_like(s, -12.3)
    np.testing.assert_allclose(loss_fn(l, l, s), LOG2, rtol=1e-6)


def test_matches_numpy_twin_of_released_code():
    l_m, l_n, s = _points()
    np.testing.assert_allclose(loss_fn(l_m, l_n, s), np_cl_pair_loss(l_m, l_n, s), rtol=1e-5, atol=1e-6)
    # The clamp: s = 1 with h ~ 0 and s = -1 with h ~ 1 give -log(1e-20), flat.
    l_m, l_n, s = np.float32([-80, 0, 5]), np.float32([0, 80, -75]), np.float32([1, 1, -1])
    np.testing.assert_allclose(loss_fn(l_m, l_n, s), [CLAMPED] * 3, rtol=1e-6)
    np.testing.assert_allclose(np_cl_pair_loss(l_m, l_n, s), [CLAMPED] * 3, rtol=1e-12)
    assert np.abs(grad_fn(l_m, l_n, s)[0]).max() == 0.0
    # Below the clamp, s = -1 and g = 20: float32 would round 1 - h to 0 (loss 46.05, no gradient); the
    # float64 twin and this code give the exact -log sigmoid(-g) = g, gradient 1. Float64 loses digits
    # from g ~ 30 and rounds to the clamp past ~37; this code stays exact (g) up to the clamp at 46.05.
    l_m, l_n, s = np.float32([20, 30, 40]), np.zeros(3, np.float32), -np.ones(3, np.float32)
    np.testing.assert_allclose(loss_fn(l_m, l_n, s)[0], np_cl_pair_loss(l_m, l_n, s)[0], rtol=1e-6)
    np.testing.assert_allclose(loss_fn(l_m, l_n, s), [20.0, 30.0, 40.0], rtol=1e-6)
    np.testing.assert_allclose(grad_fn(l_m, l_n, s)[0], [1.0] * 3, rtol=1e-6)


def test_gradients_follow_the_formula():
    l_m, l_n, s = _points(seed=1)
    h = 1 / (1 + np.exp(-(l_m.astype(np.float64) - l_n)))
    ones = np.ones_like(s)
    np.testing.assert_allclose(grad_fn(l_m, l_n, ones)[0], -(1 - h), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_fn(l_m, l_n, -ones)[0], h, rtol=1e-5, atol=1e-7)
    x = (1 - s) / 2 + s * h
    np.testing.assert_allclose(grad_fn(l_m, l_n, s)[0], -s * h * (1 - h) / x, rtol=1e-4, atol=1e-7)
    zero = np.zeros_like(s)
    assert np.abs(grad_fn(l_m, l_n, zero)[0]).max() == 0.0
    np.testing.assert_allclose(loss_fn(l_m, l_n, zero), LOG2, rtol=1e-6)
    # The reference and the weights get no gradient.
    _, g_n, g_s = grad_fn(l_m, l_n, s)
    assert np.abs(g_n).max() == 0.0 and np.abs(g_s).max() == 0.0


def test_cl_weight_schedule():
    assert float(weight_fn(0.0)) < 0.001
    assert float(weight_fn(3500.0)) == pytest.approx(0.5)
    assert float(weight_fn(6000.0)) > 0.99
    assert float(weight_fn(1750.0, 2.0)) == pytest.approx(0.5)
    assert float(weight_fn(100.0, 1.0, 100.0, 10.0)) == pytest.approx(0.5)
    w = np.asarray(weight_fn(np.arange(0, 20000, 500, dtype=np.float32)))
    assert np.all(np.diff(w) >= 0) and w.min() >= 0 and w.max() <= 1
    assert float(cl.cl_weight(0)) == pytest.approx(float(weight_fn(0.0)), rel=1e-4)  # eager ints work too


def test_matching_weight_modes():
    m = jnp.array([0.0, 0.2, 0.5, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(cl.matching_weight(m), [-1, -0.6, 0, 0.2, 0.6, 1], atol=1e-6)
    # threshold 0.4: 2 (m + 0.1) - 1, clipped
    np.testing.assert_allclose(cl.matching_weight(m, threshold=0.4), [-0.8, -0.4, 0.2, 0.4, 0.8, 1], atol=1e-6)
    # hard (0.3, 0.7): >= 0.7 -> 1, < 0.3 -> -1, in between 2m - 1
    np.testing.assert_allclose(cl.matching_weight(m, "hard", neg_threshold=0.3, pos_threshold=0.7),
                               [-1, -1, 0, 0.2, 1, 1], atol=1e-6)
    np.testing.assert_allclose(cl.matching_weight(m, "hard"), [-1, -1, 1, 1, 1, 1])
    # filter (0.3, 0.7): strictly inside -> 0, the rest 2m - 1; defaults filter nothing
    np.testing.assert_allclose(cl.matching_weight(m, "filter", neg_threshold=0.3, pos_threshold=0.7),
                               [-1, -0.6, 0, 0, 0.6, 1], atol=1e-6)
    np.testing.assert_allclose(cl.matching_weight(m, "filter"), cl.matching_weight(m), atol=1e-6)
    with pytest.raises(ValueError, match="neg_threshold <= pos_threshold"):
        cl.matching_weight(m, "hard", neg_threshold=0.8, pos_threshold=0.2)
    with pytest.raises(ValueError, match="unknown mode"):
        cl.matching_weight(m, "sharp")


def test_group_loss_reduces_to_gold_pairs_with_k0_w1():
    l_m, l_n, _ = _points(seed=2, n=8)
    empty = np.zeros((8, 0), np.float32)
    loss, aux = group_fn(np.float32(3.0), l_m, l_n, empty, empty, empty, 1.0)
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-(l_m.astype(np.float64) - l_n)))), rtol=1e-5)
    assert float(aux["cl_samples"]) == 0.0 and float(aux["nll"]) == 3.0


def test_group_loss_formula_mask_and_gradients():
    rng = np.random.default_rng(3)
    b, k = 5, 4
    l_m, l_n = (rng.normal(size=b).astype(np.float32) * 2 for _ in range(2))
    lm_s, ln_s = (rng.normal(size=(b, k)).astype(np.float32) * 2 for _ in range(2))
    s = rng.uniform(-1, 1, (b, k)).astype(np.float32)
    mask = rng.uniform(size=(b, k)) < 0.7
    nll, w = np.float32(2.5), 0.3
    loss, aux = group_fn(nll, l_m, l_n, lm_s, ln_s, s, w, mask)
    per = np.where(mask, np_cl_pair_loss(lm_s, ln_s, s), 0.0).sum(1) + np_cl_pair_loss(l_m, l_n, 1.0)
    np.testing.assert_allclose(aux["cl_loss"], per.mean() / (k + 1), rtol=1e-5)
    np.testing.assert_allclose(loss, (1 - w) * 2.5 + w * per.mean() / (k + 1), rtol=1e-5)
    assert float(aux["frac_pos"]) + float(aux["frac_neg"]) == pytest.approx(1.0)  # no s is exactly 0
    # Masked samples and the reference get no gradient; the unmasked target log-probs do.
    g_m, g_n = group_grad_fn(nll, l_m, l_n, lm_s, ln_s, s, w, mask)
    assert np.abs(np.where(mask, 0.0, g_m)).max() == 0.0 and np.abs(g_n).max() == 0.0
    assert np.all(np.asarray(g_m)[mask] != 0)


TINY = dict(vocab_size=16, embed_dim=16, hidden=16, mlp_dim=16)


@pytest.fixture(scope="module")
def matcher():
    """The tiny matcher and its boxed variables (jit-initialised: eager init of the scans is slow)."""
    model = cl.ResponseMatcher(**TINY)
    tokens = jnp.full((2, 4), 5, jnp.int32)
    return model, jax.jit(model.init)(jax.random.key(0), tokens, tokens)


def test_matcher_shapes_names_and_padding(matcher):
    model, variables = matcher
    leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    names = {a for x in leaves for a in x.names} - {None}
    assert names == {"vocab", "embed", "mlp"}
    params = nn.unbox(variables)
    rng = np.random.default_rng(0)
    lengths = np.array([[5], [2], [1]])
    c = jnp.asarray(rng.integers(4, 16, (3, 5)) * (np.arange(5) < lengths), jnp.int32)  # right-padded contexts
    r = jnp.asarray(rng.integers(4, 16, (3, 4)), jnp.int32)
    apply = jax.jit(model.apply)
    logits = apply(params, c, r)
    chex.assert_shape(logits, (3,))
    chex.assert_tree_all_finite(logits)
    padded = apply(params, jnp.pad(c, ((0, 0), (0, 3))), jnp.pad(r, ((0, 0), (0, 2))))
    np.testing.assert_allclose(padded, logits, rtol=1e-5, atol=1e-6)


def _overlap_batch(rng, b=128, length=4, vocab=16):
    """Label 1 iff the response shares a token with the context (tokens 4..vocab-1, distinct per pair)."""
    perm = np.argsort(rng.uniform(size=(b, vocab - 4)), axis=1) + 4
    c, r = perm[:, :length].copy(), perm[:, length:2 * length].copy()
    y = rng.integers(0, 2, b)
    rows, slot = np.arange(b), rng.integers(0, length, b)
    r[rows, slot] = np.where(y == 1, c[rows, rng.integers(0, length, b)], r[rows, slot])  # plant one shared token
    return jnp.asarray(c, jnp.int32), jnp.asarray(r, jnp.int32), jnp.asarray(y, jnp.int32)


def test_matcher_learns_token_overlap(matcher):
    model, variables = matcher
    rng = np.random.default_rng(0)
    c, r, y = _overlap_batch(rng)
    assert all(bool(np.isin(np.asarray(r[i]), np.asarray(c[i])).any()) == bool(y[i]) for i in range(len(y)))
    params = nn.unbox(variables)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, c, r, y):
        loss, grads = jax.value_and_grad(lambda p: cl.matcher_loss(model.apply(p, c, r), y))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    loss0 = float(step(params, opt_state, c, r, y)[2])
    for _ in range(300):
        params, opt_state, loss = step(params, opt_state, *_overlap_batch(rng))
    chex.assert_tree_all_finite(params)
    c, r, y = _overlap_batch(np.random.default_rng(123), b=512)
    accuracy = float(jnp.mean((jax.jit(model.apply)(params, c, r) > 0) == (y == 1)))
    assert loss0 > 0.6 and accuracy > 0.95, (loss0, accuracy)  # 0.996-1.0 over init seeds 0-4
