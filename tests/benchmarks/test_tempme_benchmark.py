"""benchmarks/tempme.py: `python -m benchmarks.tempme --smoke` runs every case on a tiny CLIP and writes
nothing; the rows follow the plans and the analytic MACs; the spec's ViT-B/32 figures hold; recording
goes only where told.

No timing thresholds: the numbers are only checked to be positive and consistent.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import harness
from benchmarks import tempme as bench
from jdjax import testing
from jdjax.merging import flops, tempme

# The benchmark's own smoke run compiles real models (1-2 minutes): CI runs it in the slow step.
pytestmark = pytest.mark.slow

HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
METHODS = ["dense", "imgme", "tempme"]
INFER = [f"{m} b{b}" for m in METHODS for b in (2, 1)] + (["torch-dense b2", "torch-dense b1"] if HAVE_TORCH else [])
TRAIN = ["train-peft dense b2", "train-peft tempme b2", "train-full dense b2", "train-full tempme b2"]
ENV_KEYS = ("benchmark", "case", "command", "device", "device_count", "jax", "python", "machine", "date", "notes",
            "load1")
SMOKE_PREFIX = "smoke CLIP "


def _smoke_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if SMOKE_PREFIX in line]


@pytest.fixture(scope="module")
def smoke():
    """(rows {case: metrics}, stdout) of `python -m benchmarks.tempme --smoke` in a child process."""
    before = _smoke_lines(harness.RESULTS_JSONL)
    cmd = [sys.executable, "-m", "benchmarks.tempme", "--smoke"] + ([] if HAVE_TORCH else ["--notorch"])
    proc = subprocess.run(cmd, cwd=testing.REPO_ROOT, env=testing.subprocess_env(1), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # --smoke prints its rows as JSON lines but appends none to benchmarks/results.jsonl.
    assert _smoke_lines(harness.RESULTS_JSONL) == before
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            assert row["benchmark"] == "tempme" and row["case"].startswith(SMOKE_PREFIX)
            rows[row["case"][len(SMOKE_PREFIX):]] = row
    return rows, proc.stdout


def test_all_cases_and_columns(smoke):
    rows, stdout = smoke
    assert list(rows) == INFER + TRAIN
    for case in INFER:
        row = rows[case]
        keys = ["ms_per_video", "speedup", "gmacs", "gmacs_speedup", "warmup_s"]
        keys += [] if case.startswith("torch") else ["xla_gflop", "xla_per_2macs", "compile_s"]
        keys += ["vs_torch"] if HAVE_TORCH else []
        for key in keys:
            assert math.isfinite(row[key]) and row[key] > 0, (case, key, row[key])
        assert row["videos"] == int(case[-1])
    for b in (2, 1):
        assert rows[f"dense b{b}"]["speedup"] == 1.0
        if HAVE_TORCH:
            assert rows[f"torch-dense b{b}"]["vs_torch"] == 1.0
    for case in TRAIN:
        row = rows[case]
        for key in ["train_ms", "train_ms_per_video", "train_speedup", "mem_temp_mb", "mem_peak_mb", "mem_temp_ratio",
                    "mem_peak_ratio", "xla_train_gflop", "train_compile_s", "train_warmup_s"]:
            assert math.isfinite(row[key]) and row[key] > 0, (case, key, row[key])
        assert row["videos"] == 2 and row["caption_len"] == 8
    for regime in ("peft", "full"):
        dense, merged = rows[f"train-{regime} dense b2"], rows[f"train-{regime} tempme b2"]
        assert dense["train_speedup"] == dense["mem_temp_ratio"] == dense["mem_peak_ratio"] == 1.0
        assert merged["mem_temp_mb"] < dense["mem_temp_mb"]  # fewer tokens, fewer activations kept
        assert merged["xla_train_gflop"] < dense["xla_train_gflop"]
    # the summary comes out; the B/32 targets are not judged on the tiny model
    text = "\n".join(line for line in stdout.splitlines() if not line.startswith("{"))
    assert "train-full tempme b2" in text and "tokens tempme:" in text and "target" not in text


def test_rows_follow_the_plans_and_macs(smoke):
    rows, _ = smoke
    dims = bench.smoke_dims()
    clip = dims["clip"]
    configs = bench.temporal_configs(dims)
    for method in METHODS:
        plan = tempme.plan_layers(configs[method], 1 + (clip["image_size"] // clip["patch_size"]) ** 2,
                                  clip["vision_layers"])
        macs = flops.video_macs(plan, image_size=32, patch_size=8, width=32, num_heads=2, mlp_dim=128, num_frames=4)
        for b in (2, 1):
            row = rows[f"{method} b{b}"]
            assert row["gmacs"] == pytest.approx(macs.gmacs)
            assert row["tokens"] == bench.tokens_string(plan)
            assert row["out_tokens"] == "{}x{}".format(*tempme.output_shape(plan))
    assert rows["dense b2"]["tokens"] == "[4x17>17]*4"
    assert rows["tempme b2"]["tokens"] == "4x17>16 4x16>15 2x21>19 1x27>25"
    assert rows["dense b2"]["gmacs_speedup"] == 1.0 < rows["tempme b2"]["gmacs_speedup"]
    # XLA's count follows the analytic one: dense > imgme and dense > tempme per video
    assert rows["dense b2"]["xla_gflop"] > rows["imgme b2"]["xla_gflop"]
    assert rows["dense b2"]["xla_gflop"] > rows["tempme b2"]["xla_gflop"]
    if HAVE_TORCH:
        assert rows["torch-dense b2"]["gmacs"] == rows["dense b2"]["gmacs"]


def test_trainable_parameter_counts(smoke):
    rows, _ = smoke
    dims = bench.smoke_dims()
    rank, c, d = bench.LORA_RANK, 32, 32
    lora = 4 * rank * (c + 3 * c) + 2 * rank * (d + 3 * d)  # qkv of 4 visual and 2 text blocks
    clip_pos = 4 * c + 2 * c  # ClipMe layers 2 and 3 meet 4 and 2 clips
    assert rows["train-peft dense b2"]["trainable_params"] == lora
    assert rows["train-peft tempme b2"]["trainable_params"] == lora + clip_pos
    model = bench.build_model(dims, bench.temporal_configs(dims)["dense"], lora_rank=0)
    params = bench.random_params(model, dims)
    total = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert rows["train-full dense b2"]["trainable_params"] == total
    assert rows["train-full tempme b2"]["trainable_params"] == total + clip_pos


def test_record_goes_only_where_told(smoke, tmp_path, monkeypatch):
    jsonl, md = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    monkeypatch.setattr(harness, "RESULTS_JSONL", str(jsonl))
    monkeypatch.setattr(harness, "RESULTS_MD", str(md))
    rows = {case: {k: v for k, v in row.items() if k not in ENV_KEYS} for case, row in smoke[0].items()}
    lines = bench.record_rows(rows, "tiny CLIP", write=False)
    assert [line["case"] for line in lines] == [f"tiny CLIP {case}" for case in INFER + TRAIN]
    assert not jsonl.exists() and not md.exists()
    bench.record_rows(rows, "tiny CLIP", {"torch_attn": "sdpa", "torch_threads": 2}, write=True)
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [w["benchmark"] for w in written] == ["tempme"] * len(rows)
    assert "mem_peak_mb" in written[-1] and "mem_peak_mb" not in written[0]
    text = md.read_text()
    assert "## tempme" in text and "tiny CLIP train-full tempme b2" in text and "Command: `python -m" in text
    assert "sdpa attention, inference_mode, 2 threads" in text and "8-token captions" in text


def test_paper_b32_plans_and_macs():
    """The spec's figures for the real benchmark, without compiling anything."""
    dims = bench.paper_dims()
    assert dims["num_frames"] == 12 and dims["clip"]["patch_size"] == 32 and dims["clip"]["vision_width"] == 768
    configs = bench.temporal_configs(dims)
    infos = {m: bench.static_info(bench.build_model(dims, configs[m]), dims) for m in METHODS}
    assert {m: round(i["gmacs"], 2) for m, i in infos.items() if m != "imgme"} == {"dense": 52.90, "tempme": 34.70}
    assert infos["dense"]["tokens"] == "[12x50>50]*12"
    assert infos["tempme"]["tokens"].endswith("12x36>34 6x48>44 3x62>56 1x118>107 1x107>97")
    assert infos["imgme"]["tokens"].startswith("12x50>48 12x48>46") and infos["imgme"]["tokens"].endswith("12x28>26")
    assert infos["dense"]["gmacs"] > infos["imgme"]["gmacs"] > infos["tempme"]["gmacs"]
    bench.check_expectations(infos, dims)  # passes
    broken = {**infos, "tempme": {**infos["tempme"], "gmacs": 35.0}}
    with pytest.raises(RuntimeError, match="34.7 G"):
        bench.check_expectations(broken, dims)


def test_targets_are_reported_not_asserted():
    rows = {"tempme b4": {"speedup": 1.5, "vs_torch": 1.6}}
    lines = bench.targets(rows)
    assert lines[0].endswith("1.50x met") and lines[1].endswith("1.60x NOT MET")
    assert "not measured" in bench.targets({"tempme b4": {"speedup": 1.0, "vs_torch": None}})[1]
    assert "no 4-video rows" in bench.targets({"tempme b1": {}})[0]
