"""Generation metrics: ROUGE-L against rouge-score's own scorer, aspect coverage and precision on hand cases."""

from __future__ import annotations

import math

import pytest
from rouge_score import rouge_scorer

from jdjax.metrics.generation import aspect_coverage, aspect_precision, mentioned_aspects, rouge_l

LEXICON = {"grip": ("grip",), "comfort": ("comfortable", "comfort"), "boil speed": ("boils quickly", "boils fast")}


def test_rouge_l_matches_rouge_score_and_is_one_on_identical_text():
    hyps = ["the cat sat on the mat", "a quick brown fox jumps", "nothing here"]
    refs = ["the cat was on the mat today", "the quick brown dog jumps high", "completely different words"]
    reference = rouge_scorer.RougeScorer(["rougeL"])  # its own tokeniser agrees on lower-case alphanumeric text
    expected = sum(reference.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
    assert rouge_l(hyps, refs) == pytest.approx(expected)
    # hand check of the first pair: LCS "the cat on the mat" = 5 of 6 and 7 tokens
    assert rouge_l(hyps[:1], refs[:1]) == pytest.approx(2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7))
    assert rouge_l(refs, refs) == 1.0
    assert rouge_l([["这", "是", "好", "的"]], ["这 是 好 的"]) == 1.0  # tokens kept as given (CJK, lists)
    assert rouge_l(["Grip ."], ["grip ."]) == pytest.approx(0.5)  # case and punctuation count
    assert rouge_l([""], ["a b"]) == 0.0
    with pytest.raises(ValueError, match="one reference"):
        rouge_l(["a"], ["a", "b"])


def test_aspect_coverage_hand_cases():
    hyps = ["great grip and it boils fast", "so Comfortable !", "it boils , quickly", "anything"]
    aspects = [("grip", "boil speed", "comfort"), ("comfort",), ("boil speed",), ()]
    assert mentioned_aspects(hyps[0], LEXICON) == {"grip", "boil speed"}
    assert mentioned_aspects(["boils", "quickly"], LEXICON) == {"boil speed"}
    assert mentioned_aspects(hyps[2], LEXICON) == set()  # a phrase is a run of whole tokens
    assert mentioned_aspects("gripping", LEXICON) == set()
    # (2/3 + 1 + 0) / 3; the example without aspects is left out
    assert aspect_coverage(hyps, aspects, LEXICON) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert aspect_coverage(hyps[:1], [("grip", "grip")], LEXICON) == 1.0  # repeated aspects count once
    assert math.isnan(aspect_coverage(["x"], [()], LEXICON))
    with pytest.raises(ValueError, match="not in the aspect lexicon"):
        aspect_coverage(["x"], [("colour",)], LEXICON)
    with pytest.raises(ValueError, match="one list"):
        aspect_coverage(["x", "y"], [("grip",)], LEXICON)


def test_aspect_precision_pools_the_mentions_of_every_aspect():
    hyps = ["great grip and it boils fast", "so comfortable , great grip", "anything", "grip"]
    aspects = [("grip",), ("comfort", "grip"), ("grip",), ()]
    # mentions: {grip, boil speed} 1 true of 2; {comfort, grip} 2 of 2; none; {grip} 0 of 1 -> 3 / 5
    assert aspect_precision(hyps, aspects, LEXICON) == pytest.approx(3 / 5)
    assert aspect_precision(hyps[1:2], aspects[1:2], LEXICON) == 1.0
    assert math.isnan(aspect_precision(["anything"], [("grip",)], LEXICON))
    # naming every aspect covers them all but at a third of the precision
    everything = ["grip , comfort , boils fast"]
    assert aspect_coverage(everything, [("grip",)], LEXICON) == 1.0
    assert aspect_precision(everything, [("grip",)], LEXICON) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="one list"):
        aspect_precision(["x", "y"], [("grip",)], LEXICON)
