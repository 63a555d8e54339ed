"""Helpers for the model tests: random parameters without compiling `init`, perturbations.

`model.init` compiles one XLA program per initialiser shape, which takes seconds even for
tiny models; the tests that only need *some* parameters take the shapes from
`jax.eval_shape(init)` and fill them with NumPy noise instead.
"""

import re
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from jdjax.train.optim import path_names


def param_shapes(model, *args, **kwargs):
    """The unboxed parameter tree of `model.init(key, *args)` as ShapeDtypeStructs (traced only)."""
    return jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), *args, **kwargs)))


def random_params(model, *args, seed: int = 0, scale: float = 0.2, zero: str = "", **kwargs):
    """{'params': ...} with N(0, scale^2) leaves (LayerNorm scales around 1); paths matching the
    regex `zero` are zero (e.g. LoRA B or PYRA W_D to keep their init semantics)."""
    shapes = param_shapes(model, *args, **kwargs)
    rng = np.random.default_rng(seed)
    names = path_names(shapes)

    def fill(name, s):
        if zero and re.search(zero, name):
            return np.zeros(s.shape, s.dtype)
        v = scale * rng.normal(size=s.shape)
        if re.search(r"(^|/)(ln\w*|encoder_norm|pyra_norm)(/|_)scale$", name):
            v = 1.0 + v
        return v.astype(s.dtype)

    return jax.tree.map(fill, names, shapes)


def perturb(params, pattern: str, seed: int = 1, scale: float = 0.1):
    """Adds N(0, scale^2) noise to the leaves whose '/'-path matches `pattern`."""
    rng = np.random.default_rng(seed)
    names = path_names(params)
    return jax.tree.map(
        lambda n, p: (p + scale * rng.normal(size=p.shape)).astype(p.dtype) if re.search(pattern, n) else p,
        names,
        params,
    )


def drop_lora(tree):
    """The tree without its `*_lora` subtrees (the same model with LoRAConfig(), rank 0)."""
    if isinstance(tree, dict):
        return {k: drop_lora(v) for k, v in tree.items() if not k.endswith("_lora")}
    return tree


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


# The tiny ViT of the ViT tests (test_vit*.py): `vit_tiny.TINY` keyword arguments, `IMAGES` batch shape.
TINY_VIT = dict(num_classes=5, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64)
VIT_IMAGES = (2, 16, 16, 3)  # 4x4 patches + CLS = 17 tokens


@pytest.fixture(scope="module")
def base_params(nn_helpers):
    """Random parameters of the tiny ViT (with a non-zero head)."""
    from jdjax.nn.vit import ViT

    return nn_helpers.random_params(ViT(**TINY_VIT), np.zeros(VIT_IMAGES, np.float32))


@pytest.fixture(scope="module")
def x():
    """A batch of VIT_IMAGES images in [-1, 1]."""
    import jax.numpy as jnp

    return jnp.asarray(images(VIT_IMAGES))


@pytest.fixture(scope="session")
def nn_helpers():
    return types.SimpleNamespace(
        param_shapes=param_shapes, random_params=random_params, perturb=perturb, drop_lora=drop_lora, images=images
    )
