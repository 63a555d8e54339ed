"""DADNN: domain-aware DNN for multi-scene CTR (JD.com, arXiv 2011.11938), and its baselines.

    x -> shared embeddings E(x) -> bottom -> one head per scene s -> p_s
    bottom 'mlp'   h = MLP(E)                          (DADNN-MLP: shared bottom)
           'mmoe'  h_s = sum_i g_{s,i}(E) e_i(E)      (DADNN-MMoE: one gate per scene)
           'dcn'   h = [Cross(E), MLP(E)]             (DCN: cross network beside the deep MLP)
    L = sum_n [ CE(y_n, p_{s_n}) + lambda sum_{k != s_n} KL(sg(p_{s_n}) || p_k) ] / N

A sample of scene s is supervised only through head s; knowledge transfer (KT) distils every
other head towards the own-scene head (Hinton-style, Bernoulli KL). `kt_stop_gradient` stops
the teacher's gradient (one-way distillation) or lets it flow (mutual distillation): the paper's
exact KT form is not in the abstract (spec §3.2), so both are switchable.

`MODELS` names the comparison: 'mixed' (one head for all scenes, scene id as a feature),
'dcn' (the same single-head model with DCN's cross network beside the deep MLP, the paper's
production baseline; its head tower then plays DCN's combination layer), 'per_scene' (a
separate tower per scene on the shared embeddings: no shared bottom), 'shared_bottom' /
'mmoe' (lambda = 0) and 'dadnn_mlp' / 'dadnn_mmoe' (with KT).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.ctr.embedding import Embeddings, concat_features
from jdjax.nn.ctr.features import TableSpec
from jdjax.nn.ctr.layers import MLP, CrossNetwork
from jdjax.nn.ctr.moe import MMoE

Dtype = Any

# name -> (bottom, heads per scene, knowledge transfer)
MODELS = {
    "mixed": ("mlp", False, False),
    "dcn": ("dcn", False, False),
    "per_scene": ("none", True, False),
    "shared_bottom": ("mlp", True, False),
    "mmoe": ("mmoe", True, False),
    "dadnn_mlp": ("mlp", True, True),
    "dadnn_mmoe": ("mmoe", True, True),
}


def bernoulli_kl(p: jax.Array, q: jax.Array, eps: float = 1e-7) -> jax.Array:
    """KL(Bern(p) || Bern(q)) elementwise, probabilities clipped to [eps, 1 - eps]."""
    p, q = jnp.clip(p, eps, 1 - eps), jnp.clip(q, eps, 1 - eps)
    return p * (jnp.log(p) - jnp.log(q)) + (1 - p) * (jnp.log1p(-p) - jnp.log1p(-q))


def knowledge_transfer_loss(logits: jax.Array, scene: jax.Array, stop_gradient: bool = True) -> jax.Array:
    """Mean over samples of sum_{k != s} KL(p_s || p_k); logits [B, S], scene [B] int -> scalar."""
    probs = jax.nn.sigmoid(logits.astype(jnp.float32))  # [B, S]
    teacher = jnp.take_along_axis(probs, scene[:, None], axis=1)  # [B, 1]
    if stop_gradient:
        teacher = jax.lax.stop_gradient(teacher)
    others = jax.nn.one_hot(scene, logits.shape[1]) == 0  # [B, S]
    return jnp.mean(jnp.sum(jnp.where(others, bernoulli_kl(teacher, probs), 0.0), axis=1))


class DADNN(nn.Module):
    """Attributes:
      features, tables: declarations and tables (FeatureMap); varlen features are mean-pooled.
      model: a key of MODELS.
      num_scenes: S.
      scene: name of the scene-id input [B] (ints in [0, S)); it is also an embedded feature if declared.
      bottom_hidden: shared bottom widths (each expert's widths for MMoE).
      head_hidden: per-scene head widths (then one output logit).
      num_experts: MMoE experts.
      cross_layers / cross_parameterization: DCN's cross network ('vector': DCN, 'matrix': DCN-V2).
      kt_weight: lambda of the knowledge-transfer term (used by the models with KT).
      kt_stop_gradient: one-way (True) or mutual (False) distillation.
    """

    features: tuple
    tables: tuple[TableSpec, ...]
    model: str = "dadnn_mlp"
    num_scenes: int = 4
    scene: str = "scene"
    bottom_hidden: Sequence[int] = (128, 64)
    head_hidden: Sequence[int] = (32,)
    num_experts: int = 4
    cross_layers: int = 3
    cross_parameterization: str = "vector"
    activation: str = "relu"
    kt_weight: float = 0.1
    kt_stop_gradient: bool = True
    row_multiple: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> tuple[jax.Array, dict]:
        """Returns (own-scene logit [B], aux): aux['logits'] [B, S'] (S' = 1 for 'mixed'), aux['losses']
        {'kt': scalar} for models with KT, aux['gates'] [B, S, E] for MMoE bottoms."""
        if self.model not in MODELS:
            raise ValueError(f"model.name={self.model!r} is not a multi-scene model; choose one of {sorted(MODELS)}.")
        bottom, per_scene, kt = MODELS[self.model]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = Embeddings(self.features, self.tables, self.row_multiple, name="embeddings", **kw)(batch)
        x = concat_features(emb, self.features, batch)  # [B, D]
        scene = batch[self.scene].astype(jnp.int32)
        aux: dict = {}
        heads = self.num_scenes if per_scene else 1
        if bottom == "mlp":
            h = MLP(self.bottom_hidden, self.activation, name="bottom", **kw)(x, train)
            h = jnp.broadcast_to(h[:, None], (h.shape[0], heads, h.shape[-1]))  # [B, S', H]
        elif bottom == "dcn":
            cross = CrossNetwork(self.cross_layers, self.cross_parameterization, name="cross", **kw)(x)  # [B, D]
            deep = MLP(self.bottom_hidden, self.activation, name="bottom", **kw)(x, train)  # [B, H]
            h = jnp.concatenate([cross, deep.astype(cross.dtype)], axis=-1)[:, None]  # [B, 1, D + H]
        elif bottom == "mmoe":
            h, aux["gates"] = MMoE(self.num_experts, heads, self.bottom_hidden, self.activation, name="bottom", **kw)(x, train)
        else:
            h = jnp.broadcast_to(x[:, None], (x.shape[0], heads, x.shape[-1]))
        tower = nn.vmap(
            MLP, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(1, None), out_axes=1, metadata_params={nn.PARTITION_NAME: None},
        )(self.head_hidden, self.activation, out_features=1, name="heads", **kw)
        logits = tower(h, train)[..., 0].astype(jnp.float32)  # [B, S']
        aux["logits"] = logits
        if kt and per_scene:
            aux["losses"] = {"kt": self.kt_weight * knowledge_transfer_loss(logits, scene, self.kt_stop_gradient)}
        own = logits[:, 0] if heads == 1 else jnp.take_along_axis(logits, scene[:, None], axis=1)[:, 0]
        return own, aux
