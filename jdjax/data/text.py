"""Tokenisers for the text methods (dialogue generation, product-description generation).

    texts = dialogue.dialogue_texts(splits["train"])  # training turns, each once (jdjax.data.dialogue)
    vocab = build_vocab("word", texts, workdir + "/vocab.json", max_size=40000)
    vocab.encode("Hi there! __EOT__ how are you?")   # [ids], lower-cased words and marks
    batch = encode_pairs(vocab, contexts, responses, max_context=120, max_response=40)
    batch["context"]                                  # [B, 120] int32, padded with 0

Two vocabularies with one interface (`tokenize`, `encode`, `decode`, `size`, `save`, `load`)
and the same special ids:

    0 __null__ (padding)   1 __start__ (BOS)   2 __end__ (EOS)   3 __unk__   4 __EOT__ (turn delimiter)

* `WordVocab`: ParlAI's `re` tokeniser (`\\w+|[^\\w\\s]`: runs of word characters, and every
  other non-space character alone), lower-cased; `__EOT__` is kept as one token wherever it
  stands between spaces. Chinese: `chinese="words"` segments with jieba (`jieba.lcut`),
  `chinese="chars"` makes every Han character a token (other words and marks as above). The
  vocabulary is the specials, then the training tokens by descending count, ties in
  alphabetical order (so it is the same on every machine), cut to `max_size` entries in all
  (specials included) and to tokens seen at least `min_count` times.
* `SentencePieceVocab`: a SentencePiece model (unigram by default) trained on the training
  texts, with ParlAI's special names at the ids above and `__EOT__` a user-defined symbol;
  lower-cased by the `nmt_nfkc_cf` normalisation unless `lower=False`.

`build_vocab` loads the vocabulary when its file exists and builds and saves it otherwise:
a resumed run reads the ids it started with. Files are written atomically (`jdjax.io`).
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Iterable, Sequence

import jieba
import numpy as np
import regex
import sentencepiece as spm

from jdjax import io as jio

PAD, BOS, EOS, UNK, EOT = "__null__", "__start__", "__end__", "__unk__", "__EOT__"
SPECIALS = (PAD, BOS, EOS, UNK, EOT)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, EOT_ID = range(5)
WORD_VOCAB_FORMAT = "jdjax.WordVocab/1"
CHINESE = (None, "words", "chars")

_PATTERNS = {  # the tokeniser of each `chinese` mode but "words" (jieba); __EOT__ is matched first
    None: regex.compile(r"__EOT__|\w+|[^\w\s]"),
    "chars": regex.compile(r"__EOT__|\p{Han}|[^\W\p{Han}]+|[^\w\s]"),
}


class WordVocab:
    """Word-level vocabulary: `tokens[i]` is the token of id i, the five specials first."""

    def __init__(self, tokens: Sequence[str], *, chinese: str | None = None, lower: bool = True,
                 max_size: int | None = None, min_count: int = 1):
        if tuple(tokens[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a WordVocab starts with the specials {SPECIALS}, got {tuple(tokens[:len(SPECIALS)])}.")
        if len(set(tokens)) != len(tokens):
            raise ValueError("the tokens of a WordVocab must be distinct.")
        _check_options(chinese, max_size, min_count)
        self.tokens = list(tokens)
        self.chinese, self.lower, self.max_size, self.min_count = chinese, lower, max_size, min_count
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts: Iterable[str], *, max_size: int | None = None, min_count: int = 1,
              chinese: str | None = None, lower: bool = True) -> WordVocab:
        """The vocabulary of `texts`: specials, then tokens by descending count (ties alphabetical),
        `max_size` entries at most (specials included), each seen at least `min_count` times."""
        _check_options(chinese, max_size, min_count)
        tokenize = cls(SPECIALS, chinese=chinese, lower=lower).tokenize
        counts = Counter(t for text in texts for t in tokenize(text))
        for special in SPECIALS:
            counts.pop(special, None)
        words = [w for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if c >= min_count]
        if max_size is not None:
            words = words[:max_size - len(SPECIALS)]
        return cls([*SPECIALS, *words], chinese=chinese, lower=lower, max_size=max_size, min_count=min_count)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def options(self) -> dict:
        """The settings the vocabulary was built with (what `build_vocab` checks on reuse)."""
        return {"chinese": self.chinese, "lower": self.lower, "max_size": self.max_size, "min_count": self.min_count}

    def tokenize(self, text: str) -> list[str]:
        """The tokens of `text` (lower-cased unless `lower=False`; `__EOT__` kept as it is)."""
        if self.chinese == "words":
            tokens = []
            for i, part in enumerate(text.split(EOT)):
                if i:
                    tokens.append(EOT)
                tokens.extend(t for t in jieba.lcut(part) if t.strip())
        else:
            tokens = _PATTERNS[self.chinese].findall(text)
        return [t.lower() if self.lower and t != EOT else t for t in tokens]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, `__unk__` (3) for tokens outside the vocabulary; no BOS/EOS."""
        return [self._ids.get(t, UNK_ID) for t in self.tokenize(text)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """The tokens of `ids` up to the first `__end__`, joined by spaces; `skip_special` drops
        `__null__` and `__start__` (`__unk__` and `__EOT__` are kept, as ParlAI does)."""
        tokens = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if not (skip_special and i in (PAD_ID, BOS_ID)):
                tokens.append(self.tokens[i])
        return " ".join(tokens)

    def save(self, path) -> None:
        """Writes the vocabulary as JSON to `path` (local or gs://), atomically."""
        jio.as_path(path).parent.mkdir(parents=True, exist_ok=True)
        jio.write_json(path, {"format": WORD_VOCAB_FORMAT, **self.options(), "tokens": self.tokens})

    @classmethod
    def load(cls, path) -> WordVocab:
        if not jio.as_path(path).exists():
            raise FileNotFoundError(f"word vocabulary {str(path)!r} does not exist; build it with build_vocab.")
        try:
            data = jio.read_json(path)
            if data.get("format") != WORD_VOCAB_FORMAT:
                raise ValueError(f"format {data.get('format')!r} is not {WORD_VOCAB_FORMAT!r}")
            return cls(data["tokens"], chinese=data["chinese"], lower=data["lower"], max_size=data["max_size"],
                       min_count=data["min_count"])
        except (UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"word vocabulary {str(path)!r} is not a WordVocab file or is damaged "
                             f"({type(e).__name__}: {e}); delete it to rebuild it from the training data.") from e


class SentencePieceVocab:
    """A SentencePiece model with the special ids of `WordVocab` (pad 0, bos 1, eos 2, unk 3, __EOT__ 4)."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        got = [self._sp.id_to_piece(i) for i in range(min(len(SPECIALS), self._sp.get_piece_size()))]
        if got != list(SPECIALS):
            raise ValueError(f"the SentencePiece model's first pieces are {got}, not {list(SPECIALS)}; train it with "
                             "SentencePieceVocab.train.")

    @classmethod
    def train(cls, texts: Iterable[str], path=None, *, vocab_size: int = 8000, model_type: str = "unigram",
              lower: bool = True, character_coverage: float = 1.0, **trainer_options) -> SentencePieceVocab:
        """Trains on `texts` (one sentence each; empty ones are skipped) and saves the model to `path`
        if given. `vocab_size` is an upper bound (`hard_vocab_limit=False`), so a tiny corpus gives
        a smaller model instead of an error; `trainer_options` go to `SentencePieceTrainer.train`
        (e.g. `max_sentence_length`, 4192 bytes by default: longer sentences are left out)."""
        if vocab_size <= len(SPECIALS):
            raise ValueError(f"vocab_size must exceed the {len(SPECIALS)} special pieces, got {vocab_size}.")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=(t for t in texts if t.strip()), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            normalization_rule_name="nmt_nfkc_cf" if lower else "nmt_nfkc",
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            pad_piece=PAD, bos_piece=BOS, eos_piece=EOS, unk_piece=UNK, user_defined_symbols=[EOT],
            hard_vocab_limit=False, minloglevel=2, **trainer_options)
        vocab = cls(model.getvalue())
        if path is not None:
            vocab.save(path)
        return vocab

    @property
    def size(self) -> int:
        return self._sp.get_piece_size()

    def tokenize(self, text: str) -> list[str]:
        """The pieces of `text`."""
        return self._sp.encode(text, out_type=str)

    def encode(self, text: str) -> list[int]:
        """Piece ids of `text`; no BOS/EOS."""
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """The text of `ids` up to the first `__end__`; `skip_special` drops `__null__` and `__start__`
        (with `skip_special=False` they are written as their piece names)."""
        kept = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if not (skip_special and i in (PAD_ID, BOS_ID)):
                kept.append(i)
        parts, run = [], []  # SentencePiece's decode drops control pieces: write them between decoded runs
        for i in kept + [PAD_ID]:
            if i in (PAD_ID, BOS_ID):
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return " ".join(p for p in parts[:-1] if p)

    def save(self, path) -> None:
        """Writes the serialised model to `path` (local or gs://), atomically."""
        jio.as_path(path).parent.mkdir(parents=True, exist_ok=True)
        jio.write_bytes(path, self.model_proto)

    @classmethod
    def load(cls, path) -> SentencePieceVocab:
        if not jio.as_path(path).exists():
            raise FileNotFoundError(f"SentencePiece model {str(path)!r} does not exist; build it with build_vocab.")
        try:
            return cls(jio.as_path(path).read_bytes())
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{str(path)!r} is not a SentencePiece model trained by SentencePieceVocab or is "
                             f"damaged ({e}); delete it to retrain it from the training data.") from e


Vocab = WordVocab | SentencePieceVocab
VOCABS = {"word": WordVocab, "sentencepiece": SentencePieceVocab}


def build_vocab(kind: str, texts: Iterable[str], path, **options) -> Vocab:
    """The vocabulary saved at `path` if the file exists, else one built from `texts` (consumed only
    then) and saved there. `kind` is "word" (`options`: max_size, min_count, chinese, lower) or
    "sentencepiece" (`options` go to `SentencePieceVocab.train`). A saved word vocabulary built
    with other options is an error; a SentencePiece file is used as it is."""
    if kind not in VOCABS:
        raise ValueError(f"vocabulary kind must be one of {sorted(VOCABS)}, got {kind!r}.")
    if jio.as_path(path).exists():
        vocab = VOCABS[kind].load(path)
        if kind == "word":
            defaults = WordVocab(SPECIALS).options()
            if set(options) - set(defaults):
                raise ValueError(f"unknown word vocabulary options {sorted(set(options) - set(defaults))}; the options "
                                 f"are {sorted(defaults)}.")
            wanted = {**defaults, **options}
            if wanted != vocab.options():
                raise ValueError(f"word vocabulary {str(path)!r} was built with {vocab.options()}, but this run asks "
                                 f"for {wanted}; token ids would not match. Restore the settings or delete the file "
                                 "to rebuild it (checkpoints trained with it then no longer apply).")
        return vocab
    if kind == "word":
        vocab = WordVocab.build(texts, **options)
        vocab.save(path)
        return vocab
    return SentencePieceVocab.train(texts, path, **options)


def workdir_vocab(data_cfg, train_texts: Iterable[str], workdir, sentencepiece_texts: Iterable[str] | None = None):
    """The vocabulary a task's `data_cfg` asks for (`vocab` 'word' with `vocab_size` as max_size,
    `min_count`, `chinese`; or 'sentencepiece' of `vocab_size` pieces), built from the training texts
    into workdir/vocab.json or vocab.model once and read back on resume. `sentencepiece_texts`
    replaces `train_texts` for SentencePiece (default: the same texts)."""
    if data_cfg.vocab == "word":
        return build_vocab("word", train_texts, os.path.join(workdir, "vocab.json"), max_size=data_cfg.vocab_size,
                           min_count=data_cfg.min_count, chinese=data_cfg.chinese or None)
    texts = train_texts if sentencepiece_texts is None else sentencepiece_texts
    return build_vocab("sentencepiece", texts, os.path.join(workdir, "vocab.model"), vocab_size=data_cfg.vocab_size)


def pad_batch(seqs: Sequence[Sequence[int]], max_len: int, pad_id: int = PAD_ID, truncate: str = "left") -> np.ndarray:
    """int32 [B, max_len]: each sequence cut to `max_len` ids (`truncate="left"` keeps the last
    ones, `"right"` the first ones), then padded on the right with `pad_id`."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}.")
    if truncate not in ("left", "right"):
        raise ValueError(f"truncate must be 'left' (keep the end) or 'right' (keep the start), got {truncate!r}.")
    out = np.full((len(seqs), max_len), pad_id, np.int32)  # [B, L]
    for row, seq in zip(out, seqs):
        seq = seq[len(seq) - max_len:] if truncate == "left" and len(seq) > max_len else seq[:max_len]
        row[:len(seq)] = seq
    return out


def encode_pairs(vocab: Vocab, contexts: Sequence[str], responses: Sequence[str], max_context: int,
                 max_response: int) -> dict[str, np.ndarray]:
    """Teacher-forcing arrays (int32, padded with 0) for B context/response pairs:

      context      [B, max_context]   the context's ids, cut on the left (the latest turns are kept);
      response_in  [B, max_response]  __start__ + response ids;
      response_out [B, max_response]  response ids + __end__.

    A response is cut on the right to `max_response - 1` ids, so `response_out` always ends with
    `__end__` (ParlAI instead cuts after appending it, dropping `__end__` from long labels)."""
    if len(contexts) != len(responses):
        raise ValueError(f"got {len(contexts)} contexts but {len(responses)} responses; they are pairs.")
    if max_context < 1 or max_response < 1:
        raise ValueError(f"max_context and max_response must be >= 1, got {max_context} and {max_response}.")
    responses = [vocab.encode(r)[:max_response - 1] for r in responses]
    return {
        "context": pad_batch([vocab.encode(c) for c in contexts], max_context, truncate="left"),
        "response_in": pad_batch([[BOS_ID, *r] for r in responses], max_response, truncate="right"),
        "response_out": pad_batch([[*r, EOS_ID] for r in responses], max_response, truncate="right"),
    }


def _check_options(chinese, max_size, min_count) -> None:
    if chinese not in CHINESE:
        raise ValueError(f"chinese must be one of {CHINESE} (None: no segmentation), got {chinese!r}.")
    if max_size is not None and max_size < len(SPECIALS):
        raise ValueError(f"max_size counts the {len(SPECIALS)} special tokens, so it must be >= {len(SPECIALS)}, "
                         f"got {max_size}.")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}.")
