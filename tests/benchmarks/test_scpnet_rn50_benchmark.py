"""benchmarks/scpnet_rn50.py: `python -m benchmarks.scpnet_rn50 --smoke --norss` trains a tiny ResNet in both
frameworks and writes nothing; both sides hold the same parameters; the RSS child measures; recording goes
only where told; the paper dims are CLIP's RN50.

No timing thresholds: the numbers are only checked to be positive and consistent.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import harness
from benchmarks import scpnet_rn50 as bench
from jdjax import testing
from jdjax.nn.clip import clip_config

# The benchmark's own smoke run compiles real models (1-2 minutes): CI runs it in the slow step.
pytestmark = pytest.mark.slow

pytest.importorskip("open_clip")
CASES = ["jdjax b2", "torch b2"]
ENV_KEYS = ("benchmark", "case", "command", "device", "device_count", "jax", "python", "machine", "date", "notes",
            "load1", "loadavg")
SMOKE_PREFIX = "smoke ResNet "


def _smoke_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if SMOKE_PREFIX in line]


@pytest.fixture(scope="module")
def smoke():
    """(rows {case: metrics}, stdout) of `python -m benchmarks.scpnet_rn50 --smoke --norss` in a child process."""
    before = _smoke_lines(harness.RESULTS_JSONL)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scpnet_rn50", "--smoke", "--norss"],
                          cwd=testing.REPO_ROOT, env=testing.subprocess_env(1), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _smoke_lines(harness.RESULTS_JSONL) == before  # --smoke prints its rows but records none
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            assert row["benchmark"] == "scpnet_rn50" and row["case"].startswith(SMOKE_PREFIX)
            rows[row["case"][len(SMOKE_PREFIX):]] = row
    return rows, proc.stdout


def test_rows_and_columns(smoke):
    rows, stdout = smoke
    assert list(rows) == CASES
    for case, row in rows.items():
        keys = ["step_ms", "images_per_s", "vs_torch", "params", "first_loss", "warmup_s"]
        keys += ["mem_peak_mb", "mem_temp_mb", "xla_train_gflop", "compile_s"] if case.startswith("jdjax") else []
        for key in keys:
            assert math.isfinite(row[key]) and row[key] > 0, (case, key, row[key])
        assert row["batch"] == 2 and row["image_size"] == 64 and "rss_peak_mb" not in row
        assert row["images_per_s"] == pytest.approx(2e3 / row["step_ms"])
        assert 0 < row["first_loss"] <= 4  # |unit - unit|^2
    assert rows["torch b2"]["vs_torch"] == 1.0
    assert rows["jdjax b2"]["params"] == rows["torch b2"]["params"]  # the same architecture on both sides
    mem = rows["jdjax b2"]
    assert mem["mem_peak_mb"] == pytest.approx(mem["mem_argument_mb"] + mem["mem_output_mb"] + mem["mem_temp_mb"]
                                               - mem["mem_alias_mb"])
    text = "\n".join(line for line in stdout.splitlines() if not line.startswith("{"))
    assert "jdjax b2" in text and "XLA peak MiB" in text and "target" not in text


def test_rss_child_measures_torch():
    out = bench.rss_child("torch", bench.smoke_dims(), steps=1)
    assert out["rss_base_mb"] > 0 and out["rss_peak_mb"] >= 0 and out["peak_source"] in ("VmHWM", "ru_maxrss")


def test_record_goes_only_where_told(smoke, tmp_path, monkeypatch):
    jsonl, md = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    monkeypatch.setattr(harness, "RESULTS_JSONL", str(jsonl))
    monkeypatch.setattr(harness, "RESULTS_MD", str(md))
    rows = {case: {k: v for k, v in row.items() if k not in ENV_KEYS} for case, row in smoke[0].items()}
    lines = bench.record_rows(rows, "tiny", write=False)
    assert [line["case"] for line in lines] == [f"tiny {case}" for case in CASES]
    assert not jsonl.exists() and not md.exists()
    bench.record_rows(rows, "tiny", {"torch_threads": 2, "rss_steps": 3}, write=True)
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [w["benchmark"] for w in written] == ["scpnet_rn50"] * 2 and "loadavg" in written[0]
    text = md.read_text()
    assert "## scpnet_rn50" in text and "tiny jdjax b2" in text and "2 threads" in text and "64 px, batch 2" in text


def test_paper_dims_are_clip_rn50():
    dims, rn50 = bench.paper_dims(), clip_config("RN50")
    assert (dims["layers"], dims["width"], dims["heads"], dims["output_dim"], dims["image_size"]) == (
        rn50["vision_layers"], rn50["vision_width"], rn50["vision_heads"], rn50["embed_dim"], rn50["image_size"])
    assert dims["batch"] == 8


def test_targets_are_reported_not_asserted():
    assert bench.targets({"jdjax b8": {"vs_torch": 1.2}})[0].endswith("1.20x met")
    assert bench.targets({"jdjax b8": {"vs_torch": 0.8}})[0].endswith("0.80x NOT MET")
    assert "not measured" in bench.targets({"jdjax b8": {"vs_torch": None}})[0]
