"""Amazon Electronics (McAuley et al.) reader for user-behaviour CTR, the DIN/DIEN/KFAtt data set.

    splits = load('/data/amazon', maxlen=100)   # {'train', 'val', 'test'} -> dict of arrays

Files in the directory (plain or .gz): `reviews_Electronics_5.json` (the 5-core reviews, one
JSON object per line: reviewerID, asin, unixReviewTime) and `meta_Electronics.json` (one
object per line, JSON or the original Python-literal format: asin, categories). The leaf
category of an item is `categories[0][-1]` (as in the DIEN code); items without meta get the
category '<unknown>'.

Protocol (DIEN's sampling, the paper's split; the DIEN scripts instead build both train and
test from the last pairs only, see the spec §1.5):
  * each user's reviews are sorted by time; review t is a positive whose history is the user's
    reviews before t (the most recent `maxlen`, oldest first); reviews with no history are skipped;
  * each positive is paired with one negative: an item drawn uniformly from the global list of
    review rows (so popularity-weighted), redrawn while it equals the positive's item; the
    negative carries its own category and the same history;
  * per user the last pair is test, the one before val, the rest train (DIEN selects on the test
    set; we select on val).
Raw string ids are mapped to integers (their sorted order) before batching; the CTR task
builds its vocabularies from the training split as for any data set. Slices: `new` (target
category absent from the history) and `infreq` (target category with fewer than
`infreq_threshold` training examples; 2000 in the paper).
"""

from __future__ import annotations

import ast
import gzip
import json
import os

import numpy as np

from jdjax.nn.ctr.features import SparseFeat, VarLenFeat

REVIEWS = "reviews_Electronics_5.json"
META = "meta_Electronics.json"
PAD = -1
UNKNOWN_CATEGORY = "<unknown>"


def features(embedding_dim: int, maxlen: int) -> tuple:
    """The same layout as the click log: user, item, leaf category and the behaviour sequences."""
    return (
        SparseFeat("user", embedding_dim),
        SparseFeat("item", embedding_dim),
        SparseFeat("cat", embedding_dim),
        VarLenFeat("hist_item", maxlen, embedding_dim, embedding_name="item", pad_value=PAD),
        VarLenFeat("hist_cat", maxlen, embedding_dim, embedding_name="cat", pad_value=PAD),
    )


def _find(data_dir: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"{name} (or {name}.gz) is not in {data_dir!r}. Download the Amazon Electronics 5-core reviews and the "
        "Electronics metadata (McAuley et al., jmcauley.ucsd.edu/data/amazon) into that directory."
    )


def _records(path: str):
    """Objects of a JSON-lines file whose lines may also be Python literals (the 2014 meta file)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                try:
                    yield ast.literal_eval(line)
                except (ValueError, SyntaxError) as e:
                    raise ValueError(f"{path}:{number} is neither JSON nor a Python literal ({e}); is the file corrupt?") from e


def read_reviews(data_dir: str) -> tuple[list[str], list[str], np.ndarray, dict[str, str]]:
    """(user ids, item ids, review times, item -> leaf category) from the two files."""
    users, items, times = [], [], []
    path = _find(data_dir, REVIEWS)
    for obj in _records(path):
        try:
            users.append(str(obj["reviewerID"]))
            items.append(str(obj["asin"]))
            times.append(int(obj["unixReviewTime"]))
        except KeyError as e:
            raise ValueError(f"{path}: a review has no {e.args[0]!r} field; expected reviewerID, asin, unixReviewTime.") from e
    if not users:
        raise ValueError(f"{path} holds no reviews.")
    category = {}
    for obj in _records(_find(data_dir, META)):
        cats = obj.get("categories") or [[]]
        if "asin" in obj and cats[0]:
            category[str(obj["asin"])] = str(cats[0][-1])
    return users, items, np.asarray(times, np.int64), category


def load(data_dir: str, maxlen: int = 100, seed: int = 0, infreq_threshold: int = 2000) -> dict:
    """The {'train', 'val', 'test'} splits (see the module docstring) as dicts of arrays."""
    users, items, times, category = read_reviews(data_dir)
    _, user_idx = np.unique(np.asarray(users), return_inverse=True)
    item_names, item_idx = np.unique(np.asarray(items), return_inverse=True)
    cat_names, item_cat = np.unique(
        np.asarray([category.get(name, UNKNOWN_CATEGORY) for name in item_names]), return_inverse=True
    )
    order = np.lexsort((times, user_idx))  # by user, then time
    user_idx, item_idx, times = user_idx[order], item_idx[order], times[order]
    rng = np.random.default_rng(seed)

    starts = np.flatnonzero(np.r_[True, user_idx[1:] != user_idx[:-1]])
    ends = np.r_[starts[1:], len(user_idx)]
    rows = {k: [] for k in ("user", "item", "cat", "hist_item", "label", "time", "rank_from_end")}
    for s, e in zip(starts, ends):
        seq = item_idx[s:e]
        for t in range(1, len(seq)):
            hist = seq[max(0, t - maxlen) : t]
            padded = np.full(maxlen, PAD, np.int64)
            padded[: len(hist)] = hist
            negative = seq[t]
            while negative == seq[t] and len(item_names) > 1:
                negative = item_idx[rng.integers(len(item_idx))]
            for item, label in ((seq[t], 1.0), (negative, 0.0)):
                rows["user"].append(user_idx[s])
                rows["item"].append(item)
                rows["hist_item"].append(padded)
                rows["label"].append(label)
                rows["time"].append(times[s + t])
                rows["rank_from_end"].append(len(seq) - 1 - t)
    if not rows["user"]:
        raise ValueError(f"no user in {data_dir!r} has two reviews; nothing to predict.")
    data = {k: np.asarray(v) for k, v in rows.items()}
    data["cat"] = item_cat[data["item"]]
    hist = data["hist_item"]
    data["hist_cat"] = np.where(hist != PAD, item_cat[np.maximum(hist, 0)], PAD)
    data["new"] = ~(data["hist_cat"] == data["cat"][:, None]).any(1)
    rank = data.pop("rank_from_end")
    splits = {"train": rank >= 2, "val": rank == 1, "test": rank == 0}
    out = {name: {k: v[sel] for k, v in data.items()} for name, sel in splits.items()}
    counts = np.bincount(out["train"]["cat"], minlength=len(cat_names))
    for split in out.values():
        split["infreq"] = counts[split["cat"]] < infreq_threshold
    return out
