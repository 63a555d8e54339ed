"""Product-description generation metrics on host Python: ROUGE-L and user-cared aspect coverage
(posterior-distillation PDG, spec `experiments_ads_text.md` §P3; BLEU and Dist are in `metrics/text.py`).

    rouge_l(hyps, refs)                                   mean ROUGE-L F-measure over pairs, 0..1
    aspect_coverage(hyps, aspects_per_example, lexicon)   mean share of each example's aspects mentioned
    mentioned_aspects(sentence, lexicon)                  the aspects a sentence mentions

A sentence is a list of tokens or a string split on whitespace, as in `metrics/text.py`: pass
tokenised text (e.g. `" ".join(vocab.tokenize(text))`, or the output of `decode_extended`), with
Chinese split into characters or words first.

ROUGE-L is the `rouge-score` package's (`RougeScorer(["rougeL"])`: F-measure of the longest common
subsequence, no stemming), scored on our whitespace tokens, not its default tokeniser: that one
lower-cases, turns every character outside a-z0-9 into a space and so drops punctuation, `__unk__`
markers and every Chinese character (a Chinese pair would score 0). Here tokens are compared exactly
as given (lower-case both sides before calling if case should not count). An empty hypothesis or
reference scores 0.

Aspect coverage is our metric (an automatic stand-in for the paper's human judgement of
"user-cared aspects"): an aspect counts as mentioned when one of its lexicon phrases occurs in the
hypothesis as a run of whole tokens (both lower-cased); an example scores the share of its
reference aspects mentioned, and the corpus score is the mean over the examples with at least one
aspect (NaN if none has any). The lexicon of the generated corpus is
`jdjax.data.products.ASPECT_PHRASES`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

Sentence = str | Sequence[str]


class _Tokens:
    """rouge-score's tokenizer interface: splits on whitespace and keeps every token as it is."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def _tokens(sentence: Sentence) -> list[str]:
    return sentence.split() if isinstance(sentence, str) else [str(t) for t in sentence]


def rouge_l(hyps: Sequence[Sentence], refs: Sequence[Sentence]) -> float:
    """Mean over (hypothesis, reference) pairs of the ROUGE-L F-measure, in 0..1."""
    if len(hyps) != len(refs):
        raise ValueError(f"rouge_l: {len(hyps)} hypotheses but {len(refs)} references; give one reference each.")
    if not hyps:
        raise ValueError("rouge_l: the corpus is empty; give at least one hypothesis/reference pair.")
    from rouge_score import rouge_scorer  # here: it imports nltk, which imports scipy.stats and sklearn (seconds)

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokens())
    scores = [scorer.score(" ".join(_tokens(r)), " ".join(_tokens(h)))["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return float(sum(scores) / len(scores))


def _contains(tokens: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(tokens[i] == phrase[0] and tokens[i:i + n] == phrase for i in range(len(tokens) - n + 1))


def mentioned_aspects(sentence: Sentence, aspect_lexicon: Mapping[str, Iterable[str]],
                      aspects: Iterable[str] | None = None) -> set[str]:
    """The aspects (of `aspects`, default all of the lexicon) with a lexicon phrase in `sentence`."""
    tokens = [t.lower() for t in _tokens(sentence)]
    names = aspect_lexicon if aspects is None else aspects
    return {a for a in names if any(_contains(tokens, p.lower().split()) for p in _phrases(aspect_lexicon, a))}


def _phrases(aspect_lexicon: Mapping[str, Iterable[str]], aspect: str) -> Iterable[str]:
    if aspect not in aspect_lexicon:
        raise ValueError(f"aspect {aspect!r} is not in the aspect lexicon (which has {sorted(aspect_lexicon)}); "
                         "give the lexicon of the data set the aspects come from.")
    return aspect_lexicon[aspect]


def _check_one_list_each(metric: str, hyps: Sequence, aspects_per_example: Sequence):
    if len(hyps) != len(aspects_per_example):
        raise ValueError(f"{metric}: {len(hyps)} hypotheses but {len(aspects_per_example)} aspect lists; "
                         "give one list (possibly empty) per hypothesis.")


def aspect_coverage(hyps: Sequence[Sentence], aspects_per_example: Sequence[Iterable[str]],
                    aspect_lexicon: Mapping[str, Iterable[str]]) -> float:
    """Mean over examples with aspects of (reference aspects the hypothesis mentions / reference
    aspects); NaN when no example has an aspect."""
    _check_one_list_each("aspect_coverage", hyps, aspects_per_example)
    shares = []
    for hyp, aspects in zip(hyps, aspects_per_example):
        aspects = list(dict.fromkeys(aspects))
        if aspects:
            shares.append(len(mentioned_aspects(hyp, aspect_lexicon, aspects)) / len(aspects))
    return float(sum(shares) / len(shares)) if shares else math.nan


def aspect_precision(hyps: Sequence[Sentence], aspects_per_example: Sequence[Iterable[str]],
                     aspect_lexicon: Mapping[str, Iterable[str]]) -> float:
    """Share of the aspects the hypotheses mention (any aspect of the lexicon) that their references
    hold, pooled over examples: sum |mentioned & true| / sum |mentioned|; NaN when no hypothesis
    mentions an aspect. The counterweight of `aspect_coverage`: naming every aspect a product type
    has would cover all of them at a low precision."""
    _check_one_list_each("aspect_precision", hyps, aspects_per_example)
    mentioned = true = 0
    for hyp, aspects in zip(hyps, aspects_per_example):
        named = mentioned_aspects(hyp, aspect_lexicon)
        mentioned += len(named)
        true += len(named & set(aspects))
    return true / mentioned if mentioned else math.nan
