"""Decoding: scores against NumPy, beam search = exhaustive search, greedy = beam 1, n-gram blocking,
length penalty, batched = per example; on toy step functions and a tiny real model."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdjax.nn.decoding import (
    beam_search,
    generate,
    greedy_decode,
    length_penalty,
    sequence_log_probs,
    tile_beams,
    token_nll,
)
from jdjax.nn.seq2seq import Seq2SeqLSTM, Seq2SeqTransformer

FAST = {"xla_backend_optimization_level": 0}  # compiles ~2x faster; these programs are tiny
PAD, START, END = 0, 1, 2
V, T = 5, 4  # tiny vocabulary (pad, start, end + 2 tokens) and max_len: 31 hypotheses
CODES = V ** T  # prefix codes of the toy step function


def compiled(fn, *args):
    """fn(*args), jit-compiled with FAST options."""
    return jax.jit(fn).lower(*args).compile(FAST)(*args)


def log_softmax_np(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def test_sequence_log_probs_and_token_nll_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    lengths = [5, 3, 1]
    targets = np.zeros((3, 5), np.int32)
    for b, n in enumerate(lengths):
        targets[b, :n] = rng.integers(1, 7, n)
    logp = log_softmax_np(logits)
    expected = np.array([sum(logp[b, t, targets[b, t]] for t in range(n)) for b, n in enumerate(lengths)])
    np.testing.assert_allclose(sequence_log_probs(logits, targets), expected, rtol=1e-5)
    total, count = token_nll(logits, targets)
    assert float(count) == sum(lengths)
    np.testing.assert_allclose(total, -expected.sum(), rtol=1e-5)


# ----------------------------------------------------------------------------- toy step functions


def prefix_step(table):
    """step_fn whose logits depend on the example and every token so far: table [B, CODES, V]."""

    def step(token, cache, position):
        code = cache["code"] * V + token  # base-V code of start + tokens (start = 1, so no leading zeros)
        return table[cache["example"], code], {"code": code, "example": cache["example"]}

    return step


def prefix_cache(batch, beam=1):
    return tile_beams({"code": jnp.zeros(batch, jnp.int32), "example": jnp.arange(batch)}, beam)


def run_beam(table, beam, **kw):
    """Beam search over the toy: table [B, CODES, V] -> (tokens [B, T], scores [B])."""
    b = table.shape[0]
    return compiled(lambda tb: beam_search(prefix_step(tb), prefix_cache(b, beam), b, beam, T, **kw), table)


def hypotheses():
    """Every hypothesis: tokens in {end, 3, .., V-1}, ending with end or T tokens long (31 of them)."""
    for n in range(1, T + 1):
        for prefix in itertools.product(range(END + 1, V), repeat=n - 1):
            for last in ([END] if n < T else [END, *range(END + 1, V)]):
                yield [*prefix, last]


def exhaustive(score_fn):
    """(tokens [T], score) of the hypothesis with the highest score_fn(tokens)."""
    best = max(hypotheses(), key=score_fn)
    return np.array(best + [PAD] * (T - len(best))), score_fn(best)


def toy_score(table_b, alpha):
    """score_fn of the toy for one example: sum of log p (pad and start blocked) / length penalty."""

    def score(tokens):
        code, total = 0, 0.0
        for prev, tok in zip([START, *tokens[:-1]], tokens):
            code = code * V + prev
            logits = np.array(table_b[code], np.float64)
            logits[[PAD, START]] = -np.inf
            total += log_softmax_np(logits)[tok]
        return total / ((5 + len(tokens)) / 6) ** alpha

    return score


BEAM_ALL = 24  # >= the finite candidates of any step (8 live hypotheses x 3 tokens), so nothing is pruned


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_beam_search_equals_exhaustive_search(alpha):
    table = np.random.default_rng(1).normal(size=(16, CODES, V)).astype(np.float32) * 2
    table[..., END] -= 1.0  # so that hypotheses of every length win somewhere
    tokens, scores = run_beam(jnp.asarray(table), BEAM_ALL, length_penalty_alpha=alpha)
    greedy = run_beam(jnp.asarray(table), 1, length_penalty_alpha=alpha)[0]
    best = [exhaustive(toy_score(table[b], alpha)) for b in range(16)]
    for b, (best_tokens, best_score) in enumerate(best):
        np.testing.assert_array_equal(tokens[b], best_tokens)
        np.testing.assert_allclose(scores[b], best_score, rtol=1e-5)
    assert len({int((t != PAD).sum()) for t, _ in best}) == T  # optima of lengths 1 .. T
    assert any(not np.array_equal(greedy[b], best[b][0]) for b in range(16))  # the search matters


def test_greedy_equals_beam_size_one():
    table = jnp.asarray(np.random.default_rng(2).normal(size=(6, CODES, V)).astype(np.float32) * 2)
    for kw in [{}, dict(min_len=2, block_ngram=1)]:
        g_tokens, g_scores = compiled(lambda tb, kw=kw: greedy_decode(prefix_step(tb), prefix_cache(6), 6, T, **kw),
                                      table)
        b_tokens, b_scores = run_beam(table, 1, **kw)
        np.testing.assert_array_equal(g_tokens, b_tokens)
        np.testing.assert_allclose(g_scores, b_scores, rtol=1e-6)
    assert np.all(np.asarray(g_tokens)[:, :2] != END)  # min_len = 2


def test_length_penalty_prefers_the_longer_hypothesis_when_large():
    """p(end) = .5 against p(3 4 end) = .45 * .9 * .9: alpha 0 keeps 'end', alpha 2 takes the longer one."""
    probs = np.full((CODES, V), 0.25)
    probs[1] = [0, 0.03, 0.50, 0.45, 0.02]  # after start
    probs[1 * V + 3] = [0, 0.02, 0.06, 0.02, 0.90]  # after start 3
    probs[(1 * V + 3) * V + 4] = [0, 0.02, 0.90, 0.05, 0.03]  # after start 3 4
    table = jnp.asarray(np.log(np.maximum(probs, 1e-12))[None].astype(np.float32))  # [1, CODES, V]
    short = np.log(0.5 / 0.97)  # start is blocked, so log-probs renormalise over the other tokens
    long = np.log(0.45 / 0.97 * 0.90 / 0.98 * 0.90 / 0.98)
    for alpha, tokens, score in [(0.0, [END, 0, 0, 0], short), (2.0, [3, 4, END, 0], long / (8 / 6) ** 2)]:
        out, s = run_beam(table, 3, length_penalty_alpha=alpha)
        np.testing.assert_array_equal(out[0], tokens)
        np.testing.assert_allclose(s[0], score, rtol=1e-5)
    assert float(length_penalty(3, 2.0)) == pytest.approx((8 / 6) ** 2)


def test_batched_equals_per_example():
    table = jnp.asarray(np.random.default_rng(3).normal(size=(3, CODES, V)).astype(np.float32) * 2)
    kw = dict(length_penalty_alpha=0.6, min_len=1, block_ngram=2)
    tokens, scores = run_beam(table, 4, **kw)
    for b in range(3):
        one_tokens, one_scores = run_beam(table[b:b + 1], 4, **kw)
        np.testing.assert_array_equal(one_tokens[0], tokens[b])
        np.testing.assert_allclose(one_scores[0], scores[b], rtol=1e-6)


def markov_step(matrix):
    """step_fn whose logits depend on the last token only: matrix [V', V'] of logits."""
    return lambda token, cache, position: (matrix[token], cache)


def ngrams(tokens, n):
    tokens = list(tokens)
    tokens = tokens[:tokens.index(END)] if END in tokens else [t for t in tokens if t != PAD]
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def test_ngram_blocking_never_repeats_an_ngram():
    """A sticky bigram model repeats itself; with block_ngram = n no n-gram occurs twice."""
    vocab, length = 7, 12
    rng = np.random.default_rng(4)
    matrix = rng.normal(size=(vocab, vocab)) + 4 * np.eye(vocab)
    matrix[:, END] -= 6  # end is unlikely
    matrix = jnp.asarray(matrix.astype(np.float32))
    step = markov_step(matrix)

    def decode(n):
        greedy = greedy_decode(step, (), 2, length, block_ngram=n)[0]
        beam = beam_search(step, (), 2, 3, length, block_ngram=n)[0]
        return jnp.concatenate([greedy, beam])

    for n in (0, 1, 2, 3):
        out = np.asarray(compiled(functools.partial(decode, n)))
        grams = [ngrams(row, n or 2) for row in out]
        if n == 0:
            assert any(len(g) > len(set(g)) for g in grams)  # without blocking it repeats
        else:
            assert all(len(g) == len(set(g)) for g in grams), (n, out)


# ----------------------------------------------------------------------------- real models


def tiny_variables(model, context):
    """Parameters from NumPy noise (no init compile): N(0, 0.5^2), LayerNorm scales ~1."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), context, context)))
    rng = np.random.default_rng(5)

    def fill(path, s):
        v = 0.5 * rng.normal(size=s.shape)
        return (v / 5 + 1 if path[-1].key == "scale" else v).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def force_beam(model, variables, context, beam, **kw):
    """`generate` with beam search even for beam 1."""
    memory = tile_beams(model.apply(variables, context, method="encode"), beam)
    mask = tile_beams(context != PAD, beam)
    cache = model.apply(variables, memory, T, method="init_cache")

    def step(token, cache, position):
        return model.apply(variables, memory, mask, token, cache, position, method="decode_step")

    return beam_search(step, cache, context.shape[0], beam, T, **kw)


def test_transformer_beam_search_is_exhaustive():
    """Batched beam search over padded contexts finds each context's best hypothesis under teacher forcing."""
    model = Seq2SeqTransformer(V, num_layers=1, width=16, num_heads=2, mlp_dim=32, max_positions=8)
    context = jnp.array([[3, 4, 4, 3], [4, 3, 0, 0], [3, 3, 0, 0], [4, 4, 4, 0]], jnp.int32)
    variables = tiny_variables(model, context)
    variables["params"]["embed"]["embedding"] *= 2.0  # sharper, and end neither always nor never best:
    variables["params"]["embed"]["embedding"][END] *= 0.4  # the optima differ between the contexts
    alpha = 0.8
    tokens, scores = compiled(lambda c: force_beam(model, variables, c, BEAM_ALL, length_penalty_alpha=alpha),
                              context)

    # every hypothesis scored by teacher forcing: sequence_log_probs / length penalty
    hyps = list(hypotheses())
    out = np.array([h + [PAD] * (T - len(h)) for h in hyps], np.int32)  # [H, T]
    inp = np.concatenate([np.full((len(hyps), 1), START), out[:, :-1]], axis=1)
    inp = np.where(inp == END, PAD, inp)
    lengths = np.array([len(h) for h in hyps])

    def score_all(c):
        ctx = jnp.repeat(c, len(hyps), axis=0)
        logits = model.apply(variables, ctx, jnp.tile(inp, (4, 1)))
        return sequence_log_probs(logits, jnp.tile(out, (4, 1))).reshape(4, -1) / length_penalty(lengths, alpha)

    all_scores = np.asarray(compiled(score_all, context))  # [4, H]
    for b in range(4):
        best = int(np.argmax(all_scores[b]))
        np.testing.assert_array_equal(tokens[b], out[best])
        np.testing.assert_allclose(scores[b], all_scores[b, best], rtol=1e-4)
    assert len({tuple(t) for t in np.asarray(tokens)}) > 1


def test_lstm_greedy_equals_beam_size_one():
    model = Seq2SeqLSTM(12, embed_dim=8, hidden=8, num_layers=1)
    context = jnp.array([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0], [11, 0, 0, 0, 0]], jnp.int32)
    variables = tiny_variables(model, context)

    def both(c):
        return generate(model, variables, c, max_len=T, block_ngram=2), force_beam(model, variables, c, 1,
                                                                                  block_ngram=2)

    (g_tokens, g_scores), (b_tokens, b_scores) = compiled(both, context)
    np.testing.assert_array_equal(g_tokens, b_tokens)
    np.testing.assert_allclose(g_scores, b_scores, rtol=1e-5)
