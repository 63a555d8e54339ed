"""benchmarks/scpnet_partial.py on the smoke config: one row per (method, proportion) with the
per-seed test mAP of runs that trained under the partial protocol at that proportion and seed, the
plot in the workdir, nothing recorded for a smoke run."""

import hashlib
import json
import os

import pytest

from benchmarks import harness
from jdjax import testing

# Pretrains the smoke CLIP and trains 2 methods x 2 seeds in a child process (about two minutes): the CI's slow step.
pytestmark = pytest.mark.slow


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_smoke_rows_runs_and_plot(tmp_path):
    plot_in_repo = os.path.join(testing.REPO_ROOT, "benchmarks", "scpnet_partial.png")
    before = (_digest(harness.RESULTS_JSONL), _digest(plot_in_repo))
    proc = testing.run_module("benchmarks.scpnet_partial", "--config=configs/scpnet.py:smoke", f"--workdir={tmp_path}",
                              "--proportions=0.5", "--seeds=0,1", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (_digest(harness.RESULTS_JSONL), _digest(plot_in_repo)) == before
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["scpnet p=0.5", "assume_negative p=0.5"]
    for r in rows:
        per_seed = [float(v) for v in r["test_mAP_per_seed"].split(" / ")]
        assert r["seeds"] == 2 and len(per_seed) == 2 and all(0 < v <= 100 for v in per_seed)
        assert r["test_mAP_mean"] == pytest.approx(sum(per_seed) / 2, abs=0.06)  # per-seed values are rounded
    for seed in (0, 1):
        for method in ("scpnet", "assume_negative"):
            with open(tmp_path / f"p0.5_seed{seed}" / method / "config.json") as f:
                config = json.load(f)
            assert (config["data"]["protocol"], config["data"]["known_proportion"]) == ("partial", 0.5)
            assert config["seed"] == config["data"]["seed"] == seed
            assert config["init_from"] == str(tmp_path / "pretrain" / "backbone")  # one backbone for every run
    assert (tmp_path / "scpnet_partial.png").stat().st_size > 0
