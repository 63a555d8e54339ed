"""Accuracy and speed of dense LoRA, ToMe and PYRA on the embedded PYRA recipe over several seeds.

    python -m benchmarks.pyra_accuracy --config=configs/pyra.py --seeds=0,1,2 [--workdir=runs/pyra-accuracy]

Runs `configs/pyra.py` (pretrain on digits 0-4, frozen transfer to digits 5-9) once per seed,
each seed with its own backbone, as jobs of the sweep runner (workdir/seed<k>; finished seeds are
reused, interrupted ones resume), and records per run (lora, tome-low, pyra-low, tome-high,
pyra-high) the mean and standard deviation over seeds of the test accuracy of the checkpoint
chosen on val, plus the per-seed values; then the inference speed of the recipe's models
(random weights, batch min(eval_batch_size, 64), float32), timed interleaved in this run, as
images/s and the speed-up over dense LoRA.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import harness
from jdjax import cli, tasks
from jdjax.tasks import pyra
from jdjax.train import sweep

_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")


def measure_throughput(config, batch: int, rounds: int = 15) -> dict[str, float]:
    """Inference images/s of every run's model at `batch`, timed in interleaved rounds so that a
    change of load hits every model alike (median per model)."""
    size = config.data.image_size
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
    fns = {}
    for method, compression in pyra.runs(config):
        model = pyra.build_model(config, method, compression, config.data.num_classes)
        params = model.init(jax.random.key(0), x[:1])["params"]
        params = jax.tree.map(lambda p: p + 0.01, params)  # non-zero PYRA W_D: no constant shortcut
        apply = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
        fns[pyra.run_name(method, compression)] = lambda apply=apply, params=params: jax.block_until_ready(apply(params, x))
    for fn in fns.values():
        fn(), fn()  # compile, warm up
    timed = harness.interleaved(fns, rounds)
    return {name: batch / t["median_s"] for name, t in timed.items()}


def seed_job(base, seed: int) -> sweep.Job:
    config = base.copy_and_resolve_references()
    config.seed = seed
    return sweep.Job(f"seed{seed}", lambda workdir: tasks.run(config, workdir))


def main(base, workdir: str) -> None:
    tasks.check(base)  # every seed's config problems, before anything runs
    seeds = [int(s) for s in _SEEDS.value.split(",")]
    out = sweep.run_sweep(workdir, [seed_job(base, s) for s in seeds], desc="pyra_accuracy")
    if out.status != sweep.COMPLETED:
        raise SystemExit(f"pyra_accuracy: {out.status} {out.failed or ''}; rerun to resume.")
    per_run: dict[str, list[dict]] = {}
    for results in out.results.values():
        for row in results["runs"]:
            per_run.setdefault(row["run"], []).append(row)
    batch = min(int(base.eval_batch_size), 64)
    speed = measure_throughput(base, batch)
    smoke = "smoke" in cli.config_arg()
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
                "images_per_s": speed[name],
                "speedup": speed[name] / speed["lora"] if "lora" in speed else None,
                "batch": batch,
                "gmacs": rows[0]["gmacs"],
                "trainable_params": rows[0]["trainable_params"],
                "final_tokens": rows[0]["final_tokens"],
            },
            smoke=smoke,
        )


if __name__ == "__main__":
    cli.run_app(main, example="--config=configs/pyra.py", workdir_default="runs/pyra-accuracy")
