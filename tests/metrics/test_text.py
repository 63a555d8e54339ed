"""Text metrics (jdjax/metrics/text.py): hand-computed Dist / intra-Dist / Ent, BLEU against sacrebleu,
embedding metrics on 2-D hand vectors, perplexity."""

import math

import numpy as np
import pytest
import sacrebleu
from sacrebleu.metrics import BLEU

from jdjax.metrics import text

HYPS = [["a", "b", "a", "b"], ["a", "c"]]
# unigrams  a b a b | a c        -> 6 in all, distinct {a, b, c} = 3       Dist-1 = 3/6
# bigrams   ab ba ab | ac        -> 4 in all, distinct {ab, ba, ac} = 3    Dist-2 = 3/4
# trigrams  aba bab | (none)     -> 2 in all, 2 distinct                    Dist-3 = 1
# intra-1:  {a, b} / 4 = 1/2,  {a, c} / 2 = 1          -> 3/4
# intra-2:  {ab, ba} / 3 = 2/3, {ac} / 1 = 1           -> 5/6
# intra-3:  2/2 = 1, no trigram counts as 1            -> 1
# Ent-1: p = (a 3/6, b 2/6, c 1/6)  -> -(1/2 ln 1/2 + 1/3 ln 1/3 + 1/6 ln 1/6)
# Ent-2: p = (ab 2/4, ba 1/4, ac 1/4) -> 1/2 ln 2 + 2 * 1/4 ln 4 = 3/2 ln 2
# Ent-3: p = (1/2, 1/2) -> ln 2


def test_distinct_intra_entropy_by_hand():
    assert text.distinct(HYPS, 1) == pytest.approx(3 / 6)
    assert text.distinct(HYPS, 2) == pytest.approx(3 / 4)
    assert text.distinct(HYPS, 3) == pytest.approx(1.0)
    assert text.intra_distinct(HYPS, 1) == pytest.approx(3 / 4)
    assert text.intra_distinct(HYPS, 2) == pytest.approx(5 / 6)
    assert text.intra_distinct(HYPS, 3) == pytest.approx(1.0)
    ent1 = -(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6)  # 1.0114
    assert text.entropy(HYPS, 1) == pytest.approx(ent1)
    assert text.entropy(HYPS, 2) == pytest.approx(1.5 * math.log(2))
    assert text.entropy(HYPS, 3) == pytest.approx(math.log(2))
    strings = ["a b a b", "a  c"]  # strings are split on whitespace
    for n in (1, 2, 3):
        assert text.distinct(strings, n) == text.distinct(HYPS, n)
        assert text.entropy(strings, n) == text.entropy(HYPS, n)
    assert text.distinct([["a"]], 2) == 0.0 and text.entropy([[]], 1) == 0.0


def test_bleu_matches_sacrebleu():
    hyps = ["the cat sat on the mat", "a dog runs in the park today", "hello there"]
    refs = ["the cat is on the mat", "the dog runs in a park", "hello there friend"]
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score
    assert 0 < expected < 100
    assert text.bleu(hyps, refs) == pytest.approx(expected)
    assert text.bleu([h.split() for h in hyps], [r.split() for r in refs]) == pytest.approx(expected)
    per_order = text.bleu_n(hyps, refs)
    for n in (1, 2, 3, 4):
        ref_n = BLEU(tokenize="none", max_ngram_order=n).corpus_score(hyps, [refs]).score
        assert per_order[f"bleu_{n}"] == pytest.approx(ref_n)
    assert per_order["bleu_4"] == pytest.approx(expected)
    # BLEU-1 by hand: "a b c d" vs "a b c x": 3 of 4 unigrams match, equal lengths (BP = 1) -> 75.
    assert text.bleu_n(["a b c d"], ["a b c x"], max_order=1) == {"bleu_1": pytest.approx(75.0)}


def test_bleu_perfect_and_errors():
    refs = [["we", "like", "green", "tea", "."], ["see", "you", "soon", "then"]]
    assert text.bleu(refs, refs) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="one reference per hypothesis"):
        text.bleu(refs, refs[:1])
    with pytest.raises(ValueError, match="empty"):
        text.bleu([], [])


# x = (1, 0), y = (0, 1), z = (1, 1), w = (-2, 0.5); "unk" has no vector, "zero" a zero vector.
WV = {"x": np.array([1.0, 0.0]), "y": np.array([0.0, 1.0]), "z": np.array([1.0, 1.0]),
      "w": np.array([-2.0, 0.5]), "zero": np.zeros(2)}
R2, R17 = math.sqrt(2), math.sqrt(4.25)
EMB_HYPS = [["x"], ["x", "y"], ["w", "x", "unk"], ["x"], ["unk", "zero"]]
EMB_REFS = [["y"], ["z"], ["x", "unk"], ["unk"], ["x"]]
# pair 1: x vs y                 average 0; greedy 0; extrema 0
# pair 2: {x, y} vs z            average cos((.5, .5), (1, 1)) = 1; greedy both ways 1/sqrt2; extrema (1, 1).(1, 1) -> 1
# pair 3: {w, x} vs x            average cos((-.5, .25), (1, 0)) = -.5 / sqrt(.3125);
#                                greedy hyp->ref (cos(w, x) + 1) / 2, ref->hyp 1; cos(w, x) = -2 / sqrt(4.25)
#                                extrema hyp: dim0 max 1, min -2 -> -2; dim1 0.5 -> (-2, .5);
#                                cos((-2, .5), x) = -2 / sqrt(4.25)
# pair 4: the reference has no known word -> skipped
# pair 5: the hypothesis has no known word ("zero" counts as unknown) -> 0, 0, 0
COS_WX = -2 / R17
EXPECTED_EMB = {
    "embed_average": (0 + 1 + (-0.5 / math.sqrt(0.3125)) + 0) / 4,
    "embed_greedy": (0 + 1 / R2 + ((COS_WX + 1) / 2 + 1) / 2 + 0) / 4,
    "embed_extrema": (0 + 1 + COS_WX + 0) / 4,
    "embed_skipped": 1.0,
    "embed_empty_hyp": 1.0,
}


def test_embedding_metrics_by_hand():
    got = text.embedding_metrics(EMB_HYPS, EMB_REFS, WV)
    assert got == pytest.approx(EXPECTED_EMB)
    vocab = list(WV)
    pair = text.embedding_metrics(EMB_HYPS, EMB_REFS, (vocab, np.stack([WV[w] for w in vocab])))
    assert pair == pytest.approx(EXPECTED_EMB)
    all_skipped = text.embedding_metrics([["x"]], [["unk"]], WV)
    assert math.isnan(all_skipped["embed_average"]) and all_skipped["embed_skipped"] == 1.0
    with pytest.raises(ValueError, match="matrix"):
        text.embedding_metrics(EMB_HYPS, EMB_REFS, (vocab, np.zeros((2, 2))))


def test_perplexity():
    assert text.perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert text.perplexity(0.0, 3) == 1.0
    with pytest.raises(ValueError, match="total_tokens"):
        text.perplexity(1.0, 0)


def test_text_metrics_collects_everything():
    refs = [["a", "b", "c", "d"], ["a", "x"]]
    out = text.text_metrics(HYPS, refs, word_vectors={"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])})
    keys = {"bleu", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "response_length"}
    keys |= {f"{m}_{n}" for m in ("dist", "intra_dist", "ent") for n in (1, 2, 3)}
    keys |= set(EXPECTED_EMB)
    assert set(out) == keys
    assert all(type(v) is float for v in out.values())
    assert out["dist_1"] == text.distinct(HYPS, 1) and out["ent_2"] == text.entropy(HYPS, 2)
    assert out["bleu"] == out["bleu_4"] == pytest.approx(text.bleu(HYPS, refs))
    assert out["response_length"] == 3.0
    assert "embed_average" not in text.text_metrics(HYPS, refs)
