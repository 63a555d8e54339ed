"""The CLIP byte-level BPE tokenizer, as OpenAI CLIP defines it.

Pipeline for one text (same order as OpenAI's `simple_tokenizer`):

1. cleanup: Unicode NFC, `html.unescape` twice, every whitespace run -> one space, strip.
   (OpenAI also runs `ftfy.fix_text`; ftfy is not a dependency here. NFC is ftfy's default
   normalisation; its other fixes -- mojibake, curly quotes, full-width forms, ligatures --
   are not applied, so texts that need them tokenise differently from OpenAI's: `don’t` (curly
   apostrophe) or the mojibake `cafÃ©`. Run `ftfy.fix_text` first where that matters; otherwise
   the ids equal OpenAI's, which tests/data/test_clip_tokenizer.py checks on the real file.)
2. lower-case;
3. pre-tokenise with the CLIP pattern (case-insensitive)
   `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`
   -- runs of letters, single digits, runs of other non-space characters, English
   contractions, and the two special tokens (which, as in OpenAI's code, are recognised
   even inside user text);
4. map each pre-token's UTF-8 bytes to printable characters (`bytes_to_unicode`);
5. byte-level BPE: the pre-token's last symbol carries the end-of-word mark `</w>`; the
   adjacent pair with the lowest merge rank is merged everywhere (left to right, without
   overlap) until no adjacent pair has a rank.

Vocabulary layout (OpenAI's): ids 0..255 are the 256 byte symbols in `bytes_to_unicode`
order (`'!'` is 0), ids 256..511 the same symbols followed by `</w>`, then one id per merge
(its two symbols joined) in merge order, then `<|startoftext|>` and `<|endoftext|>`. With
the standard file's first 48,894 merges: 49,408 tokens, SOT 49406, EOT 49407.

`tokenize` returns int32 `[B, context_length]`: SOT, tokens, EOT, zeros. A text that does
not fit is cut to `context_length` tokens and its last token set to EOT.

Usage:
    tok = CLIPTokenizer.from_file("/path/to/bpe_simple_vocab_16e6.txt.gz")
    ids = tok(["a photo of a cat", "a dog"])          # [2, 77] int32
    tok.decode(ids[0])                                # 'a photo of a cat'
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import os
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

try:  # \p{L} / \p{N} need the third-party `regex` module (pip install regex).
    import regex as _re
except ImportError:  # pragma: no cover - exercised only without the dependency
    _re = None

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
NUM_MERGES = 49152 - 256 - 2  # 48894: the merges OpenAI takes from the standard file
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
CONTEXT_LENGTH = 77
PAD_ID = 0

CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _require_regex():
    if _re is None:
        raise ImportError(
            "The CLIP tokenizer needs the `regex` package for its Unicode-class pattern "
            "(\\p{L}, \\p{N}); the standard `re` module cannot express it. Install it with "
            "`pip install regex`."
        )
    return _re


@functools.lru_cache(maxsize=1)
def _compiled_patterns():
    re = _require_regex()
    return re.compile(CLIP_PATTERN, re.IGNORECASE), re.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Byte value -> printable character, in OpenAI's order (printable bytes first).

    The 188 bytes that are printable Latin-1 characters (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) map to
    themselves; the other 68 map to chr(256), chr(257), ... in increasing byte order. The
    dict's insertion order is the order of vocabulary ids 0..255.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """NFC, html-unescape twice, collapse whitespace, strip, lower-case."""
    _, whitespace = _compiled_patterns()
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return whitespace.sub(" ", text).strip().lower()


def _parse_merges(merges: Iterable[str | Sequence[str]]) -> list[tuple[str, str]]:
    parsed = []
    for i, merge in enumerate(merges):
        parts = merge.split() if isinstance(merge, str) else list(merge)
        if len(parts) != 2 or not all(isinstance(p, str) and p and p.split() == [p] for p in parts):
            raise ValueError(
                f"Merge {i} is {merge!r}; every merge must be two non-empty symbols without "
                "whitespace, given as 'a b' or ('a', 'b')."
            )
        parsed.append((parts[0], parts[1]))
    return parsed


def read_merges(path: str | os.PathLike, num_merges: int | None = NUM_MERGES) -> list[tuple[str, str]]:
    """Merges from a CLIP BPE file: a header line, then one 'a b' merge a line.

    Reads gzip (`bpe_simple_vocab_16e6.txt.gz`) or, detected by its magic bytes, plain text
    (e.g. a Hugging Face `merges.txt`). Keeps the first `num_merges` merges, as OpenAI does
    (default 48,894); `None` keeps all of them.

    Header rule: like OpenAI's loader, line 0 is dropped whatever else it holds, but it must
    contain '#version'. OpenAI's own file (also shipped in the openai-clip and open_clip_torch packages)
    starts `"bpe_simple_vocab_16e6.txt#version: 0.2` -- a stray tar member name before the
    header -- and a Hugging Face `merges.txt` starts `#version: 0.2`. A first line without
    '#version' is refused rather than dropped: the file is either not a merges file or a
    header-less one, whose first merge OpenAI's loader would silently lose (shifting every id).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CLIP BPE vocabulary file {path!r} does not exist. Download OpenAI's "
            "`bpe_simple_vocab_16e6.txt.gz` (it ships in the openai/CLIP repository under "
            "clip/, and in the `openai-clip` package: `pip install openai-clip`) and pass its path."
        )
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(
            f"CLIP BPE vocabulary file {path!r} is corrupt ({type(e).__name__}: {e}). Expected "
            "gzip-compressed UTF-8 text like OpenAI's `bpe_simple_vocab_16e6.txt.gz`; download "
            "it again."
        ) from e
    lines = text.split("\n")
    if "#version" not in lines[0]:
        raise ValueError(
            f"CLIP BPE vocabulary file {path!r} has no '#version' header on its first line "
            f"(first line: {lines[0][:80]!r}), so it is not a CLIP/GPT-2 merges file, or it lacks "
            "the header line that OpenAI's loader skips. Pass OpenAI's "
            "`bpe_simple_vocab_16e6.txt.gz`, or add a '#version: 0.2' first line to a header-less "
            "merges file."
        )
    body = lines[1:]
    while body and not body[-1].strip():
        body.pop()
    if num_merges is not None:
        if len(body) < num_merges:
            raise ValueError(
                f"CLIP BPE vocabulary file {path!r} holds {len(body)} merges but {num_merges} "
                "are needed (OpenAI's file holds 262,144). The file is truncated or not the "
                "standard one; download it again, or pass num_merges=None to use all merges."
            )
        body = body[:num_merges]
    try:
        return _parse_merges(body)
    except ValueError as e:
        raise ValueError(f"CLIP BPE vocabulary file {path!r} is corrupt: {e}") from e


class CLIPTokenizer:
    """OpenAI CLIP's byte-level BPE tokenizer (see the module docstring).

    Args:
      merges: merges in rank order, each 'a b' or ('a', 'b'); symbols are byte-level
        characters (see `bytes_to_unicode`), a word's last symbol ending in '</w>'.
      cache_size: entries of the per-pre-token BPE cache (LRU).
    """

    def __init__(self, merges: Iterable[str | Sequence[str]], *, cache_size: int = 1 << 16):
        self._pattern, _ = _compiled_patterns()
        self.merges = _parse_merges(merges)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        base = list(self.byte_encoder.values())
        vocab = base + [s + END_OF_WORD for s in base] + ["".join(m) for m in self.merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {}
        for i, token in enumerate(vocab):
            if token in self.encoder:
                merge = i - 512 if i < 512 + len(self.merges) else self.encoder[token] - 512
                raise ValueError(
                    f"Merge {merge} {self.merges[merge]} makes {token!r}, which is also token "
                    f"{self.encoder[token] if merge == i - 512 else i}; each merge must create a "
                    "new symbol (not a byte symbol, an earlier merge or a special token)."
                )
            self.encoder[token] = i
        self.decoder: list[str] = vocab
        self.bpe_ranks = {m: r for r, m in enumerate(self.merges)}
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self._special = {SOT_TOKEN: (self.sot_token_id,), EOT_TOKEN: (self.eot_token_id,)}
        # id -> bytes it decodes to; an end-of-word mark becomes a trailing space.
        self._id_bytes = []
        for i, token in enumerate(vocab):
            if token in self._special:
                self._id_bytes.append(token.encode("ascii"))
                continue
            word_end = token.endswith(END_OF_WORD)
            body = token[: -len(END_OF_WORD)] if word_end else token
            if not body or any(c not in self.byte_decoder for c in body):
                raise ValueError(
                    f"Merge {i - 512} {self.merges[i - 512]} is not made of byte-level symbols: "
                    "symbols are characters of `bytes_to_unicode()` (the UTF-8 bytes of the text, "
                    "remapped), a word's last one followed by '</w>'. Map raw text through "
                    "`bytes_to_unicode` before writing merges."
                )
            self._id_bytes.append(self._symbol_bytes(body) + (b" " if word_end else b""))
        self.cache_size = cache_size
        self._bpe_ids = functools.lru_cache(maxsize=cache_size)(self._bpe_ids_uncached)

    # Pickling (e.g. into data-loader worker processes): rebuild the cache on arrival.
    def __getstate__(self):
        return {"merges": self.merges, "cache_size": self.cache_size}

    def __setstate__(self, state):
        self.__init__(state["merges"], cache_size=state["cache_size"])

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, num_merges: int | None = NUM_MERGES, **kwargs
    ) -> CLIPTokenizer:
        """Loads OpenAI's `bpe_simple_vocab_16e6.txt.gz` (see `read_merges`)."""
        return cls(read_merges(path, num_merges), **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    def _symbol_bytes(self, symbols: str) -> bytes:
        return bytes(self.byte_decoder[c] for c in symbols)

    def bpe(self, word: str) -> list[str]:
        """Byte-level BPE of one pre-token (already mapped through `bytes_to_unicode`)."""
        if word in self._special:
            return [word]
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in itertools.pairwise(symbols):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _bpe_ids_uncached(self, word: str) -> tuple[int, ...]:
        if word in self._special:
            return self._special[word]
        return tuple(self.encoder[s] for s in self.bpe(word))

    def pretokenize(self, text: str) -> list[str]:
        """Cleaned, lower-cased pre-tokens of `text` (before the byte mapping)."""
        return self._pattern.findall(clean_text(text))

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without SOT/EOT, padding or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}.")
        ids: list[int] = []
        byte_encoder = self.byte_encoder
        for piece in self.pretokenize(text):
            word = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self._bpe_ids(word))
        return ids

    def tokenize(
        self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = True
    ) -> np.ndarray:
        """int32 [B, context_length]: SOT, tokens, EOT, then 0s (a single str gives B = 1).

        A text longer than `context_length` is cut to `context_length` tokens with EOT as the
        last one; with `truncate=False` it raises ValueError instead.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"tokenize expects a str or a sequence of str, got an item of type {type(t).__name__}.")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}.")
        out = np.full((len(texts), context_length), PAD_ID, dtype=np.int32)  # [B, L]
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"Text {row} ({text[:50]!r}...) needs {len(ids)} tokens with SOT/EOT, more "
                        f"than context_length={context_length}; shorten it, raise context_length, or "
                        "pass truncate=True."
                    )
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out

    __call__ = tokenize

    def decode(self, ids, skip_special_tokens: bool = True) -> str | list[str]:
        """Text of token ids: a 1-D sequence -> str, a 2-D array -> list of str.

        Each end-of-word mark becomes a space (so punctuation and contractions come back
        space-separated, as in OpenAI's `decode`); outer whitespace is stripped; invalid UTF-8
        becomes U+FFFD. With `skip_special_tokens`, SOT is dropped and decoding stops at the
        first EOT (what follows it is padding).
        """
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.decode(row, skip_special_tokens) for row in arr]
        if arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D or 2-D array of ids, got shape {arr.shape}.")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"decode expects integer ids, got dtype {arr.dtype}.")
        ids = arr.tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).")
        if skip_special_tokens:
            if self.eot_token_id in ids:
                ids = ids[: ids.index(self.eot_token_id)]
            ids = [i for i in ids if i != self.sot_token_id]
        data = b"".join(self._id_bytes[i] for i in ids)
        return data.decode("utf-8", errors="replace").strip()
