"""Accuracy of dense LoRA, ToMe and PYRA on the embedded PYRA recipe over several seeds.

    python -m benchmarks.pyra_accuracy --config=configs/pyra.py --seeds=0,1,2 [--workdir=runs/pyra-accuracy]

Runs `configs/pyra.py` (pretrain on digits 0-4, frozen transfer to digits 5-9) once per seed,
each seed with its own backbone, and records per run (lora, tome-low, pyra-low, tome-high,
pyra-high) the mean and standard deviation over seeds of the test accuracy of the checkpoint
chosen on val, plus the per-seed values. Reruns reuse finished seeds (the workdirs resume).
"""

from __future__ import annotations

import os
import statistics

from absl import app, flags

from benchmarks import harness
from jdjax import (
    main as jmain,  # defines --config (with :variant and --config.x overrides) and --workdir
)

_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    base = jmain._CONFIG.value
    if base is None:
        raise app.UsageError("--config is required, e.g. --config=configs/pyra.py")
    workdir = jmain._WORKDIR.value or "runs/pyra-accuracy"
    smoke = "smoke" in flags.FLAGS["config"].serialize()
    per_run: dict[str, list[dict]] = {}
    for seed in [int(s) for s in _SEEDS.value.split(",")]:
        config = base.copy_and_resolve_references()
        config.seed = seed
        out = jmain.run(config, os.path.join(workdir, f"seed{seed}"))
        if out.get("status") != "completed":
            raise SystemExit(f"seed {seed} did not complete; rerun to resume.")
        for row in out["runs"]:
            per_run.setdefault(row["run"], []).append({**row, "seed": seed})
    for name, rows in per_run.items():
        test = [100 * r["test_accuracy"] for r in rows]
        val = [100 * r["val_accuracy"] for r in rows]
        harness.record(
            "pyra_accuracy",
            name,
            {
                "seeds": len(rows),
                "test_acc_mean": statistics.mean(test),
                "test_acc_std": statistics.stdev(test) if len(test) > 1 else 0.0,
                "val_acc_mean": statistics.mean(val),
                "test_acc_per_seed": " / ".join(f"{t:.1f}" for t in test),
                "speedup_mean": statistics.mean(r["speedup"] for r in rows),
                "gmacs": rows[0]["gmacs"],
                "trainable_params": rows[0]["trainable_params"],
                "final_tokens": rows[0]["final_tokens"],
            },
            smoke=smoke,
        )


if __name__ == "__main__":
    app.run(main)
