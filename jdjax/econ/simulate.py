"""Simulation protocol of the delayed-feedback paper (WWW '22, spec P1), in JAX.

Every row t = 1..T is a request (a click) carrying potential outcomes for all K arms: a latent
conversion and its delay. The policy picks which arm's outcome the row reveals. The first rows
are assigned uniformly at random; then, at each update, the policy sees every row assigned so
far (at current_t = arrival time of the last assigned row) and assigns the next batch. Regret
is expected regret, sum_t (max_k p_k - p_{a_t}).

* `make_schedule` reproduces the released update schedule exactly, `synthetic_world` and
  `criteo_world` the released data generators, `simulate` runs a policy with `lax.scan` over
  updates and `vmap` over (scenario, replication) pairs. Assigned rows go to an `ArmLog` in
  blocks of one arm each, so an update reads the units assigned so far as a prefix of static size
  (`layout_sizes`: a few sizes, picked per update with `lax.switch`) with per-arm sums over whole
  blocks; the EM never touches unassigned rows. When the policy is D-TS, its posterior is the
  stopping rule's and the EM runs once per update.
* `dts_reference_loop` is a plain per-request NumPy loop of the same D-TS algorithm: the
  reference in tests and the baseline of the speed benchmark.
* `read_criteo_log` reads Criteo's conversion logs (Chapelle 2014) for the Criteo scenario; a
  malformed line is a `CriteoLogError` (a ValueError) `file:line: what is wrong`.
* `run_delayed_feedback(cfg, workdir)` is the task entry point (configs/delayed_feedback.py);
  `config_errors(cfg)` lists what is wrong with a config before anything runs.
"""

from __future__ import annotations

import array
import functools
import gzip
import math
import os
import time
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jdjax import io
from jdjax.econ import delayed_feedback as df
from jdjax.econ import report

RATES = (1 / 1000, 1 / 750, 1 / 500)  # mean delays 1000, 750, 500 rows


class Scenario(NamedTuple):
    """A released simulation setting. Exponential delays are Weibull with shape 1."""

    cvr: tuple[float, ...]  # [K] p_c; for Criteo the target CVRs (thinning keeps p_c / max p_c)
    delay_rate: tuple[float, ...]  # [K] lambda; Weibull scale 1 / lambda; Criteo delay multiplier
    weibull_shape: float
    criteo: bool
    horizon: int  # T in the paper


SCENARIOS = {
    "high_cvr": Scenario((0.5, 0.4, 0.3), RATES, 1.0, False, 10_000),
    "low_cvr": Scenario((0.1, 0.05, 0.03), RATES, 1.0, False, 10_000),
    "weibull": Scenario((0.1, 0.05, 0.03), RATES, 1.5, False, 10_000),
    "criteo": Scenario((0.5, 0.4, 0.3), RATES, 1.0, True, 50_000),
}


# Final mean cumulative regret in the released figures at the paper's horizon, as read off in the
# spec ("re-run" = the spec author's NumPy re-run of the released code, 50 seeds).
PAPER_REGRET = {
    ("high_cvr", "random"): "~1000",
    ("high_cvr", "naive_ts"): "340-350 (re-run 361)",
    ("high_cvr", "ducb"): "153-167 (re-run 164)",
    ("high_cvr", "full_bayes"): "~215",
    ("high_cvr", "dts"): "133-147 (re-run 157)",
    ("high_cvr", "dts_known"): "re-run 94",
    ("low_cvr", "random"): "~400",
    ("low_cvr", "naive_ts"): "~65 (re-run 65)",
    ("low_cvr", "ducb"): "~145 (re-run 150)",
    ("low_cvr", "full_bayes"): "~51",
    ("low_cvr", "dts"): "~59 (re-run 60)",
    ("low_cvr", "dts_known"): "re-run 37",
    ("weibull", "random"): "~400",
    ("weibull", "naive_ts"): "~74 (re-run 74)",
    ("weibull", "ducb"): "~147 (re-run 165)",
    ("weibull", "full_bayes"): "~45",
    ("weibull", "dts"): "~54 (re-run 55)",
    ("criteo", "random"): ">>800",
    ("criteo", "naive_ts"): "~175",
    ("criteo", "ducb"): "~620",
    ("criteo", "full_bayes"): "~115",
    ("criteo", "dts"): "~147",
}


class World(NamedTuple):
    """Potential outcomes of one replication."""

    time: jax.Array  # [T] arrival time of each row, non-decreasing (row index, or Criteo seconds)
    delay: jax.Array  # [T, K] latent conversion delay; inf where the row would not convert
    cvr: jax.Array  # [K] true CVR used for the regret


class Schedule(NamedTuple):
    """Rows 0..n_init-1 are uniform random; update u happens after starts[u] rows and assigns sizes[u]."""

    n_init: int
    starts: tuple[int, ...]
    sizes: tuple[int, ...]


class Trace(NamedTuple):
    """One replication of one policy (vmap adds a leading axis)."""

    arms: jax.Array  # [T] int32 arm of every row
    regret: jax.Array  # [T] cumulative expected regret
    states: df.ArmState  # leaves [U, K], policy state after each update
    prob_best: jax.Array  # [U, K] P(best) of the stopping rule's delay-corrected posterior
    value_remaining: jax.Array  # [U] its 95th-percentile relative value remaining


def make_schedule(horizon: int, t_min: int = 100, batch_size: int = 500) -> Schedule:
    """The released schedule: update ends at t_min + j * batch_size (j >= 1) and at T; the rows
    before the first end are uniform random. For T = 10k: 600 random rows, updates after 600,
    1100, ..., 9600 rows, the last one assigning 400 rows."""
    if horizon < 1 or batch_size < 1 or t_min < 0:
        raise ValueError(f"need horizon >= 1, batch_size >= 1, t_min >= 0; got {horizon}, {batch_size}, {t_min}.")
    ends = [t_min + batch_size * j for j in range(1, (horizon - t_min) // batch_size + 1)]
    ends = sorted(set(ends) | {horizon})
    return Schedule(ends[0], tuple(ends[:-1]), tuple(np.diff(ends).tolist()))


# ----------------------------------------------------------------------------- worlds


def synthetic_world(key, cvr, delay_rate, weibull_shape, horizon: int) -> World:
    """cvr, delay_rate [K], weibull_shape [] (1 = exponential) -> World with rows at times 1..T."""
    k_conv, k_delay = jax.random.split(key)
    cvr = jnp.asarray(cvr, float)
    shape = (horizon, cvr.shape[0])
    converts = jax.random.uniform(k_conv, shape, cvr.dtype) < cvr
    delay = jax.random.exponential(k_delay, shape, cvr.dtype) ** (1.0 / weibull_shape) / jnp.asarray(delay_rate, float)
    return World(jnp.arange(1, horizon + 1, dtype=cvr.dtype), jnp.where(converts, delay, jnp.inf), cvr)


@functools.partial(jax.jit, static_argnames="horizon")
def synthetic_worlds(keys, cvr, delay_rate, weibull_shape, horizon: int) -> World:
    """`synthetic_world` for each key [R]."""
    return jax.vmap(lambda k: synthetic_world(k, cvr, delay_rate, weibull_shape, horizon))(keys)


def _sample_without_replacement(key, population: int, size: int) -> jax.Array:
    """Uniform subset of `size` indices out of `population` (top-k of iid uniform keys)."""
    return jax.lax.top_k(jax.random.uniform(key, (population,), jnp.result_type(float)), size)[1]


def criteo_world(key, log_click_time, log_delay, cvr, delay_rate, horizon: int) -> World:
    """The released Criteo-based generator. log_click_time, log_delay [M] (inf = no conversion).

    Delays of `horizon` log rows (without replacement) are shared by all arms; arm k keeps a
    conversion with probability p_k / max p and scales its delay by (1/lambda_k) / min(1/lambda);
    arrival times are `horizon` click timestamps drawn independently (without replacement) and
    sorted. The true CVR of an arm is its empirical rate in this world.
    """
    k_rows, k_times, k_keep = jax.random.split(key, 3)
    population = log_delay.shape[0]
    base = log_delay[_sample_without_replacement(k_rows, population, horizon)]  # [T]
    times = jnp.sort(log_click_time[_sample_without_replacement(k_times, population, horizon)])
    cvr, delay_rate = jnp.asarray(cvr, float), jnp.asarray(delay_rate, float)
    keep = jax.random.uniform(k_keep, (horizon, cvr.shape[0]), cvr.dtype) < cvr / cvr.max()
    scale = (1.0 / delay_rate) / jnp.min(1.0 / delay_rate)
    delay = jnp.where(keep & jnp.isfinite(base)[:, None], base[:, None] * scale, jnp.inf)
    return World(times, delay, jnp.isfinite(delay).mean(0))


@functools.partial(jax.jit, static_argnames="horizon")
def criteo_worlds(keys, log_click_time, log_delay, cvr, delay_rate, horizon: int) -> World:
    """`criteo_world` for each key [R], one after the other (each one draws from the whole log)."""
    return jax.lax.map(lambda k: criteo_world(k, log_click_time, log_delay, cvr, delay_rate, horizon), keys)


class CriteoLog(NamedTuple):
    click_time: np.ndarray  # [M] float64 seconds
    delay: np.ndarray  # [M] float64 conversion delay in seconds; inf = no conversion


class CriteoLogError(ValueError):
    """A malformed Criteo conversion log; the message is `file:line: what is wrong` and the fix."""


_MISSING_CONVERSION = ("", "NA", "nan", "NaN")  # no conversion (empty in data.txt; NA / nan from data frames)


def _criteo_time(cell: str, column: str, where: str) -> float:
    """One timestamp cell -> seconds; anything but a finite non-negative number is a CriteoLogError."""
    if not cell.strip():
        raise CriteoLogError(f"{where}: the {column} is empty; every click needs one.")
    try:
        value = float(cell)
    except ValueError:
        raise CriteoLogError(f"{where}: the {column} is {cell[:40]!r}, not a number.") from None
    if not math.isfinite(value) or value < 0:
        raise CriteoLogError(f"{where}: the {column} is {cell.strip()[:40]!r}; timestamps are finite seconds >= 0.")
    return value


def read_criteo_log(path: str) -> CriteoLog:
    """Reads Criteo's conversion logs (Chapelle 2014, `data.txt`, optionally gzipped).

    Tab-separated lines: click timestamp, conversion timestamp (empty, NA or nan when the click did
    not convert), then feature columns, which are ignored; every line has as many columns as the
    first (19 in data.txt; the two-column `data_no_feature.txt` of the released code reads the same
    way). A malformed line (too few or a changing number of columns, an empty, non-numeric,
    non-finite or negative click time, a conversion before its click, bytes that are not UTF-8, a
    truncated .gz) raises CriteoLogError `path:line: what is wrong`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Criteo conversion log {path!r} not found. Download the Criteo Conversion Logs data set "
            "(data.txt, Chapelle 2014) and pass its path as --config.criteo_path, or leave 'criteo' "
            "out of --config.scenarios."
        )
    clicks, delays = array.array("d"), array.array("d")  # 8 bytes a value: the full log has ~16M lines
    columns = None
    line_no = 0
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                where = f"{path}:{line_no}"
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise CriteoLogError(
                        f"{where}: byte {e.start + 1} of the line ({raw[e.start:e.start + 1]!r}) is not UTF-8 text; "
                        "the file is damaged or is not the Criteo data.txt (tab-separated text)."
                    ) from None
                n = line.count("\t") + 1
                if not line.strip() and n == 1:
                    raise CriteoLogError(f"{where}: the line is empty; expected 'click_timestamp<TAB>"
                                         "conversion_timestamp[<TAB>features...]'.")
                if n < 2:
                    sep = next((f" (it has {c!r} but no tab: is the file {name}-separated?)"
                                for c, name in ((",", "comma"), (" ", "space"), (";", "semicolon")) if c in line), "")
                    raise CriteoLogError(f"{where}: 1 column{sep}; expected at least 2 tab-separated columns, "
                                         f"click timestamp and conversion timestamp, got {line[:80]!r}.")
                if columns is None:
                    columns = n
                elif n != columns:
                    raise CriteoLogError(f"{where}: {n} tab-separated columns, but line 1 has {columns}; the line "
                                         "is cut short or joined with another (a damaged copy?).")
                fields = line.split("\t", 2)
                click = _criteo_time(fields[0], "click timestamp (column 1)", where)
                conv = fields[1].strip()
                if conv in _MISSING_CONVERSION:
                    delay = math.inf
                else:
                    delay = _criteo_time(conv, "conversion timestamp (column 2)", where) - click
                    if delay < 0:
                        raise CriteoLogError(f"{where}: the conversion at {conv} comes before its click at "
                                             f"{fields[0].strip()}.")
                clicks.append(click)
                delays.append(delay)
    except (EOFError, OSError, zlib.error) as e:  # BadGzipFile is an OSError
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
        if opener is open:
            raise CriteoLogError(f"{path}: cannot read the file ({reason}).") from None
        if isinstance(e, gzip.BadGzipFile) and line_no == 0:
            raise CriteoLogError(f"{path}: the name ends in .gz but the file is not gzip-compressed ({reason}); "
                                 "rename it without .gz.") from None
        raise CriteoLogError(f"{path}:{line_no + 1}: cannot read on ({reason}); the gzip file is truncated or "
                             "damaged: download it again, or gunzip what you have.") from None
    if not clicks:
        raise CriteoLogError(f"{path}: the Criteo conversion log is empty.")
    return CriteoLog(np.frombuffer(clicks, float).copy(), np.frombuffer(delays, float).copy())


# ----------------------------------------------------------------------------- simulation


def _row_values(table: jax.Array, arms: jax.Array) -> jax.Array:
    """table [T, K], arms [T] -> [T], table[t, arms[t]] (arm -1 reads column 0)."""
    if table.shape[1] > 8:
        return jnp.take_along_axis(table, jnp.maximum(arms, 0)[:, None], 1)[:, 0]
    out = table[:, 0]
    for k in range(1, table.shape[1]):
        out = jnp.where(arms == k, table[:, k], out)
    return out


def observe(world: World, arms: jax.Array, n_assigned) -> df.Observation:
    """What the experimenter sees after the first n_assigned rows (arms [T], -1 = unassigned), in
    row order. `simulate` builds the same units grouped by arm (`grouped_observation`)."""
    current_t = world.time[n_assigned - 1]
    assigned = arms >= 0
    delay = _row_values(world.delay, arms)  # [T], the delay of each row's arm
    converted = assigned & (world.time + delay < current_t)  # strict <, as released
    return df.Observation(
        arm=arms,
        elapsed=jnp.where(assigned, current_t - world.time, 0.0),
        converted=converted,
        delay=jnp.where(converted, delay, 0.0),
        current_t=current_t,
    )


LAYOUT_BLOCK = 128  # rows per block of the grouped observation
LAYOUT_BUCKETS = 6  # static observation sizes per run: each one is a compiled copy of the update step


class ArmLog(NamedTuple):
    """Units assigned so far, stored in blocks of `block` slots that each hold one arm's units: an
    arm fills its latest block, then takes the next free one. Units never move, so observing them
    at an update reads a prefix of the arrays (vmap adds a leading axis)."""

    time: jax.Array  # [NB * block] arrival time of the unit in each slot; inf in empty slots
    delay: jax.Array  # [NB * block] its latent conversion delay under its arm (inf: never converts)
    block_arm: jax.Array  # [NB] int32 arm of each block; -1 while free
    count: jax.Array  # [K] int32 units of each arm
    last_block: jax.Array  # [K] int32 block of each arm's latest unit (-1: none yet)
    num_blocks: jax.Array  # [] int32 blocks taken


def empty_log(world: World, block: int = LAYOUT_BLOCK) -> ArmLog:
    horizon, num_arms = world.delay.shape
    num_blocks = -(-horizon // block) + num_arms  # enough for any assignment of the T rows
    inf = jnp.full(num_blocks * block, jnp.inf, world.delay.dtype)
    return ArmLog(inf, inf, jnp.full(num_blocks, -1, jnp.int32), jnp.zeros(num_arms, jnp.int32),
                  jnp.full(num_arms, -1, jnp.int32), jnp.zeros((), jnp.int32))


def log_append(log: ArmLog, world: World, rows: jax.Array, arms: jax.Array, valid: jax.Array) -> ArmLog:
    """Appends rows [B] with arms [B] (where valid [B]) to the log, in order."""
    num_arms = log.count.shape[0]
    block = log.time.shape[0] // log.block_arm.shape[0]
    onehot = ((arms[:, None] == jnp.arange(num_arms)) & valid[:, None]).astype(jnp.int32)  # [B, K]
    arm = jnp.clip(arms, 0, num_arms - 1)
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), arm[:, None], 1)[:, 0] - 1  # within the batch
    new = onehot.sum(0)  # [K]
    fill = log.count % block
    room = jnp.where(fill > 0, block - fill, 0)  # free slots in each arm's latest block
    new_blocks = (jnp.maximum(new - room, 0) + block - 1) // block
    first_new = log.num_blocks + jnp.cumsum(new_blocks) - new_blocks  # [K]

    def place(r, k):  # rank r of arm k's new units -> (block, slot)
        room_k, past = df._per_unit(room, k), r - df._per_unit(room, k)
        in_latest = r < room_k
        return (jnp.where(in_latest, df._per_unit(log.last_block, k), df._per_unit(first_new, k) + past // block),
                jnp.where(in_latest, df._per_unit(fill, k) + r, past % block))

    blocks, slots = place(rank, arm)
    flat = jnp.where(valid, blocks * block + slots, log.time.shape[0])  # out of range: dropped
    rows = jnp.clip(rows, 0, world.time.shape[0] - 1)
    time = log.time.at[flat].set(world.time[rows], mode="drop")
    delay = log.delay.at[flat].set(_row_values(world.delay[rows], arm), mode="drop")
    b = jnp.arange(log.block_arm.shape[0])
    block_arm = log.block_arm
    for k in range(num_arms):
        block_arm = jnp.where((b >= first_new[k]) & (b < first_new[k] + new_blocks[k]), k, block_arm)
    last, _ = place(new - 1, jnp.arange(num_arms))
    return ArmLog(time, delay, block_arm, log.count + new, jnp.where(new > 0, last, log.last_block),
                  log.num_blocks + new_blocks.sum())


def grouped_observation(log: ArmLog, current_t, size: int) -> df.Observation:
    """What the experimenter sees at current_t of the logged units: `observe`'s units, in the log's
    blocks of one arm each (see df.Observation.block_arm). size (static, a multiple of the block)
    must cover the blocks taken, e.g. size >= units + K * (block - 1)."""
    block = log.time.shape[0] // log.block_arm.shape[0]
    time, delay, block_arm = log.time[:size], log.delay[:size], log.block_arm[: size // block]
    valid = time < jnp.inf
    converted = valid & (time + delay < current_t)  # strict <, as released
    return df.Observation(
        arm=jnp.where(valid, jnp.repeat(block_arm, block, total_repeat_length=size), -1),
        elapsed=jnp.where(valid, current_t - time, 0.0),
        converted=converted,
        delay=jnp.where(converted, delay, 0.0),
        current_t=current_t,
        block_arm=block_arm,
    )


def layout_sizes(schedule: Schedule, num_arms: int, block: int = LAYOUT_BLOCK, buckets: int = LAYOUT_BUCKETS):
    """Static observation sizes for the updates: at most `buckets` distinct sizes (each one a
    compiled copy of the estimation step), chosen to minimise their total (dynamic programming over
    the update order; an update needs its units plus K * (block - 1) rows of block padding).
    Returns (sizes, bucket of each update)."""
    need = [-(-(s + num_arms * (block - 1)) // block) * block for s in schedule.starts]  # non-decreasing
    n = len(need)
    if n == 0:
        return (block,), ()
    best = {(0, 0): (0, ())}  # (updates covered, buckets used) -> (total rows, bucket ends)
    for i in range(1, n + 1):
        for g in range(1, min(buckets, i) + 1):
            best[(i, g)] = min(
                (best[(j, g - 1)][0] + need[i - 1] * (i - j), best[(j, g - 1)][1] + (i,))
                for j in range(g - 1, i)
                if (j, g - 1) in best
            )
    ends = min(best[(n, g)] for g in range(1, min(buckets, n) + 1))[1]
    sizes = tuple(need[e - 1] for e in ends)
    return sizes, tuple(sum(u >= e for e in ends) for u in range(n))


def simulate_replication(
    policy: df.Policy,
    schedule: Schedule,
    world: World,
    key,
    policy_init: df.ArmState,
    decision_init: df.ArmState,
    em_cycles: int = df.EM_CYCLES,
    decision_draws: int = 1000,
    shared_decision: bool = False,
    buckets: int = LAYOUT_BUCKETS,
) -> Trace:
    """Runs `policy` on one world. The stopping rule's posterior (D-TS's: EM, Beta(1+C, ...)) is
    tracked alongside, whatever the policy, so every policy is judged by the same rule.

    At an update the policy sees every row assigned so far (`grouped_observation` of the arm log,
    in a static size from `layout_sizes`). shared_decision (static): the policy's state *is*
    that posterior (D-TS with em_cycles rounds started from decision_init), so the second EM is
    skipped."""
    horizon, num_arms = world.delay.shape
    max_batch = max(schedule.sizes, default=1)
    num_updates = len(schedule.starts)
    k_init, k_assign, k_decide = jax.random.split(key, 3)
    first = jax.random.randint(k_init, (schedule.n_init,), 0, num_arms, jnp.int32)
    arms = jnp.full(horizon, -1, jnp.int32).at[: schedule.n_init].set(first)
    log = log_append(empty_log(world, LAYOUT_BLOCK), world, jnp.arange(schedule.n_init), first, jnp.ones(schedule.n_init, bool))
    sizes, bucket = layout_sizes(schedule, num_arms, LAYOUT_BLOCK, buckets)

    def estimate(size, log, state, decision, current_t):
        obs = grouped_observation(log, current_t, size)
        state = policy.update(state, obs)
        return state, state if shared_decision else df.em_fit(obs, decision, em_cycles)

    branches = [functools.partial(estimate, size) for size in sizes]

    def step(carry, xs):
        arms, log, state, decision = carry
        start, batch, which, k_a, k_d = xs
        state, decision = jax.lax.switch(which, branches, log, state, decision, world.time[start - 1])
        prob_best, value_remaining = df.decision_stats(
            k_d, *df.ts_params(decision.conversions, decision.exposure), decision_draws
        )
        new = policy.assign(state, k_a, max_batch)  # [max_batch]
        offset = jnp.arange(max_batch)
        valid = offset < batch
        rows = start + offset
        arms = arms.at[jnp.where(valid, rows, horizon)].set(new, mode="drop")  # out of range -> dropped
        log = log_append(log, world, rows, new, valid)
        return (arms, log, state, decision), (state, prob_best, value_remaining)

    updates = jnp.arange(num_updates)
    xs = (jnp.asarray(schedule.starts, jnp.int32), jnp.asarray(schedule.sizes, jnp.int32), jnp.asarray(bucket, jnp.int32),
          jax.vmap(lambda u: jax.random.fold_in(k_assign, u))(updates), jax.vmap(lambda u: jax.random.fold_in(k_decide, u))(updates))
    (arms, _, _, _), (states, prob_best, value_remaining) = jax.lax.scan(step, (arms, log, policy_init, decision_init), xs)
    gap = world.cvr.max() - world.cvr
    return Trace(arms, jnp.cumsum(gap[arms]), states, prob_best, value_remaining)


@functools.partial(jax.jit, static_argnames=("policy", "schedule", "em_cycles", "decision_draws", "shared", "buckets"))
def _simulate(policy, schedule, worlds, keys, policy_init, decision_init, em_cycles, decision_draws, shared, buckets):
    run = lambda w, k, p, d: simulate_replication(policy, schedule, w, k, p, d, em_cycles, decision_draws, shared, buckets)
    return jax.vmap(run)(worlds, keys, policy_init, decision_init)


def _same_values(x, y) -> bool:
    """Whether two pytrees of arrays are equal, when their values are known (False for tracers)."""
    try:
        return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, ValueError):
        return False


def simulate(policy, schedule, worlds, keys, policy_init, decision_init, em_cycles=df.EM_CYCLES, decision_draws=1000,
             buckets=LAYOUT_BUCKETS) -> Trace:
    """`simulate_replication` vmapped over the leading axis of worlds, keys, policy_init, decision_init
    (jitted; policy, schedule, em_cycles, decision_draws and buckets are static).

    When the policy is D-TS with em_cycles rounds and policy_init equals decision_init, its state is
    the stopping rule's posterior at every update, so that EM runs once (checked here on the values)."""
    shared = policy.em_cycles == em_cycles and _same_values(policy_init, decision_init)
    return _simulate(policy, schedule, worlds, keys, policy_init, decision_init, em_cycles, decision_draws, shared, buckets)


# ----------------------------------------------------------------------------- NumPy reference


def _numpy_em(arm, elapsed, converted, delay, rate, cvr, cycles):
    """The D-TS estimator of `delayed_feedback.em_fit`, written out in NumPy (same guards)."""
    num_arms = rate.shape[0]
    conversions = np.zeros(num_arms)
    exposure = np.zeros(num_arms)
    for _ in range(cycles):
        new_rate, new_cvr = rate.copy(), np.zeros(num_arms)
        for k in range(num_arms):
            mine = arm == k
            e, seen, d = elapsed[mine], converted[mine], delay[mine]
            conversions[k] = seen.sum()
            if conversions[k] == 0:
                exposure[k] = 0.0
                continue
            theta = min(max(cvr[k], 0.0), 1.0)
            survival = np.exp(-rate[k] * e)
            den = 1.0 - theta + theta * survival
            w = np.where(den > 0, theta * survival / np.where(den > 0, den, 1.0), 1.0)
            w = np.where(seen, 1.0, w)
            new_rate[k] = conversions[k] / max((w * np.where(seen, d, e)).sum(), np.finfo(float).tiny)
            cdf = np.where(e > 0, -np.expm1(-new_rate[k] * np.where(e > 0, e, 0.0)), 0.0)
            exposure[k] = cdf.sum()
            new_cvr[k] = min(conversions[k] / max(exposure[k], np.finfo(float).tiny), 1.0)
        rate, cvr = new_rate, new_cvr
    return rate, cvr, conversions.copy(), exposure.copy()


def dts_reference_loop(
    world_time,
    world_delay,
    world_cvr,
    schedule: Schedule,
    rng: np.random.Generator,
    em_cycles: int = df.EM_CYCLES,
    delay_rate_init: float = df.DELAY_RATE_INIT,
    cvr_init: float = df.CVR_INIT,
    forced_arms=None,
) -> dict:
    """D-TS as a plain loop over requests: at an update run the EM on the rows assigned so far,
    then give every request its own posterior draw. NumPy arrays: time [T], delay [T, K], cvr [K].

    forced_arms [T] replays a given assignment (to compare estimates with the JAX simulator).
    Returns arms [T], regret [T] and, per update, delay_rate, cvr, conversions, exposure [U, K].
    """
    world_time, world_delay = np.asarray(world_time, float), np.asarray(world_delay, float)
    horizon, num_arms = world_delay.shape
    rate = np.full(num_arms, delay_rate_init)
    cvr = np.full(num_arms, cvr_init)
    arms = np.full(horizon, -1, np.int64)
    updates = set(schedule.starts)
    trace = {"delay_rate": [], "cvr": [], "conversions": [], "exposure": []}
    a = b = None
    for i in range(horizon):
        if i in updates:
            current_t = world_time[i - 1]
            mine = arms[:i]
            delay = world_delay[np.arange(i), mine]
            converted = world_time[:i] + delay < current_t
            rate, cvr, conversions, exposure = _numpy_em(
                mine, current_t - world_time[:i], converted, np.where(converted, delay, 0.0), rate, cvr, em_cycles
            )
            a, b = 1.0 + conversions, np.maximum(1.0, 1.0 + exposure - conversions)
            for name, value in zip(trace, (rate, cvr, conversions, exposure)):
                trace[name].append(value)
        if i < schedule.n_init:
            arms[i] = rng.integers(num_arms)
        else:
            arms[i] = np.argmax(rng.beta(a, b))
        if forced_arms is not None:
            arms[i] = forced_arms[i]
    gap = np.max(world_cvr) - np.asarray(world_cvr)
    return {"arms": arms, "regret": np.cumsum(gap[arms]), **{k: np.array(v) for k, v in trace.items()}}


# ----------------------------------------------------------------------------- task entry point


class PolicyRun(NamedTuple):
    """Results of one policy on one scenario, NumPy, R replications."""

    regret: np.ndarray  # [R, T] cumulative expected regret
    decision_time: np.ndarray  # [R] rows seen when the stopping rule fired (T if it never did)
    decided: np.ndarray  # [R] bool
    correct: np.ndarray  # [R] bool, recommended arm (at the stop, else at the last update) is best
    seconds_per_replication: float  # wall time of the policy's run (with compilation) / replications


def summarize_decisions(prob_best, value_remaining, starts, horizon, true_best, rule, threshold):
    """prob_best [R, U, K], value_remaining [R, U], starts [U], true_best [R] -> (time, decided, correct) [R]."""
    fired = np.asarray(df.stop_decision(prob_best, value_remaining, rule, threshold))  # [R, U]
    decided = fired.any(1)
    first = np.where(decided, fired.argmax(1), prob_best.shape[1] - 1)
    chosen = prob_best[np.arange(len(first)), first].argmax(-1)
    decision_time = np.where(decided, np.asarray(starts)[first], horizon)
    return decision_time, decided, chosen == true_best


def config_errors(cfg) -> list[str]:
    """Problems with a delayed-feedback config (configs/delayed_feedback.py); empty when it is good."""
    errors = []
    names = cfg.scenarios.split(",")
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        errors.append(f"unknown scenario(s) {unknown} in config.scenarios; known: {', '.join(SCENARIOS)}.")
    unknown = [p for p in cfg.policies.split(",") if p not in df.POLICY_LABELS]
    if unknown:
        errors.append(f"unknown policy(ies) {unknown} in config.policies; known: {', '.join(df.POLICY_LABELS)}.")
    if "criteo" in names and not cfg.criteo_path:
        errors.append(
            "scenario 'criteo' needs the Criteo conversion logs: set --config.criteo_path=/path/to/data.txt "
            "(Criteo Conversion Logs, Chapelle 2014), or drop 'criteo' from --config.scenarios."
        )
    if cfg.criteo_path and not os.path.isfile(cfg.criteo_path):
        errors.append(f"config.criteo_path={cfg.criteo_path!r} is not a file; point it at the Criteo data.txt.")
    if cfg.num_replications < 1 or cfg.chunk_size < 1 or cfg.em_cycles < 1 or cfg.decision_draws < 1:
        errors.append("config.num_replications, chunk_size, em_cycles and decision_draws must be >= 1.")
    for field in ("horizon", "criteo_horizon"):
        if cfg[field] <= cfg.t_min + cfg.batch_size:
            errors.append(
                f"config.{field}={cfg[field]} leaves no update: it must exceed t_min + batch_size = "
                f"{cfg.t_min + cfg.batch_size}, the rows assigned at random before the first update."
            )
    if cfg.stop_rule not in df.STOP_RULES:
        errors.append(f"config.stop_rule={cfg.stop_rule!r}; use one of {df.STOP_RULES}.")
    return errors


def _replication_keys(seed: int, name: str, reps: int, stream: int) -> jax.Array:
    """Keys [R] of one scenario; stream 0 makes the worlds, 1 drives the policies. Every policy
    gets the same worlds and keys (common random numbers, same initial random rows, as released)."""
    base = jax.random.fold_in(jax.random.key(seed), list(SCENARIOS).index(name))
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), stream))(jnp.arange(reps))


def _make_worlds(cfg, names, horizon, criteo_log):
    """Worlds of every (scenario, replication) pair, stacked on one leading axis [S * R]."""
    worlds = []
    for name in names:
        scenario = SCENARIOS[name]
        keys = _replication_keys(cfg.seed, name, cfg.num_replications, 0)
        cvr, rate = jnp.asarray(scenario.cvr, float), jnp.asarray(scenario.delay_rate, float)
        if scenario.criteo:
            log = (jnp.asarray(criteo_log.click_time), jnp.asarray(criteo_log.delay))
            worlds.append(criteo_worlds(keys, *log, cvr, rate, horizon))
        else:
            worlds.append(synthetic_worlds(keys, cvr, rate, scenario.weibull_shape, horizon))
    return jax.tree.map(lambda *x: jnp.concatenate(x), *worlds)


def _run_group(cfg, names, horizon, criteo_log, progress) -> dict:
    """All policies on the scenarios `names`, which share the horizon; returns {scenario: {policy: PolicyRun}}."""
    reps = cfg.num_replications
    schedule = make_schedule(horizon, cfg.t_min, cfg.batch_size)
    worlds = _make_worlds(cfg, names, horizon, criteo_log)
    total = len(names) * reps
    keys = jnp.concatenate([_replication_keys(cfg.seed, n, reps, 1) for n in names])
    known_rate = jnp.repeat(jnp.asarray([SCENARIOS[n].delay_rate for n in names], float), reps, axis=0)  # [S * R, K]
    num_arms = known_rate.shape[1]
    decision_init = jax.vmap(lambda _: df.init_state(num_arms, cfg.delay_rate_init, cfg.cvr_init))(jnp.arange(total))
    true_best = np.asarray(worlds.cvr).argmax(1)
    out = {n: {} for n in names}
    chunk = min(cfg.chunk_size, total)
    for policy_name in cfg.policies.split(","):
        policy = df.make_policy(policy_name, em_cycles=cfg.em_cycles, ucb_epsilon=cfg.ucb_epsilon, grid_level=cfg.grid_level)
        rate0 = known_rate if policy.known_delay else jnp.full_like(known_rate, cfg.delay_rate_init)
        policy_init = jax.vmap(lambda r: df.init_state(num_arms, r, cfg.cvr_init))(rate0)
        started = time.perf_counter()
        parts = []
        for lo in range(0, total, chunk):
            idx = np.minimum(np.arange(lo, lo + chunk), total - 1)  # pad the last chunk: one compiled shape
            batch = jax.tree.map(functools.partial(jnp.take, indices=idx, axis=0), (worlds, keys, policy_init, decision_init))
            trace = simulate(policy, schedule, *batch, cfg.em_cycles, cfg.decision_draws)
            n = min(chunk, total - lo)
            parts.append(tuple(np.asarray(x)[:n] for x in (trace.regret, trace.prob_best, trace.value_remaining)))
            progress.update(1)
        seconds = (time.perf_counter() - started) / total
        regret, prob_best, value_remaining = (np.concatenate(p) for p in zip(*parts))
        decision_time, decided, correct = summarize_decisions(
            prob_best, value_remaining, schedule.starts, horizon, true_best, cfg.stop_rule, cfg.stop_threshold
        )
        for s, name in enumerate(names):
            rows = slice(s * reps, (s + 1) * reps)
            out[name][policy_name] = PolicyRun(regret[rows], decision_time[rows], decided[rows], correct[rows], seconds)
    return out


def run_delayed_feedback(cfg, workdir: str) -> dict:
    """Runs every requested (scenario, policy) pair for cfg.num_replications replications and writes
    regret_table.md, regret_table.json and regret_curve.png into workdir. Returns what
    regret_table.json holds: {"rows": report.regret_table(...), "protocol": the config}.
    Config: configs/delayed_feedback.py."""
    errors = config_errors(cfg)
    if errors:
        raise ValueError("invalid delayed-feedback config:\n  - " + "\n  - ".join(errors))
    names = cfg.scenarios.split(",")
    criteo_log = read_criteo_log(cfg.criteo_path) if "criteo" in names else None
    if criteo_log is not None and criteo_log.delay.shape[0] < cfg.criteo_horizon:
        raise CriteoLogError(
            f"{cfg.criteo_path} has {criteo_log.delay.shape[0]} clicks, fewer than config.criteo_horizon="
            f"{cfg.criteo_horizon} (rows are drawn without replacement); lower criteo_horizon."
        )
    groups = {}
    for name in names:
        horizon = cfg.criteo_horizon if SCENARIOS[name].criteo else cfg.horizon
        groups.setdefault(horizon, []).append(name)
    io.as_path(workdir).mkdir(parents=True, exist_ok=True)
    results = {}
    n_chunks = sum(math.ceil(len(g) * cfg.num_replications / cfg.chunk_size) for g in groups.values())
    with jax.enable_x64(True), tqdm(total=n_chunks * len(cfg.policies.split(",")), desc="delayed feedback") as progress:
        for horizon, group in groups.items():
            results.update(_run_group(cfg, group, horizon, criteo_log, progress))
    results = {name: results[name] for name in names}
    at_paper_horizon = {n for horizon, group in groups.items() for n in group if horizon == SCENARIOS[n].horizon}
    reference = {key: text for key, text in PAPER_REGRET.items() if key[0] in at_paper_horizon}
    table = {"rows": report.regret_table(results, reference), "protocol": cfg.to_dict()}
    report.write_table(table, workdir)
    report.plot_regret_curves(results, io.as_path(workdir) / "regret_curve.png", t_min=cfg.t_min)
    return table
