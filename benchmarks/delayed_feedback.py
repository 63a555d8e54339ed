"""D-TS simulation throughput: the JAX simulator (scan over updates x vmap over replications)
against a plain per-request NumPy loop of the same algorithm, in one run.

    python -m benchmarks.delayed_feedback                 # records to benchmarks/RESULTS.md
    python -m benchmarks.delayed_feedback --smoke         # short horizon, records nothing

Scenario high_cvr (3 arms, T = 10,000 requests, updates every 500 after 600 random rows, EM with
10 cycles). 'jax' runs --replications worlds in one jitted call (`simulate.simulate`); it always
tracks the stopping rule's posterior (a second EM), timed with 1 Monte-Carlo draw of P(best) per
update (close to the loop's work) and, as 'with_stopping_rule', with the 1,000 draws that runs
use. 'numpy_loop' is `simulate.dts_reference_loop` (EM in NumPy at each update,
one Beta draw per request), timed on --loop_replications worlds. Throughput is replications x
requests per second; speedup = jax / numpy_loop (target >= 50x). Compile time apart.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

_REPLICATIONS = flags.DEFINE_integer("replications", 50, "Replications simulated together by JAX.")
_LOOP_REPLICATIONS = flags.DEFINE_integer("loop_replications", 3, "Replications run by the NumPy loop.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls of the JAX simulator (median reported).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Horizon 2,000 and few replications; print but do not record.")

BENCHMARK = "delayed_feedback"


def measure(horizon: int, replications: int, loop_replications: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import harness
    from jdjax.econ import delayed_feedback as df
    from jdjax.econ import simulate as sim

    scenario = sim.SCENARIOS["high_cvr"]
    schedule = sim.make_schedule(horizon)
    keys = jax.random.split(jax.random.key(0), replications)
    cvr, rate = jnp.asarray(scenario.cvr, float), jnp.asarray(scenario.delay_rate, float)
    worlds = sim.synthetic_worlds(keys, cvr, rate, scenario.weibull_shape, horizon)
    num_arms = len(scenario.cvr)
    init = jax.vmap(lambda _: df.init_state(num_arms))(jnp.arange(replications))
    policy = df.make_policy("dts")
    run_keys = jax.random.split(jax.random.key(1), replications)

    def jax_run(decision_draws):
        return lambda: jax.block_until_ready(
            sim.simulate(policy, schedule, worlds, run_keys, init, init, df.EM_CYCLES, decision_draws).regret)

    # decision_draws=1: (almost) only what the loop does; 1000: the stopping rule's P(best) as in runs
    jax_timing = harness.time_call(jax_run(1), warmup=1, repeats=repeats)
    full_timing = harness.time_call(jax_run(1000), warmup=1, repeats=repeats)
    world_np = [np.asarray(x) for x in (worlds.time, worlds.delay, worlds.cvr)]
    loop_times = []
    for r in range(loop_replications):
        t0 = time.perf_counter()
        sim.dts_reference_loop(world_np[0][r], world_np[1][r], world_np[2][r], schedule, np.random.default_rng(r))
        loop_times.append(time.perf_counter() - t0)
    jax_rate = replications * horizon / jax_timing["median_s"]
    loop_rate = horizon / float(np.median(loop_times))
    return {
        "horizon": horizon,
        "replications": replications,
        "jax_requests_per_s": jax_rate,
        "numpy_loop_requests_per_s": loop_rate,
        "speedup": jax_rate / loop_rate,
        "jax_with_stopping_rule_requests_per_s": replications * horizon / full_timing["median_s"],
        "speedup_with_stopping_rule": replications * horizon / full_timing["median_s"] / loop_rate,
        "jax_call_s": jax_timing["median_s"],
        "jax_compile_s": jax_timing["first_s"] - jax_timing["median_s"],
        "numpy_loop_s_per_replication": float(np.median(loop_times)),
        "load1": os.getloadavg()[0],
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from benchmarks import harness

    smoke = _SMOKE.value
    if smoke:
        metrics = measure(2_000, 4, 1, 1)
    else:
        metrics = measure(10_000, _REPLICATIONS.value, _LOOP_REPLICATIONS.value, _REPEATS.value)
    harness.record(BENCHMARK, f"D-TS high_cvr T={metrics['horizon']} x {metrics['replications']} replications",
                   metrics, smoke=smoke)


if __name__ == "__main__":
    app.run(main)
