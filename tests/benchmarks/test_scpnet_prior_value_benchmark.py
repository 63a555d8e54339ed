"""benchmarks/scpnet_prior_value.py on the smoke config: one row per mixing share, faint-object mAP with
faint data, nothing recorded for a smoke run."""

import json

import pytest

from benchmarks import harness
from jdjax import testing

# Pretrains the smoke CLIP and compiles two models in a child process (about a minute): the CI's slow step.
pytestmark = pytest.mark.slow


def test_smoke_rows(tmp_path):
    with open(harness.RESULTS_JSONL) as f:
        before = f.read()
    proc = testing.run_module("benchmarks.scpnet_prior_value", "--config=configs/scpnet.py:smoke",
                              f"--workdir={tmp_path}", "--config.data.faint=0.4", "--mix=0,0.5,1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(harness.RESULTS_JSONL) as f:
        assert f.read() == before
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["faint=0.4 a=0", "faint=0.4 a=0.5", "faint=0.4 a=1"]
    for r in rows:
        assert 0 < r["test_mAP"] <= 100 and 0 <= r["faint_mAP"] <= 100
