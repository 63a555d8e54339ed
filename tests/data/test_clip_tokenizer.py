"""CLIP BPE tokenizer (jdjax/data/clip_tokenizer.py): vocabulary layout, hand-checked BPE,
byte-level round trips, SOT/EOT/padding/truncation, OpenAI-format file loading, errors.

Merges are hand-written or learned here from a tiny corpus, except in the last tests: they load
OpenAI's real `bpe_simple_vocab_16e6.txt.gz` and compare ids with OpenAI's own tokenizer, both
taken from the `openai-clip` package of the test extra.
"""

import gzip
import importlib.util
import itertools
import os
import pickle
from collections import Counter

import numpy as np
import pytest

from jdjax.data import clip_tokenizer as ct
from jdjax.data.clip_tokenizer import CLIPTokenizer, bytes_to_unicode

BYTE_ENC = bytes_to_unicode()

CORPUS = [
    "a photo of a cat.",
    "a photo of a dog!",
    "the cat sat on the mat, and the dog sat on the log.",
    "there's a photo of the cat; it's the cat's photo.",
    "the dogs and the cats don't like photos of other dogs.",
    "photographers photograph photos of cats and dogs at the photo shoot.",
]


def _byte_word(piece: str) -> tuple[str, ...]:
    s = "".join(BYTE_ENC[b] for b in piece.encode("utf-8"))
    return tuple(s[:-1]) + (s[-1] + "</w>",)


def _merge_word(word, pair):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(corpus, num_merges):
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: the larger
    pair), never re-creating an existing symbol. Returns (merges, {word: final segmentation})."""
    pre = CLIPTokenizer([])
    words = Counter(_byte_word(p) for text in corpus for p in pre.pretokenize(text))
    symbols = {s for w in words for s in w}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for w, c in words.items():
            for p in itertools.pairwise(w):
                if p[0] + p[1] not in symbols:
                    pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        symbols.add(best[0] + best[1])
        words = Counter({_merge_word(w, best): c for w, c in words.items()})
    segmentation = {"".join(w): list(w) for w in words}
    return merges, segmentation


@pytest.fixture(scope="module")
def learned():
    merges, segmentation = learn_merges(CORPUS, 40)
    return CLIPTokenizer(merges), merges, segmentation


@pytest.fixture(scope="module")
def bare():
    return CLIPTokenizer([])


# ----------------------------------------------------------------------------- vocabulary


def test_bytes_to_unicode_table():
    assert len(BYTE_ENC) == 256 and len(set(BYTE_ENC.values())) == 256
    order = list(BYTE_ENC)
    assert order[:94] == list(range(33, 127))  # '!'..'~' first, as in OpenAI's table
    assert BYTE_ENC[ord("a")] == "a" and BYTE_ENC[0xE9] == "é"
    assert BYTE_ENC[0] == chr(256) and BYTE_ENC[ord(" ")] == "Ġ"  # chr(256 + 32)
    assert all(c.isprintable() and not c.isspace() for c in BYTE_ENC.values())


def test_vocab_layout_and_sizes(learned):
    tok, merges, _ = learned
    assert len(merges) == 40
    byte_syms = list(BYTE_ENC.values())
    assert tok.decoder[:256] == byte_syms
    assert tok.decoder[256:512] == [s + "</w>" for s in byte_syms]
    assert tok.decoder[512:-2] == [a + b for a, b in merges]
    assert tok.decoder[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert tok.vocab_size == 512 + 40 + 2 == len(tok.encoder)
    assert (tok.sot_token_id, tok.eot_token_id) == (552, 553)
    assert tok.encoder["!"] == 0 and tok.encoder["a"] == ord("a") - 33 and tok.encoder["a</w>"] == 256 + 64
    assert all(tok.encoder[t] == i for i, t in enumerate(tok.decoder))
    # The standard file: 48,894 merges -> 49,408 tokens, SOT 49406, EOT 49407.
    assert ct.NUM_MERGES == 48894 and ct.VOCAB_SIZE == 49408 == 512 + ct.NUM_MERGES + 2
    bare = CLIPTokenizer([])
    assert (bare.vocab_size, bare.sot_token_id, bare.eot_token_id) == (514, 512, 513)


# ----------------------------------------------------------------------------- hand-checked BPE


def test_hand_checked_hello():
    # ids: 'h' = 104-33 = 71, 'e' = 68, 'l' = 75, 'o' = 78 ('!' = 33 is id 0); x</w> = x + 256;
    # merge k is 512 + k; SOT = 512 + 5 = 517, EOT = 518.
    tok = CLIPTokenizer(["h e", "l l", "he ll", "ll o</w>", "hell o</w>"])
    assert tok.encoder["h"] == 71 and tok.encoder["l</w>"] == 331
    # hello: h e l l o</w> -(0)-> he l l o</w> -(1)-> he ll o</w> -(2, beats 3)-> hell o</w>
    #        -(4)-> hello</w>
    assert tok.bpe("hello") == ["hello</w>"]
    assert tok.encode("hello") == [516]
    # hell: h e l l</w>; 'l l' does not match (l, l</w>) -> he l l</w>
    assert tok.bpe("hell") == ["he", "l", "l</w>"]
    assert tok.encode("hell") == [512, 75, 331]
    # hellos: h e l l o s</w> -> he l l o s</w> -> he ll o s</w> -> hell o s</w>; 'hell o' has
    # no rank (only 'hell o</w>') -> 3 tokens: hell, o, s</w>
    assert tok.encode("hellos") == [514, 78, ord("s") - 33 + 256]
    assert tok.tokenize("Hello", context_length=5).tolist() == [[517, 516, 518, 0, 0]]
    assert tok.decode([517, 516, 518, 0, 0]) == "hello"


def test_hand_checked_rank_order_and_repeats():
    # Ranks decide, not position: 'l l'(0) then 'll o</w>'(1) win, and 'he ll'(3) never fires.
    tok = CLIPTokenizer(["l l", "ll o</w>", "h e", "he ll"])
    # h e l l o</w> -(0)-> h e ll o</w> -(1)-> h e llo</w> -(2)-> he llo</w>
    assert tok.bpe("hello") == ["he", "llo</w>"]
    assert tok.encode("hello") == [514, 513]
    # Non-overlapping, left to right: l l l l l</w> -> ll ll l</w>
    assert tok.bpe("lllll") == ["ll", "ll", "l</w>"]
    assert tok.encode("lllll") == [512, 512, 331]


# ----------------------------------------------------------------------------- BPE vs trainer


def test_bpe_reproduces_training_segmentation(learned):
    tok, _, segmentation = learned
    for word, symbols in segmentation.items():
        assert tok.bpe(word[: -len("</w>")]) == symbols, word
    # Frequent words became single tokens.
    for w in ["the", "photo", "cat", "of"]:
        assert tok.encode(w) == [tok.encoder[w + "</w>"]], w


def test_round_trip(learned):
    tok, _, _ = learned
    texts = CORPUS + [
        "the quick brown fox, jumped over 12 lazy dogs... (really?!) #1 @home",
        "café naïve résumé",
        "猫的照片 和 狗",
        "emoji: 😀🐱 and 👍🏽 done",
        "we'll see; you're here, i'm there, they've gone, he'd go, it's mine",
    ]
    for text in texts:
        ids = tok.encode(text)
        pieces = tok.pretokenize(text)
        # decode puts one space after each pre-token (end-of-word mark)
        assert tok.decode(ids) == " ".join(pieces)
        assert tok.decode(ids).replace(" ", "") == text.replace(" ", "")
        assert tok.decode(tok.tokenize(text)[0]) == " ".join(pieces)


def test_digits_are_single_tokens():
    tok = CLIPTokenizer(["1 2</w>", "1 2"])  # merges over digits never fire: [\p{N}] is one digit
    assert tok.pretokenize("2024 v12") == ["2", "0", "2", "4", "v", "1", "2"]
    assert tok.encode("2024") == [tok.encoder[d + "</w>"] for d in "2024"]
    assert tok.encode("12") == [ord("1") - 33 + 256, ord("2") - 33 + 256]


def test_contractions_and_punctuation(bare):
    assert bare.pretokenize("Don't! We'll, you're I'm it's they've he'd") == [
        "don", "'t", "!", "we", "'ll", ",", "you", "'re", "i", "'m", "it", "'s", "they", "'ve", "he", "'d",
    ]
    assert bare.pretokenize("...?! a--b") == ["...?!", "a", "--", "b"]


def test_unicode_is_byte_level(bare):
    for text in ["é", "中文", "😀"]:
        data = text.encode("utf-8")
        expected = [bare.encoder[BYTE_ENC[b]] for b in data[:-1]] + [bare.encoder[BYTE_ENC[data[-1]] + "</w>"]]
        assert bare.encode(text) == expected and len(expected) == len(data)
        assert bare.decode(expected) == text
    assert bare.pretokenize("中文 😀x") == ["中文", "😀", "x"]  # CJK are letters, emoji are not
    # A cut in the middle of a multi-byte character decodes to U+FFFD.
    assert bare.decode(bare.encode("中")[:2]) == "\ufffd"


def test_decomposed_accents_are_normalised(bare):
    assert bare.encode("cafe\u0301") == bare.encode("café")


# ----------------------------------------------------------------------------- tokenize


def test_tokenize_shape_sot_eot_padding(learned):
    tok, _, _ = learned
    out = tok.tokenize(["a photo of a cat.", "", "the dog"], context_length=12)
    assert out.dtype == np.int32 and out.shape == (3, 12)
    sot, eot = tok.sot_token_id, tok.eot_token_id
    for row, text in zip(out, ["a photo of a cat.", "", "the dog"]):
        ids = tok.encode(text)
        assert row[0] == sot and row[len(ids) + 1] == eot
        assert row[1 : len(ids) + 1].tolist() == ids
        assert (row[len(ids) + 2 :] == 0).all()
    assert out[1].tolist() == [sot, eot] + [0] * 10
    single = tok("a cat")
    assert single.shape == (1, 77) and np.array_equal(single, tok.tokenize(["a cat"]))
    # Special tokens written in the text are recognised, as in OpenAI's tokenizer.
    assert tok.encode("<|startoftext|>x<|EndOfText|>") == [sot, tok.encoder["x</w>"], eot]


def test_truncation_keeps_eot_last(learned):
    tok, _, _ = learned
    text = "the cat sat on the mat and the dog sat on the log " * 3
    ids = tok.encode(text)
    assert len(ids) > 10
    out = tok.tokenize([text, "cat"], context_length=8)
    assert out[0].tolist() == [tok.sot_token_id] + ids[:6] + [tok.eot_token_id]
    assert out[1, :3].tolist() == [tok.sot_token_id, tok.encoder["cat</w>"], tok.eot_token_id]
    # Exactly fitting: nothing dropped.
    exact = tok.tokenize(text, context_length=len(ids) + 2)[0]
    assert exact[1:-1].tolist() == ids and exact[-1] == tok.eot_token_id
    with pytest.raises(ValueError, match="context_length"):
        tok.tokenize(text, context_length=8, truncate=False)
    assert tok.tokenize("cat", context_length=3, truncate=False).shape == (1, 3)
    with pytest.raises(ValueError, match="at least 2"):
        tok.tokenize("cat", context_length=1)
    with pytest.raises(TypeError):
        tok.tokenize(["ok", 3])


def test_case_insensitive_and_cleanup(learned):
    tok, _, _ = learned
    assert tok.encode("A PHOTO of a Cat.") == tok.encode("a photo of a cat.")
    assert tok.encode("  the\n\tcat \u3000 sat ") == tok.encode("the cat sat")
    assert tok.pretokenize("&amp;amp; &lt;b&gt; caf&eacute;") == ["&", "<", "b", ">", "café"]
    assert ct.clean_text("  Hello\n\n  WORLD  ") == "hello world"


def test_decode_options(learned):
    tok, _, _ = learned
    out = tok.tokenize(["a cat", "the dog!"], context_length=10)
    assert tok.decode(out) == ["a cat", "the dog !"]
    raw = tok.decode(out[0], skip_special_tokens=False)
    assert raw.startswith("<|startoftext|>a cat <|endoftext|>")  # then padding id 0 = '!'
    assert tok.decode([]) == ""
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


def test_cache_and_pickle(learned):
    tok = CLIPTokenizer(learned[1], cache_size=128)
    tok.encode("the cat")
    hits = tok._bpe_ids.cache_info().hits
    tok.encode("the cat")
    assert tok._bpe_ids.cache_info().hits == hits + 2
    clone = pickle.loads(pickle.dumps(tok))
    assert np.array_equal(clone.tokenize(CORPUS), tok.tokenize(CORPUS))


# ----------------------------------------------------------------------------- files


def _write(path, text: str, compress=True):
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def test_load_openai_format(tmp_path, learned):
    tok, merges, _ = learned
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    path = _write(tmp_path / "bpe_simple_vocab_16e6.txt.gz", "\n".join(lines) + "\n")
    loaded = CLIPTokenizer.from_file(path, num_merges=None)
    assert loaded.merges == merges and loaded.decoder == tok.decoder
    assert np.array_equal(loaded.tokenize(CORPUS), tok.tokenize(CORPUS))
    # First-n merges, as OpenAI takes the first 48,894 of its file.
    first = CLIPTokenizer.from_file(str(path), num_merges=20)
    assert first.merges == merges[:20] and first.vocab_size == 512 + 20 + 2
    assert ct.read_merges(path, 20) == merges[:20]
    # Plain text (e.g. a Hugging Face merges.txt) is read too.
    plain = _write(tmp_path / "merges.txt", "\n".join(lines), compress=False)
    assert CLIPTokenizer.from_file(plain, num_merges=None).merges == merges
    # OpenAI's real header carries a stray tar member name before '#version'; line 0 is skipped.
    prefixed = _write(tmp_path / "prefixed.gz", '"bpe_simple_vocab_16e6.txt' + "\n".join(lines))
    assert CLIPTokenizer.from_file(prefixed, num_merges=None).merges == merges


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6"):
        CLIPTokenizer.from_file(tmp_path / "nope.txt.gz")
    few = _write(tmp_path / "few.gz", "#version: 0.2\nh e\nl l\n")
    with pytest.raises(ValueError, match="holds 2 merges but 48894"):
        CLIPTokenizer.from_file(few)
    assert CLIPTokenizer.from_file(few, num_merges=2).merges == [("h", "e"), ("l", "l")]
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(b"#version: 0.2\nh e\n" * 50)[:-20])
    with pytest.raises(ValueError, match="corrupt"):
        CLIPTokenizer.from_file(truncated, num_merges=None)
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ValueError, match="corrupt"):
        CLIPTokenizer.from_file(garbage, num_merges=None)
    headerless = _write(tmp_path / "headerless.gz", "h e\nl l\n")
    with pytest.raises(ValueError, match="#version"):
        CLIPTokenizer.from_file(headerless, num_merges=None)
    bad_line = _write(tmp_path / "bad.gz", "#version: 0.2\nh e\nl l x\n")
    with pytest.raises(ValueError, match="Merge 1"):
        CLIPTokenizer.from_file(bad_line, num_merges=None)


def test_constructor_errors():
    with pytest.raises(ValueError, match="two non-empty symbols"):
        CLIPTokenizer(["h"])
    with pytest.raises(ValueError, match="two non-empty symbols"):
        CLIPTokenizer([("h", "")])
    with pytest.raises(ValueError, match="already|also token"):
        CLIPTokenizer(["h e", "h e"])
    with pytest.raises(ValueError, match="also token"):
        CLIPTokenizer(["o </w>"])  # 'o</w>' is a base token already
    with pytest.raises(ValueError, match="byte-level"):
        CLIPTokenizer(["中 文"])


# ----------------------------------------------------------------------------- real file
# The `openai-clip` package holds OpenAI's `clip/bpe_simple_vocab_16e6.txt.gz` (the same file as in
# open_clip) and `clip/simple_tokenizer.py`, OpenAI's reference tokenizer. The package is located,
# never imported (`clip/__init__` imports torch and torchvision); simple_tokenizer.py needs only
# ftfy and regex, so it is loaded on its own.
#
# ftfy: OpenAI cleans every text with `ftfy.fix_text`, which this library does not (only the NFC
# part). CAPTIONS need no ftfy fix and must give identical ids; FTFY_CAPTIONS (a curly apostrophe,
# mojibake) are expected to differ, and agree once ftfy has fixed the text first.

CAPTIONS = [
    "a photo of a cat",
    "A man is playing a guitar on stage.",
    "Two dogs running in the park, one brown and one white!",
    "the chef's knife cuts 3 tomatoes in 1.5 seconds",
    "she's singing; they're dancing & we'll watch... isn't it fun?",
    "I'M SURE IT'S FINE",
    "a woman  \t explains\nhow to cook   pasta ",
    "Cooking show: 'Pasta al dente' (episode #42) -- part 2/3",
    "price: $19.99 (50% off) @ 10:30am",
    "&amp;lt;b&amp;gt; html &quot;entities&quot;",
    "café crème brûlée, naïve résumé",
    "e\u0301le\u0300ve",  # decomposed accents: NFC
    "東京の夜景 and 北京 streets",
    "Ελληνικά και русский текст",
    "emoji time 🎉🐱 👍🏽",
    "hyphen-ated, under_scored and slash/separated CamelCaseWords",
    "https://example.com/video?id=123&t=5s",
    " ".join(["a person is talking about a video game"] * 12),  # 96 tokens: cut at 77
]
FTFY_CAPTIONS = ["don\u2019t stop the music", "the cafÃ© is open"]


@pytest.fixture(scope="module")
def openai_clip():
    """(the real BPE file, our tokenizer on it, OpenAI's simple_tokenizer module, its SimpleTokenizer)."""
    spec = importlib.util.find_spec("clip")
    folder = os.path.dirname(spec.origin) if spec and spec.origin else ""
    bpe, ref_py = (os.path.join(folder, f) for f in ("bpe_simple_vocab_16e6.txt.gz", "simple_tokenizer.py"))
    if not (os.path.isfile(bpe) and os.path.isfile(ref_py)):
        pytest.fail(f"OpenAI's CLIP files are not in the `clip` package ({folder or 'not installed'}); "
                    "install the test extra: pip install -e '.[test]' (it installs openai-clip).")
    ref_spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", ref_py)
    ref_module = importlib.util.module_from_spec(ref_spec)
    ref_spec.loader.exec_module(ref_module)
    return bpe, CLIPTokenizer.from_file(bpe), ref_module, ref_module.SimpleTokenizer(bpe)


def _openai_tokenize(ref, texts, context_length=77):
    """OpenAI's `clip.tokenize(texts, truncate=True)` in NumPy (clip/clip.py imports torch)."""
    sot, eot = ref.encoder["<|startoftext|>"], ref.encoder["<|endoftext|>"]
    out = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
        tokens = [sot, *ref.encode(text), eot]
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = eot
        out[i, : len(tokens)] = tokens
    return out


def test_openai_vocabulary_known_ids(openai_clip):
    bpe, tok, _, ref = openai_clip
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        assert f.readline().startswith('"bpe_simple_vocab_16e6.txt#version: 0.2')  # skipped, like OpenAI
    assert tok.vocab_size == 49408 and (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert tok.encoder == ref.encoder and list(tok.encoder) == list(ref.encoder)
    assert tok.bpe_ranks == ref.bpe_ranks
    assert tok("a photo of a cat", context_length=8).tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407, 0]]


def test_matches_openai_tokenizer(openai_clip):
    _, tok, _, ref = openai_clip
    ours = tok.tokenize(CAPTIONS)
    np.testing.assert_array_equal(ours, _openai_tokenize(ref, CAPTIONS))
    assert ours[-1, -1] == tok.eot_token_id and (ours[:-1, -1] == 0).all()  # only the last one is cut
    for text in CAPTIONS[:-1]:
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text)).strip()


def test_ftfy_is_the_expected_difference(openai_clip):
    _, tok, ref_module, ref = openai_clip
    for text in FTFY_CAPTIONS:
        fixed = ref_module.ftfy.fix_text(text)  # "don't stop the music", "the café is open"
        assert tok.encode(text) != ref.encode(text)
        assert tok.encode(fixed) == ref.encode(text)
