"""Group-wise contrastive learning for dialogue generation (Cai et al., Findings of EMNLP 2020; the
released code `hengyicai/ContrastiveLearning4Dialogue`, `contrastive_learning/common_things.py`;
spec `experiments_ads_text.md` §P4): the loss, the matching weights, the annealing schedule, the
group sampler and a response-matching model that scores the samples.

Target p_m(r | c; theta), frozen reference p_n(r | c; phi). Per (context, response) pair

    l_m = sum_t log p_m(r_t | r_<t, c)       summed over label tokens incl. EOS, no length normalisation
    l_n = the same under the reference        (no gradient)
    g = l_m - l_n,  h = sigmoid(g),  s in [-1, 1] the signed matching weight
    l_CL(s) = -log clamp((1 - s) / 2 + s h, 1e-20, 1e20)

s = 1: -log h (push p_m above p_n); s = -1: -log(1 - h); s = 0: log 2, no gradient.
d l_CL / d l_m = -s h (1 - h) / ((1 - s) / 2 + s h): -(1 - h) at s = 1, +h at s = -1.

Group loss of one update with k samples per example and annealing weight w:

    L = (1 - w) NLL + w / (k + 1) * mean_b [ sum_j l_CL(sample_bj, s_bj) + l_CL(gold_b, 1) ]
    w(n) = clip((tanh((n * speed - 3500) / 1000) + 1) / 2, 0, 1),  n = CL steps so far

(run.sh: the first `pretrain_steps` = 5000 updates are plain MLE and n counts from the first CL
update; w(0) = 0.0009, so the first CL steps are nearly MLE.)

Sample j of example b is the retrieved pair at a uniform random index of its list, on the context
side (c', r) or the response side (c, r') by a fair coin (`contrast_by='both'`); its weight is the
normalised matching score, s = clip(2 (m + 0.5 - thr) - 1, -1, 1) = 2m - 1 at thr = 0.5 ('soft').
The draws happen in the data pipeline (jdjax.tasks.dialog_cl.pick_samples), per example [R]: the
released code draws one index and one side per sample for the whole batch. `sample_mask` in
`group_cl_loss` [R] is this port's (the code never has missing samples).

The matching model of the paper is MSN (Multi-hop Selector Network, Yuan et al. EMNLP 2019). Here
`ResponseMatcher` is a simpler siamese BiGRU matcher [R] (see its docstring): the weights only curate
samples (the author's reply in the repo's issue #1), and MSN's selector works on the context split
into turns, while the seq2seq contexts here are one token sequence (turns joined by a delimiter).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Dtype = Any
CLAMP_MIN, CLAMP_MAX = 1e-20, 1e20
MATCHING_MODES = ("soft", "hard", "filter")


def cl_pair_loss(l_m: jax.Array, l_n: jax.Array, s: jax.Array) -> jax.Array:
    """l_CL = -log clamp((1 - s) / 2 + s sigmoid(l_m - l_n), 1e-20, 1e20) per pair: [B] (any shape).

    l_n and s get no gradient (the reference is frozen, the weights are data). The argument of the
    log is rewritten as (1 - |s|) / 2 + |s| sigmoid(sign(s) g), a sum of two non-negative terms: the
    released float32 form 0.5 - s (0.5 - h) rounds 1 - h to 0 once g > ~17 at s = -1 and clamps
    (loss 46.05, zero gradient); here the loss is g and the gradient 1 until the true value reaches
    the clamp. The clamp itself is kept (loss <= -log 1e-20 ~ 46.05 with zero gradient beyond), and
    sigmoid(z) >= 1e-20 is a normal float32, so log needs no log-sigmoid to be accurate where it is
    not clamped. s = 0 gives exactly log 2 and a zero gradient.
    """
    g = jnp.asarray(l_m, jnp.float32) - jax.lax.stop_gradient(jnp.asarray(l_n, jnp.float32))
    s = jax.lax.stop_gradient(jnp.asarray(s, jnp.float32))
    a = jnp.abs(s)
    x = (1.0 - a) / 2 + a * jax.nn.sigmoid(jnp.where(s < 0, -g, g))
    return -jnp.log(jnp.clip(x, CLAMP_MIN, CLAMP_MAX))


def matching_weight(
    m: jax.Array, mode: str = "soft", threshold: float = 0.5, pos_threshold: float = 0.5, neg_threshold: float = 0.5
) -> jax.Array:
    """Matching scores m in [0, 1] (any shape) -> signed weights s in [-1, 1], as `normalize_score` of
    the released code (read from the code, not guessed):

      soft:   s = clip(2 (m + 0.5 - threshold) - 1, -1, 1)
      hard:   m >= pos_threshold -> 1, m < neg_threshold -> 0, m in between unchanged; then soft with
              threshold 0.5 (the code ignores `threshold` here): s = +1, -1 or 2m - 1.
              Needs 0 < neg_threshold <= pos_threshold < 1. At the defaults (0.5, 0.5) s = sign.
      filter: neg_threshold < m < pos_threshold -> 0.5 (s = 0, the pair has no gradient); the rest
              soft with threshold 0.5. Needs 0 <= neg_threshold <= pos_threshold <= 1. At the
              defaults (0.5, 0.5) no score is filtered and it equals soft.
    """
    m = jnp.asarray(m, jnp.float32)
    if mode == "soft":
        return jnp.clip(2 * (m + 0.5 - threshold) - 1, -1.0, 1.0)
    if mode == "hard":
        if not 0 < neg_threshold <= pos_threshold < 1:
            raise ValueError(
                f"matching_weight(mode='hard') needs 0 < neg_threshold <= pos_threshold < 1, got neg_threshold="
                f"{neg_threshold}, pos_threshold={pos_threshold}. Set the thresholds in that order inside (0, 1)."
            )
        m = jnp.where(m >= pos_threshold, 1.0, jnp.where(m < neg_threshold, 0.0, m))
    elif mode == "filter":
        if not 0 <= neg_threshold <= pos_threshold <= 1:
            raise ValueError(
                f"matching_weight(mode='filter') needs 0 <= neg_threshold <= pos_threshold <= 1, got neg_threshold="
                f"{neg_threshold}, pos_threshold={pos_threshold}. Set the thresholds in that order inside [0, 1]."
            )
        m = jnp.where((m > neg_threshold) & (m < pos_threshold), 0.5, m)
    else:
        raise ValueError(f"matching_weight: unknown mode {mode!r}; choose one of {MATCHING_MODES}.")
    return jnp.clip(2 * m - 1, -1.0, 1.0)


def cl_weight(n: jax.Array | float, speed: float = 1.0, center: float = 3500.0, width: float = 1000.0) -> jax.Array:
    """Annealing weight w(n) = clip((tanh((n speed - center) / width) + 1) / 2, 0, 1) of the CL terms,
    n the number of CL steps so far: 0.00091 at 0, 0.5 at 3500, 0.9933 at 6000 (defaults)."""
    x = (jnp.asarray(n, jnp.float32) * speed - center) / width
    return jnp.clip((jnp.tanh(x) + 1) / 2, 0.0, 1.0)


def group_cl_loss(
    nll: jax.Array,
    l_m_gold: jax.Array,
    l_n_gold: jax.Array,
    l_m_samples: jax.Array,
    l_n_samples: jax.Array,
    s_samples: jax.Array,
    w: jax.Array | float,
    sample_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = (1 - w) nll + w / (k + 1) mean_b [sum_j l_CL(l_m_bj, l_n_bj, s_bj) + l_CL(gold_b, s = 1)].

    Args:
      nll: scalar, the MLE loss of the gold batch (token-averaged, as ParlAI's).
      l_m_gold, l_n_gold: [B] summed log-probs of the gold responses under target / reference.
      l_m_samples, l_n_samples, s_samples: [B, k] the same for the k samples and their weights.
      w: scalar annealing weight (`cl_weight`).
      sample_mask: optional [B, k] bool [R]; a masked sample adds 0 (like an s = 0 sample, no
        gradient) and the divisor stays k + 1, as for a full group.

    Returns:
      (loss scalar, aux): 'nll', 'w', 'cl_loss' (mean over the batch of the group mean of l_CL, the
      released code's logged `cl_loss`), 'cl_gold', 'cl_samples' (mean over unmasked samples),
      'h_gold' (mean sigmoid(g) on gold pairs), 'frac_pos' / 'frac_neg' (unmasked samples with s > 0 / < 0).
    """
    k = l_m_samples.shape[-1]
    mask = jnp.ones(l_m_samples.shape, bool) if sample_mask is None else sample_mask.astype(bool)
    cl_gold = cl_pair_loss(l_m_gold, l_n_gold, jnp.ones_like(l_m_gold, jnp.float32))  # [B]
    cl_samp = jnp.where(mask, cl_pair_loss(l_m_samples, l_n_samples, s_samples), 0.0)  # [B, k]
    group = (jnp.sum(cl_samp, axis=-1) + cl_gold) / (k + 1)  # [B]
    cl_loss = jnp.mean(group)
    w = jnp.asarray(w, jnp.float32)
    loss = (1 - w) * jnp.asarray(nll, jnp.float32) + w * cl_loss
    n_valid = jnp.maximum(jnp.sum(mask), 1)
    s = jnp.asarray(s_samples, jnp.float32)
    aux = {
        "nll": jnp.asarray(nll, jnp.float32),
        "w": w,
        "cl_loss": cl_loss,
        "cl_gold": jnp.mean(cl_gold),
        "cl_samples": jnp.sum(cl_samp) / n_valid,
        "h_gold": jnp.mean(jax.nn.sigmoid(jnp.asarray(l_m_gold, jnp.float32) - jnp.asarray(l_n_gold, jnp.float32))),
        "frac_pos": jnp.sum(mask & (s > 0)) / n_valid,
        "frac_neg": jnp.sum(mask & (s < 0)) / n_valid,
    }
    return loss, aux


def _dense(features: int, axes: tuple[str | None, str | None], name: str, **kw) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        name=name,
        **kw,
    )


class BiGRUEncoder(nn.Module):
    """Bidirectional GRU over embedded tokens, max-pooled over the real positions:
    x [B, L, E], mask [B, L] -> [B, 2H] (zeros for an empty sequence)."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        def cell(name):
            return nn.GRUCell(
                self.hidden,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                recurrent_kernel_init=nn.with_logical_partitioning(nn.initializers.orthogonal(), (None, "mlp")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        lengths = jnp.sum(mask, axis=-1, dtype=jnp.int32)  # [B]
        bigru = nn.Bidirectional(nn.RNN(cell("forward")), nn.RNN(cell("backward")), name="bigru")
        y = bigru(x, seq_lengths=lengths)  # [B, L, 2H], right padding
        neg = jnp.finfo(y.dtype).min
        pooled = jnp.max(jnp.where(mask[:, :, None], y, neg), axis=1)  # [B, 2H]
        return jnp.where(jnp.any(mask, axis=-1, keepdims=True), pooled, 0.0)


class ResponseMatcher(nn.Module):
    """Response matcher [R], standing in for MSN: logit of "response r answers context c".

    A shared embedding and one shared (siamese) BiGRU encoder, max-pooled, give u = enc(c) and
    v = enc(r) [B, 2H]; the interaction features [u; v; u * v; |u - v|] (InferSent / ESIM style)
    go through a tanh MLP to one logit. Like MSN it is a GRU matcher, meant to be trained with
    `matcher_loss` (BCE) on (positive, random negative) pairs; unlike MSN it reads the context as
    one sequence (no per-turn selector, no multi-hop attention).

    context int32 [B, Lc], response int32 [B, Lr], pad 0 -> logits [B]. Parameters carry the
    logical names 'vocab', 'embed', 'mlp'.
    """

    vocab_size: int
    embed_dim: int = 300
    hidden: int = 300
    mlp_dim: int = 300
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, context: jax.Array, response: jax.Array, deterministic: bool = True) -> jax.Array:
        embed = nn.Embed(
            self.vocab_size,
            self.embed_dim,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), ("vocab", "embed")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embed",
        )
        drop = nn.Dropout(self.dropout_rate, deterministic=deterministic)
        b, length = context.shape[0], max(context.shape[1], response.shape[1])
        # One encoder pass over contexts and responses stacked along the batch: [2B, L].
        tokens = jnp.concatenate([jnp.pad(t, ((0, 0), (0, length - t.shape[1]))) for t in (context, response)])
        pooled = BiGRUEncoder(self.hidden, self.dtype, self.param_dtype, name="encoder")(
            drop(embed(tokens)), tokens != 0
        )  # [2B, 2H]
        u, v = pooled[:b], pooled[b:]  # [B, 2H] each
        feats = jnp.concatenate([u, v, u * v, jnp.abs(u - v)], axis=-1)  # [B, 8H]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hid = jnp.tanh(_dense(self.mlp_dim, ("mlp", "embed"), "hidden", **kw)(drop(feats)))  # [B, M]
        return _dense(1, ("embed", None), "logit", **kw)(drop(hid))[:, 0].astype(jnp.float32)  # [B]


def matcher_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of matching logits [B] against 0/1 labels [B]."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32)))
