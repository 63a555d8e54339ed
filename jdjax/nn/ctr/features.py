"""CTR feature declarations: what the embedding blocks look up (the vocabularies are jdjax.data.features).

Features are declared as frozen dataclasses (DeepCTR style):

    SparseFeat('item', embedding_dim=18)                                    one id per example
    VarLenFeat('hist_item', maxlen=100, embedding_dim=18, embedding_name='item')   id sequence
    DenseFeat('price', dimension=1)                                         real values

Features with the same `embedding_name` share one embedding table and one vocabulary (so
`hist_item` looks its ids up in the `item` table, as DIN needs).

Encoded ids (int32), as `jdjax.data.features.FeatureMap` writes them: 0 = padding (sequences
only; the sequence mask is `ids != 0`), 1 = out of vocabulary, 2.. = known ids.
"""

from __future__ import annotations

from dataclasses import dataclass

PAD_ID = 0
OOV_ID = 1
NUM_SPECIAL_IDS = 2


@dataclass(frozen=True)
class SparseFeat:
    """One categorical id per example: input [B] -> embedding [B, embedding_dim]."""

    name: str
    embedding_dim: int
    embedding_name: str = ""  # table name; '' means `name`
    min_count: int = 1  # ids seen fewer times in training map to the OOV row

    @property
    def table(self) -> str:
        return self.embedding_name or self.name


@dataclass(frozen=True)
class VarLenFeat:
    """A padded id sequence: input [B, maxlen] -> embeddings [B, maxlen, embedding_dim] + mask.

    Raw sequences are padded with `pad_value`; in the encoded sequence padding is id 0.
    """

    name: str
    maxlen: int
    embedding_dim: int
    embedding_name: str = ""
    pad_value: int | str = -1
    min_count: int = 1

    @property
    def table(self) -> str:
        return self.embedding_name or self.name


@dataclass(frozen=True)
class DenseFeat:
    """Real values passed through: input [B, dimension] float32."""

    name: str
    dimension: int = 1


Feature = SparseFeat | VarLenFeat | DenseFeat
_KINDS = {"sparse": SparseFeat, "varlen": VarLenFeat, "dense": DenseFeat}


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: `rows` = vocabulary size + the padding and OOV rows."""

    name: str
    rows: int
    dim: int


def _kind(feature: Feature) -> str:
    return next(k for k, cls in _KINDS.items() if isinstance(feature, cls))


def check_features(features) -> None:
    """Raises ValueError on duplicate names or tables shared by features of different widths."""
    names = [f.name for f in features]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"feature names must be unique; repeated: {dupes}.")
    dims: dict[str, tuple[str, int]] = {}
    for f in features:
        if isinstance(f, DenseFeat):
            continue
        if f.table in dims and dims[f.table][1] != f.embedding_dim:
            other, dim = dims[f.table]
            raise ValueError(
                f"features {other!r} (embedding_dim={dim}) and {f.name!r} (embedding_dim={f.embedding_dim}) share "
                f"the table {f.table!r} but differ in width; give them the same embedding_dim."
            )
        dims.setdefault(f.table, (f.name, f.embedding_dim))
