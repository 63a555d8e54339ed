"""D-TS simulation throughput: the JAX simulator (scan over updates x vmap over replications)
against a plain per-request NumPy loop of the same algorithm, in one run.

    python -m benchmarks.delayed_feedback                 # records to benchmarks/RESULTS.md
    python -m benchmarks.delayed_feedback --smoke         # short horizon, records nothing

Scenario high_cvr (3 arms, T = 10,000 requests, updates every 500 after 600 random rows, EM with
10 cycles). Both sides compute in float64, as the spec asks for exp(-lambda e) and as the
simulator runs from `python -m jdjax.main` (the run recorded before this was measured timed the
JAX side in float32, JAX's default: 178k requests/s, 3.5x). 'jax' runs --replications worlds in one jitted call (`simulate.simulate`);
it also reports the stopping rule's posterior (for D-TS it is the policy's own), timed with 1
Monte-Carlo draw of P(best) per update (close to the loop's work) and, as 'with_stopping_rule',
with the 1,000 draws that runs use. 'numpy_loop' is `simulate.dts_reference_loop` (EM in NumPy
at each update, one Beta draw per request), one replication per round. The three are timed in
interleaved rounds (harness.interleaved), medians reported; throughput is replications x
requests per second; speedup = jax / numpy_loop (the issue's target is >= 50x). Compile time apart.
"""

from __future__ import annotations

import os

from absl import app, flags

_REPLICATIONS = flags.DEFINE_integer("replications", 50, "Replications simulated together by JAX.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds (median reported).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Horizon 2,000 and few replications; print but do not record.")

BENCHMARK = "delayed_feedback"


def measure(horizon: int, replications: int, rounds: int) -> dict:
    import time

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
    assert worlds.delay.dtype == jnp.float64

    def jax_run(decision_draws):
        return lambda: jax.block_until_ready(
            sim.simulate(policy, schedule, worlds, run_keys, init, init, df.EM_CYCLES, decision_draws).regret)

    world_np = [np.asarray(x) for x in (worlds.time, worlds.delay, worlds.cvr)]
    loop_calls = [0]

    def numpy_loop():  # a different world each round
        r = loop_calls[0] % replications
        loop_calls[0] += 1
        sim.dts_reference_loop(world_np[0][r], world_np[1][r], world_np[2][r], schedule, np.random.default_rng(r))

    fns = {"jax": jax_run(1), "jax_with_stopping_rule": jax_run(1000), "numpy_loop": numpy_loop}
    first = {}
    for name in ("jax", "jax_with_stopping_rule"):  # compilation (and a first run) apart
        t0 = time.perf_counter()
        fns[name]()
        first[name] = time.perf_counter() - t0
    timing = harness.interleaved(fns, rounds)
    jax_rate = replications * horizon / timing["jax"]["median_s"]
    full_rate = replications * horizon / timing["jax_with_stopping_rule"]["median_s"]
    loop_rate = horizon / timing["numpy_loop"]["median_s"]
    return {
        "horizon": horizon,
        "replications": replications,
        "jax_requests_per_s": jax_rate,
        "numpy_loop_requests_per_s": loop_rate,
        "speedup": jax_rate / loop_rate,
        "jax_with_stopping_rule_requests_per_s": full_rate,
        "speedup_with_stopping_rule": full_rate / loop_rate,
        "jax_call_s": timing["jax"]["median_s"],
        "jax_compile_s": first["jax"] - timing["jax"]["median_s"],
        "numpy_loop_s_per_replication": timing["numpy_loop"]["median_s"],
        "rounds": rounds,
        "dtype": "float64",
        "load1": os.getloadavg()[0],
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import jax

    from benchmarks import harness

    smoke = _SMOKE.value
    with jax.enable_x64(True):
        if smoke:
            metrics = measure(2_000, 4, 1)
        else:
            metrics = measure(10_000, _REPLICATIONS.value, _ROUNDS.value)
    harness.record(BENCHMARK, f"D-TS high_cvr T={metrics['horizon']} x {metrics['replications']} replications",
                   metrics, smoke=smoke)


if __name__ == "__main__":
    app.run(main)
