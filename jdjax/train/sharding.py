"""Device mesh, the logical-axis vocabulary, and shardings derived from config rules.

Parameters carry logical axis names (`nn.with_logical_partitioning`); a config's
`sharding_rules` maps those names onto the mesh axes `data`, `fsdp` and `model`.
The same model runs data-parallel, FSDP or tensor-parallel by changing rules only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
# Mesh axes the batch dimension is split over.
BATCH_AXES = ("data", "fsdp")

# The one vocabulary of logical axis names used by every module in jdjax.nn.
LOGICAL_AXES = (
    "batch",  # examples (activations only)
    "embed",  # model width C
    "mlp",  # MLP hidden width
    "heads",  # attention heads
    "kv",  # per-head width Dh
    "qkv",  # the fused q/k/v axis (size 3)
    "vocab",  # token vocabulary
    "classes",  # classifier outputs
    "patch",  # patch-embedding input pixels (P*P*3)
    "pos",  # position / sequence length of a learned embedding
    "table_rows",  # rows of a CTR embedding table
    "experts",  # mixture-of-experts experts
    "lora_rank",  # LoRA rank
    "norm",  # LayerNorm scale/bias (usually replicated)
)

# Data parallel: everything replicated.
DATA_PARALLEL_RULES = tuple((name, None) for name in LOGICAL_AXES)
# FSDP: parameters split over the `fsdp` axis along their width.
FSDP_RULES = (("embed", "fsdp"), ("table_rows", "fsdp")) + tuple(
    (n, None) for n in LOGICAL_AXES if n not in ("embed", "table_rows")
)
# Tensor parallel (Megatron style): MLP hidden, heads, vocab and table rows over `model`.
TENSOR_PARALLEL_RULES = (
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("table_rows", "model"),
    ("experts", "model"),
) + tuple((n, None) for n in LOGICAL_AXES if n not in ("mlp", "heads", "vocab", "table_rows", "experts"))

RULE_SETS = {"data_parallel": DATA_PARALLEL_RULES, "fsdp": FSDP_RULES, "tensor_parallel": TENSOR_PARALLEL_RULES}


def resolve_mesh_shape(shape: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves a `{axis: size}` mapping (one size may be -1) to sizes in MESH_AXES order."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh has unknown axes {unknown}; the axes are {MESH_AXES}.")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} devices: the fixed axes "
                f"multiply to {fixed}, which does not divide {num_devices}. Set the sizes so they multiply "
                f"to {num_devices}, e.g. --config.mesh.data=-1."
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but {num_devices} are "
            f"present. Make the axis sizes multiply to {num_devices}, or leave one at -1."
        )
    return tuple(sizes)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the named (data, fsdp, model) mesh over all (or the given) devices."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Accepts a rule-set name (see RULE_SETS) or explicit (logical, mesh_axes) pairs."""
    if isinstance(rules, str):
        if rules not in RULE_SETS:
            raise ValueError(f"unknown sharding rule set {rules!r}; choose one of {sorted(RULE_SETS)}.")
        return RULE_SETS[rules]
    out = tuple((str(k), v if v is None or isinstance(v, str) else tuple(v)) for k, v in rules)
    unknown = [k for k, _ in out if k not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"sharding rules name unknown logical axes {unknown}; known: {LOGICAL_AXES}.")
    return out


def logical_shardings(abstract_tree, mesh: Mesh, rules):
    """NamedShardings for a (boxed, abstract) pytree whose leaves may carry logical names."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch_from_local(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's rows of the global batch into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def put_global(tree, shardings):
    """Host values (identical on every process) -> global arrays laid out as `shardings`.

    Unlike jax.device_put this works when the mesh spans devices of other processes.
    """
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)
