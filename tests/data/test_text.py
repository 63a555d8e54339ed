"""Tokenisers: word vocabulary, SentencePiece, Chinese segmentation, padding and teacher-forcing arrays."""

from __future__ import annotations

import numpy as np
import pytest

from jdjax.data import text as tx

CORPUS = ["The cat sat. __EOT__ The dog ran!", "the cat, the CAT", "a dog", "zebra"]


def test_word_vocab_ordering_specials_and_unk():
    vocab = tx.WordVocab.build(CORPUS)
    # the 4, cat 3, dog 2, then the count-1 tokens alphabetically: ! , . a ran sat zebra
    assert vocab.tokens == [*tx.SPECIALS, "the", "cat", "dog", "!", ",", ".", "a", "ran", "sat", "zebra"]
    assert (tx.PAD_ID, tx.BOS_ID, tx.EOS_ID, tx.UNK_ID, tx.EOT_ID) == (0, 1, 2, 3, 4)
    assert vocab.tokenize("Hi, the CAT! __EOT__ x") == ["hi", ",", "the", "cat", "!", "__EOT__", "x"]
    assert vocab.encode("Hi the cat __EOT__") == [tx.UNK_ID, 5, 6, tx.EOT_ID]
    assert vocab.decode([tx.BOS_ID, 5, 6, tx.UNK_ID, tx.EOS_ID, 7, 0]) == "the cat __unk__"
    assert vocab.decode([tx.BOS_ID, 5, 0], skip_special=False) == "__start__ the __null__"

    small = tx.WordVocab.build(CORPUS, max_size=7, min_count=1)
    assert small.tokens == [*tx.SPECIALS, "the", "cat"] and small.size == 7
    assert tx.WordVocab.build(CORPUS, min_count=2).tokens == [*tx.SPECIALS, "the", "cat", "dog"]
    with pytest.raises(ValueError, match="max_size"):
        tx.WordVocab.build(CORPUS, max_size=3)
    with pytest.raises(ValueError, match="chinese"):
        tx.WordVocab.build(CORPUS, chinese="pinyin")


def test_word_vocab_save_load_and_build_vocab_reuse(tmp_path):
    path = tmp_path / "vocab.json"
    vocab = tx.build_vocab("word", CORPUS, path, max_size=12)
    loaded = tx.WordVocab.load(path)
    assert loaded.tokens == vocab.tokens and loaded.options() == vocab.options()
    assert loaded.encode(CORPUS[0]) == vocab.encode(CORPUS[0])
    # an existing file is read back, not rebuilt from other texts (resume keeps the ids)
    again = tx.build_vocab("word", ["completely different words"], path, max_size=12)
    assert again.tokens == vocab.tokens
    with pytest.raises(ValueError, match="was built with"):
        tx.build_vocab("word", CORPUS, path, max_size=20)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="delete it"):
        tx.WordVocab.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="kind"):
        tx.build_vocab("bpe", CORPUS, tmp_path / "x")


def test_sentencepiece_train_encode_decode_round_trip(tmp_path):
    texts = ["hello world, how are you today?", "I am fine thank you __EOT__ and you?", "what a lovely day",
             "the world is wide and the day is long"] * 4
    path = tmp_path / "sp.model"
    vocab = tx.build_vocab("sentencepiece", texts, path, vocab_size=80)
    assert [vocab._sp.id_to_piece(i) for i in range(5)] == list(tx.SPECIALS)
    ids = vocab.encode("Hello world __EOT__ how are you?")
    assert tx.EOT_ID in ids and tx.UNK_ID not in ids
    assert vocab.decode([tx.BOS_ID, *ids, tx.EOS_ID, 9, 0]) == "hello world __EOT__ how are you?"  # lower-cased
    loaded = tx.build_vocab("sentencepiece", ["other"], path, vocab_size=80)  # reused, not retrained
    assert loaded.encode("what a day") == vocab.encode("what a day") and loaded.size == vocab.size
    assert vocab.decode([tx.BOS_ID, *vocab.encode("a day")], skip_special=False) == "__start__ a day"
    tx.build_vocab("word", texts, tmp_path / "words.json")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        tx.SentencePieceVocab.load(tmp_path / "words.json")


def test_chinese_words_vs_chars():
    text = "我爱北京天安门 __EOT__ Hello，世界"
    words = tx.WordVocab.build([text], chinese="words")
    chars = tx.WordVocab.build([text], chinese="chars")
    assert words.tokenize(text) == ["我", "爱", "北京", "天安门", "__EOT__", "hello", "，", "世界"]
    assert chars.tokenize(text) == [*"我爱北京天安门", "__EOT__", "hello", "，", "世", "界"]
    assert words.decode(words.encode(text)) == "我 爱 北京 天安门 __EOT__ hello ， 世界"


def test_pad_batch_truncation_sides():
    seqs = [[1, 2, 3, 4, 5], [7], []]
    left = tx.pad_batch(seqs, 3, truncate="left")
    right = tx.pad_batch(seqs, 3, pad_id=-1, truncate="right")
    assert left.dtype == np.int32 and left.shape == (3, 3)
    np.testing.assert_array_equal(left, [[3, 4, 5], [7, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(right, [[1, 2, 3], [7, -1, -1], [-1, -1, -1]])
    with pytest.raises(ValueError, match="truncate"):
        tx.pad_batch(seqs, 3, truncate="middle")
    with pytest.raises(ValueError, match="max_len"):
        tx.pad_batch(seqs, 0)


def test_encode_pairs_shapes_and_bos_eos():
    vocab = tx.WordVocab.build(["a b c d e f g h"])
    a, b, c, d, e, f, g, h = vocab.encode("a b c d e f g h")
    batch = tx.encode_pairs(vocab, ["a b c d e __EOT__ f", "g"], ["a b c d e", "h"], max_context=4, max_response=4)
    assert {k: v.shape for k, v in batch.items()} == {"context": (2, 4), "response_in": (2, 4), "response_out": (2, 4)}
    np.testing.assert_array_equal(batch["context"], [[d, e, tx.EOT_ID, f], [g, 0, 0, 0]])  # latest turns kept
    np.testing.assert_array_equal(batch["response_in"], [[tx.BOS_ID, a, b, c], [tx.BOS_ID, h, 0, 0]])
    np.testing.assert_array_equal(batch["response_out"], [[a, b, c, tx.EOS_ID], [h, tx.EOS_ID, 0, 0]])
    # response_out is response_in shifted left by one wherever response_in is not padding
    np.testing.assert_array_equal(batch["response_in"][:, 1:][batch["response_in"][:, 1:] > 0],
                                  batch["response_out"][:, :-1][batch["response_in"][:, 1:] > 0])
    with pytest.raises(ValueError, match="pairs"):
        tx.encode_pairs(vocab, ["a"], [], 4, 4)
