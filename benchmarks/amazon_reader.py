"""Peak memory and time of the Amazon Electronics reader (jdjax/data/amazon.py) at full size.

    python -m benchmarks.amazon_reader                                   # 1,689,188 reviews, records
    python -m benchmarks.amazon_reader --reviews=180000 --baseline_rev=3480705   # vs an older reader
    python -m benchmarks.amazon_reader --smoke                           # 20k reviews, records nothing

Generates the two files in the public layout into a temporary directory (deleted after):
`reviews_Electronics_5.json` (JSON lines with every public field: reviewerID, asin,
reviewerName, helpful, reviewText, overall, summary, unixReviewTime at day resolution,
reviewTime) and `meta_Electronics.json` (Python-literal lines: asin, imUrl, related, salesRank,
categories, title, price), sized like the real 5-core Electronics set: users, items and
categories scale with --reviews from 192,403 users, 63,001 items and 801 leaf categories at
1,689,188 reviews; every user has >= 5 reviews (heavy-tailed), items are Zipf-popular, and the
meta file lists 498,196 items at full size (the real file lists every Electronics item, most
never reviewed in the 5-core set).

Each reader runs `load(data_dir, maxlen)` in a fresh child Python process; peak memory is the
child's VmHWM (/proc/self/status: the kernel's high-water mark of the child's resident memory,
which includes the interpreter and the imports: `import_gb` is the same figure right after the
imports; getrusage's ru_maxrss is not used, Linux carries the forked parent's resident size
over exec into it), time is the wall time of `load` in the child. `output_gb` is the size of
the returned arrays. `--baseline_rev` also runs the reader of that git revision on the same
files (e.g. 3480705, the per-review-dict reader).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

FULL = dict(reviews=1_689_188, users=192_403, items=63_001, categories=801, meta_items=498_196)
L1 = ["Computers & Accessories", "Camera & Photo", "Accessories & Supplies", "Television & Video", "Car Electronics",
      "Portable Audio & Video", "Home Audio", "Headphones", "GPS & Navigation", "Cell Phones & Accessories"]
WORDS = ("the this is great cable works fine price quality sound battery camera lens bought for my with and not "
         "very good would recommend it to anyone who needs a small light easy use after months still").split()

_REVIEWS = flags.DEFINE_integer("reviews", FULL["reviews"], "Reviews to generate (users, items scale with it).")
_MAXLEN = flags.DEFINE_integer("maxlen", 100, "History length (the KFAtt/DIEN setting).")
_TEXT = flags.DEFINE_integer("text_chars", 400, "Characters of reviewText per review (only file size and parse time).")
_BASELINE = flags.DEFINE_string("baseline_rev", "", "Also run the reader of this git revision on the same files.")
_SMOKE = flags.DEFINE_bool("smoke", False, "20k reviews; print but do not record.")


def _scaled(reviews: int) -> dict:
    f = reviews / FULL["reviews"]
    users = max(2, min(reviews // 5, round(FULL["users"] * f)))
    items = max(10, round(FULL["items"] * f))
    return dict(reviews=reviews, users=users, items=items, categories=max(4, min(FULL["categories"], items // 20)),
                meta_items=max(items, round(FULL["meta_items"] * f)))


def _ids(prefix: str, index: np.ndarray, modulus: int, width: int) -> list[str]:
    """Distinct id strings of the public shape (scrambled, fixed width) for distinct indices."""
    code = (index.astype(np.int64) * 2654435761) % modulus  # 2654435761 is prime: a bijection mod 36^k
    digits = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    chars = []
    for _ in range(width):
        chars.append(digits[code % 36])
        code //= 36
    return [prefix + "".join(c) for c in zip(*reversed(chars))]


def _review_time(stamp: int) -> str:
    t = time.gmtime(stamp)
    return f"{t.tm_mon:02d} {t.tm_mday}, {t.tm_year}"  # as published: "06 2, 2013"


def generate(directory: str, reviews: int = FULL["reviews"], seed: int = 0, text_chars: int = 400) -> dict:
    """Writes the two files into `directory`; returns the sizes (reviews, users, items, duplicates)."""
    size = _scaled(reviews)
    rng = np.random.default_rng(seed)
    users, items = size["users"], size["items"]
    activity = rng.lognormal(0.0, 1.2, users)
    extra = rng.multinomial(reviews - 5 * users, activity / activity.sum())
    per_user = 5 + extra  # [U] 5-core: >= 5 reviews each, heavy tail
    popularity = 1.0 / (np.arange(items) + 20.0)
    item_of = rng.choice(items, size=reviews, p=popularity / popularity.sum())  # [R]
    user_of = rng.permutation(np.repeat(np.arange(users), per_user))  # [R] users interleaved as in the file
    day = rng.integers(10957, 16274, size=reviews)  # 2000-01-01 .. 2014-07-23, day resolution (ties)
    stamp = day * 86400
    triples = np.unique(np.stack([user_of, item_of, stamp], 1), axis=0)
    user_names = _ids("A1", np.arange(users), 36**12, 12)
    item_names = _ids("B", np.arange(size["meta_items"]), 36**9, 9)  # the first `items` are reviewed
    text = " ".join(rng.choice(WORDS, size=20000))
    with open(os.path.join(directory, "reviews_Electronics_5.json"), "w") as f:
        for k in range(reviews):
            start = int(rng.integers(0, len(text) - text_chars))
            line = {
                "reviewerID": user_names[user_of[k]], "asin": item_names[item_of[k]], "reviewerName": "J. Smith",
                "helpful": [int(k % 7), int(k % 11)], "reviewText": text[start : start + text_chars],
                "overall": float(1 + k % 5), "summary": text[start : start + 30], "unixReviewTime": int(stamp[k]),
                "reviewTime": _review_time(int(stamp[k])),
            }
            f.write(json.dumps(line) + "\n")
    cats = size["categories"]
    leaf_weight = 1.0 / (np.arange(cats) + 5.0)
    leaf_of = rng.choice(cats, size=size["meta_items"], p=leaf_weight / leaf_weight.sum())
    # 2..4 levels below the root 'Electronics', the last one the leaf, as in the real paths
    paths = [["Electronics", L1[c % len(L1)], f"{L1[c % len(L1)]} group {c % 60}", f"Sub {c % 200}"][: 2 + c % 3]
             + [f"Leaf {c}"] for c in range(cats)]
    with open(os.path.join(directory, "meta_Electronics.json"), "w") as f:
        for k in rng.permutation(size["meta_items"]).tolist():  # reviewed items spread over the file
            asin = item_names[k]
            related = [item_names[j] for j in rng.integers(0, size["meta_items"], 8)]
            line = {"asin": asin, "imUrl": f"http://ecx.images-amazon.com/images/I/{asin}.jpg",
                    "related": {"also_bought": related[:5], "bought_together": related[5:]},
                    "salesRank": {"Electronics": int(k * 7 % 100000)}, "categories": [paths[leaf_of[k]]],
                    "title": f"Product {asin} {text[k % 1000 : k % 1000 + 30]}", "price": round(5 + k % 300 * 0.99, 2)}
            f.write(repr(line) + "\n")
    return dict(size, duplicates=reviews - len(triples))


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])


def peak_gb():
    # VmHWM: the high-water mark of this process's own resident memory since exec. getrusage's ru_maxrss
    # is not used: Linux carries the forked parent's resident size over exec into it.
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if sys.argv[4]:
    import old_amazon as amazon
else:
    from jdjax.data import amazon
import_gb = peak_gb()
t0 = time.perf_counter()
splits = amazon.load(sys.argv[1], maxlen=int(sys.argv[2]))
load_s = time.perf_counter() - t0
print(json.dumps({"load_s": load_s, "peak_gb": peak_gb(), "import_gb": import_gb,
                  "output_gb": sum(v.nbytes for s in splits.values() for v in s.values()) / 2**30,
                  "pairs": sum(len(s["label"]) // 2 for s in splits.values())}))
"""

def measure(data_dir: str, maxlen: int, baseline_dir: str = "") -> dict:
    """Runs one reader in a child process (see the module docstring)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = [data_dir, str(maxlen), baseline_dir or ".", "1" if baseline_dir else ""]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"the reader failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    from benchmarks import harness

    reviews = 20_000 if _SMOKE.value else _REVIEWS.value
    workdir = tempfile.mkdtemp(prefix="amazon_reader_")
    try:
        t0 = time.perf_counter()
        size = generate(workdir, reviews, text_chars=_TEXT.value)
        generate_s = time.perf_counter() - t0
        file_gb = sum(os.path.getsize(os.path.join(workdir, n)) for n in os.listdir(workdir)) / 2**30
        readers = {"": "jdjax/data/amazon.py"}
        if _BASELINE.value:
            old = os.path.join(workdir, "old")
            os.mkdir(old)
            source = subprocess.run(["git", "show", f"{_BASELINE.value}:jdjax/data/amazon.py"], capture_output=True,
                                    text=True, check=True, cwd=os.path.dirname(harness.HERE)).stdout
            with open(os.path.join(old, "old_amazon.py"), "w") as f:
                f.write(source)
            readers[old] = f"jdjax/data/amazon.py at {_BASELINE.value}"
        for baseline_dir, label in readers.items():
            load1 = os.getloadavg()[0]
            result = measure(workdir, _MAXLEN.value, baseline_dir)
            harness.record(
                "amazon_reader",
                f"{label}, {reviews} reviews",
                {"reviews": reviews, "users": size["users"], "items": size["items"], "meta_items": size["meta_items"],
                 "maxlen": _MAXLEN.value, "pairs": result["pairs"], "files_gb": file_gb,
                 "peak_gb": result["peak_gb"], "import_gb": result["import_gb"], "output_gb": result["output_gb"],
                 "load_s": result["load_s"], "generate_s": generate_s, "load1": load1,
                 "notes": "Peak resident memory of amazon.load(data_dir, maxlen) on generated files in the public "
                 "layout (5-core Electronics sizes scaled by the review count), in a fresh child process: "
                 "peak_gb = the child's VmHWM, the high-water mark of its resident memory (includes the interpreter "
                 "and jax/flax imports, import_gb); output_gb = the returned arrays; load_s = wall time of load. "
                 "load1 = 1-minute load average before the run (2 shared cores)."},
                smoke=_SMOKE.value,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
