"""The user-behaviour CTR model family of KFAtt's comparison: embeddings -> behaviour module -> MLP.

    v_hat = UserBehaviour(q, k_1..T, v_1..T)            q: target's query features (category)
    logit = MLP([other, e_target, v_hat, e_target * v_hat])   k_t: behaviour keys, v_t: behaviour values

The behaviour module is a scorer plus a pooling (`MODELS` names the combinations):

    scorer     'sum'          sum pooling of v_t (no attention)
               'attention'    s_t = q^T k_t (vanilla attention)
               'din'          s_t = DIN local activation unit (q, k_t)
               'transformer'  encoder H = SelfAttention(K, V) within sessions, then multi-head
                              decoding with s_t = (q W^Q)^T (k_t W^K) per head
    pooling    'softmax'      masked softmax attention
               'kfatt_base'   KFAtt with the learned global prior
               'kfatt_freq'   KFAtt with frequency capping (de-duplicated by `dedup` ids)

Values v_t are the concatenated embeddings of the `history` features, laid out like the target's
`target` features (e.g. [item, category]), so e_target * v_hat is defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.models.kfatt import KFAttPooling, MultiHeadKFAtt
from jdjax.nn.ctr.attention import BehaviourEncoder, LocalActivationUnit
from jdjax.nn.ctr.embedding import Embeddings, pool, sequence_mask
from jdjax.nn.ctr.features import TableSpec
from jdjax.nn.ctr.layers import MLP

Dtype = Any

# name -> (scorer, pooling); the KFAtt paper's Table 1/2 models.
MODELS = {
    "sum": ("sum", "softmax"),
    "attention": ("attention", "softmax"),
    "din": ("din", "softmax"),
    "transformer": ("transformer", "softmax"),
    "kfatt_base": ("attention", "kfatt_base"),
    "kfatt_freq": ("attention", "kfatt_freq"),
    "din_kfatt_base": ("din", "kfatt_base"),
    "din_kfatt_freq": ("din", "kfatt_freq"),
    "transformer_kfatt_base": ("transformer", "kfatt_base"),  # KFAtt-trans-b
    "transformer_kfatt_freq": ("transformer", "kfatt_freq"),  # KFAtt-trans-f
}


def scorer_and_pooling(name: str) -> tuple[str, str]:
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not a behaviour model; choose one of {sorted(MODELS)}.")
    return MODELS[name]


class BehaviourCTR(nn.Module):
    """Attributes:
      features, tables: the feature declarations and their tables (FeatureMap).
      name_: a key of MODELS.
      query / keys: feature names of q [B, Dq] and k [B, T, Dk] (concatenated if several).
      target / history: features of e_target [B, Dv] and v_t [B, T, Dv], same layout.
      dedup: varlen feature whose ids de-duplicate behaviours (kfatt_freq).
      other: further sparse/dense features fed to the MLP (e.g. user id).
      session: optional input name of per-behaviour session ids [B, T] (transformer).
      mlp_hidden / activation: the CTR tower (DIEN: 200-80, PReLU or Dice).
      din_hidden: DIN attention MLP widths.
      num_heads / head_dim: Transformer encoder and decoder heads.
      prior_hidden / prior: KFAtt prior MLPs ('learned' or 'unit' sigma_q).
    """

    features: tuple
    tables: tuple[TableSpec, ...]
    model: str = "kfatt_freq"
    query: Sequence[str] = ("cat",)
    keys: Sequence[str] = ("hist_cat",)
    target: Sequence[str] = ("item", "cat")
    history: Sequence[str] = ("hist_item", "hist_cat")
    dedup: str = "hist_cat"
    other: Sequence[str] = ("user",)
    session: str = ""
    mlp_hidden: Sequence[int] = (200, 80)
    activation: str = "prelu"
    dropout: float = 0.0
    din_hidden: Sequence[int] = (80, 40)
    num_heads: int = 2
    head_dim: int = 16
    prior_hidden: int = 32
    prior: str = "learned"
    row_multiple: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> tuple[jax.Array, dict]:
        """batch: encoded features (FeatureMap.encode). Returns (logits [B], aux) where aux has
        'weights' (the attention / KFAtt weights, absent for sum pooling)."""
        scorer, pooling = scorer_and_pooling(self.model)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embeddings = Embeddings(self.features, self.tables, self.row_multiple, name="embeddings", **kw)
        emb = embeddings(batch)
        cat = lambda names: jnp.concatenate([emb[n] for n in names], axis=-1)
        e_target = cat(self.target)  # [B, Dv]
        values = cat(self.history)  # [B, T, Dv]
        mask = sequence_mask(batch[self.history[0]])  # [B, T]
        aux = {}
        if scorer == "sum":
            v_hat = pool(values, mask, "sum")
        else:
            q, k = cat(self.query), cat(self.keys)  # [B, Dq], [B, T, Dk]
            dedup = batch[self.dedup]
            if scorer == "transformer":
                session = batch[self.session] if self.session else None
                h = BehaviourEncoder(self.num_heads, self.head_dim, values.shape[-1], values.shape[1], name="encoder", **kw)(
                    k, values, mask, session
                )
                v_hat, aux["weights"] = MultiHeadKFAtt(
                    pooling, self.num_heads, self.head_dim, values.shape[-1], self.prior_hidden, self.prior, name="decoder", **kw
                )(q, k, h, mask, dedup, *self._key_table(embeddings, batch, pooling))
            else:
                if scorer == "attention":
                    if q.shape[-1] != k.shape[-1]:
                        raise ValueError(f"vanilla attention needs q and k of one width, got {q.shape[-1]} and {k.shape[-1]}.")
                    scores = jnp.einsum("bd,btd->bt", q, k)  # [B, T]
                else:
                    scores = LocalActivationUnit(self.din_hidden, name="din", **kw)(q, k)
                v_hat, aux["weights"] = KFAttPooling(
                    pooling, values.shape[-1], self.prior_hidden, self.prior, name="pooling", **kw
                )(q, scores, values, mask, k, dedup, *self._key_table(embeddings, batch, pooling))
        others = [emb[n].reshape(emb[n].shape[0], -1) for n in self.other]
        x = jnp.concatenate([*others, e_target, v_hat, e_target * v_hat], axis=-1)
        logits = MLP(self.mlp_hidden, self.activation, out_features=1, dropout=self.dropout, name="mlp", **kw)(x, train)
        return logits[:, 0].astype(jnp.float32), aux

    def _key_table(self, embeddings: Embeddings, batch, pooling: str):
        """(key table [V, Dk], key ids [B, T]) when KFAtt-freq's keys are one varlen feature, also the
        de-duplication feature, whose table has at most B * T rows (the sigma' MLP then runs per
        table row and the counts are a scatter-add), else (None, None)."""
        if pooling != "kfatt_freq" or len(self.keys) != 1 or self.dedup != self.keys[0]:
            return None, None
        ids = batch[self.keys[0]]  # [B, T]
        table_name = next((f.table for f in self.features if f.name == self.keys[0] and hasattr(f, "maxlen")), None)
        if table_name is None:
            return None, None
        table = nn.meta.unbox(embeddings.variables["params"][table_name])
        if table.shape[0] > ids.size:
            return None, None
        return table.astype(self.dtype), ids
