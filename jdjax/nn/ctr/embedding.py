"""Embedding tables for declared CTR features, one per `embedding_name`, sharded by rows.

Every table is a parameter `<table>` [rows, dim] annotated ('table_rows', 'embed'): the
'tensor_parallel' rules split it over the `model` mesh axis by rows. Rows are padded up to a
multiple of `row_multiple` so the split is even (the padding rows are never looked up).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.ctr.features import (
    PAD_ID,
    DenseFeat,
    TableSpec,
    VarLenFeat,
    check_features,
)

Dtype = Any


def padded_rows(rows: int, multiple: int) -> int:
    """`rows` rounded up to a multiple of `multiple`."""
    return -(-rows // multiple) * multiple


class Embeddings(nn.Module):
    """Looks up every sparse and varlen feature; dense features pass through.

    Attributes:
      features: the feature declarations (SparseFeat / VarLenFeat / DenseFeat).
      tables: one TableSpec per embedding table (`FeatureMap.tables()`).
      row_multiple: table rows are padded to a multiple of this (a multiple of the mesh axis
        the rows are sharded over).
      embedding_init: initializer of the tables.
    """

    features: tuple
    tables: tuple[TableSpec, ...]
    row_multiple: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Any = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)

    @nn.compact
    def __call__(self, inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """inputs: name -> ids [B] (sparse), ids [B, L] (varlen, 0 = padding) or values [B, d] (dense).

        Returns name -> [B, D] (sparse), [B, L, D] (varlen; padding rows are zero) or [B, d] (dense).
        """
        check_features(self.features)
        specs = {t.name: t for t in self.tables}
        tables = {}
        for name, spec in specs.items():
            init = nn.with_logical_partitioning(self.embedding_init, ("table_rows", "embed"))
            tables[name] = self.param(name, init, (padded_rows(spec.rows, self.row_multiple), spec.dim), self.param_dtype)
        out = {}
        for f in self.features:
            if f.name not in inputs:
                raise ValueError(f"Embeddings: the batch has no input {f.name!r}; inputs: {sorted(inputs)}.")
            x = inputs[f.name]
            if isinstance(f, DenseFeat):
                out[f.name] = x.astype(self.dtype)
                continue
            if f.table not in specs:
                raise ValueError(f"Embeddings: feature {f.name!r} uses table {f.table!r}, which is not in `tables`.")
            emb = jnp.take(tables[f.table], x, axis=0).astype(self.dtype)  # [B, D] or [B, L, D]
            if isinstance(f, VarLenFeat):
                emb = emb * (x != PAD_ID)[..., None].astype(self.dtype)
            out[f.name] = emb
        return out


def sequence_mask(ids: jax.Array) -> jax.Array:
    """[B, L] True where a varlen feature holds a behaviour (not padding)."""
    return ids != PAD_ID


def pool(embeddings: jax.Array, mask: jax.Array, combiner: str = "sum") -> jax.Array:
    """Pools [B, L, D] over the valid positions of `mask` [B, L]: 'sum' or 'mean' -> [B, D]."""
    m = mask[..., None].astype(embeddings.dtype)
    total = jnp.sum(embeddings * m, axis=-2)
    if combiner == "sum":
        return total
    if combiner == "mean":
        return total / jnp.maximum(jnp.sum(m, axis=-2), 1.0)
    raise ValueError(f"pool: combiner must be 'sum' or 'mean', got {combiner!r}.")


def concat_features(embedded: dict[str, jax.Array], features, batch: dict[str, jax.Array]) -> jax.Array:
    """One flat input per example: varlen features mean-pooled over their valid positions,
    dense features flattened, all concatenated in declaration order -> [B, D]."""
    parts = []
    for f in features:
        x = embedded[f.name]
        if isinstance(f, VarLenFeat):
            x = pool(x, sequence_mask(batch[f.name]), "mean")
        parts.append(x.reshape(x.shape[0], -1) if isinstance(f, DenseFeat) else x)
    return jnp.concatenate(parts, axis=-1)
