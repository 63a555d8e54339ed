"""Dialogue-generation metrics on host Python/NumPy: BLEU, distinct n-grams, n-gram entropy,
embedding similarity and perplexity (Group-wise CL for dialogue, spec `experiments_ads_text.md` §P4).

    bleu(hyps, refs)                    corpus BLEU-4 (sacrebleu, percent)
    bleu_n(hyps, refs)                  {'bleu_1': .., 'bleu_4': ..}: cumulative BLEU-1..4
    distinct(hyps, n)                   Dist-n = #distinct n-grams / #n-grams over the corpus
    intra_distinct(hyps, n)             mean over sentences of the per-sentence Dist-n
    entropy(hyps, n)                    Ent-n = -sum_g p(g) ln p(g), p the corpus n-gram distribution
    embedding_metrics(hyps, refs, wv)   Average / Greedy / Extrema cosine against word vectors
    perplexity(total_nll, total_tokens) exp(total_nll / total_tokens)
    text_metrics(hyps, refs, wv=None)   all of the above in one flat dict[str, float]

A sentence is a list of tokens or a string (split on whitespace). Texts are compared as given:
already tokenised, already lower-cased (tokenise Chinese by characters or words before calling;
the two give very different BLEU/Dist). One reference per hypothesis.

BLEU is sacrebleu's corpus BLEU with `tokenize='none'` (tokens joined by single spaces are the
units; no 13a re-tokenisation, no lower-casing), the default exponential smoothing and brevity
penalty; BLEU-n is the same with `max_ngram_order=n` (uniform weights over orders 1..n).

Conventions of the released evaluator (`parlai/agents/dialog_evaluator/auto_evaluator.py`,
`hy_lib/embedding_metrics.py`) kept here: intra-Dist of a sentence without n-grams counts as 1
((d + eps) / (t + eps)); for the embedding metrics a pair whose reference has no word with a vector
is skipped (counted in `embed_skipped`) and a hypothesis with no such word scores 0 (counted in
`embed_empty_hyp`); Extrema takes, per dimension, the value of largest magnitude (the max on a tie).
Not kept: the released Average weights words by Arora's a / (a + p(w)) from training unigram counts
(here every word weighs 1), the released Greedy also scores pairs with an empty reference (as 0;
here they are skipped like the others), and the released "word entropy" is a per-sentence log2
score under the training n-gram distribution; Ent-n here is the generated-corpus entropy in nats
(Zhang et al. 2018), the definition of the spec.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
from sacrebleu.metrics import BLEU

Sentence = str | Sequence[str]
WordVectors = Mapping[str, np.ndarray] | tuple[Sequence[str], np.ndarray]
NGRAM_ORDERS = (1, 2, 3)


def _tokens(sentence: Sentence) -> list[str]:
    return sentence.split() if isinstance(sentence, str) else [str(t) for t in sentence]


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _pairs(hyps: Sequence[Sentence], refs: Sequence[Sentence], name: str) -> tuple[list[list[str]], list[list[str]]]:
    if len(hyps) != len(refs):
        raise ValueError(
            f"{name}: {len(hyps)} hypotheses but {len(refs)} references; give one reference per hypothesis."
        )
    if not hyps:
        raise ValueError(f"{name}: the corpus is empty; give at least one hypothesis/reference pair.")
    return [_tokens(h) for h in hyps], [_tokens(r) for r in refs]


def _corpus_bleu(hyps: list[list[str]], refs: list[list[str]], order: int) -> float:
    metric = BLEU(tokenize="none", max_ngram_order=order, force=True)
    return float(metric.corpus_score([" ".join(h) for h in hyps], [[" ".join(r) for r in refs]]).score)


def bleu(hypotheses: Sequence[Sentence], references: Sequence[Sentence]) -> float:
    """Corpus BLEU-4 in percent (0..100) of tokenised hypotheses against one reference each."""
    hyps, refs = _pairs(hypotheses, references, "bleu")
    return _corpus_bleu(hyps, refs, 4)


def bleu_n(hypotheses: Sequence[Sentence], references: Sequence[Sentence], max_order: int = 4) -> dict[str, float]:
    """{'bleu_n': corpus BLEU with n-gram orders 1..n} for n = 1..max_order, in percent."""
    hyps, refs = _pairs(hypotheses, references, "bleu_n")
    return {f"bleu_{n}": _corpus_bleu(hyps, refs, n) for n in range(1, max_order + 1)}


def distinct(hyps: Sequence[Sentence], n: int) -> float:
    """Dist-n: distinct n-grams / all n-grams over the whole corpus (0 if there are none)."""
    counts = Counter(g for h in hyps for g in _ngrams(_tokens(h), n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def intra_distinct(hyps: Sequence[Sentence], n: int) -> float:
    """Mean over sentences of (distinct n-grams / n-grams) of the sentence; a sentence with no
    n-gram counts as 1, as in the released evaluator. 0 for an empty corpus."""
    eps = np.finfo(np.float64).eps
    ratios = []
    for h in hyps:
        grams = _ngrams(_tokens(h), n)
        ratios.append((len(set(grams)) + eps) / (len(grams) + eps))
    return float(np.mean(ratios)) if ratios else 0.0


def entropy(hyps: Sequence[Sentence], n: int) -> float:
    """Ent-n = -sum_g p(g) ln p(g) in nats, p the n-gram frequencies of the whole corpus (0 if none)."""
    counts = np.array(list(Counter(g for h in hyps for g in _ngrams(_tokens(h), n)).values()), np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-np.sum(p * np.log(p)))


def _lookup(word_vectors: WordVectors):
    """word -> float64 vector; words whose vector is all zero count as unknown."""
    if isinstance(word_vectors, tuple):
        vocab, matrix = word_vectors
        matrix = np.asarray(matrix, np.float64)
        if matrix.ndim != 2 or matrix.shape[0] != len(vocab):
            raise ValueError(
                f"word vectors: a (vocab, matrix) pair needs matrix [len(vocab), D]; got {len(vocab)} words and "
                f"matrix shape {matrix.shape}."
            )
        table = dict(zip(vocab, matrix))
    else:
        table = {w: np.asarray(v, np.float64) for w, v in word_vectors.items()}
    return {w: v for w, v in table.items() if np.any(v)}


def _cos(x: np.ndarray, y: np.ndarray) -> float:
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def _greedy(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over the rows of x [Nx, D] of the best cosine with a row of y [Ny, D]."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    return float(np.mean(np.max(xn @ yn.T, axis=1)))


def _extrema(x: np.ndarray) -> np.ndarray:
    """Per dimension, the entry of largest magnitude over the rows of x [N, D] (the max on a tie)."""
    hi, lo = x.max(axis=0), x.min(axis=0)
    return np.where(np.abs(lo) > hi, lo, hi)


def embedding_metrics(
    hypotheses: Sequence[Sentence], references: Sequence[Sentence], word_vectors: WordVectors
) -> dict[str, float]:
    """Embedding Average, Greedy (symmetrised) and Extrema cosines, averaged over pairs.

    word_vectors: {word: [D]} or (vocab list, matrix [V, D]). Average = cos(mean hyp vector,
    mean ref vector); Greedy = (G(hyp, ref) + G(ref, hyp)) / 2, G(x, y) the mean over x's words of
    the best cosine with a word of y; Extrema = cos of the per-dimension largest-magnitude vectors.
    Only words with a (non-zero) vector take part. Returns 'embed_average', 'embed_greedy',
    'embed_extrema' (NaN if every pair is skipped), 'embed_skipped' (pairs whose reference has no
    known word, left out) and 'embed_empty_hyp' (hypotheses with no known word, scored 0).
    """
    hyps, refs = _pairs(hypotheses, references, "embedding_metrics")
    table = _lookup(word_vectors)
    scores: dict[str, list[float]] = {"embed_average": [], "embed_greedy": [], "embed_extrema": []}
    skipped = empty = 0
    for hyp, ref in zip(hyps, refs):
        r = np.array([table[w] for w in ref if w in table])
        h = np.array([table[w] for w in hyp if w in table])
        if r.size == 0:
            skipped += 1
            continue
        if h.size == 0:
            empty += 1
            values = (0.0, 0.0, 0.0)
        else:
            greedy = (_greedy(h, r) + _greedy(r, h)) / 2
            values = (_cos(h.mean(0), r.mean(0)), greedy, _cos(_extrema(h), _extrema(r)))
        for key, value in zip(scores, values):
            scores[key].append(value)
    out = {k: float(np.mean(v)) if v else math.nan for k, v in scores.items()}
    out.update(embed_skipped=float(skipped), embed_empty_hyp=float(empty))
    return out


def perplexity(total_nll: float, total_tokens: float) -> float:
    """exp(total_nll / total_tokens): total_nll the summed token negative log-likelihood in nats."""
    if total_tokens <= 0:
        raise ValueError(f"perplexity: total_tokens must be positive, got {total_tokens}; no token was scored.")
    with np.errstate(over="ignore"):
        return float(np.exp(np.float64(total_nll) / np.float64(total_tokens)))


def text_metrics(
    hyps: Sequence[Sentence], refs: Sequence[Sentence], word_vectors: WordVectors | None = None
) -> dict[str, float]:
    """Every generation metric in one flat dict: 'bleu' (= BLEU-4), 'bleu_1'..'bleu_4', 'dist_n',
    'intra_dist_n', 'ent_n' (n = 1, 2, 3), 'response_length' (mean hypothesis tokens) and, given word
    vectors, the `embedding_metrics` keys."""
    h, r = _pairs(hyps, refs, "text_metrics")
    out = bleu_n(h, r)
    out["bleu"] = out["bleu_4"]
    for n in NGRAM_ORDERS:
        out[f"dist_{n}"] = distinct(h, n)
        out[f"intra_dist_{n}"] = intra_distinct(h, n)
        out[f"ent_{n}"] = entropy(h, n)
    out["response_length"] = float(np.mean([len(t) for t in h]))
    if word_vectors is not None:
        out.update(embedding_metrics(h, r, word_vectors))
    return out
