"""Loop overhead: steps/s of the full training loop vs the bare compiled step (ViT on digits).

    python -m benchmarks.loop_overhead            # records to benchmarks/RESULTS.md
    python -m benchmarks.loop_overhead --smoke    # a quick check, records nothing

Two model sizes: the `:smoke` ViT (a ~2 ms step, where any fixed per-step host cost shows) and
the default `configs/vit.py` ViT. The full loop includes data loading and augmentation,
host-to-device transfer, metric fetching, logging and checkpoints at the default config's
cadence (every 50 and 500 steps) and the progress bar; eval runs only at the end and is
excluded. The bare step reuses the loop's own jitted step on one fixed device batch.
"""

import json
import os
import tempfile
import time

from absl import app, flags

_SMOKE = flags.DEFINE_bool("smoke", False, "Few steps; print but do not record.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Full-loop runs per case (the median is reported).")


def measure(cfg, steps: int, repeats: int, smoke: bool, label: str):
    import jax

    from benchmarks import harness
    from jdjax.data.pipeline import train_dataset
    from jdjax.tasks import classification
    from jdjax.train import loop
    from jdjax.train import sharding as shd

    cfg.num_train_steps = steps
    cfg.eval_every_steps = steps
    task = classification.build(cfg)

    # Bare step: the loop's jitted train step on one fixed batch, `steps` steps per timing.
    c = loop.compile_task(cfg, task)
    batch = shd.global_batch_from_local(train_dataset(task.train_source, cfg.batch_size, 0)[0], c.mesh)
    state = c.init_state()

    def run_bare():
        nonlocal state
        for _ in range(steps):
            state, metrics = c.train_step(state, batch, c.rng)
        jax.block_until_ready(metrics)

    bare = harness.time_call(run_bare, warmup=1, repeats=repeats)
    bare_sps = steps / bare["median_s"]

    # Full loop: steps/s from the loop's own per-interval timings, time-weighted, the first
    # interval (compilation) left out.
    loop_sps = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as workdir:
            t0 = time.perf_counter()
            loop.train_and_evaluate(cfg, workdir, classification.build(cfg))
            wall = time.perf_counter() - t0
            rates = [json.loads(line)["train/steps_per_second"] for line in open(os.path.join(workdir, "metrics.jsonl"))
                     if "train/steps_per_second" in line][1:]
            interval = cfg.logging.every_steps
            loop_sps.append(len(rates) * interval / sum(interval / r for r in rates))
    loop_sps.sort()
    full_sps = loop_sps[len(loop_sps) // 2]
    harness.record(
        "loop_overhead",
        f"{label}: width {cfg.model.width}, depth {cfg.model.depth}, batch {cfg.batch_size}, {steps} steps",
        {
            "bare_ms_per_step": 1e3 / bare_sps,
            "loop_ms_per_step": 1e3 / full_sps,
            "overhead_pct": 100 * (bare_sps / full_sps - 1),
            "compile_s": bare["first_s"] - bare["median_s"],
            "last_run_wall_s": wall,
            "load_avg_1min": os.getloadavg()[0],
            "notes": "Loop overhead = extra time per step of the full loop (data + augmentation, host-to-device, "
            "metric fetching, logging every 50 and checkpoints every 500 steps, progress bar) over the bare "
            "compiled step; target <= 10 %. load_avg_1min: other work on the machine during the run.",
        },
        smoke=smoke,
    )


def main(_):
    from configs import vit

    default = vit.get_config()
    cases = [("smoke ViT", vit.get_config("smoke"), 1500), ("default ViT", vit.get_config(), 600)]
    for label, cfg, steps in cases:
        cfg.logging.every_steps = 10 if _SMOKE.value else default.logging.every_steps
        cfg.checkpoint.every_steps = 20 if _SMOKE.value else default.checkpoint.every_steps
        measure(cfg, 60 if _SMOKE.value else steps, 1 if _SMOKE.value else _REPEATS.value, _SMOKE.value, label)


if __name__ == "__main__":
    app.run(main)
