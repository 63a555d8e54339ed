"""Multi-head attention (key bias, mask, LoRA) and the LoRA helpers: init, fold, trainable regex."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.nn import lora as lora_lib
from jdjax.nn.attention import MultiHeadAttention
from jdjax.nn.lora import LoRAConfig
from jdjax.nn.vit import MergeConfig, ViT
from jdjax.train.optim import path_names, trainable_mask

WIDTH, HEADS = 32, 2


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.fixture(scope="module")
def mha_params():
    """Real init of an attention layer with LoRA on qkv and out (the base is its subtree)."""
    mha = MultiHeadAttention(num_heads=HEADS, lora=LoRAConfig(rank=4, targets=("qkv", "out")))
    return nn.meta.unbox(jax.jit(mha.init)(jax.random.key(0), jnp.zeros((1, 3, WIDTH))))


# ----------------------------------------------------------------------------- attention


def test_attention_shapes_and_keys(mha_params, nn_helpers):
    mha = MultiHeadAttention(num_heads=HEADS)
    params = {"params": nn_helpers.drop_lora(mha_params["params"])}
    p = params["params"]
    chex.assert_shape(p["qkv"]["kernel"], (WIDTH, 3, HEADS, WIDTH // HEADS))
    chex.assert_shape(p["qkv"]["bias"], (3, HEADS, WIDTH // HEADS))
    chex.assert_shape(p["out"]["kernel"], (HEADS, WIDTH // HEADS, WIDTH))
    chex.assert_shape(p["out"]["bias"], (WIDTH,))
    params = nn_helpers.perturb(params, "bias$")
    x = _x((2, 7, WIDTH))
    out, keys = mha.apply(params, x)
    chex.assert_shape(out, (2, 7, WIDTH))
    chex.assert_shape(keys, (2, 7, HEADS, WIDTH // HEADS))
    # keys are the k part of the fused projection, before the 1/sqrt(Dh) scaling
    q = params["params"]["qkv"]
    expected = jnp.einsum("bnc,chd->bnhd", x, q["kernel"][:, 1]) + q["bias"][1]
    np.testing.assert_allclose(keys, expected, rtol=1e-5, atol=1e-5)
    shapes = nn_helpers.param_shapes(MultiHeadAttention(num_heads=HEADS, qkv_bias=False), x)
    assert "bias" not in shapes["params"]["qkv"]


def test_attention_width_not_divisible():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        jax.eval_shape(MultiHeadAttention(num_heads=3).init, jax.random.key(0), jnp.zeros((1, 4, WIDTH)))


def test_proportional_attention_equals_duplicated_keys(mha_params, nn_helpers):
    """Spec §5.4: keys {k0, k1, k2} with bias [0, 0, log 3] == keys {k0, k1, k2, k2, k2}."""
    mha = MultiHeadAttention(num_heads=HEADS)
    params = {"params": nn_helpers.drop_lora(mha_params["params"])}
    x3 = _x((1, 3, WIDTH), seed=3)
    x5 = jnp.concatenate([x3, x3[:, 2:], x3[:, 2:]], axis=1)
    bias = jnp.log(jnp.asarray([[1.0, 1.0, 3.0]]))
    out3, _ = mha.apply(params, x3, key_bias=bias)
    out5, _ = mha.apply(params, x5)
    np.testing.assert_allclose(out3, out5[:, :3], rtol=1e-5, atol=1e-6)
    plain, _ = mha.apply(params, x3)
    assert not np.allclose(plain, out3, atol=1e-4)


def test_attention_mask_blocks_keys(mha_params, nn_helpers):
    mha = MultiHeadAttention(num_heads=HEADS)
    params = {"params": nn_helpers.drop_lora(mha_params["params"])}
    x = _x((1, 5, WIDTH), seed=4)
    mask = jnp.asarray([True, True, True, False, False])[None, None, None, :]
    out, _ = mha.apply(params, x, mask=mask)
    changed = x.at[:, 3:].set(_x((1, 2, WIDTH), seed=5))
    out2, _ = mha.apply(params, changed, mask=mask)
    np.testing.assert_allclose(out[:, :3], out2[:, :3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out[:, :3], mha.apply(params, changed)[0][:, :3], atol=1e-4)


# ----------------------------------------------------------------------------- LoRA


def test_lora_init_kaiming_uniform_and_zero_b(mha_params):
    p = mha_params["params"]
    dh = WIDTH // HEADS
    chex.assert_shape(p["qkv_lora"]["a"], (WIDTH, 4))
    chex.assert_shape(p["qkv_lora"]["b"], (4, 3, HEADS, dh))
    chex.assert_shape(p["out_lora"]["a"], (HEADS, dh, 4))
    chex.assert_shape(p["out_lora"]["b"], (4, WIDTH))
    bound = 1 / np.sqrt(WIDTH)  # fan_in = C for both (out: H * Dh = C)
    for name in ("qkv_lora", "out_lora"):
        a = np.asarray(p[name]["a"])
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
        assert np.abs(np.asarray(p[name]["b"])).max() == 0.0
    a = np.asarray(lora_lib.kaiming_uniform_sqrt5()(jax.random.key(0), (768, 8)))  # torch: U(+-1/sqrt(768))
    assert 0.99 / np.sqrt(768) < np.abs(a).max() <= 1 / np.sqrt(768) and abs(a.mean()) < 2e-3


def test_lora_b_zero_equals_base(mha_params, nn_helpers):
    x = _x((2, 5, WIDTH))
    base = MultiHeadAttention(num_heads=HEADS)
    with_lora = MultiHeadAttention(num_heads=HEADS, lora=LoRAConfig(rank=4, targets=("qkv", "out")))
    out_lora, k_lora = with_lora.apply(mha_params, x)
    out_base, k_base = base.apply({"params": nn_helpers.drop_lora(mha_params["params"])}, x)
    np.testing.assert_array_equal(out_lora, out_base)
    np.testing.assert_array_equal(k_lora, k_base)


@pytest.mark.parametrize("alpha,scale", [(None, 1.0), (16.0, 4.0)])
def test_lora_delta_and_alpha_scaling(mha_params, nn_helpers, alpha, scale):
    x = _x((2, 5, WIDTH))
    mha = MultiHeadAttention(num_heads=HEADS, lora=LoRAConfig(rank=4, alpha=alpha, targets=("qkv", "out")))
    p = nn_helpers.perturb(mha_params, "qkv_lora/b$")
    _, keys = mha.apply(p, x)
    q, la = p["params"]["qkv"], p["params"]["qkv_lora"]
    expected = (
        jnp.einsum("bnc,chd->bnhd", x, q["kernel"][:, 1])
        + q["bias"][1]
        + scale * jnp.einsum("bnc,cr,rhd->bnhd", x, la["a"], la["b"][:, 1])
    )
    np.testing.assert_allclose(keys, expected, rtol=1e-5, atol=1e-5)


def test_lora_dropout_only_in_train_mode(mha_params, nn_helpers):
    mha = MultiHeadAttention(num_heads=HEADS, lora=LoRAConfig(rank=4, dropout=0.5, targets=("qkv", "out")))
    x = _x((2, 5, WIDTH))
    p = nn_helpers.perturb(mha_params, "_lora/b$", scale=1.0)
    eval1, _ = mha.apply(p, x)
    eval2, _ = mha.apply(p, x, deterministic=True)
    np.testing.assert_array_equal(eval1, eval2)
    train, _ = mha.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(train, eval1)


@pytest.mark.parametrize("scan", [False, True])
def test_fold_lora_equals_unfolded(nn_helpers, scan):
    kw = dict(num_classes=3, patch_size=4, width=WIDTH, depth=2, num_heads=HEADS, mlp_dim=64, scan=scan)
    model = ViT(**kw, lora=LoRAConfig(rank=4, alpha=8.0, targets=("qkv", "out", "fc1", "fc2")))
    images = nn_helpers.images((2, 8, 8, 3))
    params = nn_helpers.random_params(model, images)
    folded = lora_lib.fold_lora(params["params"], alpha=8.0)
    assert not any("_lora" in n for n in jax.tree.leaves(path_names(folded)))
    a = jax.jit(model.apply)(params, images)
    b = jax.jit(ViT(**kw).apply)({"params": folded}, images)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # folding changes exactly the kernels that had LoRA
    changed = jax.tree.map(lambda u, v: bool(np.any(u != v)), nn_helpers.drop_lora(params["params"]), folded)
    names, flags = jax.tree.leaves(path_names(changed)), jax.tree.leaves(changed)
    assert {n for n, f in zip(names, flags) if f} == {n for n in names if re.search(r"(qkv|out|fc1|fc2)/kernel$", n)}


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=-1), "rank must be an int >= 0"),
    (dict(rank=2, alpha=0.0), "alpha must be None"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(targets="qkv"), r"write \('qkv',\)"),
    (dict(targets=("qkv", "proj")), "unknown entries"),
])
def test_lora_config_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora_lib.LoRAConfig(**kwargs)


def test_lora_config_is_hashable():
    assert lora_lib.LoRAConfig(targets=["qkv", "out"]).targets == ("qkv", "out")
    assert len({lora_lib.LoRAConfig(rank=2), lora_lib.LoRAConfig(rank=2), lora_lib.LoRAConfig()}) == 2


def test_fold_lora_rejects_orphan():
    with pytest.raises(ValueError, match="no sibling"):
        lora_lib.fold_lora({"attn": {"qkv_lora": {"a": jnp.zeros((4, 2)), "b": jnp.zeros((2, 4))}}})


def test_lora_trainable_pattern_selects_lora_head_pyra(nn_helpers):
    model = ViT(num_classes=3, patch_size=4, width=WIDTH, depth=2, num_heads=HEADS, mlp_dim=64,
                lora=LoRAConfig(rank=4), merge=MergeConfig(r=2, mode="pyra"))
    params = nn_helpers.param_shapes(model, jnp.zeros((1, 8, 8, 3)))["params"]
    mask = trainable_mask(params, lora_lib.lora_trainable_pattern(("head", "pyra")))
    selected = {n for n, m in zip(jax.tree.leaves(path_names(params)), jax.tree.leaves(mask)) if m}
    expected = {f"block{i}/attn/qkv_lora/{w}" for i in range(2) for w in "ab"} | {"head/kernel", "head/bias"}
    expected |= {f"block{i}/merge/pyra_{w}" for i in range(2) for w in ("w_r", "w_d", "norm_scale", "norm_bias")}
    assert selected == expected
    only_lora = trainable_mask(params, lora_lib.lora_trainable_pattern(()))
    assert sum(jax.tree.leaves(only_lora)) == 4
