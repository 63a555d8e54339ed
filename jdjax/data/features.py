"""The feature map: one vocabulary per CTR embedding table, built once over the training data.

A `FeatureMap` holds the vocabulary of every table of the declared features
(`jdjax.nn.ctr.features`), built once over the *whole* training split (never per data block,
which would break per-user grouping, FuxiCTR #164), and is saved/loaded as `feature_map.json`.
Features with the same `embedding_name` share one table and one vocabulary.

Encoded ids (int32): 0 = padding (sequences only; the sequence mask is `ids != 0`), 1 = out of
vocabulary (ids unseen in training, or seen fewer than `min_count` times), 2.. = known ids in
sorted raw-id order. Raw ids may be integers or strings.

Raw ids -> rows. The map stores the *raw* ids of the data (an asin, a reviewerID, a category
name, an integer id column), never codes a reader made up per directory: `feature_map.json`
lists each table's ids in row order (ids[k] is row k + 2) with their type, and a fingerprint
(sha256 of the vocabularies). A reader must therefore pass raw ids, or the same id would mean
another row in another directory. A reader that keeps compact integer codes (0..K-1, e.g. the
rank of an asin in one directory, to save memory) passes `id_names={table: raw ids [K]}` to
`fit`, `encode` and `check_data`: the map still stores and looks up the raw ids. `check_data` refuses a map whose vocabularies are not the ones
this training data gives (another data directory, another split, another min_count) with a
message naming the file and the fix: an embedding table trained with one map must not be read
with another.

The out-of-vocabulary row is trained. Unseen ids at test time (new ads, new users, new items)
all read row 1, so it must hold a learned "unknown id" vector, not its random initial value.
`min_count` (DeepCTR/FuxiCTR's min_categr_count) gives it the ids rarer than that, but a data set
may have no rare ids at all (the embedded click logs have none). So, as with unknown-word
replacement in NLP, `encode(..., train=True)` also encodes a fixed, seeded fraction `oov_rate`
(default 1 %) of the training occurrences of every known id as out of vocabulary: row 1 learns
what an average id of its table predicts. Val/test are encoded as they are; `oov_rate=0` turns
it off.

Numbers: dense values must be finite; `encode` names the feature and example of a NaN or inf
(the file readers name the file, row and column before that).
"""

from __future__ import annotations

import dataclasses
import hashlib
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

FEATURE_MAP_VERSION = 2  # 2: raw ids with their type, a fingerprint and oov_rate (1 held bare lists)
OOV_RATE = 0.01  # default fraction of training occurrences encoded as out of vocabulary
ID_TYPES = {"int": np.int64, "float": np.float64, "str": str, "bool": bool}


def _is_text(values: np.ndarray) -> bool:
    return values.dtype.kind in "USO"


def _id_type(values: np.ndarray) -> str:
    kind = values.dtype.kind
    return {"i": "int", "u": "int", "f": "float", "b": "bool"}.get(kind, "str")


def _check_ids(name: str, raw: np.ndarray, where: str) -> None:
    """Missing values are not ids: NaN in a float id column, None in an object column."""
    if raw.dtype.kind == "f" and np.isnan(raw).any():
        missing = int(np.isnan(raw).sum())
    elif raw.dtype.kind == "O" and any(v is None for v in raw.reshape(-1)):
        missing = sum(v is None for v in raw.reshape(-1))
    else:
        return
    raise ValueError(
        f"{where}: feature {name!r} holds {missing} missing ids (NaN/None). Fill them with a category of their own "
        "(e.g. -1 or 'missing') in the data before training."
    )


@dataclass
class FeatureMap:
    """Feature declarations plus one vocabulary (sorted known raw ids) per embedding table.

    `oov_rate`: the fraction of known training occurrences `encode(..., train=True)` maps to the
    out-of-vocabulary row, so that row is trained (see the module docstring).
    """

    features: tuple
    vocabularies: dict[str, np.ndarray]
    oov_rate: float = OOV_RATE

    @classmethod
    def fit(cls, features, columns: dict[str, np.ndarray], oov_rate: float = OOV_RATE,
            id_names: dict[str, np.ndarray] | None = None) -> FeatureMap:
        """Builds every table's vocabulary from the training columns of all features sharing it.

        Args:
          features: the declarations.
          columns: name -> raw training values ([N] for sparse, [N, maxlen] padded for varlen): the
            data's own ids, or integer codes into `id_names` (see below).
          oov_rate: fraction of training occurrences encoded as out of vocabulary, in [0, 1).
          id_names: table -> raw ids [K], for readers that keep compact integer codes (0..K-1) in a
            table's columns instead of the raw ids (e.g. Amazon's asins): code k is the raw id
            id_names[table][k]. The map stores the raw ids, so codes may differ between directories;
            pass the same `id_names` to `encode` and `check_data`.
        """
        features = tuple(features)
        check_features(features)
        if not 0.0 <= oov_rate < 1.0:
            raise ValueError(f"FeatureMap.fit: oov_rate must be in [0, 1), got {oov_rate}.")
        id_names = id_names or {}
        parts: dict[str, list] = {}
        min_count: dict[str, int] = {}
        for f in features:
            if isinstance(f, DenseFeat):
                continue
            if f.name not in columns:
                raise ValueError(f"FeatureMap.fit: no training column for feature {f.name!r}.")
            raw = np.asarray(columns[f.name])
            if isinstance(f, VarLenFeat):
                raw = raw[raw != f.pad_value]
            raw = raw.reshape(-1)
            if f.table in id_names:  # codes: counted per code, never expanded to raw ids
                names = _names(id_names, f.table)
                parts.setdefault(f.table, []).append(np.bincount(_codes(f, raw, names, "FeatureMap.fit"), minlength=len(names)))
            else:
                _check_ids(f.name, raw, "FeatureMap.fit")
                parts.setdefault(f.table, []).append(raw)
            min_count[f.table] = max(min_count.get(f.table, 1), f.min_count)
        vocabularies = {}
        for table, table_parts in parts.items():
            if table in id_names:  # per-code counts -> per-raw-id counts (a raw id listed twice is one id)
                values, inverse = np.unique(_names(id_names, table), return_inverse=True)
                freq = np.bincount(inverse.reshape(-1), weights=np.sum(table_parts, axis=0), minlength=len(values))
            else:
                values, freq = np.unique(np.concatenate(table_parts), return_counts=True)
            vocabularies[table] = values[freq >= min_count[table]]
        return cls(features, vocabularies, float(oov_rate))

    def tables(self) -> tuple[TableSpec, ...]:
        """One TableSpec per embedding table, in first-use order."""
        out: dict[str, TableSpec] = {}
        for f in self.features:
            if not isinstance(f, DenseFeat) and f.table not in out:
                out[f.table] = TableSpec(f.table, len(self.vocabularies[f.table]) + NUM_SPECIAL_IDS, f.embedding_dim)
        return tuple(out.values())

    def encode(self, columns: dict[str, np.ndarray], train: bool = False, seed: int = 0,
               id_names: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Raw columns -> model inputs: int32 ids (0 pad, 1 OOV, 2.. known) and float32 dense values.

        With `train=True` a seeded fraction `oov_rate` of the known ids is encoded as OOV (the same
        ones for the same columns and seed). `id_names`: as in `fit`, for columns of integer codes.
        Columns that are not declared features are passed through unchanged. Raises ValueError on
        a NaN or infinite dense value.
        """
        id_names = id_names or {}
        out = dict(columns)
        for index, f in enumerate(self.features):
            if f.name not in columns:
                raise ValueError(f"FeatureMap.encode: missing column {f.name!r}.")
            raw = np.asarray(columns[f.name])
            if isinstance(f, DenseFeat):
                out[f.name] = _dense(f, raw)
                continue
            if f.table in id_names:  # codes: look the K raw ids up once, then index by code
                names = _names(id_names, f.table)
                pad = raw == f.pad_value if isinstance(f, VarLenFeat) else np.zeros(raw.shape, bool)
                codes = np.where(pad, 0, raw)
                _codes(f, codes, names, "FeatureMap.encode")
                pos_of, known_of = self._lookup(f, names)
                pos, known = pos_of.astype(np.int32)[codes], known_of[codes]
            else:
                _check_ids(f.name, raw, "FeatureMap.encode")
                pos, known = self._lookup(f, raw)
            if train and self.oov_rate > 0:
                known &= np.random.default_rng([seed, index]).random(raw.shape) >= self.oov_rate
            ids = np.where(known, pos + NUM_SPECIAL_IDS, OOV_ID).astype(np.int32)
            if isinstance(f, VarLenFeat):
                if raw.ndim != 2 or raw.shape[1] != f.maxlen:
                    raise ValueError(f"feature {f.name!r}: expected raw shape [N, {f.maxlen}], got {raw.shape}.")
                ids = np.where(raw == f.pad_value, PAD_ID, ids).astype(np.int32)
            out[f.name] = ids
        return out

    def _lookup(self, f, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in the vocabulary, known?) of every raw id."""
        vocab = self.vocabularies[f.table]
        if vocab.size and raw.size and _is_text(raw) != _is_text(vocab):
            raise ValueError(
                f"feature {f.name!r}: raw ids of dtype {raw.dtype} cannot be looked up in the {f.table!r} "
                f"vocabulary of dtype {vocab.dtype}; encode with the same id type as in training."
            )
        pos = np.clip(np.searchsorted(vocab, raw), 0, max(vocab.size - 1, 0))
        known = (vocab[pos] == raw) if vocab.size else np.zeros(raw.shape, bool)
        return pos, known

    # --- Matching a map to data, and the file ---------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 (hex) of the tables' raw ids and id types, in table-name order: equal
        fingerprints, equal rows for every id."""
        blob = json.dumps({t: [_id_type(v), v.tolist()] for t, v in sorted(self.vocabularies.items())}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def check_data(self, features, columns: dict[str, np.ndarray], path="feature map", data: str = "",
                   id_names: dict[str, np.ndarray] | None = None) -> None:
        """Raises ValueError unless this map is the one `fit(features, columns)` builds: the same
        feature declarations and, table by table, the same raw ids in the same rows.

        Args:
          features: the declarations of the data about to be encoded.
          columns: its raw training columns.
          path: the map's file, for the message.
          data: where the data came from (e.g. the data directory), for the message.
          id_names: as in `fit`.
        """
        source = f" ({data})" if data else ""
        fix = ("Leave --config.data.feature_map empty to build the map of this data (the run writes it to "
               "<workdir>/feature_map.json), or train on the data the map was built from.")
        ours, theirs = [_describe(f) for f in self.features], [_describe(f) for f in tuple(features)]
        if ours != theirs:
            diff = [f"{a} in the map, {b} in the data" for a, b in zip(ours, theirs) if a != b]
            if len(ours) != len(theirs):
                diff.append(f"{len(ours)} features in the map, {len(theirs)} in the data")
            raise ValueError(f"{path} does not match the training data{source}: its feature declarations differ ("
                             + "; ".join(diff[:3]) + f"). {fix}")
        fitted = FeatureMap.fit(features, columns, self.oov_rate, id_names)
        problems = []
        for table, vocab in self.vocabularies.items():
            other = fitted.vocabularies[table]
            if _id_type(vocab) != _id_type(other) and vocab.size and other.size:
                problems.append(f"table {table!r} holds {_id_type(vocab)} ids in the map, {_id_type(other)} ids in the data")
                continue
            mine, data_ids = set(vocab.tolist()), set(other.tolist())
            if mine != data_ids:
                problems.append(f"table {table!r}: {len(data_ids - mine)} of the data's {len(data_ids)} known ids are "
                                f"not in the map, {len(mine - data_ids)} of the map's {len(mine)} are not in the data")
        if problems:
            raise ValueError(
                f"{path} (fingerprint {self.fingerprint()[:12]}) was not built from this training data{source} "
                f"(fingerprint {fitted.fingerprint()[:12]}): " + "; ".join(problems[:3]) + ". Its rows would send ids "
                f"to other ids' embeddings or to the out-of-vocabulary row. {fix}"
            )

    def to_json(self) -> dict:
        return {
            "version": FEATURE_MAP_VERSION,
            "rows": f"ids[k] of a table is row k + {NUM_SPECIAL_IDS}; row {PAD_ID} is padding, row {OOV_ID} out of vocabulary",
            "features": [{"type": _kind(f), **dataclasses.asdict(f)} for f in self.features],
            "vocabularies": {t: {"id_type": _id_type(v), "ids": v.tolist()} for t, v in self.vocabularies.items()},
            "oov_rate": self.oov_rate,
            "fingerprint": self.fingerprint(),
        }

    @classmethod
    def from_json(cls, data: dict) -> FeatureMap:
        if data.get("version") != FEATURE_MAP_VERSION:
            raise ValueError(f"feature map version {data.get('version')!r} is not {FEATURE_MAP_VERSION} (version 1 maps "
                             "could hold per-directory codes instead of raw ids); rebuild it.")
        features = tuple(_KINDS[d.pop("type")](**d) for d in (dict(x) for x in data["features"]))
        check_features(features)
        vocabularies = {t: np.asarray(v["ids"], ID_TYPES[v["id_type"]]) for t, v in data["vocabularies"].items()}
        missing = {f.table for f in features if not isinstance(f, DenseFeat)} - set(vocabularies)
        if missing:
            raise ValueError(f"feature map has no vocabulary for tables {sorted(missing)}; rebuild it.")
        fmap = cls(features, vocabularies, float(data["oov_rate"]))
        if fmap.fingerprint() != data["fingerprint"]:
            raise ValueError("its vocabularies do not match its fingerprint (edited by hand or damaged); rebuild it.")
        return fmap

    def save(self, path) -> None:
        """Writes the map as JSON to `path` (local or remote, via etils.epath), atomically: a
        temporary file renamed into place."""
        path = epath.Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), allow_nan=False))
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> FeatureMap:
        if not epath.Path(path).exists():
            raise FileNotFoundError(f"feature map {str(path)!r} does not exist; build it from the training data first.")
        try:
            return cls.from_json(json.loads(epath.Path(path).read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"feature map {str(path)!r} is corrupt or unusable ({type(e).__name__}: {e}); delete it "
                             "and rebuild it from the training data (leave --config.data.feature_map empty).") from e


def _names(id_names: dict, table: str) -> np.ndarray:
    names = np.asarray(id_names[table])
    if names.ndim != 1:
        raise ValueError(f"id_names[{table!r}] must be a 1-D array of raw ids, got shape {names.shape}.")
    _check_ids(table, names, f"id_names[{table!r}]")
    return names


def _codes(f, codes: np.ndarray, names: np.ndarray, where: str) -> np.ndarray:
    """Checks that integer `codes` index `names`."""
    if codes.dtype.kind not in "iu":
        raise ValueError(f"{where}: feature {f.name!r} has id_names, so its column must hold integer codes, got "
                         f"dtype {codes.dtype}.")
    if codes.size and (codes.min() < 0 or codes.max() >= len(names)):
        raise ValueError(f"{where}: feature {f.name!r}: codes must be in 0..{len(names) - 1} (the length of "
                         f"id_names[{f.table!r}]), got {codes.min()}..{codes.max()}.")
    return codes


def _describe(f) -> str:
    return f"{_kind(f)} {f.name!r} " + ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(f).items() if k != "name")


def _dense(f: DenseFeat, raw: np.ndarray) -> np.ndarray:
    """Dense values as float32 [N, dimension]; a NaN, an inf or a value beyond float32 is an error."""
    try:
        values = raw.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"dense feature {f.name!r} holds values that are not numbers ({e}).") from None
    with np.errstate(over="ignore"):
        out = values.astype(np.float32).reshape(len(raw), f.dimension)
    bad = ~np.isfinite(out)
    if bad.any():
        row = int(np.flatnonzero(bad.any(1))[0])
        raise ValueError(
            f"dense feature {f.name!r}: example {row} (0-based) is not a finite float32 number ({raw[row]!r}); "
            f"{int(bad.any(1).sum())} examples have NaN, inf or out-of-range values. Fix or drop them in the data."
        )
    return out
