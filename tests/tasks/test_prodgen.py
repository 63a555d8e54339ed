"""The product-description task: encoding into the task's arrays, config checks, the smoke recipe."""

import math
import os

import numpy as np
import pytest

from configs import prodgen as prodgen_config
from jdjax import tasks
from jdjax.data import products as prod
from jdjax.data import text
from jdjax.io import read_json
from jdjax.tasks import prodgen


def test_encode_indexes_every_split_globally_and_counts_reviews(tmp_path):
    c = prodgen_config.get_config("smoke")
    splits = prodgen.load_products(c.data)
    vocab = prodgen.load_vocab(c.data, splits["train"], str(tmp_path))
    enc = prodgen.encode(c, vocab, splits)
    offset = 0
    for split, items in splits.items():
        a = enc.arrays[split]
        np.testing.assert_array_equal(a["index"], np.arange(offset, offset + len(items)))
        np.testing.assert_array_equal(a["num_reviews"], [len(p.reviews) for p in items])
        assert all(enc.products[offset + k] is p for k, p in enumerate(items))
        offset += len(items)
    # Copied ids decode to the product's own words: the model token is a source OOV word.
    p, a = splits["test"][0], enc.arrays["test"]
    ext = a["source_ext"][0]
    words = enc.oov_words[int(a["index"][0])]
    assert set(prod.decode_extended(vocab, ext[ext >= vocab.size], words).split()) == set(words)
    assert any(w in p.title.lower() for w in words)
    assert text.WordVocab.load(os.path.join(tmp_path, "vocab.json")).size == vocab.size  # reused on resume


@pytest.mark.parametrize("override, message", [
    ({"method": "full,gpt"}, "method"),
    ({"data.name": "jd"}, "data.name"),
    ({"data.name": "dir", "data.data_dir": "/nonexistent"}, "not a directory"),
    ({"model.review_select": "hard"}, "review_select"),
    ({"model.review_memory": "first"}, "review_memory"),
    ({"data.max_target": 500}, "max_positions"),
])
def test_bad_configs_are_named(override, message):
    c = prodgen_config.get_config("smoke")
    for k, v in override.items():
        if "." in k:
            section, key = k.split(".")
            c[section][key] = v
        else:
            c[k] = v
    assert any(message in e for e in tasks.validate(c))


def _product(kind, aspects, reviews=()):
    return prod.Product("t", (), tuple(reviews), "d", tuple(aspects), kind)


def test_aspect_rules_on_a_hand_case():
    train = [_product("shoe", ["comfort", "grip"]), _product("shoe", ["comfort", "fit"]), _product("shoe", ["comfort"]),
             _product("shoe", ["grip", "fit"]), _product("shoe", ["grip"]), _product("bag", ["durability"])]
    # mean true aspects 1.67 -> 2; shoe prior: comfort 3, grip 3 (tie, by name), fit 2
    test = [_product("shoe", ["fit"], ["runs true to size , great grip"]), _product("shoe", ["grip"]),
            _product("bag", ["durability"], ["nothing to say"])]
    rules = prodgen.aspect_rules(train, test)
    assert rules["type prior"] == [["comfort", "grip"], ["comfort", "grip"], ["durability"]]
    assert rules["reviews + type prior"] == [["fit", "grip"], ["comfort", "grip"], ["durability"]]
    assert prodgen.aspect_rules(train, test, num_aspects=1)["reviews + type prior"][0] == ["fit", "grip"]

    c = prodgen_config.get_config("smoke")
    c.long_tail_reviews = 0  # long tail = no reviews: products 1 and 3 are "reviewed"
    rows = {r["run"]: r for r in prodgen.aspect_rule_rows(c, {"train": train, "test": test})}
    prior, reviews = rows["rule: type prior"], rows["rule: reviews + type prior"]
    assert prior["test/aspect_coverage"] == pytest.approx(100 * (0 + 1 + 1) / 3)
    assert prior["test/aspect_precision"] == pytest.approx(100 * 2 / 5)
    assert reviews["test/aspect_coverage"] == pytest.approx(100.0)
    assert reviews["test/reviewed_aspect_coverage"] == pytest.approx(100.0)  # products 1 and 3 have reviews
    assert reviews["test/tail_aspect_coverage"] == pytest.approx(100.0)
    assert prior["test/reviewed_aspect_precision"] == pytest.approx(100 * 1 / 3)
    assert "bleu_4" not in " ".join(prior)
    assert prodgen.aspect_rule_rows(c, {"train": train, "test": [prod.Product("t", (), (), "d")]}) == []


@pytest.mark.slow  # about 2-4 minutes: compiles two models' train steps and beam searches
def test_smoke_recipe_writes_the_table(tmp_path):
    c = prodgen_config.get_config("smoke")
    out = tasks.run(c, str(tmp_path))
    assert out["status"] == "completed"
    rows = read_json(os.path.join(tmp_path, "comparison.json"))  # non-finite floats restored
    assert [r["run"] for r in rows] == ["transformer", "full", "rule: type prior", "rule: reviews + type prior"]
    for r in rows[:2]:
        # precision is NaN only when no output names an aspect (a 6-step model may name none)
        assert all(math.isfinite(r[f"test/{k}"]) or (k == "aspect_precision" and math.isnan(r[f"test/{k}"]))
                   for _, k in prodgen.COLUMNS)
    assert "| full |" in open(os.path.join(tmp_path, "comparison.md")).read()
