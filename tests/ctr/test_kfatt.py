"""KFAtt kernels against a plain NumPy reference, and the spec's invariants (spec §1.8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.models import kfatt
from jdjax.nn.ctr.attention import softmax_pool

B, T, D = 4, 7, 3


def _inputs(seed=0, dup=True):
    rng = np.random.default_rng(seed)
    s0 = rng.normal(size=B)
    mu = rng.normal(size=(B, D))
    keys = rng.integers(0, 3 if dup else 1000, (B, T))
    scores = rng.normal(size=(B, T))
    lv = rng.normal(size=(B, T))
    # Score and log sigma'^2 are functions of the key within a row (the KFAtt setting).
    for b in range(B):
        for t in range(T):
            first = int(np.flatnonzero(keys[b] == keys[b, t])[0])
            scores[b, t], lv[b, t] = scores[b, first], lv[b, first]
    values = rng.normal(size=(B, T, D))
    lengths = np.array([T, 4, 1, 0])
    mask = np.arange(T)[None] < lengths[:, None]
    return s0, mu, scores, values, mask, keys, lv


def np_kfatt_base(s0, mu, scores, values, mask):
    """Eq. 6 in linear space: (mu/sq + sum v_t/st) / (1/sq + sum 1/st) with 1/s = exp(score)."""
    out = np.zeros(mu.shape)
    for b in range(len(s0)):
        num = np.exp(s0[b]) * mu[b]
        den = np.exp(s0[b])
        for t in np.flatnonzero(mask[b]):
            num = num + np.exp(scores[b, t]) * values[b, t]
            den += np.exp(scores[b, t])
        out[b] = num / den
    return out


def np_kfatt_freq(s0, mu, scores, values, mask, keys, lv):
    """Eq. 10: sensors = distinct keys; w_m = 1 / (sigma_m^2 + sigma'_m^2 / n_m)."""
    out = np.zeros(mu.shape)
    for b in range(len(s0)):
        num = np.exp(s0[b]) * mu[b]
        den = np.exp(s0[b])
        groups = {}
        for t in np.flatnonzero(mask[b]):
            groups.setdefault(keys[b, t], []).append(t)
        for members in groups.values():
            n = len(members)
            sigma2, rand2 = np.exp(-scores[b, members[0]]), np.exp(lv[b, members[0]])
            w = 1.0 / (sigma2 + rand2 / n)
            num = num + w * values[b, members].mean(0)
            den += w
        out[b] = num / den
    return out


def test_base_matches_numpy_reference():
    s0, mu, scores, values, mask, _, _ = _inputs()
    out, w = kfatt.kfatt_base(jnp.asarray(s0), jnp.asarray(mu), jnp.asarray(scores), jnp.asarray(values), jnp.asarray(mask))
    np.testing.assert_allclose(out, np_kfatt_base(s0, mu, scores, values, mask), rtol=1e-5, atol=1e-6)
    # A convex combination of mu and the valid behaviours (spec invariant 5).
    assert np.all(np.asarray(w) >= 0) and np.allclose(np.sum(w, -1), 1.0, atol=1e-6)
    assert np.all(np.asarray(w)[:, 1:][~mask] == 0)


def test_freq_matches_numpy_reference():
    s0, mu, scores, values, mask, keys, lv = _inputs(seed=1)
    out, w, n = kfatt.kfatt_freq(*map(jnp.asarray, (s0, mu, scores, values, mask, keys, lv)))
    np.testing.assert_allclose(out, np_kfatt_freq(s0, mu, scores, values, mask, keys, lv), rtol=1e-5, atol=1e-6)
    assert np.allclose(np.sum(w, -1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.sum(n, -1), mask.sum(-1))  # every valid behaviour in exactly one sensor


def test_stable_for_extreme_scores():
    s0, mu, scores, values, mask, keys, lv = _inputs(seed=2)
    big = jnp.asarray(scores * 400.0)  # exp overflows float32 in linear space
    out, _ = kfatt.kfatt_base(jnp.asarray(s0), jnp.asarray(mu), big, jnp.asarray(values), jnp.asarray(mask))
    out_f, _, _ = kfatt.kfatt_freq(jnp.asarray(s0), jnp.asarray(mu), big, jnp.asarray(values), jnp.asarray(mask),
                                   jnp.asarray(keys), jnp.asarray(lv * 400.0))
    assert np.isfinite(out).all() and np.isfinite(out_f).all()


def test_freq_gradients_finite_for_extreme_scores_and_padding():
    """Linear-space weights: no inf behind the mask or far from the top token, so no NaN gradient
    (padding scores far above the valid ones, extreme scores and random errors, no prior)."""
    s0, mu, scores, values, mask, keys, lv = _inputs(seed=10)
    scores = np.where(mask, scores, 1000.0)
    for scale, prior in ((1.0, s0), (400.0, s0), (400.0, np.full(B, -np.inf))):
        args = tuple(map(jnp.asarray, (prior, mu, scores * scale, values, lv * scale)))

        def loss(s0, mu, scores, values, lv):
            return jnp.sum(kfatt.kfatt_freq(s0, mu, scores, values, jnp.asarray(mask), jnp.asarray(keys), lv)[0] ** 2)

        grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads), scale


def test_infinite_prior_variance_is_masked_softmax_attention():
    _, mu, scores, values, mask, _, _ = _inputs(seed=3)
    no_prior = jnp.full((B,), -jnp.inf)
    out, _ = kfatt.kfatt_base(no_prior, jnp.asarray(mu), jnp.asarray(scores), jnp.asarray(values), jnp.asarray(mask))
    ref, _ = softmax_pool(jnp.asarray(scores), jnp.asarray(values), jnp.asarray(mask))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert np.all(np.asarray(out)[~mask.any(-1)] == 0)  # the empty row: no prior, no evidence -> 0


def test_empty_history_returns_the_prior_mean():
    s0, mu, scores, values, _, keys, lv = _inputs(seed=4)
    empty = jnp.zeros((B, T), bool)
    out, _ = kfatt.kfatt_base(jnp.asarray(s0), jnp.asarray(mu), jnp.asarray(scores), jnp.asarray(values), empty)
    out_f, _, _ = kfatt.kfatt_freq(jnp.asarray(s0), jnp.asarray(mu), jnp.asarray(scores), jnp.asarray(values), empty,
                                   jnp.asarray(keys), jnp.asarray(lv))
    np.testing.assert_allclose(out, mu, atol=1e-6)
    np.testing.assert_allclose(out_f, mu, atol=1e-6)


def test_base_is_the_map_estimate():
    """The gradient of the log posterior vanishes at v_hat (spec invariant 3, base)."""
    s0, mu, scores, values, mask, _, _ = _inputs(seed=5)
    out, _ = kfatt.kfatt_base(jnp.asarray(s0), jnp.asarray(mu), jnp.asarray(scores), jnp.asarray(values), jnp.asarray(mask))

    def log_post(v, b):
        prior = -0.5 * jnp.exp(s0[b]) * jnp.sum((v - mu[b]) ** 2)
        meas = -0.5 * jnp.sum(jnp.exp(scores[b]) * mask[b] * jnp.sum((v[None] - values[b]) ** 2, -1))
        return prior + meas

    for b in range(B):
        np.testing.assert_allclose(jax.grad(log_post)(out[b], b), 0.0, atol=1e-5)


def test_freq_is_the_joint_map_over_interest_and_sensors():
    """KFAtt-freq equals the joint MAP over (v_q, v_1..v_M) of Eqs. 17-20, solved numerically
    (one Newton step from 0 with the autodiff Hessian: exact for this quadratic)."""
    s0, mu, scores, values, mask, keys, lv = _inputs(seed=6)
    out, _, _ = kfatt.kfatt_freq(*map(jnp.asarray, (s0, mu, scores, values, mask, keys, lv)))
    # Sensor slot of each behaviour: the position of the first behaviour with its key.
    slot = np.array([[np.flatnonzero((keys[b] == keys[b, t]) & mask[b])[0] if mask[b, t] else 0 for t in range(T)]
                     for b in range(B)])
    used = np.zeros((B, T), bool)
    for b in range(B):
        used[b, slot[b][mask[b]]] = True

    def neg_log_post(x, s0, mu, scores, lv, values, mask, slot, used):
        vq, vm = x[0], x[1:]  # [D], [T, D] (one slot per position; unused slots pinned at 0)
        total = 0.5 * jnp.exp(s0) * jnp.sum((vq - mu) ** 2)
        total += 0.5 * jnp.sum(jnp.where(used, jnp.exp(scores), 1.0) * jnp.sum((vm - jnp.where(used[:, None], vq, 0.0)) ** 2, -1))
        err = jnp.sum((values - vm[slot]) ** 2, -1)  # [T] each click against its sensor
        return total + 0.5 * jnp.sum(jnp.where(mask, jnp.exp(-lv[slot]) * err, 0.0))

    def joint_map(*args):
        f = lambda x: neg_log_post(x.reshape(1 + T, D), *args)
        x0 = jnp.zeros((1 + T) * D)
        return (x0 - jnp.linalg.solve(jax.hessian(f)(x0), jax.grad(f)(x0))).reshape(1 + T, D)[0]

    ref = jax.jit(jax.vmap(joint_map))(*map(jnp.asarray, (s0, mu, scores, lv, values, mask, slot, used)))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_freq_reduces_to_base_without_duplicates_and_random_error():
    s0, mu, scores, values, mask, keys, _ = _inputs(seed=7, dup=False)
    keys = np.tile(np.arange(T), (B, 1))  # every behaviour its own sensor: n_m = 1
    no_random_error = jnp.full((B, T), -jnp.inf)  # sigma' = 0
    out_f, _, _ = kfatt.kfatt_freq(jnp.asarray(s0), jnp.asarray(mu), jnp.asarray(scores), jnp.asarray(values),
                                   jnp.asarray(mask), jnp.asarray(keys), no_random_error)
    out_b, _ = kfatt.kfatt_base(jnp.asarray(s0), jnp.asarray(mu), jnp.asarray(scores), jnp.asarray(values), jnp.asarray(mask))
    np.testing.assert_allclose(out_f, out_b, atol=1e-6)


def test_duplicates_multiply_base_weight_but_freq_weight_is_capped():
    """A behaviour repeated k times: k x its base weight; its freq weight stays below exp(s_m)."""
    k = 5
    s0 = jnp.array([0.0])
    mu = jnp.zeros((1, D))
    scores = jnp.array([[1.0] * k + [0.5]])  # key 7 repeated k times, then key 9 once
    values = jnp.ones((1, k + 1, D))
    mask = jnp.ones((1, k + 1), bool)
    keys = jnp.array([[7] * k + [9]])
    _, w_base = kfatt.kfatt_base(s0, mu, scores, values, mask)
    unnorm = np.asarray(w_base[0]) / np.asarray(w_base[0, 0])  # relative to the prior's exp(s0) = 1
    np.testing.assert_allclose(unnorm[1 : k + 1].sum(), k * np.exp(1.0), rtol=1e-5)
    for log_rand in (-2.0, 0.0, 3.0):
        _, w_freq, n = kfatt.kfatt_freq(s0, mu, scores, values, mask, keys, jnp.full((1, k + 1), log_rand))
        rel = np.asarray(w_freq[0]) / np.asarray(w_freq[0, 0])
        sensor = 1 + int(np.flatnonzero(np.asarray(n[0]) == k)[0])
        assert rel[sensor] < np.exp(1.0)
        np.testing.assert_allclose(rel[sensor], 1.0 / (np.exp(-1.0) + np.exp(log_rand) / k), rtol=1e-5)


def test_dedup_ignores_padding():
    keys = jnp.array([[3, 3, 5, 3, 0, 0]])
    mask = jnp.array([[True, True, True, True, False, False]])
    a = np.asarray(kfatt.dedup_assignment(keys, mask))[0]
    np.testing.assert_array_equal(a.sum(0), [3, 0, 1, 0, 0, 0])  # sensors at the first occurrence
    assert a[4:].sum() == 0


@pytest.mark.parametrize("mode", ["kfatt_base", "kfatt_freq"])
def test_pooling_module_prior_only_for_empty_history(mode):
    pool = kfatt.KFAttPooling(mode, value_dim=D, prior_hidden=8)
    rng = np.random.default_rng(8)
    q = jnp.asarray(rng.normal(size=(B, 5)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, 5)), jnp.float32)
    scores, values = jnp.asarray(rng.normal(size=(B, T))), jnp.asarray(rng.normal(size=(B, T, D)))
    keys = jnp.asarray(rng.integers(0, 3, (B, T)))
    empty = jnp.zeros((B, T), bool)
    params = pool.init(jax.random.key(0), q, scores, values, empty, k, keys)
    out, w = pool.apply(params, q, scores, values, empty, k, keys)
    mu = kfatt.TwoLayerMLP(D, 8).apply({"params": params["params"]["prior_mean"]}, q)
    np.testing.assert_allclose(out, mu, atol=1e-6)
    np.testing.assert_allclose(w[:, 0], 1.0)


def test_freq_counts_by_scatter_equal_counts_by_comparison():
    s0, mu, scores, values, mask, keys, lv = map(jnp.asarray, _inputs(seed=9))
    out, w, n = kfatt.kfatt_freq(s0, mu, scores, values, mask, keys, lv)
    out_s, w_s, n_s = kfatt.kfatt_freq(s0, mu, scores, values, mask, keys, lv, num_keys=3)
    np.testing.assert_allclose(out_s, out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(w_s, w, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(n_s, n)


@pytest.mark.parametrize("name", ["kfatt_freq", "din_kfatt_freq", "transformer_kfatt_freq"])
def test_random_error_per_table_row_equals_per_behaviour(name):
    """KFAtt-freq in a model runs the sigma' MLP once per category-table row: the same outputs
    and gradients as running it on every behaviour's key."""
    import flax.linen as nn

    from jdjax.data import clicklog
    from jdjax.data.features import FeatureMap
    from jdjax.models.din import BehaviourCTR

    log = clicklog.generate("tiny", seed=0)["train"]
    fmap = FeatureMap.fit(clicklog.features(8, clicklog.SIZES["tiny"].maxlen), log)
    enc = fmap.encode({k: log[k][:16] for k in ("user", "item", "cat", "hist_item", "hist_cat")})
    batch = {k: jnp.asarray(v) for k, v in enc.items()}
    kw = {"mlp_hidden": (16, 8), "din_hidden": (8, 4), "head_dim": 4, "prior_hidden": 8}
    table_mode = BehaviourCTR(fmap.features, fmap.tables(), name, **kw)
    per_behaviour = BehaviourCTR(fmap.features, fmap.tables(), name, dedup="hist_cat_copy", **kw)
    # Any parameters serve for this equality: the structure from eval_shape (no init compile, the
    # slowest part of this test), the values random normal (biases and PReLU slopes nonzero too).
    shapes = nn.meta.unbox(jax.eval_shape(table_mode.init, jax.random.key(0), batch)["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype), shapes)
    copy = {**batch, "hist_cat_copy": batch["hist_cat"]}  # de-duplicate by a copy: not table mode
    jaxpr = lambda model, b: str(jax.make_jaxpr(lambda p: model.apply({"params": p}, b))(params))
    assert "scatter-add" in jaxpr(table_mode, batch) and "scatter-add" not in jaxpr(per_behaviour, copy)

    def grad_and_logits(model, b):
        """Gradient of sum(logits^2) and the logits, in one compiled call (jit: one compile, not op by op)."""

        def loss(p):
            logits = model.apply({"params": p}, b)[0]
            return jnp.sum(logits**2), logits

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    (g1, out1), (g2, out2) = grad_and_logits(table_mode, batch), grad_and_logits(per_behaviour, copy)
    np.testing.assert_allclose(out1, out2, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
