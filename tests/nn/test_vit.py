"""ViT: config, layout and logical names, r = 0 equals the plain model, NumPy reference, position embeddings."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.nn import vit as vit_lib
from jdjax.nn.attention import MultiHeadAttention
from jdjax.nn.lora import LoRAConfig
from jdjax.nn.vit import MergeConfig, ViT, exact_gelu, interpolate_pos_embedding, vit_config
from jdjax.train import sharding as shd

TINY = dict(num_classes=5, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64)  # = conftest.TINY_VIT
IMAGES = (2, 16, 16, 3)  # = conftest.VIT_IMAGES: 4x4 patches + CLS = 17 tokens


# ----------------------------------------------------------------------------- config and layout


def test_vit_config():
    assert vit_config("B/16") == dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072)
    assert vit_config("Ti/16")["width"] == 192 and vit_config("S/32")["patch_size"] == 32
    assert vit_config("L/16") == dict(patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096)
    with pytest.raises(ValueError, match="unknown ViT name"):
        vit_config("X/16")


def test_shapes(base_params, x):
    model = ViT(**TINY)
    logits, info = jax.jit(lambda p, x: model.apply(p, x, return_info=True))(base_params, x)
    chex.assert_shape(logits, (2, 5))
    chex.assert_shape(info["tokens"], (2, 17, 32))
    chex.assert_shape(info["size"], (2, 17, 1))
    assert logits.dtype == jnp.float32
    features = ViT(**{**TINY, "num_classes": 0}).apply(
        {"params": {k: v for k, v in base_params["params"].items() if k != "head"}}, x)
    chex.assert_shape(features, (2, 32))
    np.testing.assert_allclose(features, info["tokens"][:, 0], rtol=1e-6, atol=1e-6)


EXPECTED_TREE = {
    "embedding": {"kernel": (4, 4, 3, 32), "bias": (32,)},
    "cls": (1, 1, 32),
    "pos_embedding": (1, 17, 32),
    "encoder_norm": {"scale": (32,), "bias": (32,)},
    "head": {"kernel": (32, 5), "bias": (5,)},
    **{
        f"block{i}": {
            "ln1": {"scale": (32,), "bias": (32,)},
            "attn": {
                "qkv": {"kernel": (32, 3, 2, 16), "bias": (3, 2, 16)},
                "qkv_lora": {"a": (32, 4), "b": (4, 3, 2, 16)},
                "out": {"kernel": (2, 16, 32), "bias": (32,)},
            },
            "merge": {"pyra_w_r": (r, 1), "pyra_w_d": (32,), "pyra_norm_scale": (32,), "pyra_norm_bias": (32,)},
            "ln2": {"scale": (32,), "bias": (32,)},
            "mlp": {"fc1": {"kernel": (32, 64), "bias": (64,)}, "fc2": {"kernel": (64, 32), "bias": (32,)}},
        }
        for i, r in enumerate((3, 2))
    },
}


def _boxed(model, images):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images))


def _names_and_shapes(boxed):
    is_box = lambda b: isinstance(b, nn.LogicallyPartitioned)  # noqa: E731
    leaves = jax.tree.leaves(boxed, is_leaf=is_box)
    return [(b.names, b.value.shape) if is_box(b) else (None, b.shape) for b in leaves]


@pytest.mark.parametrize("scan", [False, True])
def test_param_tree_and_logical_names(scan):
    kw = dict(lora=LoRAConfig(rank=4), merge=MergeConfig(r=0 if scan else [3, 2], mode="pyra"), scan=scan)
    model = ViT(**TINY, **kw)
    boxed = _boxed(model, jnp.zeros(IMAGES))
    shapes = jax.tree.map(lambda s: tuple(s.shape), nn.meta.unbox(boxed))["params"]
    if not scan:
        assert shapes == EXPECTED_TREE
    else:
        stacked = {k: v for k, v in EXPECTED_TREE["block0"].items() if k != "merge"}
        assert shapes["blocks"] == jax.tree.map(lambda s: (2, *s), stacked, is_leaf=lambda s: isinstance(s, tuple))
    for names, shape in _names_and_shapes(boxed):
        assert names is not None, "every parameter carries logical axis names"
        assert len(names) == len(shape)
        assert set(names) - {None} <= set(shd.LOGICAL_AXES), names
    for rules in shd.RULE_SETS.values():  # every rule set resolves every parameter
        with nn.logical_axis_rules(rules):
            mesh = shd.make_mesh({"data": 1, "fsdp": -1} if rules is shd.FSDP_RULES else {"data": -1})
            shd.logical_shardings(boxed, mesh, rules)


# ----------------------------------------------------------------------------- r = 0 is the plain model


class PlainBlock(nn.Module):
    """The block before the hook existed (foundation commit): x + Attn(LN x); x + MLP(LN x)."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        h = vit_lib.layer_norm("ln1", 1e-6, jnp.float32, jnp.float32)(x)
        h, _ = MultiHeadAttention(self.num_heads, name="attn")(h)
        x = x + h
        h = vit_lib.layer_norm("ln2", 1e-6, jnp.float32, jnp.float32)(x)
        return x + PlainMlp(self.mlp_dim, name="mlp")(h)


class PlainMlp(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        h = exact_gelu(nn.Dense(self.mlp_dim, name="fc1")(x))  # == jax.nn.gelu: test_exact_gelu_equals_the_library_gelu
        return nn.Dense(x.shape[-1], name="fc2")(h)


class PlainViT(nn.Module):
    num_classes: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, images):
        p, b = self.patch_size, images.shape[0]
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="embedding")(images)
        x = x.reshape(b, -1, self.width)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.zeros, (1, x.shape[1], self.width))
        for i in range(self.depth):
            x = PlainBlock(self.num_heads, self.mlp_dim, name=f"block{i}")(x)
        x = vit_lib.layer_norm("encoder_norm", 1e-6, jnp.float32, jnp.float32)(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])


def test_r0_is_bit_identical_to_plain_model(base_params, x):
    plain = jax.jit(PlainViT(**TINY).apply)(base_params, x)
    merges = [MergeConfig(), MergeConfig(r=0, prop_attn=True, trace_source=True, mode="pyra"), MergeConfig(r=[0, 0])]
    for merge in merges:
        out = jax.jit(ViT(**TINY, merge=merge).apply)(base_params, x)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))


def _erf(v):
    return np.vectorize(math.erf)(v)


def numpy_vit(p, images, num_heads, eps=1e-6):
    """Independent float64 reference of the Google/timm ViT forward (pre-LN, exact GELU)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    ln = lambda v, q: (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + eps) * q["scale"] + q["bias"]  # noqa: E731
    b, s, _, _ = images.shape
    k = p["embedding"]["kernel"]
    ps = k.shape[0]
    g = s // ps
    patches = np.asarray(images, np.float64).reshape(b, g, ps, g, ps, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    x = patches @ k.reshape(-1, k.shape[-1]) + p["embedding"]["bias"]
    x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, x.shape[-1])), x], 1) + p["pos_embedding"]
    c = x.shape[-1]
    dh = c // num_heads
    i = 0
    while f"block{i}" in p:
        q = p[f"block{i}"]
        h = ln(x, q["ln1"])
        qkv = np.einsum("bnc,ctd->bntd", h, q["attn"]["qkv"]["kernel"].reshape(c, 3, c)) + q["attn"]["qkv"]["bias"].reshape(3, c)
        qh, kh, vh = (qkv[:, :, j].reshape(b, -1, num_heads, dh) for j in range(3))
        logits = np.einsum("bqhd,bkhd->bhqk", qh, kh) / np.sqrt(dh)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", w, vh).reshape(b, -1, c)
        x = x + o @ q["attn"]["out"]["kernel"].reshape(c, c) + q["attn"]["out"]["bias"]
        h = ln(x, q["ln2"]) @ q["mlp"]["fc1"]["kernel"] + q["mlp"]["fc1"]["bias"]
        h = 0.5 * h * (1 + _erf(h / np.sqrt(2)))
        x = x + h @ q["mlp"]["fc2"]["kernel"] + q["mlp"]["fc2"]["bias"]
        i += 1
    x = ln(x, p["encoder_norm"])
    return x[:, 0] @ p["head"]["kernel"] + p["head"]["bias"]


def test_matches_numpy_reference(base_params, x):
    out = jax.jit(ViT(**TINY).apply)(base_params, x)
    ref = numpy_vit(base_params["params"], np.asarray(x), TINY["num_heads"])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- position embeddings


def test_interpolate_pos_embedding_identity():
    pos = jnp.asarray(np.random.default_rng(0).normal(size=(1, 17, 8)).astype(np.float32))
    assert interpolate_pos_embedding(pos, 4) is pos
    table = pos[0]
    assert interpolate_pos_embedding(table, (4, 4), (4, 4)) is table
    for method in ("bicubic", "bilinear"):
        np.testing.assert_array_equal(vit_lib.resize_matrix(5, 5, method), np.eye(5))
    # resampling rows of a constant embedding keeps it constant; the class token is untouched
    const = jnp.concatenate([pos[:, :1], jnp.ones((1, 16, 8))], axis=1)
    out = interpolate_pos_embedding(const, (6, 3))
    chex.assert_shape(out, (1, 19, 8))
    np.testing.assert_array_equal(out[:, 0], pos[:, 0])
    np.testing.assert_allclose(out[:, 1:], 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embedding(pos[:, :16], 3)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("old,new", [((4, 4), (7, 7)), ((6, 6), (4, 4)), ((4, 4), (5, 8))])
def test_interpolate_pos_embedding_matches_torch(method, old, new):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    pos = rng.normal(size=(1, 1 + old[0] * old[1], 8)).astype(np.float32)
    grid = torch.from_numpy(pos[0, 1:].reshape(*old, 8)).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(grid, size=new, mode=method, align_corners=False)
    ref = ref[0].permute(1, 2, 0).reshape(-1, 8).numpy()
    out = np.asarray(interpolate_pos_embedding(jnp.asarray(pos), new, old, method=method))
    np.testing.assert_array_equal(out[0, 0], pos[0, 0])
    np.testing.assert_allclose(out[0, 1:], ref, rtol=1e-5, atol=1e-5)


def test_vit_at_another_resolution(base_params, nn_helpers):
    images = jnp.asarray(nn_helpers.images((2, 24, 24, 3)))
    with pytest.raises(ValueError, match="pos_interpolation"):
        ViT(**TINY).apply(base_params, images)
    on_the_fly = jax.jit(ViT(**TINY, pos_interpolation="bicubic").apply)(base_params, images)
    resampled = dict(base_params["params"])
    resampled["pos_embedding"] = interpolate_pos_embedding(resampled["pos_embedding"], 6)
    model = ViT(**TINY, image_size=24)
    assert model.token_counts() == [37, 37, 37]
    once = jax.jit(model.apply)({"params": resampled}, images)
    np.testing.assert_allclose(on_the_fly, once, rtol=1e-6, atol=1e-6)
    shapes = nn_helpers.param_shapes(model, jnp.zeros((1, 24, 24, 3)))
    assert shapes["params"]["pos_embedding"].shape == (1, 37, 32)


def test_exact_gelu_equals_the_library_gelu():
    """exact_gelu (erf, chosen for XLA:CPU speed: benchmarks/roofline.py ablation rows) is
    jax.nn.gelu(approximate=False) (erfc): values and derivatives, tails included; dtype kept. Below
    x = -5 the erf form rounds 1 + erf to 0 (as torch's GELU does), an absolute error under 1e-6."""
    x = jnp.linspace(-12.0, 12.0, 4001, dtype=jnp.float32)
    library = functools.partial(jax.nn.gelu, approximate=False)
    np.testing.assert_allclose(exact_gelu(x), library(x), rtol=1e-6, atol=1e-6)
    grad = jax.vmap(jax.grad(exact_gelu))(x)
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(library))(x), rtol=1e-6, atol=1e-6)
    assert exact_gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
