"""Amazon Electronics (McAuley et al.) reader for user-behaviour CTR, the DIN/DIEN/KFAtt data set.

    splits = load('/data/amazon', maxlen=100)   # {'train', 'val', 'test'} -> dict of arrays

Files in the directory (plain or .gz, UTF-8): `reviews_Electronics_5.json` (the 5-core reviews,
one JSON object per line: reviewerID, asin, unixReviewTime) and `meta_Electronics.json` (one
object per line, JSON or the original Python-literal format: asin, categories, a list of
category paths from the root, e.g. [['Electronics', 'Computers & Accessories', 'Cables']]).
The category of an item is the leaf of its first path, `categories[0][-1]` (as in the DIEN
code); items without meta (or with no path) get the category '<unknown>'.

Protocol (the paper's split and negatives, DIEN's sampler otherwise; the DIEN scripts instead
build both train and test from the last pairs only, see the spec §1.5):
  * a review line with the same reviewerID, asin and unixReviewTime as an earlier line (the
    only fields read) is a duplicate and is dropped; the count is logged (a duplicate would
    otherwise be a positive whose target is already in its own history). The same item
    reviewed again at another time is kept;
  * each user's reviews are sorted by time, ties (unixReviewTime has day resolution) broken by
    asin, so the samples do not depend on the order of the lines; review t is a positive whose
    history is the user's reviews before t (the most recent `maxlen`, oldest first); reviews
    with no history are skipped;
  * each positive is paired with one negative with the same history and its own category, an
    item drawn from the global list of review rows (popularity-weighted, as in the DIEN code)
    and redrawn while it is excluded: `negatives='unreviewed'` (the default, the paper's
    "random not-reviewed items of this user", which names no distribution) excludes every item
    the user reviewed at any time; `negatives='dien'` (the DIEN code) excludes only the
    positive's own item, so some negatives are items the user reviewed. A user left with no
    item to draw is an error;
  * per user the last pair is test, the one before val, the rest train (DIEN selects on the test
    set; we select on val).
Raw string ids are mapped to integers (their sorted order) before batching; the CTR task
builds its vocabularies from the training split as for any data set. Slices: `new` (target
category absent from the history) and `infreq` (target category with fewer than
`infreq_threshold` training instances, 2000 in the paper; an instance is a review, as in the
paper's 1,689,188 instances, so the count is over the positives of the train split (the paper
has no val split) and negatives do not count).

KFAtt-freq's de-duplication key (`dedup_category_level`): -1 (default) the leaf category, the
`cat` feature itself (the paper's "3rd level"); k >= 1 the k-th level below the root of the
first path, `categories[0][k]` (the leaf when the path is shorter): the paper's Table 6 ablations
f-Cate2 and f-Cate1 are 2 and 1. Any level but -1 adds the column `hist_dedup` [N, maxlen]
(category ids at that level, -1 on padding), which the CTR task hands to the model as its
de-duplication ids; `cat` and `hist_cat` (the attention's query and keys) stay the leaf.

Arrays: ids int32 (`user`, `item`, `cat`, `hist_item`, `hist_cat`, `hist_dedup`; -1 pads the
histories), `label` float32, `time` int64, `new`, `infreq` bool; rows come in (positive,
negative) pairs, users in sorted order, each user's positives in time order.

Memory: the files are streamed line by line and only interned ids are kept (typed arrays, not
per-review objects); the histories are written in chunks straight into the split arrays. The
output is most of the peak: 2 x positives x maxlen x 4 bytes for each of hist_item and hist_cat
(2.4 GB for the 1.69M reviews of Electronics at maxlen 100; benchmarks/amazon_reader.py).

Errors: a line that cannot be used raises ValueError "path:line: what is wrong" (not UTF-8,
neither JSON nor a Python literal, not an object, a field missing or of the wrong type, e.g.
`categories` a string, whose leaf would be its last letter); the CTR task turns it into a
one-message exit (status 2) before anything is written. A meta line that starts with the asin
of an item nobody reviewed (most of the public meta file) is not parsed further.
"""

from __future__ import annotations

import array
import ast
import dataclasses
import gzip
import json
import os
import re
import zlib

import numpy as np
from absl import logging

from jdjax.nn.ctr.features import SparseFeat, VarLenFeat

REVIEWS = "reviews_Electronics_5.json"
META = "meta_Electronics.json"
PAD = -1
UNKNOWN_CATEGORY = "<unknown>"
NEGATIVES = ("unreviewed", "dien")
LEAF = -1
_CHUNK = 1 << 15  # positives per chunk when writing histories
_MAX_REDRAWS = 64  # rounds of vectorised redraws before the exact per-row draw
_DIGITS = re.compile(r"[0-9]+")
_LEADING_ASIN = re.compile(r"""\{\s*(['"])asin\1\s*:\s*(['"])([^'"\\]*)\2""")  # {'asin': 'B00...', ... -> group 3


def features(embedding_dim: int, maxlen: int) -> tuple:
    """The same layout as the click log: user, item, leaf category and the behaviour sequences."""
    return (
        SparseFeat("user", embedding_dim),
        SparseFeat("item", embedding_dim),
        SparseFeat("cat", embedding_dim),
        VarLenFeat("hist_item", maxlen, embedding_dim, embedding_name="item", pad_value=PAD),
        VarLenFeat("hist_cat", maxlen, embedding_dim, embedding_name="cat", pad_value=PAD),
    )


def check_options(maxlen: int = 100, infreq_threshold: int = 2000, negatives: str = "unreviewed",
                  dedup_category_level: int = LEAF) -> list[str]:
    """Problems of the reader's options (the CTR task reports them as config errors)."""
    errors = []
    if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
        errors.append(f"data.maxlen must be a positive integer, got {maxlen!r}.")
    if negatives not in NEGATIVES:
        errors.append(f"data.negatives must be 'unreviewed' (the paper: items the user never reviewed) or 'dien' "
                      f"(the DIEN code: any item but the positive), got {negatives!r}.")
    if isinstance(dedup_category_level, bool) or not isinstance(dedup_category_level, int) or not (
            dedup_category_level == LEAF or dedup_category_level >= 1):
        errors.append(f"data.dedup_category_level must be -1 (the leaf category) or a level >= 1 below the root "
                      f"(Table 6: 2 and 1), got {dedup_category_level!r}.")
    if isinstance(infreq_threshold, bool) or not isinstance(infreq_threshold, int) or infreq_threshold < 0:
        errors.append(f"data.infreq_threshold must be an integer >= 0 (training instances; 2000 in the paper), "
                      f"got {infreq_threshold!r}.")
    return errors


def _find(data_dir: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"{name} (or {name}.gz) is not in {data_dir!r}. Download the Amazon Electronics 5-core reviews and the "
        "Electronics metadata (McAuley et al., jmcauley.ucsd.edu/data/amazon) into that directory."
    )


def _lines(path: str):
    """(line number, stripped text) of the non-blank lines of a plain or gzipped UTF-8 file, one at a time."""
    opener = gzip.open if path.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(
                        f"{path}:{number}: invalid UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line; "
                        "the public files are UTF-8: re-download the file, or convert it "
                        "(e.g. iconv -f latin1 -t utf-8)."
                    ) from None
                line = line.strip()
                if line:
                    yield number, line
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}:{number + 1}: cannot be read ({e}); is the file complete? Re-download it.") from e


def _parse(path: str, number: int, line: str):
    """A line as JSON, else as a Python literal (the 2014 meta file)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        try:
            return ast.literal_eval(line)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError(
                f"{path}:{number}: neither JSON nor a Python literal ({e}); is the file corrupt?") from None


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return f"the string {_show(value)}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return f"a {type(value).__name__}"


def _show(value, limit: int = 60) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _string(obj: dict, key: str, path: str, number: int, what: str) -> str:
    if key not in obj:
        raise ValueError(f"{path}:{number}: the {what} has no {key!r} field; expected {_FIELDS[what]}.")
    value = obj[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path}:{number}: {key} must be a non-empty string, got {_kind(value)}.")
    return value


_FIELDS = {"review": "reviewerID, asin and unixReviewTime", "metadata line": "asin and categories"}


def _time(obj: dict, path: str, number: int) -> int:
    if "unixReviewTime" not in obj:
        raise ValueError(f"{path}:{number}: the review has no 'unixReviewTime' field; expected {_FIELDS['review']}.")
    value = obj["unixReviewTime"]
    if isinstance(value, int) and not isinstance(value, bool):
        t = value
    elif isinstance(value, float) and value.is_integer():
        t = int(value)
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        t = int(value)
    else:
        raise ValueError(
            f"{path}:{number}: unixReviewTime must be an integer (seconds since 1970), got {_kind(value)}.")
    if not 0 <= t < 2**63:
        raise ValueError(f"{path}:{number}: unixReviewTime must be in [0, 2^63) (seconds since 1970), got {t}.")
    return t


def _category_path(obj: dict, path: str, number: int) -> list[str] | None:
    """categories[0] of a metadata object, None when it has no category."""
    cats = obj.get("categories")
    if cats is None or (isinstance(cats, (list, tuple)) and not cats):
        return None
    if not isinstance(cats, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and all(isinstance(c, str) for c in p) for p in cats):
        got = _show(cats) if isinstance(cats, (list, tuple)) else _kind(cats)
        raise ValueError(
            f"{path}:{number}: categories must be a list of category paths, each a list of strings from the root "
            f"(e.g. [['Electronics', 'Cables']]), got {got}."
        )
    return list(cats[0]) or None


def _at_level(names: list[str], level: int) -> str:
    return names[-1] if level == LEAF else names[min(level, len(names) - 1)]


@dataclasses.dataclass
class Reviews:
    """The reviews of the two files, duplicates dropped, sorted by (user, time, asin).

    Names are sorted; ids index them. [R] arrays are per review, [I] per item."""

    user_names: np.ndarray  # [U] str
    item_names: np.ndarray  # [I] str
    cat_names: np.ndarray  # [C] leaf categories (UNKNOWN_CATEGORY for items without one)
    item_cat: np.ndarray  # [I] int32 into cat_names
    dedup_names: np.ndarray  # [D] categories at dedup_category_level (cat_names for the leaf)
    item_dedup: np.ndarray  # [I] int32 into dedup_names
    user: np.ndarray  # [R] int32
    item: np.ndarray  # [R] int32
    time: np.ndarray  # [R] int64
    line: np.ndarray  # [R] int32 line of the review in the reviews file
    duplicates: int  # lines dropped as duplicates


def _sorted_ids(interned: dict[str, int], ids: array.array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(names in sorted order [N], the first-appearance id of each sorted id [N], `ids` remapped to
    sorted ids) of ids interned in first-appearance order."""
    names = np.asarray(list(interned))  # [N] in first-appearance order
    order = np.argsort(names, kind="stable")
    rank = np.empty(len(names), np.int32)
    rank[order] = np.arange(len(names), dtype=np.int32)
    return names[order], order, rank[np.frombuffer(ids, np.int32)]


def read_reviews(data_dir: str, dedup_category_level: int = LEAF) -> Reviews:
    """Reads and checks both files (see the module docstring)."""
    path = _find(data_dir, REVIEWS)
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    user_ids, item_ids, lines = array.array("i"), array.array("i"), array.array("i")
    times = array.array("q")
    for number, line in _lines(path):
        obj = _parse(path, number, line)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{number}: a review must be an object with {_FIELDS['review']}, got {_kind(obj)}.")
        user = _string(obj, "reviewerID", path, number, "review")
        item = _string(obj, "asin", path, number, "review")
        t = _time(obj, path, number)
        user_ids.append(users.setdefault(user, len(users)))
        item_ids.append(items.setdefault(item, len(items)))
        times.append(t)
        lines.append(number)
    if not users:
        raise ValueError(f"{path}: holds no reviews; is it the right file?")

    meta_path = _find(data_dir, META)
    leaf: dict[int, str] = {}
    dedup: dict[int, str] = {}
    for number, line in _lines(meta_path):
        leading = _LEADING_ASIN.match(line)
        if leading and leading.group(3) not in items:
            continue  # an item nobody reviewed (most of the meta file): not parsed further
        obj = _parse(meta_path, number, line)
        if not isinstance(obj, dict):
            raise ValueError(f"{meta_path}:{number}: a metadata line must be an object (JSON or a Python dict) with "
                             f"{_FIELDS['metadata line']}, got {_kind(obj)}.")
        asin = _string(obj, "asin", meta_path, number, "metadata line")
        names = _category_path(obj, meta_path, number)
        item = items.get(asin)
        if item is None or names is None:
            continue
        leaf[item] = names[-1]
        if dedup_category_level != LEAF:
            dedup[item] = _at_level(names, dedup_category_level)

    user_names, _, user = _sorted_ids(users, user_ids)
    item_names, order, item = _sorted_ids(items, item_ids)  # order: sorted id -> first-appearance id
    del user_ids, item_ids
    item_leaf = np.asarray([leaf.get(int(i), UNKNOWN_CATEGORY) for i in order])  # [I] by sorted id
    cat_names, item_cat = np.unique(item_leaf, return_inverse=True)
    if dedup_category_level == LEAF:
        dedup_names, item_dedup = cat_names, item_cat
    else:
        dedup_names, item_dedup = np.unique(
            np.asarray([dedup.get(int(i), UNKNOWN_CATEGORY) for i in order]), return_inverse=True)

    time = np.frombuffer(times, np.int64)
    line = np.frombuffer(lines, np.int32)
    order = np.lexsort((line, item, time, user))  # by user, time, asin; file order only among duplicates
    user, item, time, line = user[order], item[order], time[order], line[order]
    keep = np.r_[True, (user[1:] != user[:-1]) | (item[1:] != item[:-1]) | (time[1:] != time[:-1])]
    duplicates = int(len(keep) - keep.sum())
    if duplicates:
        dup = int(np.flatnonzero(~keep)[0])
        logging.warning("%s: dropped %d duplicate review line(s) (the same reviewerID, asin and unixReviewTime as an "
                        "earlier line), e.g. line %d repeats line %d.", path, duplicates, line[dup], line[dup - 1])
        user, item, time, line = user[keep], item[keep], time[keep], line[keep]
    return Reviews(user_names, item_names, cat_names, item_cat.astype(np.int32), dedup_names,
                   item_dedup.astype(np.int32), user, item, time, line, duplicates)


def load(data_dir: str, maxlen: int = 100, seed: int = 0, infreq_threshold: int = 2000, negatives: str = "unreviewed",
         dedup_category_level: int = LEAF, with_id_names: bool = False) -> dict:
    """The {'train', 'val', 'test'} splits (see the module docstring) as dicts of arrays. Ids are
    codes into the sorted names of this directory; with `with_id_names`, out['id_names'] =
    {'user', 'item', 'cat': names [K]} maps them back to raw ids (FeatureMap stores raw ids)."""
    errors = check_options(maxlen, infreq_threshold, negatives, dedup_category_level)
    if errors:
        raise ValueError(" ".join(errors))
    r = read_reviews(data_dir, dedup_category_level)
    n = len(r.user)
    starts = np.flatnonzero(np.r_[True, r.user[1:] != r.user[:-1]])  # [U] first review of each user
    ends = np.r_[starts[1:], n]
    segment = np.repeat(np.arange(len(starts)), ends - starts)  # [R]
    first, last = starts[segment], ends[segment] - 1  # [R] each review's user's first and last review
    del segment
    positives = np.flatnonzero(np.arange(n) > first)  # [P] reviews with a history
    if not positives.size:
        raise ValueError(f"no user in {data_dir!r} has two reviews; nothing to predict.")
    rng = np.random.default_rng(seed)
    negative = _negatives(r, positives, first, last, negatives, rng)  # [P]
    rank = last[positives] - positives  # 0 = the user's last review
    out = {}
    for name, sel in (("train", rank >= 2), ("val", rank == 1), ("test", rank == 0)):
        out[name] = _pairs(r, positives[sel], negative[sel], first, maxlen, dedup_category_level != LEAF)
    counts = np.bincount(out["train"]["cat"][0::2], minlength=len(r.cat_names))  # training positives per category
    for split in out.values():
        split["infreq"] = counts[split["cat"]] < infreq_threshold
    logging.info("Amazon: %d reviews (%d duplicates dropped), %d users, %d items, %d categories; pairs train %d, "
                 "val %d, test %d.", n, r.duplicates, len(r.user_names), len(r.item_names), len(r.cat_names),
                 *(len(s["label"]) // 2 for s in out.values()))
    if with_id_names:
        out["id_names"] = {"user": r.user_names, "item": r.item_names, "cat": r.cat_names}
    return out


def _negatives(r: Reviews, positives, first, last, rule: str, rng) -> np.ndarray:
    """[P] int32 negative items: review rows drawn uniformly (items by popularity), redrawn while excluded."""
    num_items, n = len(r.item_names), len(r.item)
    if rule == "unreviewed":
        reviewed = np.unique(r.user.astype(np.int64) * num_items + r.item)  # sorted (user, item) keys

        def excluded(idx, cand):
            key = r.user[positives[idx]].astype(np.int64) * num_items + cand
            return reviewed[np.minimum(np.searchsorted(reviewed, key), len(reviewed) - 1)] == key
    else:

        def excluded(idx, cand):
            return cand == r.item[positives[idx]]

    negative = r.item[rng.integers(n, size=len(positives))]
    todo = np.flatnonzero(excluded(np.arange(len(positives)), negative))
    for _ in range(_MAX_REDRAWS):
        if not todo.size:
            break
        negative[todo] = r.item[rng.integers(n, size=todo.size)]
        todo = todo[excluded(todo, negative[todo])]
    if todo.size:  # users who reviewed most of the popular items: draw from what is left, by popularity
        popularity = np.bincount(r.item, minlength=num_items).astype(np.float64)
        for i in todo:
            p = positives[i]
            weights = popularity.copy()
            weights[r.item[first[p] : last[p] + 1] if rule == "unreviewed" else r.item[p]] = 0.0
            if not weights.sum():
                raise ValueError(
                    f"user {str(r.user_names[r.user[p]])!r} has reviewed every one of the {num_items} items, so no "
                    f"negative can be drawn under data.negatives={rule!r}; add data or use data.negatives='dien'."
                    if rule == "unreviewed" else
                    f"every review is of the item {str(r.item_names[r.item[p]])!r}, so no negative can be drawn."
                )
            negative[i] = rng.choice(num_items, p=weights / weights.sum())
    return negative.astype(np.int32)


def _pairs(r: Reviews, positives, negative, first, maxlen: int, with_dedup: bool) -> dict:
    """The (positive, negative) rows of `positives` [P] (indices into the sorted reviews)."""
    n = len(positives)
    item = np.empty(2 * n, np.int32)
    item[0::2], item[1::2] = r.item[positives], negative
    out = {
        "user": np.repeat(r.user[positives], 2),
        "item": item,
        "cat": r.item_cat[item],
        "hist_item": np.empty((2 * n, maxlen), np.int32),
        "label": np.tile(np.asarray([1.0, 0.0], np.float32), n),
        "time": np.repeat(r.time[positives], 2),
        "hist_cat": np.empty((2 * n, maxlen), np.int32),
    }
    if with_dedup:
        out["hist_dedup"] = np.empty((2 * n, maxlen), np.int32)
    new = np.empty(2 * n, bool)
    j = np.arange(maxlen)
    for a in range(0, n, _CHUNK):
        p = positives[a : a + _CHUNK]  # [c]
        b = a + len(p)
        length = np.minimum(p - first[p], maxlen)  # [c] history length
        valid = j < length[:, None]  # [c, T] oldest first, padding at the end
        hist = r.item[np.where(valid, (p - length)[:, None] + j, 0)]  # [c, T]
        columns = {"hist_item": hist, "hist_cat": r.item_cat[hist]}
        if with_dedup:
            columns["hist_dedup"] = r.item_dedup[hist]
        for key, values in columns.items():
            values = np.where(valid, values, PAD)
            out[key][2 * a : 2 * b : 2] = values
            out[key][2 * a + 1 : 2 * b : 2] = values
        cats = out["cat"][2 * a : 2 * b].reshape(-1, 2)  # [c, 2] (positive, negative)
        hist_cat = np.where(valid, columns["hist_cat"], PAD)
        new[2 * a : 2 * b : 2] = ~(hist_cat == cats[:, :1]).any(1)
        new[2 * a + 1 : 2 * b : 2] = ~(hist_cat == cats[:, 1:]).any(1)
    out["new"] = new
    return out
