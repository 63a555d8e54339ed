"""ViT options: bf16 compute and parameters, remat (with a checkpoint policy) and scan equal the plain
loop, train-mode randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.nn.vit import MergeConfig, ViT

TINY = dict(num_classes=5, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64)  # = conftest.TINY_VIT
IMAGES = (2, 16, 16, 3)  # = conftest.VIT_IMAGES: 4x4 patches + CLS = 17 tokens


# ----------------------------------------------------------------------------- dtype, remat, scan


def test_bf16_forward_close_to_f32(nn_helpers, x):
    model = ViT(**TINY, merge=MergeConfig(r=[3, 2], mode="pyra"))
    params = nn_helpers.perturb(nn_helpers.random_params(model, x, scale=0.1, zero="pyra_w_d"), "pyra_w_d")
    f32, info32 = jax.jit(lambda p, x: model.apply(p, x, return_info=True))(params, x)
    bf = model.clone(dtype=jnp.bfloat16)
    b16, info16 = jax.jit(lambda p, x: bf.apply(p, x, return_info=True))(params, x)
    assert b16.dtype == jnp.float32 and info16["tokens"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(b16))
    np.testing.assert_allclose(b16, f32, atol=0.05 * float(np.abs(f32).max()) + 1e-2)
    # bf16 parameters too
    pb = model.clone(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p16 = nn_helpers.random_params(pb, x, scale=0.1)
    assert {leaf.dtype for leaf in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    assert np.all(np.isfinite(jax.jit(pb.apply)(p16, x)))


def _stack_blocks(params, depth):
    p = dict(params["params"])
    blocks = [p.pop(f"block{i}") for i in range(depth)]
    p["blocks"] = jax.tree.map(lambda *a: np.stack(a), *blocks)
    return {"params": p}


def test_remat_and_scan_equal_plain_loop(base_params, x):
    loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply(p, x) ** 2)))  # noqa: E731
    ref, g_ref = loss(ViT(**TINY))(base_params)
    stacked = _stack_blocks(base_params, 2)
    # forward: remat alone, scan alone
    plain = jax.jit(ViT(**TINY).apply)(base_params, x)
    np.testing.assert_array_equal(jax.jit(ViT(**TINY, remat=True).apply)(base_params, x), plain)
    np.testing.assert_allclose(jax.jit(ViT(**TINY, scan=True).apply)(stacked, x), plain, rtol=1e-5, atol=1e-6)
    # backward through both: scan over rematerialised blocks
    val, g = loss(ViT(**TINY, scan=True, remat=True))(stacked)
    np.testing.assert_allclose(val, ref, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, _stack_blocks(g_ref, 2))


def test_remat_policy_keeps_outputs_and_gradients(base_params, x):
    """remat_policy='dots_saveable' reaches every block's jax.checkpoint and changes no number."""
    model = ViT(**TINY, remat=True, remat_policy="dots_saveable")
    jaxpr = str(jax.make_jaxpr(model.apply)(base_params, x))
    assert jaxpr.count(f"policy={jax.checkpoint_policies.dots_saveable}") == TINY["depth"]
    loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply(p, x) ** 2)))  # noqa: E731
    np.testing.assert_array_equal(jax.jit(model.apply)(base_params, x), jax.jit(ViT(**TINY).apply)(base_params, x))
    (val, g), (ref, g_ref) = loss(model)(base_params), loss(ViT(**TINY))(base_params)
    np.testing.assert_allclose(val, ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_ref)


def test_unknown_remat_policy_names_the_choices(x):
    with pytest.raises(ValueError, match=r"remat_policy='dots' is unknown; choose one of \[.*'dots_saveable'"):
        jax.eval_shape(ViT(**TINY, remat=True, remat_policy="dots").init, jax.random.key(0), x)


def test_train_mode_dropout_drop_path_remat(base_params, x):
    """Dropout, attention dropout and drop path run under remat (deterministic is static)."""
    model = ViT(**TINY, dropout=0.1, attention_dropout=0.1, drop_path=0.2, remat=True)
    a = jax.jit(lambda p, k: model.apply(p, x, train=True, rngs={"dropout": k}))
    out0, out1 = a(base_params, jax.random.key(0)), a(base_params, jax.random.key(1))
    assert np.all(np.isfinite(out0)) and not np.allclose(out0, out1)


def test_scan_rejects_merging(base_params, x):
    with pytest.raises(ValueError, match="scan=True needs a merge schedule of zeros"):
        jax.eval_shape(ViT(**TINY, scan=True, merge=MergeConfig(r=2)).init, jax.random.key(0), x)


