"""Ad blending end to end (configs/ad_blending.py:smoke): click models through the loop, frontier,
tuning on separate pages, report; plus resume and validation."""

import json
import os

import numpy as np
import pytest

from configs import ad_blending as ad_config
from jdjax import tasks as jtasks
from jdjax.econ import vb_tuning
from jdjax.tasks import ad_blending


def config(**overrides):
    cfg = ad_config.get_config("smoke")
    cfg.checkpoint.async_save = False
    cfg.update_from_flattened_dict(overrides)
    return cfg


@pytest.mark.slow  # trains two click models and tunes (~1 min on 2 cores)
def test_smoke_run_reports_every_mechanism_and_reuses_trained_click_models(tmp_path, capsys):
    cfg = config()
    out = jtasks.run(cfg, str(tmp_path))
    assert out["status"] == "completed"
    for name in ("report.md", "report.json", "frontier.png", "click_context/results.json",
                 "click_no_context/results.json"):
        assert os.path.exists(tmp_path / name), name
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    a = cfg.auction
    floor = report["floor"]["eval"]
    labels = [r["mechanism"] for r in report["mechanisms"]]
    assert any(s.startswith("GSP") for s in labels) and any("SPSA" in s for s in labels)
    for row in report["mechanisms"]:
        want = vb_tuning.penalized_objective(row["revenue"], row["organic_clicks"], floor, a.penalty)
        np.testing.assert_allclose(row["objective"], want, rtol=1e-6)
        assert 0.0 <= row["clip_rate"] <= 1.0 and row["revenue"] >= 0.0
    for name, tuned in report["tuned"].items():
        assert a.vb_org_lo <= tuned["vb_org"] <= a.vb_org_hi and a.vb_ad_lo <= tuned["vb_ad"] <= a.vb_ad_hi
        if name != "spsa":
            assert len(tuned["history"]) == a.golden_evals
    # Monotone comparative statics (spec): with the true CTR, a higher VB_org never lowers the
    # organic clicks of the chosen allocations.
    oracle = report["frontier"]["oracle"]
    assert np.all(np.diff(oracle["organic_clicks"]) >= -1e-6)
    assert oracle["vb_org"] == list(a.vb_org_grid)
    # The click models are reused, not retrained, by a second call.
    capsys.readouterr()
    models = ad_blending.train_click_models(cfg, str(tmp_path))
    assert models.status == "completed" and list(models.results) == ["click_context", "click_no_context"]
    assert " -> " not in capsys.readouterr().out  # the sweep logs "<job> -> <dir>" only for jobs it runs


def test_bad_auction_settings_are_rejected_before_anything_runs(tmp_path):
    cfg = config(**{"auction.generator": "beam", "auction.organic_floor": 1.5, "auction.vb_org_hi": -1.0})
    errors = "; ".join(ad_blending.validate(cfg))
    assert "auction.generator" in errors and "organic_floor" in errors and "vb_org_lo < vb_org_hi" in errors
