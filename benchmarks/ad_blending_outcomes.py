"""Outcomes of the ad-blending mechanisms (configs/ad_blending.py) over several seeds.

    python -m benchmarks.ad_blending_outcomes --config=configs/ad_blending.py --seeds=0,1,2 \\
        [--workdir=runs/ad-blending-outcomes]

Each seed draws its own environment (category centres, logs, pages: data.seed) and its own
click-model initialisation (seed), trains both click models, tunes the virtual bids on the tune
pages and evaluates every mechanism on the eval pages (jdjax/tasks/ad_blending.py). Records per
mechanism the mean and standard deviation over seeds of revenue, ad clicks, organic clicks,
clip rate and the business objective J, how often the organic-click floor was met, and per click
model the test AUC / logloss. Finished click models are reused when rerun.
"""

from __future__ import annotations

import statistics

from absl import flags

from benchmarks import harness
from jdjax import cli, tasks
from jdjax.train import sweep

_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
NOTES = ("Ad blending (configs/ad_blending.py) on the synthetic page environment (jdjax/econ/page_env.py): "
         "expected values per request under the true CTR on the eval pages, virtual bids tuned on separate "
         "tune pages; J = revenue - penalty x shortfall below the organic-click floor (95 % of the no-ads "
         "organic clicks); floor_met = seeds whose eval organic clicks reach the floor. Click-model rows: "
         "test AUC / logloss of the val-selected checkpoint. Mean and std over seeds (each seed its own "
         "environment).")


def _stats(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_job(base, seed: int) -> sweep.Job:
    config = base.copy_and_resolve_references()
    config.seed = config.data.seed = seed
    return sweep.Job(f"seed{seed}", lambda workdir: tasks.run(config, workdir))


def main(base, workdir: str) -> None:
    tasks.check(base)  # every seed's config problems, before anything runs
    smoke = "smoke" in cli.config_arg()
    seeds = [int(s) for s in _SEEDS.value.split(",")]
    out = sweep.run_sweep(workdir, [seed_job(base, s) for s in seeds], desc="ad_blending_outcomes")
    if out.status != sweep.COMPLETED:
        raise SystemExit(f"ad_blending_outcomes: {out.status} {out.failed or ''}; rerun to resume.")
    mechanisms: dict[str, list[dict]] = {}
    click: dict[str, list[dict]] = {}
    for results in out.results.values():
        for row in results["mechanisms"]:
            mechanisms.setdefault(row["mechanism"], []).append({**row, "floor": results["floor"]["eval"]})
        for row in results["click_models"]:
            click.setdefault(row["model"], []).append(row)
    for name, rows in click.items():
        auc, logloss = _stats([r["auc"] for r in rows]), _stats([r["logloss"] for r in rows])
        harness.record("ad_blending_outcomes", f"click model: {name}", {
            "seeds": len(rows), "test_auc_mean": auc[0], "test_auc_std": auc[1],
            "test_logloss_mean": logloss[0], "test_logloss_std": logloss[1], "notes": NOTES}, smoke=smoke)
    for name, rows in mechanisms.items():
        metrics = {"seeds": len(rows), "notes": NOTES}
        for key in ("revenue", "ad_clicks", "organic_clicks", "clip_rate", "objective", "vb_org", "vb_ad"):
            metrics[f"{key}_mean"], metrics[f"{key}_std"] = _stats([r[key] for r in rows])
        metrics["floor_met"] = f"{sum(r['organic_clicks'] >= r['floor'] - 1e-9 for r in rows)}/{len(rows)}"
        harness.record("ad_blending_outcomes", name, metrics, smoke=smoke)


if __name__ == "__main__":
    cli.run_app(main, example="--config=configs/ad_blending.py", workdir_default="runs/ad-blending-outcomes")
