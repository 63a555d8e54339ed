"""benchmarks/dialog.py in its smoke mode (tiny LSTM; the code is model-agnostic and the Transformer's
compiles alone would take ~20 s): every case and column comes out, nothing reaches benchmarks/RESULTS.md
unless told; the paper sizes and caps are checked without compiling.

No timing thresholds: the numbers are only checked to be positive and consistent.
"""

import json
import math
import os

import numpy as np
import pytest

from benchmarks import dialog as bench
from benchmarks import harness

PARTS = ["train", "greedy", "beam5", "mle-grad", "cond-mle-grad", "cond-cl-grad"]
CASES = [f"smoke lstm {part} b4" for part in PARTS]


def _smoke_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if '"case": "smoke ' in line]


@pytest.fixture(scope="module")
def rows():
    before = _smoke_lines(harness.RESULTS_JSONL)
    out = bench.run(smoke=True, models=("lstm",), log=lambda *a, **k: None)
    assert _smoke_lines(harness.RESULTS_JSONL) == before  # --smoke records nothing
    return out


@pytest.mark.slow  # shares a module fixture that compiles and runs the whole smoke pipeline (60-80 s)
def test_all_cases_and_columns(rows):
    assert list(rows) == CASES
    common = ["ms", "compile_s", "warmup_s"]
    keys = {"train": ["examples_per_s", "resp_tokens_per_s", "ctx_tokens_per_s", "resp_fill", "ctx_fill", "xla_gflop",
                      "mem_temp_mb", "params"],
            "greedy": ["sentences_per_s", "mean_out_len"], "beam5": ["sentences_per_s", "mean_out_len"],
            "mle-grad": ["examples_per_s", "resp_tokens_per_s", "vs_mle_grad", "mem_temp_mb"],
            "cond-mle-grad": ["examples_per_s", "resp_tokens_per_s", "vs_mle_grad", "mem_temp_mb"],
            "cond-cl-grad": ["examples_per_s", "resp_tokens_per_s", "vs_mle_grad", "mem_temp_mb"]}
    for case, row in rows.items():
        part = row["part"]
        for key in common + keys[part]:
            if key == "compile_s" and part == "cond-cl-grad":
                assert row[key] == 0.0  # the cond-mle-grad executable, compiled once
                continue
            assert math.isfinite(row[key]) and row[key] > 0, (case, key, row[key])
        assert row["size"] == "smoke" and row["model"] == "lstm" and row["batch"] == 4
        assert row["capped_from"] is None and row["repeats"] == 2
        assert row["dims"] == "V64 Lc16 Lr8 E16 H16 x1"
    by_part = {r["part"]: r for r in rows.values()}
    assert by_part["mle-grad"]["vs_mle_grad"] == 1.0
    assert by_part["greedy"]["beam_size"] == 1 and by_part["beam5"]["beam_size"] == 5
    assert by_part["greedy"]["max_len"] == 8 and 0 < by_part["greedy"]["mean_out_len"] <= 8
    assert 0.5 <= by_part["train"]["resp_fill"] <= 1 and 0.5 <= by_part["train"]["ctx_fill"] <= 1
    assert by_part["cond-cl-grad"]["k"] == 6
    text = bench.summary(rows)
    assert "smoke    lstm" in text and "CL/MLE grad" in text and "capped" not in text


def test_batches_follow_the_task_layout():
    rng = np.random.default_rng(0)
    b = bench.token_batch(rng, 32, 10, 6, 50)
    assert b["context"].shape == (32, 10) and b["response_in"].shape == b["response_out"].shape == (32, 6)
    n_in, n_out = (b["response_in"] != 0).sum(1), (b["response_out"] != 0).sum(1)
    assert np.array_equal(n_in, n_out) and n_out.min() >= 3 and (b["context"] != 0).sum(1).min() >= 5
    assert (b["response_in"][:, 0] == 1).all() and ((b["response_out"] == 2).sum(1) == 1).all()
    assert np.array_equal(b["response_in"][:, 1:][b["response_out"][:, 1:] != 0],  # teacher forcing: in = start + out
                          b["response_out"][:, :-1][b["response_out"][:, 1:] != 0])
    c = bench.cl_batch(rng, 3, 6, 10, 6, 50)
    assert c["sample_context"].shape == (3, 6, 10) and c["sample_response_out"].shape == (3, 6, 6)
    assert c["sample_m"].shape == (3, 6) and c["context"].shape == (3, 10)


def test_paper_sizes_and_caps():
    """The paper configs the real run uses, without compiling anything."""
    lstm, tf = bench.size_config("paper", "lstm"), bench.size_config("paper", "transformer")
    assert bench.dims_string(lstm, 20000) == "V20000 Lc120 Lr40 E300 H256 x2"
    assert bench.dims_string(tf, 20000) == "V20000 Lc120 Lr40 C512 F2048 h8 x6"
    assert bench.dims_string(bench.size_config("default", "lstm"), 3000) == "V3000 Lc32 Lr24 E128 H128 x2"
    assert lstm.cl.pretrain_steps == tf.cl.pretrain_steps == 1 and lstm.cl.sample_k == 6
    assert bench.batches("default", "transformer", 64) == dict.fromkeys(("train", "greedy", "beam", "cl"), 64)
    assert bench.batches("paper", "transformer", 64) == {"train": 16, "greedy": 32, "beam": 8, "cl": 4}
    assert bench.batches("paper", "transformer", 64, caps=False)["beam"] == 64
    assert bench.batches("paper", "lstm", 64)["cl"] == 16
    with pytest.raises(ValueError, match="unknown sizes"):
        bench.run(sizes=("huge",), record=False, log=lambda *a, **k: None)


@pytest.mark.slow  # shares a module fixture that compiles and runs the whole smoke pipeline (60-80 s)
def test_record_goes_only_where_told(rows, tmp_path, monkeypatch):
    jsonl, md = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    monkeypatch.setattr(harness, "RESULTS_JSONL", str(jsonl))
    monkeypatch.setattr(harness, "RESULTS_MD", str(md))
    lines = bench.record_rows(rows, write=False)
    assert [line["case"] for line in lines] == CASES
    assert "capped_from" not in lines[0] and "notes" in lines[0]
    assert not jsonl.exists() and not md.exists()
    bench.record_rows(rows, write=True)
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [w["benchmark"] for w in written] == ["dialog"] * len(CASES)
    text = md.read_text()
    assert "## dialog" in text and "smoke lstm cond-cl-grad b4" in text and "Command: `" in text
