"""ViT token-reduction hook (ToMe / PYRA): schedule, sizes, sources, block wiring, PYRA init equivalence."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.merging import schedules, tome
from jdjax.nn import vit as vit_lib
from jdjax.nn.attention import MultiHeadAttention
from jdjax.nn.lora import LoRAConfig
from jdjax.nn.vit import EncoderBlock, MergeConfig, TokenMerger, ViT, vit_config

TINY = dict(num_classes=5, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64)  # = conftest.TINY_VIT
IMAGES = (2, 16, 16, 3)  # = conftest.VIT_IMAGES: 4x4 patches + CLS = 17 tokens


# ----------------------------------------------------------------------------- merging


def test_merging_follows_schedule_and_conserves_size(base_params, x):
    model = ViT(**TINY, merge=MergeConfig(r=[3, 2], trace_source=True))
    assert model.token_counts(16) == [17, 14, 12]
    logits, info = jax.jit(lambda p, x: model.apply(p, x, return_info=True))(base_params, x)
    chex.assert_shape(logits, (2, 5))
    chex.assert_shape(info["tokens"], (2, 12, 32))
    chex.assert_shape(info["size"], (2, 12, 1))
    chex.assert_shape(info["source"], (2, 12, 17))
    size, source = np.asarray(info["size"])[..., 0], np.asarray(info["source"])
    np.testing.assert_array_equal(size.sum(-1), 17.0)  # Σ s = N0
    np.testing.assert_array_equal(size[:, 0], 1.0)  # the class token is never merged
    np.testing.assert_array_equal(source.sum(1), 1.0)  # every original token in exactly one
    np.testing.assert_array_equal(source.sum(2), size)  # row sums are the sizes
    assert source[0, 0, 0] == 1.0
    dense = jax.jit(ViT(**TINY).apply)(base_params, x)
    assert not np.allclose(logits, dense, atol=1e-4)


def test_token_counts_clamp_and_schedules():
    model = ViT(**TINY, merge=MergeConfig(r=10), image_size=16)
    assert model.token_counts() == [17, 9, 5]  # r clamped to 8, then 4
    assert model.token_counts() == [17] + schedules.token_counts([10, 10], 17)
    b16 = ViT(num_classes=0, **vit_config("B/16"), merge=MergeConfig(r=16))
    assert b16.token_counts(224)[-3:] == [37, 21, 11]  # spec §1.4
    high = ViT(num_classes=0, **vit_config("B/16"), merge=MergeConfig(r=[40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]))
    assert high.token_counts(224) == [197, 157, 123, 93, 69, 51, 37, 27, 19, 15, 11, 8, 5]  # spec §3.1
    assert MergeConfig(r=[1]).schedule(2) == [1, 0]


@pytest.mark.parametrize("prop_attn", [True, False])
def test_block_wiring_matches_kernels(nn_helpers, prop_attn):
    """attention(LN1 x, log size) -> tome.merge_tokens on the head-mean keys -> MLP(LN2 x)."""
    block = EncoderBlock(num_heads=2, mlp_dim=64, r=3, merge=MergeConfig(prop_attn=prop_attn))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 32)).astype(np.float32))
    size = jnp.asarray(np.random.default_rng(1).integers(1, 4, size=(2, 9, 1)).astype(np.float32))
    params = nn_helpers.random_params(block, x)["params"]
    out, size_out, source = block.apply({"params": params}, x, size)
    assert source is None

    ln = lambda v, q: nn.LayerNorm(epsilon=1e-6).apply({"params": q}, v)  # noqa: E731
    bias = jnp.log(size[..., 0]) if prop_attn else None
    h, keys = MultiHeadAttention(2).apply({"params": params["attn"]}, ln(x, params["ln1"]), key_bias=bias)
    merged, size_ref = tome.merge_tokens(x + h, keys.mean(axis=2), size, 3)
    mlp = vit_lib.MlpBlock(64).apply({"params": params["mlp"]}, ln(merged, params["ln2"]))
    np.testing.assert_allclose(out, merged + mlp, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(size_out, size_ref)
    chex.assert_shape(out, (2, 6, 32))


def test_pyra_init_equals_tome_lora_and_w_d_matters(nn_helpers, x):
    pyra_model = ViT(**TINY, lora=LoRAConfig(rank=4), merge=MergeConfig(r=[3, 2], mode="pyra"))
    tome_model = ViT(**TINY, lora=LoRAConfig(rank=4), merge=MergeConfig(r=[3, 2], mode="tome"))
    params = nn_helpers.random_params(pyra_model, x, zero="pyra_w_d")  # W_D = 0 as at init
    tome_params = {"params": {k: ({n: m for n, m in v.items() if n != "merge"} if k.startswith("block") else v)
                              for k, v in params["params"].items()}}
    a = jax.jit(pyra_model.apply)(params, x)
    b = jax.jit(tome_model.apply)(tome_params, x)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    c = jax.jit(pyra_model.apply)(nn_helpers.perturb(params, "pyra_w_d", scale=1.0), x)
    assert not np.allclose(a, c, atol=1e-4)
    # the real initialisers: W_r ~ U(-1, 1), W_D = 0, LayerNorm 1 / 0
    merger = TokenMerger(r=3, merge=MergeConfig(mode="pyra"))
    init = jax.jit(lambda k, v, s: nn.meta.unbox(merger.init(k, v, s)))
    p = init(jax.random.key(0), jnp.zeros((1, 9, 32)), jnp.asarray(np.random.default_rng(0).normal(size=(1, 9, 2, 16))))
    p = p["params"]
    chex.assert_shape(p["pyra_w_r"], (3, 1))
    assert np.all(np.abs(p["pyra_w_r"]) <= 1.0) and np.any(p["pyra_w_r"] != 0)
    np.testing.assert_array_equal(p["pyra_w_d"], 0.0)
    np.testing.assert_array_equal(p["pyra_norm_scale"], 1.0)
    np.testing.assert_array_equal(p["pyra_norm_bias"], 0.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="bogus"), "MergeConfig.mode must be one of"),
    (dict(r=-1), "non-negative ints"),
    (dict(r=[3, 2.5]), "non-negative ints"),
    (dict(pyra_ln_eps=0.0), "pyra_ln_eps must be positive"),
])
def test_merge_config_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MergeConfig(**kwargs)


def test_merge_config_is_hashable_and_checked_against_depth():
    assert MergeConfig(r=[3, 2]).r == schedules.PerLayer([3, 2]) and list(MergeConfig(r=[3, 2]).r) == [3, 2]
    assert len({MergeConfig(r=[3, 2]), MergeConfig(r=[3, 2]), MergeConfig(r=schedules.PerLayer([3, 2])), MergeConfig()}) == 2
    with pytest.raises(ValueError, match="list schedule has 3 entries"):
        ViT(**TINY, merge=MergeConfig(r=[1, 1, 1])).token_counts(16)


def test_merge_config_takes_tome_tuples_with_tome_meaning():
    """(r, inflect) is ToMe's schedule: (16, 0) merges 16 in every layer, (16, -1) decreases from
    32 to 0; a per-layer list stays per-layer, also through dataclasses.replace."""
    b16 = vit_config("B/16")
    for r, expect in [((16, 0), [16] * 12), ((16, -1), schedules.parse_r((16, -1), 12)), ([16, 0], [16] + [0] * 11),
                      (16, [16] * 12)]:
        config = MergeConfig(r=r)
        assert config.schedule(12) == expect, r
        again = dataclasses.replace(config, mode="pyra")  # re-runs __post_init__ on the stored r
        assert again.schedule(12) == expect and again == dataclasses.replace(config, mode="pyra")
        model = ViT(num_classes=0, **b16, merge=config)
        assert model.token_counts(224) == [197] + schedules.token_counts(expect, 197)
    assert MergeConfig(r=(16, 0)) != MergeConfig(r=[16, 0])
    assert len({MergeConfig(r=(16, 0)), MergeConfig(r=[16, 0]), MergeConfig(r=(16, 0.0))}) == 2
    assert MergeConfig(r=(16, -1)).r == (16, -1)


@pytest.mark.parametrize("r, match", [
    ((3, 2), r"MergeConfig.r=\(3, 2\): a tuple is ToMe's \(r, inflect\) schedule; .*negative r values.*pass a list, e.g. r=\[3, 2\]"),
    ((3, 2, 1), r"a tuple is ToMe's \(r, inflect\) schedule; .*\(r: int, inflect: float\).*r=\[3, 2, 1\]"),
    ((16.0, 0), r"\(r: int, inflect: float\)"),
    ([16, -1], "non-negative ints"),
])
def test_merge_config_rejects_bad_tuples_and_lists(r, match):
    with pytest.raises(ValueError, match=match):
        MergeConfig(r=r)


def test_merge_config_tuple_needs_two_layers():
    with pytest.raises(ValueError, match="at least 2 layers"):
        MergeConfig(r=(2, 0)).schedule(1)


def test_gradients_reach_lora_and_pyra(nn_helpers, x):
    model = ViT(**TINY, lora=LoRAConfig(rank=2), merge=MergeConfig(r=[3, 2], mode="pyra"))
    params = nn_helpers.random_params(model, x)
    # all final tokens: the last block's merge does not reach the class token (the MLP is per token)
    loss = lambda p: jnp.sum(model.apply(p, x, return_info=True)[1]["tokens"] ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)["params"]
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    for i in range(2):
        for g in (grads[f"block{i}"]["attn"]["qkv_lora"]["b"], grads[f"block{i}"]["merge"]["pyra_w_d"],
                  grads[f"block{i}"]["merge"]["pyra_w_r"]):
            assert float(jnp.abs(g).max()) > 1e-6
