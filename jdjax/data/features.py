"""The feature map: one vocabulary per CTR embedding table, built once over the training data.

A `FeatureMap` holds the vocabulary of every table of the declared features
(`jdjax.nn.ctr.features`), built once over the *whole* training split (never per data block,
which would break per-user grouping, FuxiCTR #164), and is saved/loaded as `feature_map.json`.
Features with the same `embedding_name` share one table and one vocabulary.

Encoded ids (int32): 0 = padding (sequences only; the sequence mask is `ids != 0`), 1 = out of
vocabulary (ids unseen in training, or seen fewer than `min_count` times), 2.. = known ids in
sorted raw-id order. Raw ids may be integers or strings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
from etils import epath

from jdjax.nn.ctr.features import (
    _KINDS,
    NUM_SPECIAL_IDS,
    OOV_ID,
    PAD_ID,
    DenseFeat,
    TableSpec,
    VarLenFeat,
    _kind,
    check_features,
)

FEATURE_MAP_VERSION = 1


def _is_text(values: np.ndarray) -> bool:
    return values.dtype.kind in "USO"


@dataclass
class FeatureMap:
    """Feature declarations plus one vocabulary (sorted known raw ids) per embedding table."""

    features: tuple
    vocabularies: dict[str, np.ndarray]

    @classmethod
    def fit(cls, features, columns: dict[str, np.ndarray]) -> FeatureMap:
        """Builds every table's vocabulary from the training columns of all features sharing it.

        Args:
          features: the declarations.
          columns: name -> raw training values ([N] for sparse, [N, maxlen] padded for varlen).
        """
        features = tuple(features)
        check_features(features)
        counts: dict[str, list] = {}
        min_count: dict[str, int] = {}
        for f in features:
            if isinstance(f, DenseFeat):
                continue
            if f.name not in columns:
                raise ValueError(f"FeatureMap.fit: no training column for feature {f.name!r}.")
            raw = np.asarray(columns[f.name])
            if isinstance(f, VarLenFeat):
                raw = raw[raw != f.pad_value]
            counts.setdefault(f.table, []).append(raw.reshape(-1))
            min_count[f.table] = max(min_count.get(f.table, 1), f.min_count)
        vocabularies = {}
        for table, parts in counts.items():
            values, freq = np.unique(np.concatenate(parts), return_counts=True)
            vocabularies[table] = values[freq >= min_count[table]]
        return cls(features, vocabularies)

    def tables(self) -> tuple[TableSpec, ...]:
        """One TableSpec per embedding table, in first-use order."""
        out: dict[str, TableSpec] = {}
        for f in self.features:
            if not isinstance(f, DenseFeat) and f.table not in out:
                out[f.table] = TableSpec(f.table, len(self.vocabularies[f.table]) + NUM_SPECIAL_IDS, f.embedding_dim)
        return tuple(out.values())

    def encode(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw columns -> model inputs: int32 ids (0 pad, 1 OOV, 2.. known) and float32 dense values.

        Columns that are not declared features are passed through unchanged.
        """
        out = dict(columns)
        for f in self.features:
            if f.name not in columns:
                raise ValueError(f"FeatureMap.encode: missing column {f.name!r}.")
            raw = np.asarray(columns[f.name])
            if isinstance(f, DenseFeat):
                out[f.name] = raw.astype(np.float32).reshape(len(raw), f.dimension)
                continue
            vocab = self.vocabularies[f.table]
            if vocab.size and raw.size and _is_text(raw) != _is_text(vocab):
                raise ValueError(
                    f"feature {f.name!r}: raw ids of dtype {raw.dtype} cannot be looked up in the {f.table!r} "
                    f"vocabulary of dtype {vocab.dtype}; encode with the same id type as in training."
                )
            pos = np.clip(np.searchsorted(vocab, raw), 0, max(vocab.size - 1, 0))
            known = (vocab[pos] == raw) if vocab.size else np.zeros(raw.shape, bool)
            ids = np.where(known, pos + NUM_SPECIAL_IDS, OOV_ID).astype(np.int32)
            if isinstance(f, VarLenFeat):
                if raw.ndim != 2 or raw.shape[1] != f.maxlen:
                    raise ValueError(f"feature {f.name!r}: expected raw shape [N, {f.maxlen}], got {raw.shape}.")
                ids = np.where(raw == f.pad_value, PAD_ID, ids).astype(np.int32)
            out[f.name] = ids
        return out

    def to_json(self) -> dict:
        return {
            "version": FEATURE_MAP_VERSION,
            "features": [{"type": _kind(f), **dataclasses.asdict(f)} for f in self.features],
            "vocabularies": {t: v.tolist() for t, v in self.vocabularies.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> FeatureMap:
        if data.get("version") != FEATURE_MAP_VERSION:
            raise ValueError(f"feature map version {data.get('version')!r} is not {FEATURE_MAP_VERSION}; rebuild it.")
        features = tuple(_KINDS[d.pop("type")](**d) for d in (dict(x) for x in data["features"]))
        check_features(features)
        vocabularies = {t: np.asarray(v) for t, v in data["vocabularies"].items()}
        missing = {f.table for f in features if not isinstance(f, DenseFeat)} - set(vocabularies)
        if missing:
            raise ValueError(f"feature map has no vocabulary for tables {sorted(missing)}; rebuild it.")
        return cls(features, vocabularies)

    def save(self, path) -> None:
        """Writes the map as JSON to `path` (local or remote, via etils.epath), atomically: a
        temporary file renamed into place."""
        path = epath.Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> FeatureMap:
        if not epath.Path(path).exists():
            raise FileNotFoundError(f"feature map {str(path)!r} does not exist; build it from the training data first.")
        try:
            return cls.from_json(json.loads(epath.Path(path).read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"feature map {path!r} is corrupt ({type(e).__name__}: {e}); delete it and rebuild.") from e
