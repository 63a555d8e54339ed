"""Mesh, logical-axis rules and shardings (jdjax/train/sharding.py) on 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jdjax.train import sharding as shd


@pytest.fixture(autouse=True)
def _eight_devices():
    if jax.device_count() != 8:
        pytest.skip("needs the 8 fake CPU devices from tests/conftest.py")


# ----------------------------------------------------------------------------- mesh shape


@pytest.mark.parametrize(
    "shape,n,expected",
    [
        ({"data": -1}, 8, (8, 1, 1)),
        ({"data": -1, "fsdp": 1, "model": 1}, 8, (8, 1, 1)),
        ({"data": 1, "fsdp": -1}, 8, (1, 8, 1)),
        ({"data": -1, "model": 2}, 8, (4, 1, 2)),
        ({"data": 2, "fsdp": 2, "model": -1}, 8, (2, 2, 2)),
        ({"data": 2, "fsdp": 4}, 8, (2, 4, 1)),
        ({}, 1, (1, 1, 1)),
        ({"fsdp": -1}, 1, (1, 1, 1)),
    ],
)
def test_resolve_mesh_shape(shape, n, expected):
    assert shd.resolve_mesh_shape(shape, n) == expected


def test_resolve_mesh_shape_not_divisible():
    with pytest.raises(ValueError, match="does not divide 8") as err:
        shd.resolve_mesh_shape({"data": -1, "model": 3}, 8)
    assert "--config.mesh" in str(err.value)


def test_resolve_mesh_shape_too_many_free_axes():
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_resolve_mesh_shape_wrong_product():
    with pytest.raises(ValueError, match="has 4 devices but 8 are present") as err:
        shd.resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)
    assert "multiply to 8" in str(err.value)
    with pytest.raises(ValueError, match="has 16 devices but 8"):
        shd.resolve_mesh_shape({"data": 16}, 8)


@pytest.mark.parametrize("shape", [{"data": -1, "fsdp": 0}, {"data": -1, "fsdp": -2}])
def test_resolve_mesh_shape_rejects_non_positive_sizes(shape):
    with pytest.raises(ValueError, match="mesh"):
        shd.resolve_mesh_shape(shape, 8)


def test_make_mesh_on_eight_devices():
    mesh = shd.make_mesh({"data": 2, "fsdp": -1})
    assert mesh.axis_names == shd.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    assert mesh.devices.size == 8 and set(mesh.devices.flat) == set(jax.devices())
    tp = shd.make_mesh({"data": -1, "model": 2})
    assert dict(tp.shape) == {"data": 4, "fsdp": 1, "model": 2}


def test_make_mesh_on_given_devices():
    mesh = shd.make_mesh({"data": -1}, devices=jax.devices()[:2])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "model": 1}
    with pytest.raises(ValueError, match="present"):
        shd.make_mesh({"data": 4}, devices=jax.devices()[:2])


# ----------------------------------------------------------------------------- rules


def test_rules_from_config_names():
    assert shd.rules_from_config("data_parallel") == shd.DATA_PARALLEL_RULES
    assert shd.rules_from_config("fsdp") == shd.FSDP_RULES
    assert shd.rules_from_config("tensor_parallel") == shd.TENSOR_PARALLEL_RULES
    with pytest.raises(ValueError, match="unknown sharding rule set 'zero3'") as err:
        shd.rules_from_config("zero3")
    assert "fsdp" in str(err.value)


def test_rule_sets_cover_the_vocabulary_once():
    for rules in shd.RULE_SETS.values():
        names = [k for k, _ in rules]
        assert sorted(names) == sorted(shd.LOGICAL_AXES)
        assert all(v is None or v in shd.MESH_AXES for _, v in rules)
    assert dict(shd.FSDP_RULES)["embed"] == "fsdp"
    assert dict(shd.TENSOR_PARALLEL_RULES)["mlp"] == "model"
    assert all(v is None for _, v in shd.DATA_PARALLEL_RULES)


def test_rules_from_config_explicit_pairs():
    rules = shd.rules_from_config([["embed", "fsdp"], ("mlp", ["model", "data"]), ("heads", None)])
    assert rules == (("embed", "fsdp"), ("mlp", ("model", "data")), ("heads", None))
    with pytest.raises(ValueError, match="unknown logical axes") as err:
        shd.rules_from_config([("embed", "fsdp"), ("emb", None)])
    assert "'emb'" in str(err.value)


# ----------------------------------------------------------------------------- logical shardings


class _TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 16] -> [B, 16]
        h = nn.Dense(
            32,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            name="fc1",
        )(x)
        return nn.Dense(
            16,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="fc2",
        )(nn.relu(h))


def _init_sharded(model, x, mesh, rules):
    """The loop's recipe: eval_shape of init -> logical shardings -> jit(init, out_shardings)."""
    init = lambda key: model.init(key, x)  # noqa: E731
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init, jax.random.key(0))
        shardings = shd.logical_shardings(boxed, mesh, rules)
        params = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(jax.random.key(0))
    return boxed, shardings, params


def test_logical_shardings_fsdp_splits_embed():
    mesh = shd.make_mesh({"data": 1, "fsdp": -1})
    _, shardings, params = _init_sharded(_TwoLayer(), jnp.zeros((2, 16)), mesh, shd.FSDP_RULES)
    s = shardings["params"]
    assert isinstance(s["fc1"]["kernel"], NamedSharding)
    assert s["fc1"]["kernel"].spec == PartitionSpec("fsdp", None)
    assert s["fc2"]["kernel"].spec == PartitionSpec(None, "fsdp")
    assert s["fc2"]["bias"].spec == PartitionSpec("fsdp")
    assert s["fc1"]["bias"].is_fully_replicated
    k = params["params"]["fc1"]["kernel"]
    assert k.shape == (16, 32)
    assert {sh.data.shape for sh in k.addressable_shards} == {(2, 32)}
    assert len({sh.device for sh in k.addressable_shards}) == 8
    assert {sh.data.shape for sh in params["params"]["fc2"]["kernel"].addressable_shards} == {(32, 2)}


def test_logical_shardings_data_parallel_replicates():
    mesh = shd.make_mesh({"data": -1})
    _, shardings, params = _init_sharded(_TwoLayer(), jnp.zeros((2, 16)), mesh, shd.DATA_PARALLEL_RULES)
    for sh in jax.tree.leaves(shardings):
        assert sh.is_fully_replicated
    for p in jax.tree.leaves(params):
        assert p.sharding.is_fully_replicated
        assert {s.data.shape for s in p.addressable_shards} == {p.shape}


def test_logical_shardings_tensor_parallel_splits_mlp():
    mesh = shd.make_mesh({"data": -1, "model": 2})
    _, shardings, params = _init_sharded(_TwoLayer(), jnp.zeros((2, 16)), mesh, shd.TENSOR_PARALLEL_RULES)
    assert shardings["params"]["fc1"]["kernel"].spec == PartitionSpec(None, "model")
    assert {s.data.shape for s in params["params"]["fc1"]["kernel"].addressable_shards} == {(16, 16)}


def test_sharded_init_equals_unsharded_init():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    model, x = _TwoLayer(), jnp.zeros((2, 16))
    _, _, params = _init_sharded(model, x, mesh, shd.FSDP_RULES)
    plain = jax.jit(lambda k: nn.meta.unbox(model.init(k, x)))(jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), params, plain)


# ----------------------------------------------------------------------------- batches


def test_batch_sharding_and_replicated():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    assert shd.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    assert shd.replicated(mesh).is_fully_replicated


@pytest.mark.parametrize("mesh_shape,rows_per_device", [({"data": 2, "fsdp": 4}, 2), ({"data": -1, "model": 2}, 4)])
def test_global_batch_from_local(mesh_shape, rows_per_device):
    mesh = shd.make_mesh(mesh_shape)
    rng = np.random.default_rng(0)
    local = {
        "image": rng.normal(size=(16, 4, 4, 3)).astype(np.float32),
        "label": np.arange(16, dtype=np.int32),
    }
    batch = shd.global_batch_from_local(local, mesh)  # one process: local rows == global batch
    for k, v in local.items():
        arr = batch[k]
        assert isinstance(arr, jax.Array)
        assert arr.shape == v.shape and arr.dtype == v.dtype
        assert arr.sharding.is_equivalent_to(shd.batch_sharding(mesh), v.ndim)
        np.testing.assert_array_equal(np.asarray(arr), v)
        shards = arr.addressable_shards
        assert len(shards) == 8
        for sh in shards:
            assert sh.data.shape == (rows_per_device,) + v.shape[1:]
            np.testing.assert_array_equal(np.asarray(sh.data), v[sh.index])


# ----------------------------------------------------------------------------- ViT, born sharded


def _tiny_vit():
    from jdjax.nn.vit import ViT

    return ViT(num_classes=10, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32)


def test_vit_params_born_sharded_over_fsdp():
    mesh = shd.make_mesh({"data": 1, "fsdp": -1})
    model, x = _tiny_vit(), jnp.zeros((2, 8, 8, 3))
    boxed, shardings, params = _init_sharded(model, x, mesh, shd.FSDP_RULES)

    names = jax.tree.leaves(
        jax.tree.map(lambda b: b.names, boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned)),
        is_leaf=lambda n: isinstance(n, tuple),
    )
    arrays = jax.tree.leaves(params)
    assert len(names) == len(arrays) and len(arrays) > 10, "every ViT parameter carries logical names"
    n_embed = 0
    for axes, arr in zip(names, arrays):
        assert len(axes) == arr.ndim
        expected = tuple(d // 8 if a == "embed" else d for a, d in zip(axes, arr.shape))
        assert {s.data.shape for s in arr.addressable_shards} == {expected}, (axes, arr.shape)
        n_embed += "embed" in axes
    assert n_embed >= 8  # patch embedding, cls, pos, qkv, out, fc1, fc2, head, ...

    p = params["params"]
    assert p["block0"]["mlp"]["fc1"]["kernel"].sharding.spec == PartitionSpec("fsdp", None)
    assert {s.data.shape for s in p["block0"]["mlp"]["fc1"]["kernel"].addressable_shards} == {(2, 32)}
    assert {s.data.shape for s in p["pos_embedding"].addressable_shards} == {(1, 5, 2)}
    assert p["block0"]["ln1"]["scale"].sharding.is_fully_replicated

    # The sharded parameters run a forward pass that equals the single-device one. (Sharded and
    # unsharded init values are compared on the small module above; ViT init compiles slowly.)
    # The head is zero-initialised, so compare the class-token features (num_classes=0) instead.
    from jdjax.nn.vit import ViT

    features = ViT(num_classes=0, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32)
    body = {"params": {k: v for k, v in p.items() if k != "head"}}
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(2, 8, 8, 3)).astype(np.float32))
    apply = jax.jit(features.apply)
    out = apply(body, images)
    assert out.shape == (2, 16) and float(jnp.abs(out).max()) > 0
    one_device = jax.device_put(jax.device_get(body), jax.devices()[0])
    np.testing.assert_allclose(np.asarray(out), np.asarray(apply(one_device, images)), rtol=1e-5, atol=1e-6)


def test_vit_params_replicated_under_data_parallel():
    mesh = shd.make_mesh({"data": -1})
    model, x = _tiny_vit(), jnp.zeros((2, 8, 8, 3))
    with nn.logical_axis_rules(shd.DATA_PARALLEL_RULES):
        boxed = jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))
        shardings = shd.logical_shardings(boxed, mesh, shd.DATA_PARALLEL_RULES)
    leaves = jax.tree.leaves(shardings)
    assert len(leaves) > 10
    for sh in leaves:
        assert isinstance(sh, NamedSharding) and sh.is_fully_replicated
