"""ToMe kernels against a plain NumPy reference and the spec's invariants (§1.2, §5)."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.merging import schedules, tome

# ----------------------------------------------------------------------------- NumPy reference


def ref_matching(metric, r, class_token, distill_token):
    """metric [N, D] -> (src, dst, unm) lists of A/B indices, or None if nothing merges."""
    n = metric.shape[0]
    r = min(r, (n - class_token - distill_token) // 2)
    if r <= 0:
        return None
    unit = metric / np.sqrt((metric**2).sum(-1, keepdims=True))
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    best = []  # (score, b index) per A token
    for i, pa in enumerate(a_pos):
        best_score, best_j = -np.inf, 0
        for j, pb in enumerate(b_pos):
            protected = (class_token and i == 0) or (distill_token and j == 0)
            score = -np.inf if protected else float(unit[pa] @ unit[pb])
            if score > best_score:
                best_score, best_j = score, j
        best.append((best_score, best_j))
    order = sorted(range(len(a_pos)), key=lambda i: -best[i][0])  # Python's sort is stable
    src, unm = order[:r], order[r:]
    if class_token:
        unm = sorted(unm)
    return src, [best[i][1] for i in src], unm


def ref_merge(x, match, mode, distill_token):
    """x [N, C] -> [N - r, C] with the reduction `mode` into the destinations."""
    if match is None:
        return x.copy()
    src, dst, unm = match
    a, b = x[0::2], x[1::2].copy()
    count = np.ones(len(b))
    for s, d in zip(src, dst):
        if mode == "amax":
            b[d] = np.maximum(b[d], a[s])
        else:
            b[d] = b[d] + a[s]
            count[d] += 1
    if mode == "mean":
        b = b / count[:, None]
    kept = a[unm]
    if distill_token:
        return np.concatenate([kept[:1], b[:1], kept[1:], b[1:]])
    return np.concatenate([kept, b])


def ref_match_and_merge(metric, x, size, r, class_token, distill_token):
    """One example: returns (match, x', s') with the size-weighted average."""
    match = ref_matching(metric, r, class_token, distill_token)
    s_new = ref_merge(size, match, "sum", distill_token)
    x_new = ref_merge(x * size, match, "sum", distill_token) / s_new
    return match, x_new, s_new


def ref_unmerge(x, match, n, distill_token):
    """x [N - r, C] -> [N, C]: kept tokens in place, sources copy their destination."""
    src, dst, unm = match
    k = len(unm)
    if distill_token:
        kept, b = np.concatenate([x[:1], x[2 : k + 1]]), np.concatenate([x[1:2], x[k + 1 :]])
    else:
        kept, b = x[:k], x[k:]
    out = np.zeros((n, x.shape[1]), x.dtype)
    for j in range(len(b)):
        out[2 * j + 1] = b[j]
    for i, a_idx in enumerate(unm):
        out[2 * a_idx] = kept[i]
    for s, d in zip(src, dst):
        out[2 * s] = b[d]
    return out


def random_inputs(seed, batch, n, c=5, d=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, n, c)).astype(np.float32)
    metric = rng.normal(size=(batch, n, d)).astype(np.float32)
    size = rng.integers(1, 4, size=(batch, n, 1)).astype(np.float32)
    return x, metric, size


# ----------------------------------------------------------------------------- reference checks

STATIC = {"static_argnames": ("r", "class_token", "distill_token")}
merge_tokens_jit = jax.jit(tome.merge_tokens, **STATIC)


@partial(jax.jit, **STATIC)
def match_and_merge(x, metric, size, r, class_token, distill_token):
    matching = tome.bipartite_soft_matching(metric, r, class_token=class_token, distill_token=distill_token)
    return matching, tome.merge_wavg(x, size, matching)


@pytest.mark.parametrize("n", [7, 10])
@pytest.mark.parametrize("class_token,distill_token", [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize("r", [0, 1, 3, 100])
def test_matching_and_merge_wavg_match_numpy_reference(n, class_token, distill_token, r):
    x, metric, size = random_inputs(seed=n * 100 + r, batch=3, n=n)
    matching, (x_new, s_new) = match_and_merge(x, metric, size, r, class_token, distill_token)
    expected_r = min(r, (n - class_token - distill_token) // 2)
    assert matching.r == expected_r
    assert x_new.shape == (3, n - expected_r, 5) and s_new.shape == (3, n - expected_r, 1)
    for i in range(3):
        match, x_ref, s_ref = ref_match_and_merge(metric[i], x[i], size[i], r, class_token, distill_token)
        if match is not None:
            np.testing.assert_array_equal(matching.src_idx[i], match[0])
            np.testing.assert_array_equal(matching.dst_idx[i], match[1])
            np.testing.assert_array_equal(matching.unm_idx[i], match[2])
        np.testing.assert_allclose(x_new[i], x_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s_new[i], s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("class_token", [True, False])
def test_exact_ties_keep_index_order(class_token):
    """One-hot metrics give exact ties; the lower index wins both the sort and the max."""
    eye = np.eye(4, dtype=np.float32)
    metric = eye[[0, 1, 1, 1, 1, 2, 2, 3, 2]][None]  # A = e0 e1 e1 e2 e2, B = e1 e1 e2 e3
    x = np.random.default_rng(0).normal(size=(1, 9, 3)).astype(np.float32)
    size = np.ones((1, 9, 1), np.float32)
    for r in [1, 2, 3]:
        matching, (x_new, _) = match_and_merge(x, metric, size, r, class_token, False)
        match, x_ref, _ = ref_match_and_merge(metric[0], x[0], size[0], r, class_token, False)
        np.testing.assert_array_equal(matching.src_idx[0], match[0])
        np.testing.assert_array_equal(matching.dst_idx[0], match[1])
        np.testing.assert_array_equal(matching.unm_idx[0], match[2])
        np.testing.assert_allclose(x_new[0], x_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean", "amax"])
@pytest.mark.parametrize("distill_token", [False, True])
def test_merge_modes_and_unmerge_match_reference(mode, distill_token):
    x, metric, _ = random_inputs(seed=7, batch=4, n=11)
    matching = tome.bipartite_soft_matching(jnp.asarray(metric), 3, distill_token=distill_token)
    merged = tome.merge(jnp.asarray(x), matching, mode)
    restored = tome.unmerge(merged, matching)
    assert restored.shape == x.shape
    for i in range(4):
        match = ref_matching(metric[i], 3, True, distill_token)
        ref = ref_merge(x[i], match, mode, distill_token)
        np.testing.assert_allclose(merged[i], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(restored[i], ref_unmerge(ref, match, 11, distill_token), rtol=1e-5, atol=1e-6)


def test_unmerge_restores_kept_tokens_and_copies_destinations():
    x, metric, _ = random_inputs(seed=3, batch=2, n=9)
    matching = tome.bipartite_soft_matching(jnp.asarray(metric), 3)
    restored = np.asarray(tome.unmerge(tome.merge(jnp.asarray(x), matching, "mean"), matching))
    for i in range(2):
        src = 2 * np.asarray(matching.src_idx[i])
        kept = 2 * np.asarray(matching.unm_idx[i])
        np.testing.assert_array_equal(restored[i, kept], x[i, kept])
        dst = 2 * np.asarray(matching.dst_idx[i]) + 1
        np.testing.assert_array_equal(restored[i, src], restored[i, dst])


# ----------------------------------------------------------------------------- invariants (§5)


def test_r_zero_is_bit_identical():
    x, metric, size = random_inputs(seed=0, batch=2, n=9)
    x = jnp.asarray(x)
    x_new, s_new = tome.merge_tokens(x, jnp.asarray(metric), None, 0)
    assert x_new is x
    np.testing.assert_array_equal(s_new, np.ones((2, 9, 1)))
    jitted = jax.jit(tome.merge_tokens, static_argnums=3)
    x_jit, s_jit = jitted(x, jnp.asarray(metric), jnp.asarray(size), 0)
    np.testing.assert_array_equal(x_jit, x)
    np.testing.assert_array_equal(s_jit, size)


@pytest.mark.parametrize("class_token", [True, False])
def test_mass_conservation_over_layers(class_token):
    x0, _, _ = random_inputs(seed=11, batch=3, n=21, c=6)
    x, size = jnp.asarray(x0), None
    schedule = [4, 4, 3, 100]
    for r in schedule:
        x, size = merge_tokens_jit(x, x, size, r=r, class_token=class_token)
        np.testing.assert_allclose(size.sum(axis=(1, 2)), 21.0)
        np.testing.assert_allclose((x * size).sum(axis=1), x0.sum(axis=1), rtol=1e-5, atol=1e-4)
        if class_token:
            np.testing.assert_array_equal(size[:, 0, 0], 1.0)
            np.testing.assert_array_equal(x[:, 0], x0[:, 0])
    protected = int(class_token)
    assert x.shape[1] == schedules.token_counts(schedule, 21, protected)[-1]


def test_identical_tokens_stay_equal():
    rng = np.random.default_rng(5)
    v = rng.normal(size=(4,)).astype(np.float32)
    x = np.broadcast_to(v, (2, 13, 4)).copy()
    x[:, 0] = rng.normal(size=(2, 4))  # a distinct class token
    x, size = jnp.asarray(x), None
    for r in [3, 3, 2]:
        x, size = merge_tokens_jit(x, x, size, r=r)
        np.testing.assert_allclose(x[:, 1:], np.broadcast_to(v, x[:, 1:].shape), rtol=1e-6, atol=1e-6)


def test_source_map_tracks_original_tokens():
    @partial(jax.jit, static_argnames="r")
    def layer(x, size, source, r):
        matching = tome.bipartite_soft_matching(x, r)
        return (*tome.merge_wavg(x, size, matching), tome.merge_source(matching, x, source))

    x0, _, _ = random_inputs(seed=2, batch=2, n=15)
    x, size, source = layer(jnp.asarray(x0), None, None, r=3)
    for r in [3, 2]:
        x, size, source = layer(x, size, source, r=r)
    assert source.shape == (2, 15 - 8, 15)
    assert set(np.unique(source)) == {0.0, 1.0}
    np.testing.assert_array_equal(source.sum(axis=1), 1.0)  # every original token is in one place
    np.testing.assert_array_equal(source.sum(axis=2), size[..., 0])
    averaged = np.einsum("bkn,bnc->bkc", source, x0) / size  # the mean of the covered tokens
    np.testing.assert_allclose(x, averaged, rtol=1e-5, atol=1e-5)


def attend(q, k, v, key_bias):
    """q [Q, D], k/v [K, D], key_bias [K] -> [Q, D] softmax attention."""
    logits = q @ k.T / jnp.sqrt(q.shape[-1]) + key_bias
    return jax.nn.softmax(logits, axis=-1) @ v


def test_proportional_attention_equals_duplicated_keys():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(4, 8), (3, 8), (3, 8)])
    bias = tome.proportional_attention_bias(jnp.array([[[1.0], [1.0], [3.0]]]))  # [1, 3]
    assert bias.shape == (1, 3)
    merged = attend(q, k, v, bias[0])
    dup = np.array([0, 1, 2, 2, 2])
    duplicated = attend(q, k[dup], v[dup], jnp.zeros(5))
    np.testing.assert_allclose(merged, duplicated, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- spec vectors (§5.5)

SPEC_X = [[9, 0, 0], [1, 0.1, 0.3], [1, 0.2, -0.1], [0, 1, 0.2], [0.1, 1, 0], [-1, 0.3, 0.5], [0.9, 0.05, 0.1]]


def test_spec_seven_token_example():
    x = jnp.asarray([SPEC_X], jnp.float32)
    matching = tome.bipartite_soft_matching(x, 2)
    np.testing.assert_array_equal(matching.src_idx[0], [3, 2])
    np.testing.assert_array_equal(matching.dst_idx[0], [0, 1])
    np.testing.assert_array_equal(matching.unm_idx[0], [0, 1])
    x_new, s_new = tome.merge_wavg(x, None, matching)
    expected = [[9, 0, 0], [1, 0.2, -0.1], [0.95, 0.075, 0.2], [0.05, 1, 0.1], [-1, 0.3, 0.5]]
    np.testing.assert_allclose(x_new[0], expected, atol=1e-6)
    np.testing.assert_array_equal(s_new[0, :, 0], [1, 1, 2, 2, 1])


def test_spec_two_layer_example():
    x = jnp.asarray([SPEC_X], jnp.float32)[..., :2]
    x, size = tome.merge_tokens(x, x, None, 2)
    np.testing.assert_allclose(x[0], [[9, 0], [0.1, 1], [0.9667, 0.1167], [0, 1], [-1, 0.3]], atol=1e-4)
    np.testing.assert_array_equal(size[0, :, 0], [1, 1, 3, 1, 1])
    x, size = tome.merge_tokens(x, x, size, 2)
    np.testing.assert_allclose(x[0], [[9, 0], [0.75, 0.3375], [-0.5, 0.65]], atol=1e-4)
    np.testing.assert_array_equal(size[0, :, 0], [1, 4, 2])


# ----------------------------------------------------------------------------- jit, grads, dtypes


def test_jit_compiles_once_per_shape():
    chex.clear_trace_counter()

    @partial(jax.jit, static_argnames="r")
    @chex.assert_max_traces(n=1)
    def step(x, metric, size, r):
        return tome.merge_tokens(x, metric, size, r)

    for seed in range(3):
        x, metric, size = random_inputs(seed=seed, batch=2, n=10)
        x_new, _ = step(x, metric, size, r=3)
        assert x_new.shape == (2, 7, 5)


def test_gradients_flow_through_values_not_metric():
    x, metric, size = random_inputs(seed=4, batch=2, n=11, d=5)
    weights = np.random.default_rng(0).normal(size=(2, 8, 5)).astype(np.float32)

    def loss(x, metric, size):
        x_new, s_new = tome.merge_tokens(x, metric, size, 3)
        return jnp.sum(x_new * weights) + jnp.sum(s_new)

    gx, gm, gs = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(metric), jnp.asarray(size))
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gs))
    assert np.abs(gx).sum() > 0
    np.testing.assert_array_equal(gm, 0.0)
    check = partial(jax.test_util.check_grads, order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)
    check(lambda x, size: loss(x, metric, size), (jnp.asarray(x), jnp.asarray(size)))
    g_self = jax.grad(lambda x: loss(x, x, size))(jnp.asarray(metric))  # metric = x: only the value path
    np.testing.assert_allclose(g_self, jax.grad(loss)(jnp.asarray(metric), jnp.asarray(metric), size))


def test_low_precision_input_keeps_dtype():
    x, metric, size = random_inputs(seed=6, batch=2, n=10)
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    x_new, s_new = tome.merge_tokens(x_bf16, jnp.asarray(metric), jnp.asarray(size), 3)
    assert x_new.dtype == jnp.bfloat16 and s_new.dtype == jnp.float32
    x_ref, _ = tome.merge_tokens(x_bf16.astype(jnp.float32), jnp.asarray(metric), jnp.asarray(size), 3)
    np.testing.assert_allclose(x_new.astype(np.float32), x_ref, rtol=1e-2, atol=1e-2)


def test_bad_inputs_raise():
    x, metric, _ = random_inputs(seed=0, batch=2, n=9)
    matching = tome.bipartite_soft_matching(jnp.asarray(metric), 2)
    with pytest.raises(ValueError, match="matching was computed"):
        tome.merge(jnp.asarray(x[:, :8]), matching)
    with pytest.raises(ValueError, match="merge mode"):
        tome.merge(jnp.asarray(x), matching, "median")
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        tome.bipartite_soft_matching(jnp.asarray(metric[0]), 2)
    with pytest.raises(TypeError, match="static Python int"):
        tome.bipartite_soft_matching(jnp.asarray(metric), 2.0)
