"""Per-slot click models of a displayed page, with and without externalities (spec P2, "Click model
with externalities" [R]).

A page shows S items in slots 0..S-1 (slot index = position). For item i in slot i:

    e_i   = W_item [x_i; cat_emb(cat_i); type_emb(is_ad_i)]            item embedding        [C]
    p_i   = pos_emb(i)                                                  position embedding    [C]
    u'    = W_user u                                                    user embedding        [C]
    ctx_i = sum_{j != i} a_ij W_v [e_j; p_j]                            context (context=True) [C]
    a_ij  = softmax_{j != i}( (W_q [e_i; p_i]) . (W_k [e_j; p_j]) / sqrt(Dh) + r_h[j - i] )   per head h
    logit_i = MLP([u'; e_i; u' * e_i; p_i; ctx_i; ctx_i * e_i])        (no ctx terms when context=False)

This is one configurable reading of the paper's context-aware click model (the paper's exact
architecture was not retrieved): the context of item i is a multi-head self-attention over the
OTHER displayed items (the diagonal is masked out, so each row of weights sums to 1 over j != i);
keys and values carry the neighbour's position and type (ad / organic), and a learned
relative-position bias r_h[j - i] per head lets a head single out the item just above or below,
which is what a neighbour externality (competition or complementarity between similar adjacent
items) needs. Several heads give separate pools, e.g. for ads and organic items. The products
u' * e_i (user-item relevance is bilinear) and ctx_i * e_i (similarity of i to its context) are
DIN-style interaction features. With context=False the model is the separable no-context
baseline: slot i's logit depends only on (u, x_i, cat_i, is_ad_i, i).

Inputs (a batch of pages): user [B, D], x [B, S, D], cat [B, S] int, is_ad [B, S] bool.
Output: logits [B, S] (float32) and aux {'weights' [B, H, S, S], 'context' [B, S, C]} (context
model only). Parameters carry logical axis names like the other CTR models (jdjax.nn.ctr).

`make_ctr_fn(model, params)` gives the allocation code click probabilities [A, S] of A candidate
layouts of one page (jdjax.econ.page_env.Page / Layout); it is a pure function, safe to jit and vmap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.ctr.layers import MLP

Dtype = Any
INPUTS = ("user", "x", "cat", "is_ad")


def _logical(init, axes: tuple):
    return nn.with_logical_partitioning(init, axes)


class ContextAttention(nn.Module):
    """Self-attention of every slot over the other slots of its page (diagonal masked out).

    Attributes:
      num_heads: H; `width` must divide by it.
      width: C, the output width (and the q/k/v width H * Dh).
      num_slots: S, the length of the learned relative-position bias (2S - 1 offsets per head).
    """

    num_heads: int
    width: int
    num_slots: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens [B, S, F] -> (ctx [B, S, C], weights [B, H, S, S]); weights[b, h, i, i] = 0 and
        each row sums to 1 over j != i."""
        b, s, _ = tokens.shape
        if self.width % self.num_heads:
            raise ValueError(f"ContextAttention: width {self.width} is not divisible by num_heads={self.num_heads}.")
        if s > self.num_slots:
            raise ValueError(f"ContextAttention: the page has {s} slots but num_slots={self.num_slots}.")
        if s < 2:
            raise ValueError("ContextAttention: a page needs at least 2 slots for a context.")
        h, dh = self.num_heads, self.width // self.num_heads

        def proj(name):
            return nn.DenseGeneral(
                (h, dh), dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=_logical(nn.initializers.lecun_normal(), ("embed", "heads", "kv")),
                bias_init=_logical(nn.initializers.zeros, ("heads", "kv")), name=name,
            )(tokens)  # [B, S, H, Dh]

        q, k, v = proj("query"), proj("key"), proj("value")
        rel = self.param("relative_bias", _logical(nn.initializers.zeros, ("heads", "pos")),
                         (h, 2 * self.num_slots - 1), self.param_dtype)
        offset = jnp.arange(s)[None, :] - jnp.arange(s)[:, None] + self.num_slots - 1  # [S, S]: j - i shifted
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(dh))
        logits = logits + rel.astype(jnp.float32)[:, offset][None]  # [B, H, S, S]
        others = ~jnp.eye(s, dtype=bool)  # [S, S]: False on the diagonal (an item is not its own context)
        logits = jnp.where(others, logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1)  # [B, H, S, S], exactly 0 on the diagonal
        heads = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)  # [B, S, H, Dh]
        ctx = nn.DenseGeneral(
            self.width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_logical(nn.initializers.lecun_normal(), ("heads", "kv", "embed")),
            bias_init=_logical(nn.initializers.zeros, ("embed",)), name="out",
        )(heads)  # [B, S, C]
        return ctx, weights


class PageClickModel(nn.Module):
    """Click logits of every slot of a page (see the module docstring).

    Attributes:
      context: True for the context-aware model (externalities), False for the no-context baseline.
      num_slots: S (maximum page length; the position table has S rows).
      num_categories: rows of the category table (category ids are in [0, num_categories)).
      width: C, the width of item, position, user and context embeddings.
      num_heads: context attention heads.
      mlp_hidden / activation / dropout: the logit tower (jdjax.nn.ctr.layers.MLP).
    """

    context: bool = True
    num_slots: int = 10
    num_categories: int = 8
    width: int = 32
    num_heads: int = 4
    mlp_hidden: Sequence[int] = (64, 32)
    activation: str = "relu"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> tuple[jax.Array, dict]:
        """batch: user [B, D], x [B, S, D], cat [B, S] int, is_ad [B, S] bool (other keys ignored).
        Returns (logits [B, S] float32, aux); aux has 'weights' [B, H, S, S] and 'context' [B, S, C]
        for the context model, nothing for the baseline."""
        missing = [k for k in INPUTS if k not in batch]
        if missing:
            raise ValueError(f"PageClickModel: the batch lacks {missing}; it needs {list(INPUTS)}.")
        user, x, cat, is_ad = batch["user"], batch["x"], batch["cat"], batch["is_ad"]
        b, s, _ = x.shape
        if s > self.num_slots:
            raise ValueError(f"PageClickModel: pages have {s} slots but num_slots={self.num_slots}.")
        c, kw = self.width, dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def table(name, rows, axes=("table_rows", "embed")):
            init = _logical(nn.initializers.normal(1.0), axes)
            return self.param(name, init, (rows, c), self.param_dtype).astype(self.dtype)

        def dense(name, axes=("embed", "mlp")):
            return nn.Dense(c, kernel_init=_logical(nn.initializers.lecun_normal(), axes),
                            bias_init=_logical(nn.initializers.zeros, (axes[1],)), name=name, **kw)

        cat_emb = jnp.take(table("category", self.num_categories), cat, axis=0)  # [B, S, C]
        type_emb = jnp.take(table("type", 2), is_ad.astype(jnp.int32), axis=0)  # [B, S, C]
        e = dense("item")(jnp.concatenate([x.astype(self.dtype), cat_emb, type_emb], axis=-1))  # [B, S, C]
        pos = jnp.broadcast_to(table("position", self.num_slots, ("pos", "embed"))[:s], (b, s, c))  # [B, S, C]
        u = jnp.broadcast_to(dense("user")(user.astype(self.dtype))[:, None, :], (b, s, c))  # [B, S, C]
        features = [u, e, u * e, pos]
        aux = {}
        if self.context:
            ctx, weights = ContextAttention(self.num_heads, c, self.num_slots, name="context", **kw)(
                jnp.concatenate([e, pos], axis=-1)
            )  # [B, S, C], [B, H, S, S]
            features += [ctx, ctx * e]
            aux = {"weights": weights, "context": ctx}
        h = jnp.concatenate(features, axis=-1)  # [B, S, 4C] or [B, S, 6C]
        logits = MLP(tuple(self.mlp_hidden), self.activation, out_features=1, dropout=self.dropout, name="mlp", **kw)(
            h, train
        )  # [B, S, 1]
        return logits[..., 0].astype(jnp.float32), aux


def page_batch(page, lays) -> dict[str, jax.Array]:
    """Model inputs for A candidate layouts of one page: page_env.Page (user [D]) and page_env.Layout
    with a leading [A] axis -> user [A, D], x [A, S, D], cat [A, S], is_ad [A, S]."""
    a = lays.x.shape[0]
    return {
        "user": jnp.broadcast_to(page.user, (a, page.user.shape[-1])),
        "x": lays.x,
        "cat": lays.cat,
        "is_ad": lays.is_ad,
    }


def page_ctr(model: PageClickModel, params, page, lays) -> jax.Array:
    """[A, S] click probabilities of A candidate layouts `lays` (page_env.Layout, leading [A]) of one
    page `page` (page_env.Page), with the (unboxed) parameters as an argument (jit with `model` static)."""
    logits, _ = model.apply({"params": params}, page_batch(page, lays), train=False)  # [A, S]
    return jax.nn.sigmoid(logits)


def make_ctr_fn(model: PageClickModel, params) -> Callable[[Any, Any], jax.Array]:
    """ctr_fn(page, lays) -> [A, S] click probabilities of A candidate layouts of one page.

    `params` is the model's parameter tree (boxed or not). The returned function is pure (the
    parameters are closed over, so under jit they become constants of the program; use `page_ctr`
    to pass them as arguments instead), so it can be jitted and vmapped over pages."""
    params = nn.meta.unbox(params)

    def ctr_fn(page, lays) -> jax.Array:
        return page_ctr(model, params, page, lays)

    return ctr_fn
