"""Kalman Filtering Attention (KFAtt, Liu et al., NeurIPS 2020): a user-behaviour pooling with a
learned global prior (KFAtt-base) and frequency capping by de-duplicated keys (KFAtt-freq).

Model: v_q ~ N(mu_q, sigma_q^2 I) is the user's interest under query q; each behaviour is a
measurement v_t ~ N(v_q, sigma_t^2 I) with precision 1/sigma_t^2 = exp(s_t), s_t any
unnormalised attention score (q^T k_t, DIN, a Transformer head). The MAP estimate

    v_hat = (mu_q / sigma_q^2 + sum_t v_t / sigma_t^2) / (1 / sigma_q^2 + sum_t 1 / sigma_t^2)

is computed exactly and stably as a softmax over T + 1 tokens, logits [s_0, s_1..s_T] with
s_0 = -log sigma_q^2 and values [mu_q, v_1..v_T]. The padding mask applies to behaviours only:
the prior token is never masked, so an empty history returns mu_q, and s_0 -> -inf recovers
vanilla masked softmax attention.

KFAtt-freq groups behaviours with the same de-duplication key (e.g. leaf category) into M
sensors m with n_m clicks and mean value v_bar_m. Sensor m has system error sigma_m^2
(1/sigma_m^2 = exp(s_m)) and each click a random error sigma'_m^2 (an MLP of the key), so

    w_m = 1 / (sigma_m^2 + sigma'_m^2 / n_m),   log w_m = -logaddexp(-s_m, log sigma'_m^2 - log n_m)

and v_hat is the (M + 1)-token softmax over [s_0, log w_m] and [mu_q, v_bar_m]. w_m <= exp(s_m)
whatever n_m: a behaviour repeated many times cannot outweigh its sensor's precision.

Functions work on [B, ...] arrays; modules add the prior and random-error MLPs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdjax.nn.ctr.attention import masked_softmax

Dtype = Any
POOLINGS = ("softmax", "kfatt_base", "kfatt_freq")


def kfatt_base(
    prior_logit: jax.Array, prior_mean: jax.Array, scores: jax.Array, values: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """KFAtt-base: the MAP estimate with a global prior.

    Args:
      prior_logit: [B] s_0 = log(1 / sigma_q^2); -inf turns the prior off.
      prior_mean: [B, Dv] mu_q.
      scores: [B, T] s_t = log(1 / sigma_t^2), unnormalised (never softmax-normalised scores).
      values: [B, T, Dv] v_t.
      mask: [B, T] True on real behaviours.

    Returns:
      (v_hat [B, Dv], weights [B, 1 + T]: the prior's weight first, then the behaviours').

    The (T + 1)-token softmax is computed without materialising the [B, 1 + T, Dv] token array:
    the prior's term is added to the behaviours' weighted sum (one max shift for all T + 1 logits).
    """
    s0 = prior_logit.astype(jnp.float32)  # [B]
    s = scores.astype(jnp.float32)  # [B, T]
    has_prior = jnp.isfinite(s0)
    neg = jnp.finfo(jnp.float32).min
    top = jnp.maximum(jnp.where(has_prior, s0, neg), jnp.max(jnp.where(mask, s, neg), axis=-1))  # [B]
    top = jax.lax.stop_gradient(jnp.where(top > neg, top, 0.0))
    # exp(-inf) = 0 with a zero gradient: masked entries neither count nor produce NaN gradients.
    e0 = jnp.exp(jnp.where(has_prior, s0 - top, -jnp.inf))  # [B]
    e = jnp.exp(jnp.where(mask, s - top[:, None], -jnp.inf))  # [B, T]
    out, w0, w = _normalise(e0, e, prior_mean, values)
    return out, jnp.concatenate([w0[:, None], w], axis=-1)


def _normalise(e0: jax.Array, e: jax.Array, prior_mean: jax.Array, values: jax.Array):
    """(e0 mu + sum_t e_t v_t) / z, z = e0 + sum_t e_t, from unnormalised token weights e0 [B], e [B, T]:
    (v_hat [B, Dv], w0 [B], w [B, T]). The sum is weighted before it is normalised, so the division is
    by [B, Dv], not [B, T] (one elementwise pass fewer; the weights cost nothing unless used)."""
    z = jnp.maximum(e0 + jnp.sum(e, axis=-1), jnp.finfo(jnp.float32).tiny)  # [B]
    num = e0[:, None] * prior_mean.astype(jnp.float32) + jnp.einsum("bt,btd->bd", e, values.astype(jnp.float32))
    return (num / z[:, None]).astype(values.dtype), e0 / z, e / z[:, None]


def dedup_assignment(keys: jax.Array, mask: jax.Array) -> jax.Array:
    """Groups behaviours by key: A [B, T, M=T], A[b, t, m] = 1 if valid behaviour t belongs to
    the sensor m, where sensor m is the first valid position holding that key (other m are empty).

    keys: [B, T] integer de-duplication keys; mask: [B, T] bool. Padding is in no group.
    """
    t = keys.shape[-1]
    same = (keys[:, :, None] == keys[:, None, :]) & mask[:, :, None] & mask[:, None, :]  # [B, T, T]
    first = jnp.argmax(same, axis=-1)  # [B, T] index of the first valid behaviour with this key
    return ((first[:, :, None] == jnp.arange(t)) & mask[:, :, None]).astype(jnp.float32)


def kfatt_freq(
    prior_logit: jax.Array,
    prior_mean: jax.Array,
    scores: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    keys: jax.Array,
    log_random_var: jax.Array,
    num_keys: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """KFAtt-freq: de-duplicate behaviours by key, cap each sensor's weight, pool with the prior.

    Args:
      prior_logit, prior_mean, scores, values, mask: as in `kfatt_base`.
      keys: [B, T] integer de-duplication keys (e.g. leaf category ids).
      log_random_var: [B, T] log sigma'^2 of each behaviour's key.
      num_keys: a static bound on the keys (all in [0, num_keys)), e.g. the rows of the category
        table: the per-row counts n_m are then a scatter-add into [B, num_keys] (O(B T)) instead
        of the [B, T, T] key comparison.

    `scores` and `log_random_var` are taken to be functions of the key within a row, so that
    they are the sensor's s_m and log sigma'_m^2: the KFAtt setting (q^T k_m, a DIN unit or a
    Transformer head on k_m, with the category both the attention key and the de-duplication
    key; every scorer of jdjax.models.din satisfies it). Otherwise each behaviour enters with
    its own precision, capped with its sensor's count.

    Computed per behaviour, without gathering sensors: sum_m w_m v_bar_m = sum_t (w_m(t) / n_m(t)) v_t,
    so the (M + 1)-token softmax over [s_0, log w_m] and [mu_q, v_bar_m] equals the (T + 1)-token
    softmax over [s_0, log w_m(t) - log n_m(t)] and [mu_q, v_t]: elementwise work on the counts only,
    no [B, T, M] x [B, T, Dv] contraction. The token weights are formed in (shifted) linear space,
    e^{s_0 - r} and 1 / (n e^{r - s} + e^{lv + r}) with a per-row shift r, not through logaddexp
    (see the code: about half the elementwise cost on CPU).

    Returns:
      (v_hat [B, Dv], weights [B, 1 + M] (prior first; M = T sensor slots, sensor m at the
       position of its first behaviour, other slots 0), counts n_m [B, M]). Under jit the
       weights and counts cost nothing unless they are used.
    """
    b, t = keys.shape
    f32 = jnp.float32
    same = (keys[:, :, None] == keys[:, None, :]) & mask[:, None, :]  # [B, T, T] valid behaviours with t's key
    if num_keys is None:
        n_t = jnp.sum(same, axis=-1, dtype=jnp.int32)  # [B, T] clicks of behaviour t's sensor
    else:
        flat = (jnp.arange(b)[:, None] * num_keys + keys).reshape(-1)  # [B * T] row-major (row, key) slots
        per_key = jnp.zeros(b * num_keys, jnp.int32).at[flat].add(mask.reshape(-1).astype(jnp.int32))
        n_t = per_key[flat].reshape(b, t)
    n_t = n_t.astype(f32)
    s, log_var, s0 = scores.astype(f32), log_random_var.astype(f32), prior_logit.astype(f32)
    # Per behaviour, w_m(t) / n_m(t) = 1 / (n_t sigma_m^2 + sigma'_m^2) = 1 / (n_t e^{-s_t} + e^{lv_t}): two exps
    # and a reciprocal, no log / log1p (the log-space form -logaddexp(-s_t, lv_t - log n_t) - log n_t costs
    # about twice as much on CPU). Stabilised by a per-row shift r >= s_0 and r >= min(s_t, -lv_t) for every
    # valid t: then e^{s_0 - r} <= 1 and every denominator n_t e^{r - s_t} + e^{lv_t + r} >= 1 (one of its
    # exponents is >= 0), while the largest token keeps a weight >= 1 / (n_t + 1) (the bound is tight within
    # a factor n_t + 1): no overflow, no underflow of the normaliser. Exponents are clipped at 80 (e^80 * T is
    # finite in float32) so far-off behaviours get a weight ~e^-80 instead of an inf and a NaN gradient.
    neg = jnp.finfo(f32).min
    has_prior = jnp.isfinite(s0)
    cap = jnp.where(mask, jnp.minimum(s, -log_var), neg)  # [B, T]
    r = jnp.maximum(jnp.where(has_prior, s0, neg), jnp.max(cap, axis=-1))  # [B]
    r = jax.lax.stop_gradient(jnp.where(r > neg, r, 0.0))[:, None]  # [B, 1]
    e0 = jnp.exp(jnp.where(has_prior, s0 - r[:, 0], -jnp.inf))  # [B]
    s = jnp.where(mask, s, r)  # padding: a denominator >= 1 too, so no inf (and NaN gradient) behind the mask
    denom = jnp.maximum(n_t, 1.0) * jnp.exp(jnp.minimum(r - s, 80.0)) + jnp.exp(jnp.minimum(log_var + r, 80.0))
    e = jnp.where(mask, 1.0 / denom, 0.0)  # [B, T]
    out, w0, w = _normalise(e0, e, prior_mean, values)
    earlier = jnp.arange(t)[None, :] < jnp.arange(t)[:, None]  # [T, T] t' before t
    is_first = mask & ~jnp.any(same & earlier, axis=-1)  # [B, T] t opens its sensor
    counts = jnp.where(is_first, n_t, 0.0)  # [B, M]
    sensor_w = jnp.where(is_first, w * n_t, 0.0)  # the sensor's total weight at its slot
    return out, jnp.concatenate([w0[:, None], sensor_w], axis=-1), counts


class TwoLayerMLP(nn.Module):
    """Dense(hidden) -> ReLU -> Dense(features): the MLPs of mu_q, log(1/sigma_q^2) and log sigma'^2."""

    features: int
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> [..., features]."""
        def dense(width, axes, name):
            return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]), name=name)

        hidden = nn.relu(dense(self.hidden, ("embed", "mlp"), "hidden")(x))
        return dense(self.features, ("mlp", None), "out")(hidden)


class KFAttPooling(nn.Module):
    """Pools behaviour values with softmax attention, KFAtt-base or KFAtt-freq given the scores.

    Attributes:
      mode: one of POOLINGS.
      value_dim: Dv (width of mu_q).
      prior_hidden: hidden width of the prior and random-error MLPs.
      prior: 'learned' (mu_q and sigma_q from MLPs of q) or 'unit' (the paper's naive-prior
        ablation KFAtt-bs: sigma_q = 1, mu_q still learned).
    """

    mode: str
    value_dim: int
    prior_hidden: int = 32
    prior: str = "learned"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, scores, values, mask, keys=None, dedup_keys=None, key_table=None, key_ids=None):
        """query [B, Dq], scores [B, T], values [B, T, Dv], mask [B, T]; for 'kfatt_freq' also keys
        [B, T, Dk] (input of the sigma' MLP) and dedup_keys [B, T] int.

        When the keys are rows of one embedding table, pass key_table [V, Dk] and key_ids [B, T]
        (keys = key_table[key_ids] on valid behaviours, and dedup_keys ids of the same table, < V):
        the sigma' MLP then runs once per table row instead of once per behaviour, and the counts
        are a scatter-add (the same parameters and values; cheaper when V < B * T).

        Returns (v_hat [B, Dv], weights [B, 1 + T] for KFAtt (prior first) or [B, T] for softmax).
        """
        if self.mode not in POOLINGS:
            raise ValueError(f"KFAttPooling: mode must be one of {POOLINGS}, got {self.mode!r}.")
        if self.mode == "softmax":
            w = masked_softmax(scores, mask)
            return jnp.einsum("bt,btd->bd", w, values.astype(jnp.float32)).astype(values.dtype), w
        mu = TwoLayerMLP(self.value_dim, self.prior_hidden, self.dtype, self.param_dtype, name="prior_mean")(query)  # [B, Dv]
        if self.prior == "learned":
            s0 = TwoLayerMLP(1, self.prior_hidden, self.dtype, self.param_dtype, name="prior_logit")(query)[:, 0]  # [B]
        elif self.prior == "unit":
            s0 = jnp.zeros(query.shape[:1], jnp.float32)
        else:
            raise ValueError(f"KFAttPooling: prior must be 'learned' or 'unit', got {self.prior!r}.")
        if self.mode == "kfatt_base":
            return kfatt_base(s0, mu, scores, values, mask)
        if keys is None or dedup_keys is None:
            raise ValueError("KFAttPooling: mode 'kfatt_freq' needs `keys` and `dedup_keys`.")
        random_error = TwoLayerMLP(1, self.prior_hidden, self.dtype, self.param_dtype, name="random_error")
        if key_table is not None and key_ids is not None:
            log_var = jnp.take(random_error(key_table)[:, 0], key_ids, axis=0)  # [V] -> [B, T]
        else:
            log_var = random_error(keys)[..., 0]  # [B, T]
        # Table mode: the de-duplication keys are rows of the key table too (BehaviourCTR checks it).
        num_keys = key_table.shape[0] if key_table is not None and key_ids is not None else None
        out, w, _ = kfatt_freq(s0, mu, scores, values, mask, dedup_keys, log_var, num_keys)
        return out, w


class MultiHeadKFAtt(nn.Module):
    """KFAtt-trans decoder (and the Transformer baseline with mode='softmax'):
    head_i = Pool(q W_i^Q, K W_i^K, H W_i^V) with score s_t = (q W_i^Q)^T (k_t W_i^K) and a prior
    per head in the head's value space; v_hat = Concat(head_1..head_h) W^O [B, out_dim].
    """

    mode: str
    num_heads: int
    head_dim: int
    out_dim: int
    prior_hidden: int = 32
    prior: str = "learned"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, keys, values, mask, dedup_keys=None, key_table=None, key_ids=None):
        """query [B, Dq], keys [B, T, Dk], values (encoder output H) [B, T, Dh], mask [B, T],
        dedup_keys [B, T] (kfatt_freq); key_table [V, Dk] / key_ids [B, T] as in KFAttPooling.
        Returns (v_hat [B, out_dim], weights [B, heads, ...])."""

        def proj(name):
            return nn.DenseGeneral(
                (self.num_heads, self.head_dim), dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "heads", "kv")), name=name,
            )

        key_proj = proj("key")
        q = proj("query")(query)  # [B, H, Dh]
        k = key_proj(keys)  # [B, T, H, Dh]
        v = proj("value")(values)  # [B, T, H, Dh]
        scores = jnp.einsum("bhd,bthd->bht", q, k)  # [B, H, T], unscaled as in the paper
        table = key_proj(key_table) if self.mode == "kfatt_freq" and key_table is not None else None  # [V, H, Dh]
        pool = nn.vmap(
            KFAttPooling,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            # the heads axis of query, scores, values, mask, keys, dedup keys, key table, key ids
            in_axes=(1, 1, 2, None, 2, None, 1, None),
            out_axes=1,
            metadata_params={nn.PARTITION_NAME: "heads"},
        )(self.mode, self.head_dim, prior_hidden=self.prior_hidden, prior=self.prior, dtype=self.dtype,
          param_dtype=self.param_dtype, name="pool")
        heads, w = pool(q, scores, v, mask, k, dedup_keys, table, key_ids if table is not None else None)  # [B, H, Dh], [B, H, ...]
        out = nn.DenseGeneral(
            self.out_dim, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("heads", "kv", "embed")), name="out",
        )(heads)
        return out, w
