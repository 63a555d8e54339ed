"""benchmarks/prodgen.py in its smoke mode (tiny transformer and transformer_copy; the code is method-agnostic
and the review methods' compiles would double the time): every case, column and the copy-head cost row come
out, nothing reaches benchmarks/RESULTS.md unless told; the batch layout, paper sizes and caps are checked
without compiling.

No timing thresholds: the numbers are only checked to be positive and consistent.
"""

import json
import math
import os

import numpy as np
import pytest

from benchmarks import harness, prodgen_accuracy
from benchmarks import prodgen as bench

METHODS = ("transformer", "transformer_copy")
CASES = [f"smoke {m} {part} b4" for m in METHODS for part in ("train", "beam5")] + ["smoke cost copy-head"]


def _smoke_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if '"case": "smoke ' in line]


@pytest.fixture(scope="module")
def rows():
    before = _smoke_lines(harness.RESULTS_JSONL)
    out = bench.run(smoke=True, methods=METHODS, log=lambda *a, **k: None)
    assert _smoke_lines(harness.RESULTS_JSONL) == before  # --smoke records nothing
    return out


@pytest.mark.slow  # shares a module fixture that compiles and runs the whole smoke pipeline (60-80 s)
def test_all_cases_and_columns(rows):
    assert sorted(rows) == sorted(CASES)
    keys = {"train": ["examples_per_s", "tokens_per_s", "target_fill", "source_fill", "xla_gflop", "mem_temp_mb",
                      "params"],
            "beam5": ["products_per_s", "mean_out_len", "mem_temp_mb"]}
    for case, row in rows.items():
        if row["part"] == "copy-head":
            continue
        for key in ["ms", "compile_s", "warmup_s", "vs_transformer"] + keys[row["part"]]:
            assert math.isfinite(row[key]) and row[key] > 0, (case, key, row[key])
        assert row["size"] == "smoke" and row["batch"] == 4 and row["capped_from"] is None and row["repeats"] == 2
        assert row["dims"] == "V64 Ls12+16 R3x12 Lt24 C16 F32 h2 x1"
    tf, copy = rows["smoke transformer beam5 b4"], rows["smoke transformer_copy beam5 b4"]
    assert tf["vs_transformer"] == 1.0 and tf["beam_size"] == 5 and tf["max_len"] == 24
    assert 0 < tf["mean_out_len"] <= 24 and tf["copied_out"] == 0  # no copy head: never an extended id
    assert rows["smoke transformer_copy train b4"]["params"] > rows["smoke transformer train b4"]["params"]  # p_gen
    cost = rows["smoke cost copy-head"]
    assert cost["method"] == "transformer_copy / transformer" and cost["repeats"] == 2
    assert cost["beam5_ratio"] == pytest.approx(copy["vs_transformer"])
    lo, hi = map(float, cost["train_ratio_range"].split("-"))
    assert 0 < lo <= hi
    text = bench.summary(rows)
    assert "smoke    transformer_copy" in text and "copy-head" in text and "capped" not in text


def test_batches_follow_the_task_layout():
    config = bench.size_config("default")
    d, vocab = config.data, 2000
    b = bench.product_batch(np.random.default_rng(0), 64, d, vocab)
    ls = d.max_title + d.max_attr
    assert b["source"].shape == b["segment"].shape == b["source_ext"].shape == (64, ls)
    assert b["reviews"].shape == (64, d.max_reviews, d.max_review_len)
    assert b["target_in"].shape == b["target_out"].shape == b["target_ext"].shape == (64, d.max_target)
    assert all(v.dtype == np.int32 for v in b.values())
    # source: title (segment 1) then attributes (2 / 3), no gap; OOV words unk in source, V, V+1, ... in source_ext
    assert np.array_equal(b["segment"] != 0, b["source"] != 0)
    n_src, n_title = (b["source"] != 0).sum(1), (b["segment"] == 1).sum(1)
    assert np.array_equal(b["source"] != 0, np.arange(ls) < n_src[:, None])  # right-padded
    assert np.array_equal(b["segment"] == 1, np.arange(ls) < n_title[:, None])  # title first
    assert n_title.min() >= d.max_title // 2 and (n_src - n_title).min() >= d.max_attr // 2
    oov = b["source_ext"] >= vocab
    assert np.array_equal(oov, b["source"] == 3) and oov.sum(1).max() <= bench.MAX_SOURCE_OOV and oov.any()
    assert np.array_equal(b["source_ext"][~oov], b["source"][~oov])
    for row in b["source_ext"]:
        assert np.array_equal(row[row >= vocab], vocab + np.arange((row >= vocab).sum()))  # first appearance
    # reviews: half the products (even rows) with 0-1, the others 2..M; lengths >= Lrev / 2
    counts = (b["reviews"] != 0).any(-1).sum(1)
    assert counts[0::2].max() <= 1 and counts[1::2].min() >= 2 and (counts == 0).any()
    lengths = (b["reviews"] != 0).sum(-1)
    assert lengths[lengths > 0].min() >= d.max_review_len // 2
    # targets: out = words + end, in = start + words; target_ext = target_out with copied source OOV ids
    n_out = (b["target_out"] != 0).sum(1)
    assert np.array_equal(n_out, (b["target_in"] != 0).sum(1)) and n_out.min() >= d.max_target // 2
    assert (b["target_in"][:, 0] == 1).all() and ((b["target_out"] == 2).sum(1) == 1).all()
    assert np.array_equal(b["target_in"][:, 1:][b["target_out"][:, 1:] != 0],
                          b["target_out"][:, :-1][b["target_out"][:, 1:] != 0])
    copied = b["target_ext"] >= vocab
    assert copied.any() and np.array_equal(b["target_ext"][~copied], b["target_out"][~copied])
    assert (b["target_out"][copied] == 3).all()
    assert (b["target_ext"] < vocab + oov.sum(1, keepdims=True)).all()  # only the product's own OOV words


def test_paper_sizes_and_caps():
    """The configs the real run uses, without compiling anything."""
    assert bench.dims_string(bench.size_config("paper"), 20000) == "V20000 Ls30+60 R10x50 Lt100 C512 F2048 h8 x6"
    assert bench.dims_string(bench.size_config("default"), 2000) == "V2000 Ls16+24 R4x24 Lt48 C128 F256 h4 x2"
    assert bench.batches("default", 32) == {"train": 32, "beam": 32}
    assert bench.batches("paper", 32) == {"train": bench.PAPER_CAPS["train"], "beam": bench.PAPER_CAPS["beam"]}
    assert bench.batches("paper", 32, caps=False) == {"train": 32, "beam": 32}
    from jdjax.tasks import prodgen as task_lib

    assert bench.METHOD_NAMES == tuple(task_lib.METHODS)
    with pytest.raises(ValueError, match="unknown sizes"):
        bench.run(sizes=("huge",), record=False, log=lambda *a, **k: None)


@pytest.mark.slow  # shares a module fixture that compiles and runs the whole smoke pipeline (60-80 s)
def test_record_goes_only_where_told(rows, tmp_path, monkeypatch):
    jsonl, md = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    monkeypatch.setattr(harness, "RESULTS_JSONL", str(jsonl))
    monkeypatch.setattr(harness, "RESULTS_MD", str(md))
    lines = bench.record_rows(rows, write=False)
    assert [line["case"] for line in lines] == list(rows)
    assert "capped_from" not in lines[0] and "notes" in lines[0]
    assert not jsonl.exists() and not md.exists()
    bench.record_rows(rows, write=True)
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [w["benchmark"] for w in written] == ["prodgen"] * len(CASES)
    text = md.read_text()
    assert "## prodgen" in text and "smoke cost copy-head" in text and "Command: `" in text


def test_accuracy_rows_keep_every_table_value():
    """prodgen_accuracy: each table row becomes one case; test/x -> test_x, missing (None) values left out."""
    runs = [{"run": "full", "selected_step": 800, "test/bleu_4": 35.0, "test/tail_bleu_4": None,
             "test/reviewed_aspect_coverage": 61.0, "val/bleu_4": 36.0},
            {"run": "rule: type prior", "selected_step": "-", "test/aspect_coverage": 55.8}]
    assert prodgen_accuracy.accuracy_rows(runs) == {
        "full": {"selected_step": 800, "test_bleu_4": 35.0, "test_reviewed_aspect_coverage": 61.0, "val_bleu_4": 36.0},
        "rule: type prior": {"selected_step": "-", "test_aspect_coverage": 55.8}}
