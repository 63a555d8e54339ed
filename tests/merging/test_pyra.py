"""PYRA modulation against a plain NumPy reference and the spec's vectors (§3.2, §5.5)."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.merging import pyra, tome

SPEC_X = [[9, 0, 0], [1, 0.1, 0.3], [1, 0.2, -0.1], [0, 1, 0.2], [0.1, 1, 0], [-1, 0.3, 0.5], [0.9, 0.05, 0.1]]


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def ref_pyra_merge(x, size, match, params, eps, distill_token):
    """One example: x [N, C], size [N, 1], match = (src, dst, unm) -> (x', s')."""
    src, dst, unm = match
    w_r, w_d, scale, bias = (params[k] for k in ("w_r", "w_d", "ln_scale", "ln_bias"))
    xs = x * size
    a, b = xs[0::2], xs[1::2].copy()
    size_a, size_b = size[0::2], size[1::2].copy()
    pairs = np.stack([a[s] + b[d] for s, d in zip(src, dst)])  # [r, C], before any update
    centred = pairs - pairs.mean(-1, keepdims=True)
    m = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps) * scale + bias
    w_c = 2 * sigmoid(sum(w_r[k, 0] * m[k] for k in range(len(src))))  # [C]
    w_t = [2 * sigmoid(float(m[k] @ w_d[0])) - 1 for k in range(len(src))]
    for k, (s, d) in enumerate(zip(src, dst)):
        b[d] = b[d] + a[s] * (1 + w_c * w_t[k])
        size_b[d] = size_b[d] + size_a[s]
    kept, kept_size = a[unm], size_a[unm]
    if distill_token:
        x_new = np.concatenate([kept[:1], b[:1], kept[1:], b[1:]])
        s_new = np.concatenate([kept_size[:1], size_b[:1], kept_size[1:], size_b[1:]])
    else:
        x_new, s_new = np.concatenate([kept, b]), np.concatenate([kept_size, size_b])
    return x_new / s_new, s_new


def random_case(seed, batch, n, c, r, scale=1.0):
    rng = np.random.default_rng(seed)
    x = (scale * rng.normal(size=(batch, n, c))).astype(np.float32)
    size = rng.integers(1, 4, size=(batch, n, 1)).astype(np.float32)
    params = {
        "w_r": rng.uniform(-1, 1, size=(r, 1)).astype(np.float32),
        "w_d": rng.normal(size=(1, c)).astype(np.float32),
        "ln_scale": (1 + 0.1 * rng.normal(size=(c,))).astype(np.float32),
        "ln_bias": (0.1 * rng.normal(size=(c,))).astype(np.float32),
    }
    return x, size, params


@partial(jax.jit, static_argnames=("r", "distill_token"))
def match_and_pyra(x, size, params, r, distill_token=False):
    matching = tome.bipartite_soft_matching(x, r, distill_token=distill_token)
    return matching, pyra.pyra_merge_wavg(x, size, matching, **params)


@pytest.mark.parametrize("n, r, scale", [(9, 2, 1.0), (12, 4, 1.0), (11, 5, 1.0), (10, 3, 1e-3)])
@pytest.mark.parametrize("distill_token", [False, True])
def test_matches_numpy_reference(n, r, scale, distill_token):
    """scale=1e-3 makes the pair variance comparable to the LayerNorm eps."""
    r = min(r, (n - 1 - distill_token) // 2)
    x, size, params = random_case(seed=n + r, batch=3, n=n, c=6, r=r, scale=scale)
    matching, (x_new, s_new) = match_and_pyra(x, size, params, r=r, distill_token=distill_token)
    assert x_new.shape == (3, n - r, 6)
    params64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for i in range(3):
        match = [np.asarray(idx[i]) for idx in (matching.src_idx, matching.dst_idx, matching.unm_idx)]
        x_ref, s_ref = ref_pyra_merge(x[i].astype(np.float64), size[i], match, params64, 1e-5, distill_token)
        np.testing.assert_allclose(x_new[i], x_ref, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(s_new[i], s_ref, rtol=1e-6)


def test_spec_vector():
    x = jnp.asarray([SPEC_X], jnp.float32)
    matching = tome.bipartite_soft_matching(x, 2)
    params = {
        "w_r": jnp.array([[0.5], [-1.0]]),
        "w_d": jnp.array([[0.3, -0.2, 0.1]]),
        "ln_scale": jnp.ones(3),
        "ln_bias": jnp.zeros(3),
    }
    w_c, w_t = pyra.pyra_modulation(x, matching, **params)
    assert w_c.shape == (1, 1, 3) and w_t.shape == (1, 2, 1)
    np.testing.assert_allclose(w_c[0, 0], [1.6244, 0.2732, 1.1875], atol=1e-4)
    np.testing.assert_allclose(w_t[0, :, 0], [0.2632, -0.2805], atol=1e-4)
    x_new, s_new = pyra.pyra_merge_wavg(x, None, matching, **params)
    expected = [[9, 0, 0], [1, 0.2, -0.1], [1.1424, 0.0768, 0.2156], [0.0272, 0.9617, 0.1], [-1, 0.3, 0.5]]
    np.testing.assert_allclose(x_new[0], expected, atol=1e-4)
    np.testing.assert_array_equal(s_new[0, :, 0], [1, 1, 2, 2, 1])
    x_tome, _ = tome.merge_wavg(x, None, matching)
    np.testing.assert_array_equal(x_new[0, [0, 1, 4]], x_tome[0, [0, 1, 4]])


def test_zero_w_d_equals_tome_exactly():
    x, size, params = random_case(seed=0, batch=2, n=13, c=4, r=4)
    params["w_d"] = np.zeros_like(params["w_d"])
    matching = tome.bipartite_soft_matching(jnp.asarray(x), 4)
    x_pyra, s_pyra = pyra.pyra_merge_wavg(jnp.asarray(x), jnp.asarray(size), matching, **params)
    x_tome, s_tome = tome.merge_wavg(jnp.asarray(x), jnp.asarray(size), matching)
    np.testing.assert_array_equal(x_pyra, x_tome)
    np.testing.assert_array_equal(s_pyra, s_tome)


def test_weights_are_bounded_and_sizes_conserved():
    x, size, params = random_case(seed=1, batch=2, n=15, c=5, r=6)
    matching, (_, s_new) = match_and_pyra(x, size, params, r=6)
    w_c, w_t = pyra.pyra_modulation(jnp.asarray(x * size), matching, **params)
    assert np.all((w_c > 0) & (w_c < 2)) and np.all((w_t > -1) & (w_t < 1))
    np.testing.assert_allclose(s_new.sum(axis=(1, 2)), size.sum(axis=(1, 2)))


def test_gradients_reach_parameters_and_tokens_not_metric():
    x, size, params = random_case(seed=2, batch=2, n=11, c=4, r=3)
    metric = np.random.default_rng(3).normal(size=(2, 11, 4)).astype(np.float32)
    weights = np.random.default_rng(4).normal(size=(2, 8, 4)).astype(np.float32)

    def loss(params, x, metric):
        matching = tome.bipartite_soft_matching(metric, 3)
        x_new, _ = pyra.pyra_merge_wavg(x, jnp.asarray(size), matching, **params)
        return jnp.sum(x_new * weights)

    g_params, g_x, g_metric = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, jnp.asarray(x), jnp.asarray(metric))
    for name, g in [*g_params.items(), ("x", g_x)]:
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name
    np.testing.assert_array_equal(g_metric, 0.0)
    check = partial(jax.test_util.check_grads, order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)
    check(lambda params, x: loss(params, x, metric), (params, jnp.asarray(x)))


def test_jit_compiles_once_per_shape():
    chex.clear_trace_counter()

    @partial(jax.jit, static_argnames="r")
    @chex.assert_max_traces(n=1)
    def step(x, size, params, r):
        return pyra.pyra_merge_wavg(x, size, tome.bipartite_soft_matching(x, r), **params)

    for seed in range(3):
        x, size, params = random_case(seed=seed, batch=2, n=10, c=4, r=3)
        x_new, _ = step(x, size, params, r=3)
        assert x_new.shape == (2, 7, 4)


def test_low_precision_input_keeps_dtype():
    x, size, params = random_case(seed=5, batch=2, n=9, c=4, r=3)
    matching = tome.bipartite_soft_matching(jnp.asarray(x), 3)
    x_new, s_new = pyra.pyra_merge_wavg(jnp.asarray(x, jnp.bfloat16), jnp.asarray(size), matching, **params)
    assert x_new.dtype == jnp.bfloat16 and s_new.dtype == jnp.float32


def test_clamped_r_is_rejected():
    x, size, params = random_case(seed=6, batch=1, n=7, c=4, r=5)
    matching = tome.bipartite_soft_matching(jnp.asarray(x), 5)  # clamped to (7 - 1) // 2 = 3
    assert matching.r == 3
    with pytest.raises(ValueError, match="50% clamp"):
        pyra.pyra_merge_wavg(jnp.asarray(x), jnp.asarray(size), matching, **params)
