"""The Amazon Electronics reader on tiny files written here (JSON reviews, Python-literal meta)."""

import gzip
import json
import random

import jax
import numpy as np
import pytest

from configs import kfatt as kfatt_config
from jdjax import tasks as jtasks
from jdjax import testing
from jdjax.data import amazon
from jdjax.tasks import ctr

REVIEWS = [  # (user, item, time)
    ("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u1", "d", 4),
    ("u2", "c", 5), ("u2", "a", 1), ("u2", "e", 9),
    ("u3", "b", 1), ("u3", "e", 2), ("u3", "a", 3), ("u3", "c", 4), ("u3", "d", 5),
    ("u4", "a", 1),  # one review: no example
    ("u5", "f", 1),  # one review: no example; u3 reviewed a-e, so f is u3's only unreviewed item
]
META = {"a": "Cables", "b": "Cables", "c": "Cameras", "d": "Headphones"}  # e, f have no meta


def review_line(u, i, t):
    return json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0})


def meta_line(asin, path):
    return repr({"asin": asin, "categories": [path], "title": f"item {asin}"})


def write(directory, gz=False, reviews=REVIEWS, meta=None):
    meta = meta or {a: ["Electronics", c] for a, c in META.items()}
    text = "\n".join(review_line(*r) for r in reviews)
    if gz:
        with gzip.open(directory / (amazon.REVIEWS + ".gz"), "wt") as f:
            f.write(text)
    else:
        (directory / amazon.REVIEWS).write_text(text)
    (directory / amazon.META).write_text("\n".join(meta_line(a, p) for a, p in meta.items()))


def amazon_config(data_dir, **data):
    cfg = kfatt_config.get_config("smoke")
    cfg.data.update(name="amazon", data_dir=str(data_dir), maxlen=3, **data)
    return cfg


@pytest.mark.parametrize("gz", [False, True])
def test_protocol(tmp_path, gz):
    write(tmp_path, gz)
    splits = amazon.load(str(tmp_path), maxlen=2, seed=0, infreq_threshold=3)
    sizes = {k: len(v["label"]) for k, v in splits.items()}
    assert sizes == {"train": 2 * (1 + 0 + 2), "val": 6, "test": 6}  # pairs: u1 3, u2 2, u3 4 (train = rest)
    for split in splits.values():
        assert np.all(split["label"][0::2] == 1) and np.all(split["label"][1::2] == 0)  # (positive, negative)
        assert np.all(split["item"][0::2] != split["item"][1::2])
        np.testing.assert_array_equal(split["hist_item"][0::2], split["hist_item"][1::2])
        assert split["hist_item"].dtype == np.int32 and "hist_dedup" not in split
    r = amazon.read_reviews(str(tmp_path))
    item_names, cats = r.item_names, r.cat_names
    assert list(cats) == [amazon.UNKNOWN_CATEGORY, "Cables", "Cameras", "Headphones"]
    test = splits["test"]
    u1 = np.flatnonzero(test["user"] == 0)[0]  # u1's last review: d after b, c (maxlen 2)
    assert list(item_names[test["hist_item"][u1]]) == ["b", "c"] and item_names[test["item"][u1]] == "d"
    assert cats[test["cat"][u1]] == "Headphones" and test["new"][u1]
    u2 = np.flatnonzero(test["user"] == 1)[0]  # u2: a (t=1), c (t=5), e (t=9) -> history [a, c], e unknown
    assert list(item_names[test["hist_item"][u2]]) == ["a", "c"] and cats[test["cat"][u2]] == amazon.UNKNOWN_CATEGORY
    assert splits["train"]["infreq"].dtype == bool


def test_task_builds_on_amazon(tmp_path):
    write(tmp_path)
    task = ctr.build(amazon_config(tmp_path))
    assert len(task.train_source) == 6 and set(task.eval_sources) == {"val", "test"}
    batch = task.eval_sources["test"].get_batch(np.arange(6))
    assert batch["hist_item"].shape == (6, 3) and "new" in batch and "repeat" not in batch
    assert "hist_dedup" not in batch


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="reviews_Electronics_5.json"):
        amazon.load(str(tmp_path))
    write(tmp_path)
    (tmp_path / amazon.META).write_text("{'asin': 'a', 'categories': [[")
    with pytest.raises(ValueError, match=f"{amazon.META}:1: neither JSON nor a Python literal"):
        amazon.load(str(tmp_path))


# (file, bad line, message): each replaces line 3 of that file.
GOOD_REVIEW = review_line("u1", "c", 3)
BAD_LINES = {
    "review is a list": (amazon.REVIEWS, b'["u1", "c", 3]',
                         "a review must be an object with reviewerID, asin and unixReviewTime, got a list"),
    "review is null": (amazon.REVIEWS, b"null",
                       "a review must be an object with reviewerID, asin and unixReviewTime, got null"),
    "no unixReviewTime": (amazon.REVIEWS, b'{"reviewerID": "u1", "asin": "c"}',
                          "the review has no 'unixReviewTime' field"),
    "unixReviewTime abc": (amazon.REVIEWS, b'{"reviewerID": "u1", "asin": "c", "unixReviewTime": "abc"}',
                           'unixReviewTime must be an integer (seconds since 1970), got the string "abc"'),
    "unixReviewTime null": (amazon.REVIEWS, b'{"reviewerID": "u1", "asin": "c", "unixReviewTime": null}',
                            "unixReviewTime must be an integer (seconds since 1970), got null"),
    "no asin": (amazon.REVIEWS, b'{"reviewerID": "u1", "unixReviewTime": 3}', "the review has no 'asin' field"),
    "invalid UTF-8": (amazon.REVIEWS, GOOD_REVIEW.replace("u1", "u\xe9").encode("latin-1"),
                      "invalid UTF-8 byte 0xe9 at byte 18 of the line"),
    "meta is a list": (amazon.META, b"['c', [['Electronics', 'Cameras']]]",
                       "a metadata line must be an object (JSON or a Python dict) with asin and categories, "
                       + "got a list"),
    "categories a string": (amazon.META, b"{'asin': 'c', 'categories': 'Electronics'}",
                            "categories must be a list of category paths, each a list of strings from the root "
                            + "(e.g. [['Electronics', 'Cables']]), got the string \"Electronics\""),
    "categories a flat list": (amazon.META, b"{'asin': 'c', 'categories': ['Electronics', 'Cameras']}",
                               "categories must be a list of category paths"),
    "meta invalid UTF-8": (amazon.META, b"{'asin': 'c', 'title': 'caf\xe9', 'categories': [['Electronics']]}",
                           "invalid UTF-8 byte 0xe9"),
}


def write_bad(directory, name):
    write(directory)
    file, bad, _ = BAD_LINES[name]
    path = directory / file
    lines = path.read_bytes().split(b"\n")
    lines[2] = bad
    path.write_bytes(b"\n".join(lines))
    return path


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_bad_lines_name_file_and_line_and_write_nothing(tmp_path, name):
    path = write_bad(tmp_path, name)
    message = BAD_LINES[name][2]
    with pytest.raises(ValueError) as err:
        amazon.load(str(tmp_path))
    assert str(err.value).startswith(f"{path}:3: {message}"), str(err.value)
    workdir = tmp_path / "run"
    with pytest.raises(jtasks.UsageError) as err:  # the task: one message, before anything is written
        jtasks.run(amazon_config(tmp_path), str(workdir))
    assert str(err.value).startswith(f"{path}:3: {message}") and not workdir.exists()


def test_bad_line_exits_2_from_the_command_line(tmp_path):
    path = write_bad(tmp_path, "invalid UTF-8")
    workdir = tmp_path / "run"
    proc = testing.run_main("configs/kfatt.py:smoke", str(workdir), "--config.data.name=amazon",
                            f"--config.data.data_dir={tmp_path}", "--config.data.maxlen=3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{path}:3: invalid UTF-8 byte 0xe9" in proc.stderr and "Traceback" not in proc.stderr
    assert not workdir.exists()


def test_gzip_errors_name_the_line(tmp_path):
    write(tmp_path, gz=True)
    path = tmp_path / (amazon.REVIEWS + ".gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ValueError, match=rf"^{path}:\d+: cannot be read .*Re-download"):
        amazon.load(str(tmp_path))


def test_duplicate_reviews_are_dropped_and_counted(tmp_path, caplog):
    write(tmp_path)
    clean = amazon.load(str(tmp_path), maxlen=2)
    reviews = REVIEWS[:3] + [REVIEWS[1]] + REVIEWS[3:] + [REVIEWS[9], REVIEWS[9]]  # line 4 repeats 2, 15/16 repeat 11
    write(tmp_path, reviews=reviews)
    with caplog.at_level("WARNING"):
        dup = amazon.load(str(tmp_path), maxlen=2)
    assert "dropped 3 duplicate review line(s)" in caplog.text and "line 4 repeats line 2" in caplog.text
    assert amazon.read_reviews(str(tmp_path)).duplicates == 3
    for name in clean:
        for key in clean[name]:
            np.testing.assert_array_equal(clean[name][key], dup[name][key], err_msg=f"{name}/{key}")
    # the same item reviewed again at another time is a review, not a duplicate
    write(tmp_path, reviews=REVIEWS + [("u1", "b", 7)])
    assert amazon.read_reviews(str(tmp_path)).duplicates == 0


TIED = [  # day resolution: many reviews share a time
    ("u1", "c", 86400), ("u1", "a", 86400), ("u1", "b", 86400), ("u1", "d", 2 * 86400), ("u1", "e", 2 * 86400),
    ("u2", "e", 0), ("u2", "d", 0), ("u2", "a", 86400), ("u2", "b", 86400), ("u2", "c", 86400),
    ("u3", "b", 5), ("u3", "a", 5), ("u3", "f", 6), ("u3", "c", 6),
    ("u4", "a", 1), ("u4", "b", 2), ("u4", "c", 3),
]


def test_order_is_independent_of_line_order(tmp_path):
    meta = {a: ["Electronics", f"L1-{a}", f"L2-{a}"] for a in "abcdef"}
    base = tmp_path / "base"
    base.mkdir()
    write(base, reviews=TIED, meta=meta)
    expected = amazon.load(str(base), maxlen=3, seed=3, dedup_category_level=1)
    r = amazon.read_reviews(str(base))
    names = r.item_names
    u1 = np.flatnonzero(expected["test"]["user"] == 0)[0]  # ties broken by asin: a b c | d e
    assert list(names[expected["test"]["hist_item"][u1]]) == ["b", "c", "d"]
    assert names[expected["test"]["item"][u1]] == "e"
    for k in range(3):
        lines = list(TIED)
        random.Random(k).shuffle(lines)
        items = list(meta.items())
        random.Random(k).shuffle(items)
        shuffled = tmp_path / f"shuffled{k}"
        shuffled.mkdir()
        write(shuffled, reviews=lines, meta=dict(items))
        got = amazon.load(str(shuffled), maxlen=3, seed=3, dedup_category_level=1)
        for name in expected:
            assert list(got[name]) == list(expected[name])
            for key in expected[name]:
                np.testing.assert_array_equal(got[name][key], expected[name][key], err_msg=f"{k} {name}/{key}")


def test_negatives_paper_rule_by_default_dien_as_option(tmp_path):
    write(tmp_path)
    r = amazon.read_reviews(str(tmp_path))
    reviewed = {}
    for u, i in zip(r.user, r.item):
        reviewed.setdefault(int(u), set()).add(int(i))

    def negatives_in_history(splits):
        rows = [(int(u), int(i)) for s in splits.values() for u, i in zip(s["user"][1::2], s["item"][1::2])]
        return sum(i in reviewed[u] for u, i in rows), rows

    for seed in range(5):
        hits, rows = negatives_in_history(amazon.load(str(tmp_path), maxlen=2, seed=seed))
        assert hits == 0
        assert {i for u, i in rows if u == 2} == {int(np.searchsorted(r.item_names, "f"))}  # u3's only unreviewed item
    hits = 0
    for seed in range(5):
        splits = amazon.load(str(tmp_path), maxlen=2, seed=seed, negatives="dien")
        assert all(np.all(s["item"][0::2] != s["item"][1::2]) for s in splits.values())
        hits += negatives_in_history(splits)[0]
    assert hits > 0  # the DIEN code only excludes the positive itself
    # no unreviewed item left for a user: a clear error instead of an endless redraw
    write(tmp_path, reviews=[r for r in REVIEWS if r[1] != "f"])
    with pytest.raises(ValueError, match="user 'u3' has reviewed every one of the 5 items.*negatives='dien'"):
        amazon.load(str(tmp_path), maxlen=2)


def test_dedup_category_level(tmp_path):
    meta = {"a": ["Electronics", "Computers", "Cables", "USB"], "b": ["Electronics", "Computers", "Cables", "HDMI"],
            "c": ["Electronics", "Camera", "Lenses"], "d": ["Electronics", "Audio"]}
    write(tmp_path, meta=meta)
    leaf = amazon.load(str(tmp_path), maxlen=4)
    assert "hist_dedup" not in leaf["train"]
    r = amazon.read_reviews(str(tmp_path), dedup_category_level=1)
    assert list(r.cat_names) == [amazon.UNKNOWN_CATEGORY, "Audio", "HDMI", "Lenses", "USB"]  # the leaf
    for level, expected in ((1, ["Audio", "Camera", "Computers", "Computers", "<unknown>", "<unknown>"]),
                            (2, ["Audio", "Lenses", "Cables", "Cables", "<unknown>", "<unknown>"]),
                            (3, ["Audio", "Lenses", "USB", "HDMI", "<unknown>", "<unknown>"])):
        r = amazon.read_reviews(str(tmp_path), dedup_category_level=level)
        got = {name: r.dedup_names[r.item_dedup[i]] for i, name in enumerate(r.item_names)}
        assert [got[a] for a in "dcabef"] == expected, level
        splits = amazon.load(str(tmp_path), maxlen=4, dedup_category_level=level)
        for name, split in splits.items():
            hist = split["hist_item"]
            want = np.where(hist != amazon.PAD, r.item_dedup[np.maximum(hist, 0)], amazon.PAD)
            np.testing.assert_array_equal(split["hist_dedup"], want)
            for key in ("cat", "hist_cat", "new", "hist_item"):  # query, keys and slices stay the leaf
                np.testing.assert_array_equal(split[key], leaf[name][key])


def test_dedup_level_reaches_kfatt_freq(tmp_path):
    meta = {"a": ["Electronics", "Computers", "USB"], "b": ["Electronics", "Computers", "HDMI"],
            "c": ["Electronics", "Camera", "Lenses"], "d": ["Electronics", "Audio"]}
    write(tmp_path, meta=meta)
    outputs = {}
    for level in (-1, 1):
        cfg = amazon_config(tmp_path, dedup_category_level=level)
        cfg.model.name = "kfatt_freq"
        assert jtasks.validate(cfg) == []
        task = ctr.build(cfg)
        batch = task.eval_sources["test"].get_batch(np.arange(6))
        assert ("hist_dedup" in batch) == (level != -1)
        params = jax.jit(task.init)(jax.random.key(0))
        loss, _ = task.loss(params, batch, jax.random.key(1))
        assert np.isfinite(loss)
        outputs[level] = np.asarray(task.predict(params, batch)["prob"])
    # u1's test history [b, c] -> [a, b, c] at maxlen 3: a and b share 'Computers' at level 1 only
    assert not np.allclose(outputs[-1], outputs[1])


def test_infreq_counts_training_positives_and_is_a_config_field(tmp_path):
    write(tmp_path)
    splits = amazon.load(str(tmp_path), maxlen=2, infreq_threshold=2)
    train = splits["train"]
    counts = np.bincount(train["cat"][0::2], minlength=4)  # positives only: u1 b, u3 e, a -> unknown 1, Cables 2
    assert list(counts) == [1, 2, 0, 0]
    for split in splits.values():
        np.testing.assert_array_equal(split["infreq"], counts[split["cat"]] < 2)
    cfg = amazon_config(tmp_path, infreq_threshold=2)
    _, from_config, _ = ctr.load_splits(cfg.data)
    np.testing.assert_array_equal(from_config["test"]["infreq"][0::2], splits["test"]["infreq"][0::2])
    cfg.data.infreq_threshold = 0
    _, none_rare, _ = ctr.load_splits(cfg.data)
    assert set(none_rare.pop("id_names")) == {"user", "item", "cat"}  # raw ids of the codes, for the feature map
    assert not any(s["infreq"].any() for s in none_rare.values())


@pytest.mark.parametrize("field, value, message", [
    ("negatives", "popular", "data.negatives must be 'unreviewed'"),
    ("dedup_category_level", 0, "data.dedup_category_level must be -1"),
    ("infreq_threshold", -1, "data.infreq_threshold must be an integer >= 0"),
])
def test_reader_options_are_validated(tmp_path, field, value, message):
    cfg = amazon_config(tmp_path, **{field: value})
    errors = jtasks.validate(cfg)
    assert any(message in e for e in errors), errors


def test_benchmark_generator_writes_the_public_layout(tmp_path):
    from benchmarks import amazon_reader

    stats = amazon_reader.generate(str(tmp_path), reviews=3000, seed=0)
    splits = amazon.load(str(tmp_path), maxlen=20)
    positives = sum(len(s["label"]) // 2 for s in splits.values())
    assert positives == stats["reviews"] - stats["duplicates"] - stats["users"]
    assert (tmp_path / amazon.META).read_text().startswith("{'asin': ")  # Python-literal meta, as published


def test_feature_map_rows_are_raw_asins_across_directories(tmp_path):
    """A new asin that sorts first shifts every per-directory code, but not the map's rows: the map
    built on one directory encodes the other's common items to the same rows, and refuses it."""
    from jdjax.data.features import FeatureMap

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write(a)
    write(b, reviews=REVIEWS + [("u6", "0new", 7), ("u6", "a", 8)])
    features = amazon.features(4, 3)
    load = lambda d: amazon.load(str(d), maxlen=3, seed=0, infreq_threshold=1, with_id_names=True)  # noqa: E731
    sa, sb = load(a), load(b)
    names_a, names_b = sa.pop("id_names"), sb.pop("id_names")
    fmap = FeatureMap.fit(features, sa["train"], oov_rate=0.0, id_names=names_a)
    rows_a = fmap.encode(sa["test"], id_names=names_a)["item"]
    rows_b = fmap.encode(sb["test"], id_names=names_b)["item"]
    asins_a = names_a["item"][sa["test"]["item"]]
    asins_b = names_b["item"][sb["test"]["item"]]
    assert not np.array_equal(sa["test"]["item"][: len(asins_a)], sb["test"]["item"][: len(asins_a)])  # codes moved
    for asin, row in zip(asins_b, rows_b):
        if asin in set(asins_a):
            assert row == rows_a[list(asins_a).index(asin)], asin
    with pytest.raises(ValueError, match="was not built from this training data.*1 of the data's 5 known ids"):
        fmap.check_data(features, sb["train"], "feature_map.json", data=str(b), id_names=names_b)
