"""Product data: the generated corpus's planted structure, the JSONL readers and the copy-aware encoding."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from jdjax.data import products as pd
from jdjax.data.products import Product
from jdjax.data.text import BOS_ID, EOS_ID, UNK_ID, WordVocab
from jdjax.metrics.generation import mentioned_aspects


@pytest.fixture(scope="module")
def corpus():
    return pd.generated_products(2000, seed=0)


@pytest.fixture(scope="module")
def vocab(corpus):
    return WordVocab.build(pd.vocab_texts(corpus), min_count=2)


def _words(text: str) -> int:
    return len(text.split())


def test_generated_deterministic_and_splits_disjoint(corpus):
    assert pd.generated_products(2000, seed=0) == corpus
    assert pd.generated_products(50, seed=1) != corpus[:50]
    splits = pd.product_splits({"train": 300, "val": 50, "test": 50}, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "val": 50, "test": 50}
    titles = {k: {p.title for p in v} for k, v in splits.items()}
    assert not titles["train"] & titles["val"] and not titles["train"] & titles["test"]
    assert not titles["val"] & titles["test"]
    bigger = pd.product_splits({"train": 500, "val": 50, "test": 50}, seed=0)  # val/test do not move
    assert bigger["val"] == splits["val"] and bigger["test"] == splits["test"]


def test_generated_shapes_and_long_tail(corpus):
    assert {p.product_type for p in corpus} == set(pd.PRODUCT_TYPES)
    assert all(6 <= _words(p.title) <= 12 and 20 <= _words(p.description) <= 40 for p in corpus)
    assert all(8 <= _words(r) <= 25 for p in corpus for r in p.reviews)
    counts = np.array([len(p.reviews) for p in corpus])
    assert np.mean(counts <= 1) >= 0.4 and counts.max() == 10 and np.mean(counts >= 5) > 0.1
    assert all(1 <= len(p.aspects) <= 3 and set(p.aspects) <= set(pd.PRODUCT_TYPES[p.product_type].aspects)
               for p in corpus)


def test_model_tokens_rare_and_copied_only(corpus, vocab):
    models = [p.title.split()[1] for p in corpus]
    assert np.mean([c == 1 for c in Counter(models).values()]) > 0.99
    assert np.mean([vocab.encode(m) == [UNK_ID] for m in models]) > 0.99
    # brands, attribute values and aspect words are frequent: the model token is the only OOV word
    oov = {t for p in corpus for t in vocab.tokenize(p.description) if vocab.encode(t) == [UNK_ID]}
    assert oov <= set(models)


def test_descriptions_mention_exactly_the_true_aspects(corpus, vocab):
    for p in corpus:
        tokens = vocab.tokenize(p.description)
        brand, model = p.title.split()[:2]
        assert brand in tokens and model in tokens and p.product_type in tokens
        assert mentioned_aspects(tokens, pd.ASPECT_PHRASES) == set(p.aspects), p
        for review in p.reviews:  # reviews praise true aspects only, some indirectly
            assert mentioned_aspects(vocab.tokenize(review), pd.ASPECT_PHRASES) <= set(p.aspects), review
        assert not mentioned_aspects(vocab.tokenize(" ".join([p.title, *(f"{k} {v}" for k, v in p.attributes)])),
                                     pd.ASPECT_PHRASES)
    reviewed = [p for p in corpus if len(p.reviews) >= 3]
    recovered = [set(p.aspects) == set().union(*(mentioned_aspects(vocab.tokenize(r), pd.ASPECT_PHRASES)
                                                for r in p.reviews)) for p in reviewed]
    assert np.mean(recovered) > 0.5  # with several reviews the lexicon alone already finds most aspect sets


HAND = Product(title="Acme zq77 kettle glass", attributes=(("colour", "zorblue"), ("power", "2000 w")),
               reviews=("boils fast !", "very quiet ."), description="the acme zq77 kettle in zorblue , quxword .",
               aspects=("boil speed",), product_type="kettle")


def test_encode_product_hand_example():
    vocab = WordVocab(["__null__", "__start__", "__end__", "__unk__", "__EOT__", "the", "kettle", "glass", "colour",
                       "power", "2000", "w", "in", ",", ".", "acme", "boils", "fast", "!"])
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    v = vocab.size
    out = pd.encode_product(vocab, HAND, max_title=5, max_attr=6, max_reviews=3, max_review_len=4, max_target=10)
    title = [ids["acme"], UNK_ID, ids["kettle"], ids["glass"]]
    attrs = [ids["colour"], UNK_ID, ids["power"], ids["2000"], ids["w"]]
    np.testing.assert_array_equal(out["source"], title + attrs + [0, 0])  # [max_title + max_attr], no gap
    np.testing.assert_array_equal(out["segment"], [1, 1, 1, 1, 2, 3, 2, 3, 3, 0, 0])
    assert out["oov_words"] == ["zq77", "zorblue"] and out["num_oov"] == 2
    np.testing.assert_array_equal(out["source_ext"][:4], [ids["acme"], v, ids["kettle"], ids["glass"]])
    np.testing.assert_array_equal(out["source_ext"][4:6], [ids["colour"], v + 1])
    target = [ids["the"], ids["acme"], UNK_ID, ids["kettle"], ids["in"], UNK_ID, ids[","], UNK_ID, ids["."]]
    np.testing.assert_array_equal(out["target_in"], [BOS_ID, *target])
    np.testing.assert_array_equal(out["target_out"], [*target, EOS_ID])
    target_ext = [ids["the"], ids["acme"], v, ids["kettle"], ids["in"], v + 1, ids[","], UNK_ID, ids["."], EOS_ID]
    np.testing.assert_array_equal(out["target_ext"], target_ext)  # "quxword" is not in the source: stays unk
    reviews = [[ids["boils"], ids["fast"], ids["!"], 0], [UNK_ID, UNK_ID, ids["."], 0], [0] * 4]
    np.testing.assert_array_equal(out["reviews"], reviews)
    assert all(a.dtype == np.int32 for a in out.values() if isinstance(a, np.ndarray))
    assert pd.decode_extended(vocab, out["target_ext"], out["oov_words"]) == "the acme zq77 kettle in zorblue , __unk__ ."
    source = "acme zq77 kettle glass colour zorblue power 2000 w"
    assert pd.decode_extended(vocab, out["source_ext"], out["oov_words"]) == source
    with pytest.raises(ValueError, match="extended id"):
        pd.decode_extended(vocab, [v + 2], out["oov_words"])


def test_encode_products_batch_round_trip(corpus, vocab):
    products = corpus[:16]
    batch = pd.encode_products(vocab, products, max_title=16, max_attr=24, max_reviews=4, max_review_len=30,
                               max_target=64)
    assert batch["source"].shape == batch["segment"].shape == batch["source_ext"].shape == (16, 40)
    assert batch["reviews"].shape == (16, 4, 30) and batch["target_ext"].shape == (16, 64)
    assert batch["num_oov"].tolist() == [len(w) for w in batch["oov_words"]]
    for p, ext, words, reviews in zip(products, batch["target_ext"], batch["oov_words"], batch["reviews"]):
        assert pd.decode_extended(vocab, ext, words) == " ".join(vocab.tokenize(p.description))
        assert p.title.split()[1] in words  # the model token is copied from the title
        assert (reviews[:, 0] != 0).sum() == min(len(p.reviews), 4)


def test_jsonl_reader_round_trip_and_errors(tmp_path, corpus):
    pd.write_products_jsonl(tmp_path / "train.jsonl", corpus[:20])
    assert pd.read_products_jsonl(tmp_path / "train.jsonl") == corpus[:20]
    real = {"title": "a b", "attributes": {"colour": "red"}, "reviews": ["", "ok"], "description": "red a b"}
    (tmp_path / "valid.jsonl").write_text(json.dumps(real) + "\n\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({**real, "attributes": [["colour", "red"]]}) + "\n")
    splits = pd.read_products_dir(tmp_path)
    assert splits["val"] == splits["test"] == [Product("a b", (("colour", "red"),), ("ok",), "red a b")]
    for bad, message in [("{not json", "not valid JSON"), ('{"title": "t"}', "missing field"),
                         (json.dumps({**real, "reviews": "ok"}), '"reviews" must be a list of strings'),
                         (json.dumps({**real, "attributes": {"size": 42}}), '"attributes" must be'),
                         (json.dumps({**real, "description": " "}), '"description" must be a non-empty')]:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(real) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: {message}"):
            pd.read_products_jsonl(path)
    (tmp_path / "valid.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="valid.jsonl"):
        pd.read_products_dir(tmp_path)
