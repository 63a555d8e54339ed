"""The Amazon Electronics reader on tiny files written here (JSON reviews, Python-literal meta)."""

import gzip
import json

import numpy as np
import pytest

from configs import kfatt as kfatt_config
from jdjax.data import amazon
from jdjax.tasks import ctr

REVIEWS = [  # (user, item, time)
    ("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u1", "d", 4),
    ("u2", "c", 5), ("u2", "a", 1), ("u2", "e", 9),
    ("u3", "b", 1), ("u3", "e", 2), ("u3", "a", 3), ("u3", "c", 4), ("u3", "d", 5),
    ("u4", "a", 1),  # one review: no example
]
META = {"a": "Cables", "b": "Cables", "c": "Cameras", "d": "Headphones"}  # e has no meta


def write(directory, gz=False):
    reviews = "\n".join(json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0}) for u, i, t in REVIEWS)
    meta = "\n".join(repr({"asin": a, "categories": [["Electronics", c]], "title": f"item {a}"}) for a, c in META.items())
    if gz:
        with gzip.open(directory / (amazon.REVIEWS + ".gz"), "wt") as f:
            f.write(reviews)
    else:
        (directory / amazon.REVIEWS).write_text(reviews)
    (directory / amazon.META).write_text(meta)


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
    _, items, _, category = amazon.read_reviews(str(tmp_path))
    item_names = np.unique(items)
    test = splits["test"]
    u1 = np.flatnonzero(test["user"] == 0)[0]  # u1's last review: d after b, c (maxlen 2)
    assert list(item_names[test["hist_item"][u1]]) == ["b", "c"] and item_names[test["item"][u1]] == "d"
    cats = np.unique([category.get(i, amazon.UNKNOWN_CATEGORY) for i in item_names])
    assert cats[test["cat"][u1]] == "Headphones" and test["new"][u1]
    u2 = np.flatnonzero(test["user"] == 1)[0]  # u2: a (t=1), c (t=5), e (t=9) -> history [a, c], e unknown
    assert list(item_names[test["hist_item"][u2]]) == ["a", "c"] and cats[test["cat"][u2]] == amazon.UNKNOWN_CATEGORY
    assert splits["train"]["infreq"].dtype == bool


def test_task_builds_on_amazon(tmp_path):
    write(tmp_path)
    cfg = kfatt_config.get_config("smoke")
    cfg.data.name, cfg.data.data_dir, cfg.data.maxlen = "amazon", str(tmp_path), 3
    task = ctr.build(cfg)
    assert len(task.train_source) == 6 and set(task.eval_sources) == {"val", "test"}
    batch = task.eval_sources["test"].get_batch(np.arange(6))
    assert batch["hist_item"].shape == (6, 3) and "new" in batch and "repeat" not in batch


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="reviews_Electronics_5.json"):
        amazon.load(str(tmp_path))
    write(tmp_path)
    (tmp_path / amazon.META).write_text("{'asin': 'a', 'categories': [[")
    with pytest.raises(ValueError, match="neither JSON nor a Python literal"):
        amazon.load(str(tmp_path))
