"""Adaptive experimentation with delayed binary feedback (D-TS, WWW '22): the paper's simulations.

    python -m jdjax.main --config=configs/delayed_feedback.py --workdir=/tmp/dts         # paper settings
    python -m jdjax.main --config=configs/delayed_feedback.py:smoke --workdir=/tmp/dts   # ~20 s, for CI
    python -m jdjax.main --config=configs/delayed_feedback.py --workdir=/tmp/dts \\
        --config.scenarios=high_cvr,low_cvr,weibull,criteo --config.criteo_path=/data/criteo/data.txt

Writes regret_table.md, regret_table.json and regret_curve.png into the workdir
(jdjax.econ.simulate.run_delayed_feedback). Scenarios: high_cvr, low_cvr, weibull (embedded
generators) and criteo (needs the Criteo Conversion Logs file, Chapelle 2014). Policies: random,
naive_ts, dts, dts_known, ducb, ducb_known, full_bayes. The stopping rule is ours, not the paper's.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "delayed_feedback"
    c.seed = 0
    c.scenarios = "high_cvr,low_cvr,weibull"  # comma-separated; add 'criteo' with criteo_path
    c.policies = "random,naive_ts,ducb,full_bayes,dts,dts_known,ducb_known"
    c.num_replications = 50  # N_sim
    c.horizon = 10_000  # T of the synthetic scenarios
    c.criteo_horizon = 50_000  # T of the Criteo scenario
    c.criteo_path = ""  # Criteo conversion log (data.txt, optionally .gz)
    c.t_min = 100  # released schedule: uniform random rows up to t_min + batch_size, then updates
    c.batch_size = 500
    c.em_cycles = 10
    c.delay_rate_init = 0.01  # EM start (every arm)
    c.cvr_init = 0.2
    c.ucb_epsilon = 0.1  # D-UCB
    c.grid_level = 50  # Full Bayesian: Gauss-Legendre nodes per axis
    c.stop_rule = "prob_best"  # ours: 'prob_best' (max P(best) >= threshold) or 'value_remaining' (<= threshold)
    c.stop_threshold = 0.95
    c.decision_draws = 1000  # Monte-Carlo draws for P(best) / value remaining at each update
    c.chunk_size = 50  # (scenario, replication) pairs simulated together (vmap); lower it to save memory

    if args.smoke:
        c.scenarios = "high_cvr,low_cvr"
        c.policies = "random,naive_ts,dts"
        c.num_replications = 4
        c.horizon = 2_000
        c.chunk_size = 8
    return c
