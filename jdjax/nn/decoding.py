"""Sequence scores and decoding (greedy, beam search) for the encoder-decoder models.

Scores (spec P4): `sequence_log_probs` sums log p over the label tokens (end included, padding
ignored, no length normalisation); `token_nll` gives (sum, count) for corpus perplexity.

Decoding works on any `step_fn(token [N], cache, position) -> (logits [N, V], cache)`; `generate`
builds it from a model's `encode` / `init_cache` / `decode_step` (`jdjax.nn.seq2seq`). Everything
is jit-compatible: static shapes, `lax.while_loop` that stops once no hypothesis can change the
result. Outputs are tokens [B, max_len] (the generated tokens, end included, then pad 0) and
scores [B].

Per step, as ParlAI's TreeSearch: logits with pad and start blocked -> log-softmax -> end blocked while
fewer than `min_len` tokens were generated -> tokens that would repeat an n-gram of the
hypothesis blocked (`block_ngram` = n, ParlAI's --beam-block-ngram; 0 = off).

Beam search keeps `beam_size` hypotheses, chosen among all beam_size x V extensions (end
included, so beam size 1 is greedy). A hypothesis that emits end moves to the finished set with
score = log p / lp(length), lp = ((5 + length) / 6) ** length_penalty_alpha (GNMT; length counts
the end token; ParlAI uses (1 + length) / 6); hypotheses alive at max_len finish there. The
finished set keeps the best beam_size; the loop stops when the worst of them beats every alive
hypothesis's best reachable score (log p / the largest lp still reachable), so a beam that never
has to drop a candidate returns the exhaustive optimum. Greedy scores are plain sums of log p.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import einops
import jax
import jax.numpy as jnp

from jdjax.nn.seq2seq import END, PAD, START

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


# ----------------------------------------------------------------------------- scores


def sequence_log_probs(logits, targets, pad_id: int = PAD):
    """Sum over non-pad targets of log softmax(logits)[target]: logits [B, L, V], targets [B, L] -> [B]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, L]
    return jnp.sum(jnp.where(targets != pad_id, token, 0.0), axis=-1)


def token_nll(logits, targets, pad_id: int = PAD):
    """(sum of -log p over non-pad targets, number of non-pad targets), float32 scalars.

    Token-averaged NLL = sum / count; corpus perplexity = exp(sum of sums / sum of counts).
    """
    mask = targets != pad_id
    return -jnp.sum(sequence_log_probs(logits, targets, pad_id)), jnp.sum(mask).astype(jnp.float32)


def length_penalty(length, alpha: float):
    """GNMT length penalty ((5 + length) / 6) ** alpha (1 for alpha = 0)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# ----------------------------------------------------------------------------- per-step log-probs


def repeated_ngram_tokens(seq, length, n: int, vocab_size: int):
    """[N, V] bool: tokens t such that seq[:, :length] + [t] ends with an n-gram already in seq[:, :length].

    seq [N, T] generated tokens (positions >= length are ignored); length: int32 scalar.
    """
    num, total = seq.shape
    rows = jnp.arange(num)[:, None]
    if n == 1:  # every token generated so far
        generated = jnp.broadcast_to(jnp.arange(total) < length, seq.shape).astype(jnp.int32)
        return jnp.zeros((num, vocab_size), jnp.int32).at[rows, seq].add(generated) > 0
    if total < n:
        return jnp.zeros((num, vocab_size), bool)
    starts = total - n + 1
    windows = jnp.stack([seq[:, k:k + starts] for k in range(n)], axis=-1)  # [N, S, n]: n-gram at each start
    suffix = jax.lax.dynamic_slice_in_dim(seq, jnp.maximum(length - (n - 1), 0), n - 1, axis=1)  # [N, n - 1]
    match = jnp.all(windows[..., :-1] == suffix[:, None, :], axis=-1)  # [N, S]
    match = match & (jnp.arange(starts) + n <= length)  # the whole n-gram was generated (so length >= n)
    return jnp.zeros((num, vocab_size), jnp.int32).at[rows, windows[..., -1]].add(match.astype(jnp.int32)) > 0


def next_log_probs(logits, seq, length, *, min_len: int = 0, block_ngram: int = 0, start_id: int = START,
                   end_id: int = END, pad_id: int = PAD):
    """[N, V] float32 log-probs of the next token after seq[:, :length]: pad and start never, end not
    before min_len, no repeated `block_ngram`-gram."""
    vocab = logits.shape[-1]
    never = (jnp.arange(vocab) == pad_id) | (jnp.arange(vocab) == start_id)
    logits = jnp.where(never, -jnp.inf, logits.astype(jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    if min_len > 0:
        logp = jnp.where((jnp.arange(vocab) == end_id) & (length < min_len), -jnp.inf, logp)
    if block_ngram > 0:
        logp = jnp.where(repeated_ngram_tokens(seq, length, block_ngram, vocab), -jnp.inf, logp)
    return logp


# ----------------------------------------------------------------------------- greedy


def greedy_decode(step_fn: StepFn, cache, batch_size: int, max_len: int, *, min_len: int = 0,
                  block_ngram: int = 0, start_id: int = START, end_id: int = END, pad_id: int = PAD):
    """Argmax decoding of `batch_size` rows: -> (tokens [B, max_len], scores [B] = sum of log p)."""
    opts = dict(min_len=min_len, block_ngram=block_ngram, start_id=start_id, end_id=end_id, pad_id=pad_id)

    def cond(s):
        return (s["i"] < max_len) & ~jnp.all(s["done"])

    def body(s):
        logits, cache = step_fn(s["token"], s["cache"], s["i"])
        logp = next_log_probs(logits, s["seq"], s["i"], **opts)  # [B, V]
        token = jnp.where(s["done"], pad_id, jnp.argmax(logp, axis=-1)).astype(jnp.int32)  # [B]
        gained = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        return dict(
            i=s["i"] + 1,
            token=token,
            seq=s["seq"].at[:, s["i"]].set(token),
            score=s["score"] + jnp.where(s["done"], 0.0, gained),
            done=s["done"] | (token == end_id),
            cache=cache,
        )

    state = dict(
        i=jnp.zeros((), jnp.int32),
        token=jnp.full((batch_size,), start_id, jnp.int32),
        seq=jnp.full((batch_size, max_len), pad_id, jnp.int32),
        score=jnp.zeros((batch_size,), jnp.float32),
        done=jnp.zeros((batch_size,), bool),
        cache=cache,
    )
    state = jax.lax.while_loop(cond, body, state)
    return state["seq"], state["score"]


# ----------------------------------------------------------------------------- beam search


def tile_beams(tree, beam_size: int):
    """Repeats every leaf [B, ...] -> [B * K, ...] (example-major: row b * K + k)."""
    return jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), tree)


def reorder_beams(tree, parent, beam_size: int):
    """Leaves [B * K, ...] -> rows taken from beams `parent` [B, K] of the same example."""

    def take(x):
        x = einops.rearrange(x, "(b k) ... -> b k ...", k=beam_size)
        idx = parent.reshape(parent.shape + (1,) * (x.ndim - 2))
        return einops.rearrange(jnp.take_along_axis(x, idx, axis=1), "b k ... -> (b k) ...")

    return jax.tree.map(take, tree)


def _keep_best(score, seq, new_score, new_seq, k: int):
    """The k best of two (score [B, K], seq [B, K, T]) sets, sorted best first."""
    score = jnp.concatenate([score, new_score], axis=1)  # [B, 2K]
    seq = jnp.concatenate([seq, new_seq], axis=1)  # [B, 2K, T]
    top, idx = jax.lax.top_k(score, k)
    return top, jnp.take_along_axis(seq, idx[..., None], axis=1)


def beam_search(step_fn: StepFn, cache, batch_size: int, beam_size: int, max_len: int, *,
                length_penalty_alpha: float = 0.0, min_len: int = 0, block_ngram: int = 0, start_id: int = START,
                end_id: int = END, pad_id: int = PAD):
    """Beam search; `step_fn` and `cache` work on B * K rows (see `tile_beams`).

    Returns (tokens [B, max_len], scores [B]) of the best finished hypothesis; score = sum of
    log p / length_penalty(length, length_penalty_alpha).
    """
    b, k, t = batch_size, beam_size, max_len
    opts = dict(min_len=min_len, block_ngram=block_ngram, start_id=start_id, end_id=end_id, pad_id=pad_id)

    def lp(length):
        return length_penalty(length, length_penalty_alpha)

    def cond(s):
        best_reachable = jnp.max(s["logp"], axis=1) / jnp.maximum(lp(s["i"] + 1), lp(t))  # [B]
        done = s["fin_score"][:, -1] >= best_reachable
        return (s["i"] < t) & ~jnp.all(done)

    def body(s):
        i = s["i"]
        logits, cache = step_fn(s["token"].reshape(b * k), s["cache"], i)
        logp = next_log_probs(logits, s["seq"].reshape(b * k, t), i, **opts)  # [B * K, V]
        vocab = logp.shape[-1]
        cand = s["logp"][..., None] + logp.reshape(b, k, vocab)  # [B, K, V]
        top, idx = jax.lax.top_k(cand.reshape(b, k * vocab), k)  # [B, K]
        parent, token = idx // vocab, (idx % vocab).astype(jnp.int32)
        seq = jnp.take_along_axis(s["seq"], parent[..., None], axis=1).at[:, :, i].set(token)  # [B, K, T]
        ended = token == end_id
        fin_score, fin_seq = _keep_best(s["fin_score"], s["fin_seq"], jnp.where(ended, top / lp(i + 1), -jnp.inf),
                                        seq, k)
        return dict(i=i + 1, token=token, seq=seq, logp=jnp.where(ended, -jnp.inf, top), fin_score=fin_score,
                    fin_seq=fin_seq, cache=reorder_beams(cache, parent, k))

    state = dict(
        i=jnp.zeros((), jnp.int32),
        token=jnp.full((b, k), start_id, jnp.int32),
        seq=jnp.full((b, k, t), pad_id, jnp.int32),
        logp=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (b, 1)),  # one live beam at the start
        fin_score=jnp.full((b, k), -jnp.inf),
        fin_seq=jnp.full((b, k, t), pad_id, jnp.int32),
        cache=cache,
    )
    s = jax.lax.while_loop(cond, body, state)
    alive = jnp.where(s["i"] >= t, s["logp"] / lp(t), -jnp.inf)  # hypotheses cut at max_len finish
    score, seq = _keep_best(s["fin_score"], s["fin_seq"], alive, s["seq"], k)
    return seq[:, 0], score[:, 0]


# ----------------------------------------------------------------------------- models


def generate(model, variables, context, *, max_len: int, beam_size: int = 1, length_penalty_alpha: float = 0.0,
             min_len: int = 0, block_ngram: int = 0):
    """Decodes responses to `context` [B, Lc] with a `jdjax.nn.seq2seq` model's encode / init_cache /
    decode_step: greedy for beam_size 1 (scores = sum of log p), else beam search (scores length-
    penalised). -> (tokens [B, max_len], scores [B]). Jit it with the keyword arguments static."""
    memory = model.apply(variables, context, method="encode")
    context_mask = context != PAD
    if beam_size > 1:
        memory, context_mask = tile_beams((memory, context_mask), beam_size)
    cache = model.apply(variables, memory, max_len, method="init_cache")

    def step_fn(token, cache, position):
        return model.apply(variables, memory, context_mask, token, cache, position, method="decode_step")

    opts = dict(min_len=min_len, block_ngram=block_ngram)
    if beam_size == 1:
        return greedy_decode(step_fn, cache, context.shape[0], max_len, **opts)
    return beam_search(step_fn, cache, context.shape[0], beam_size, max_len,
                       length_penalty_alpha=length_penalty_alpha, **opts)
