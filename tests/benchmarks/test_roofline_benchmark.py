"""benchmarks/roofline.py on tiny models: every case and column comes out, the columns follow their
definitions, and nothing reaches benchmarks/RESULTS.md. No timing thresholds."""

import math
import os

import pytest

from benchmarks import harness
from benchmarks import roofline as bench

# Compiles a dozen small programs and builds a transformers ViT (about a minute): the slow step.
pytestmark = pytest.mark.slow
pytest.importorskip("torch")
pytest.importorskip("transformers")

FORWARD = ["vit dense", "vit tome r=16", "pyra-high", "clip image", "clip text", "torch vit dense"]
ABLATIONS = [f"{name}{grad}" for name in ("attention head-major", "attention token-major", "mlp exact_gelu",
                                           "mlp jax.nn.gelu") for grad in ("", " grad")]
TRAIN = ["vit dense train", "pyra-high train", *ABLATIONS, "torch vit dense train"]


@pytest.fixture(scope="module")
def rows():
    return bench.measure([2], train_batch=2, repeats=2, smoke=True, log=lambda *a, **k: None)


def test_cases_and_column_definitions(rows):
    assert [r["case"] for r in rows] == FORWARD + TRAIN
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        for key in ("items_per_s", "median_ms", "gflop", "gflop_s", "matmul_gflop_s", "stream_gb_s", "bound_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["case"], key)
        assert r["batch"] == 2
        assert r["items_per_s"] == pytest.approx(2e3 / r["median_ms"])
        assert r["gflop_s"] == pytest.approx(r["gflop"] * r["items_per_s"])
        assert r["pct_of_matmul"] == pytest.approx(100 * r["gflop_s"] / r["matmul_gflop_s"])
        assert r["pct_of_roofline"] == pytest.approx(100 * r["bound_ms"] / r["median_ms"])
    # torch rows carry their jdjax twin's FLOPs and are the vs_torch unit; CLIP rows have no twin.
    assert by_case["torch vit dense"]["gflop"] == by_case["vit dense"]["gflop"]
    assert by_case["torch vit dense train"]["gflop"] == by_case["vit dense train"]["gflop"]
    assert by_case["torch vit dense"]["vs_torch"] == 1.0 and by_case["torch vit dense train"]["vs_torch"] == 1.0
    assert by_case["clip text"]["vs_torch"] is None
    # merging cuts XLA's count; a training step costs more than the forward pass
    assert by_case["vit tome r=16"]["gflop"] < by_case["vit dense"]["gflop"]
    assert by_case["vit dense train"]["gflop"] > by_case["vit dense"]["gflop"]
    assert by_case["pyra-high train"]["gflop"] < by_case["vit dense train"]["gflop"]
    # ablations: ours carries the alternative's median over its own; the alternatives carry none
    for ours, alternative in bench.ABLATION_PAIRS.items():
        for grad in ("", " grad"):
            row, alt = by_case[ours + grad], by_case[alternative + grad]
            assert row["ablation_speedup"] == pytest.approx(alt["median_ms"] / row["median_ms"])
            assert alt["ablation_speedup"] is None and row["vs_torch"] is None


def test_smoke_rows_are_not_recorded(rows):
    before = os.path.getmtime(harness.RESULTS_JSONL)
    bench.record_rows(rows, "smoke", write=False)
    assert os.path.getmtime(harness.RESULTS_JSONL) == before
    text = bench.summary(rows)
    assert all(case in text for case in FORWARD + TRAIN)


def test_profile_shares_cover_the_kernels():
    """--profile: every traced kernel falls in a category; the shares add up to 100 and the
    matmuls are among them (the tiny ViT's dense layers)."""
    for row in bench.profile_rows(smoke=True):
        shares = {k: v for k, v in row.items() if k.startswith("pct ")}
        assert sum(shares.values()) == pytest.approx(100.0)
        assert shares.get("pct matmul", 0) > 0, row
