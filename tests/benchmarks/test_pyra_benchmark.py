"""benchmarks/pyra.py on a tiny ViT: every case and column comes out, token counts follow the
schedules, the spec's ViT-B/16 checks hold, and nothing reaches benchmarks/RESULTS.md.

No timing thresholds: the numbers are only checked to be positive and consistent.
"""

import json
import math

import pytest

from benchmarks import harness
from benchmarks import pyra as bench
from configs import pyra as pyra_config
from jdjax.merging import flops, schedules

# The benchmark's own smoke run compiles real models (1-2 minutes): CI runs it in the slow step.
pytestmark = pytest.mark.slow

# Compiles ~2.5x faster than XLA's default; these timings mean nothing anyway.
FAST = {"xla_backend_optimization_level": 0}
LABELS = ["lora", "tome-low", "pyra-low", "tome-high", "pyra-high"]
N0 = 1 + (32 // 4) ** 2  # 65 tokens


def tiny_config():
    c = pyra_config.get_config("smoke")
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, lora_rank=2)
    c.data.image_size = 32
    c.schedules.update(low=[8, 4], high=[16, 8])
    return c


@pytest.fixture(scope="module")
def rows():
    return bench.measure(tiny_config(), batch=2, train_batch=2, repeats=2, compiler_options=FAST,
                         log=lambda *a, **k: None)


def test_all_cases_and_columns(rows):
    assert list(rows) == LABELS
    numeric = ["infer_img_s", "speedup", "infer_ms", "train_img_s", "train_speedup", "train_ms", "gmacs",
               "gmacs_speedup", "fvcore_gflops", "xla_gflop", "xla_train_gflop", "compile_s", "train_compile_s"]
    for label, row in rows.items():
        for key in numeric:
            assert math.isfinite(row[key]) and row[key] > 0, (label, key, row[key])
        assert row["batch"] == 2 and row["train_batch"] == 2
        is_pyra = label.startswith("pyra")
        assert (row["pyra_overhead_pct"] is not None) == is_pyra
        assert (row["train_pyra_overhead_pct"] is not None) == is_pyra
    assert rows["lora"]["speedup"] == 1.0 and rows["lora"]["train_speedup"] == 1.0
    # The training step costs more than inference per image; merging cuts XLA's count too.
    for row in rows.values():
        assert row["xla_train_gflop"] > row["xla_gflop"]
    assert rows["lora"]["xla_gflop"] > rows["tome-low"]["xla_gflop"] > rows["tome-high"]["xla_gflop"]
    text = bench.summary(rows, targets=True)
    assert all(label in text for label in LABELS) and "PYRA over ToMe" in text and "target >= 3.0x" in text
    assert "target" not in bench.summary(rows, targets=False)


def test_token_counts_follow_the_schedules(rows):
    c = tiny_config()
    assert rows["lora"]["tokens"] == ">".join([str(N0)] * 3)
    for compression in ("low", "high"):
        want = [N0] + schedules.token_counts(list(c.schedules[compression]), N0)
        for method in ("tome", "pyra"):
            row = rows[f"{method}-{compression}"]
            assert row["tokens"] == ">".join(map(str, want))
            assert row["final_tokens"] == want[-1]
    assert rows["pyra-high"]["final_tokens"] == 65 - 16 - 8


def test_macs_and_trainable_params(rows):
    c = tiny_config()
    dims = {"patch_size": 4, "width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "image_size": 32}
    for row in rows.values():
        compression = row["compression"]
        merge_r = 0 if compression == "dense" else list(c.schedules[compression])
        macs = flops.vit_macs(**dims, merge_r=merge_r)
        assert row["gmacs"] == pytest.approx(macs.total / 1e9)
        assert row["fvcore_gflops"] == pytest.approx(macs.total / 2**30)
    assert rows["tome-low"]["gmacs"] == rows["pyra-low"]["gmacs"]
    # LoRA (qkv, rank 2) + head are trainable in all; PYRA adds r + 3C per merging layer.
    lora_head = 2 * (32 * 2 + 2 * 3 * 32) + (32 * 5 + 5)
    assert rows["lora"]["trainable_params"] == rows["tome-high"]["trainable_params"] == lora_head
    assert rows["pyra-low"]["trainable_params"] == lora_head + (8 + 3 * 32) + (4 + 3 * 32)
    assert rows["pyra-high"]["trainable_params"] == lora_head + (16 + 3 * 32) + (8 + 3 * 32)


def test_record_goes_only_where_told(rows, tmp_path, monkeypatch):
    jsonl, md = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    monkeypatch.setattr(harness, "RESULTS_JSONL", str(jsonl))
    monkeypatch.setattr(harness, "RESULTS_MD", str(md))
    lines = bench.record_rows(rows, "tiny ViT", write=False)
    assert [line["case"] for line in lines] == [f"tiny ViT b2 {label}" for label in LABELS]
    assert not jsonl.exists() and not md.exists()
    bench.record_rows(rows, "tiny ViT", write=True)
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [w["benchmark"] for w in written] == ["pyra"] * 5
    assert "pyra_overhead_pct" in written[2] and "pyra_overhead_pct" not in written[1]
    text = md.read_text()
    assert "## pyra" in text and "tiny ViT b2 pyra-high" in text and "Command: `python -m" in text


def test_paper_vit_b16_schedules_and_macs():
    """The spec's figures for the real benchmark, without compiling anything."""
    config = bench.paper_config("B/16")
    assert config.data.image_size == 224 and config.model.lora_rank == 8
    static = bench.static_rows(bench.build_models(config))
    assert {k: v["final_tokens"] for k, v in static.items()} == {
        "lora": 197, "tome-low": 11, "pyra-low": 11, "tome-high": 5, "pyra-high": 5}
    assert static["pyra-high"]["tokens"] == [197, 157, 123, 93, 69, 51, 37, 27, 19, 15, 11, 8, 5]
    assert {k: round(v["gmacs"], 2) for k, v in static.items()} == {
        "lora": 17.56, "tome-low": 8.77, "pyra-low": 8.77, "tome-high": 5.07, "pyra-high": 5.07}
    bench.check_expectations("B/16", static)  # passes
    broken = {**static, "pyra-high": {**static["pyra-high"], "final_tokens": 6}}
    with pytest.raises(RuntimeError, match="must end at 5 tokens"):
        bench.check_expectations("B/16", broken)
    with pytest.raises(ValueError, match="paper's schedules"):
        bench.paper_config("B/32")
