"""Delay-corrected Thompson sampling (D-TS) and its baselines for conversions that arrive late.

Wang, Carrion, Lin, Ji, Bao, Yan, "Adaptive Experimentation with Delayed Binary Feedback",
WWW '22 (arXiv 2202.00846). Spec: `specs/experiments_ads_text.md`, section P1.

Model, per arm k and unit i (one click assigned at time s_i): the unit eventually converts with
probability theta_k; if it does, the conversion arrives after a delay D_i ~ Exp(lambda_k). At
calendar time t the unit has elapsed time e_i = t - s_i and is seen converted iff it converts and
s_i + D_i < t, so P(seen converted) = theta_k F(e_i) with F(e) = 1 - exp(-lambda_k e).

* Effective exposure  N~_k = sum_i F(e_i); delay-corrected CVR  theta_k = C_k / N~_k, where C_k
  counts the conversions seen so far (E[C_k] = theta_k N~_k; the naive C_k / N_k is biased down).
* Unknown lambda: `em_fit` runs the released EM-style fixed point (`cycles` rounds, warm-started
  from the previous update's estimates).
* Allocation: Thompson sampling from Beta(1 + C_k, max(1, 1 + N~_k - C_k)), one posterior draw
  per request, request b goes to argmax_k theta_k^(b). Beta variates come from `beta_sample`, an
  exact vectorised Marsaglia-Tsang gamma sampler: with jax.random.beta's per-element rejection
  loops the D-TS simulation runs 2-3x slower on CPU (`python -m benchmarks.delayed_feedback
  --cases=library_calls`).

Everything here is a pure function of arrays; policies are pure functions of an `ArmState`.
Run under `jax.enable_x64(True)`: exp(-lambda e) with lambda ~ 1e-3 and e ~ 1e4 needs float64.
The drivers in `simulate.py` and `experiment.py` do this.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DELAY_RATE_INIT = 0.01  # EM start for lambda, every arm (released code)
CVR_INIT = 0.2  # EM start for theta, every arm (released code)
EM_CYCLES = 10  # EM rounds per update (released code)


class Observation(NamedTuple):
    """What the experimenter sees at one update: every unit assigned so far, padded to U."""

    arm: jax.Array  # [U] int32, arm of the unit; -1 marks padding
    elapsed: jax.Array  # [U] float, e_i = current_t - s_i >= 0 (0 for padding)
    converted: jax.Array  # [U] bool, conversion seen by current_t
    delay: jax.Array  # [U] float, observed delay d_i where converted, 0 elsewhere
    current_t: jax.Array  # [] float, time of the update
    # Optional [nb], nb dividing U: the units come grouped by arm in nb blocks of U / nb rows, every
    # unit of block b having arm block_arm[b] (-1: a block of padding). Per-arm sums are then sums of
    # block sums (much faster on CPU than masked sums); `group_by_arm` builds such an observation.
    block_arm: jax.Array | None = None


@struct.dataclass
class ArmState:
    """Per-arm state of a policy. Fields a policy does not estimate keep their initial values."""

    delay_rate: jax.Array  # [K] lambda used for the correction: EM warm start, or the known rate
    cvr: jax.Array  # [K] CVR estimate
    conversions: jax.Array  # [K] C_k, conversions seen
    clicks: jax.Array  # [K] N_k, units assigned
    exposure: jax.Array  # [K] N~_k, effective exposure (N_k for the naive sampler)
    probs: jax.Array  # [K] assignment probabilities of the softmax policies; uniform otherwise


def init_state(num_arms: int, delay_rate=DELAY_RATE_INIT, cvr=CVR_INIT) -> ArmState:
    """Initial state; `delay_rate` and `cvr` are scalars or [K] (the known rate for known-delay policies)."""
    dtype = jnp.result_type(float)
    zeros = jnp.zeros(num_arms, dtype)
    return ArmState(
        delay_rate=jnp.broadcast_to(jnp.asarray(delay_rate, dtype), (num_arms,)),
        cvr=jnp.broadcast_to(jnp.asarray(cvr, dtype), (num_arms,)),
        conversions=zeros,
        clicks=zeros,
        exposure=zeros,
        probs=jnp.full(num_arms, 1.0 / num_arms, dtype),
    )


# ----------------------------------------------------------------------------- counts, exposure


def _onehot(obs: Observation, num_arms: int) -> jax.Array:
    return jax.nn.one_hot(obs.arm, num_arms, dtype=obs.elapsed.dtype)  # [U, K]; zero rows for padding


_SELECT_MAX_ARMS = 8  # up to this many arms, per-arm values are picked with a chain of selects


def _per_unit(values: jax.Array, arm: jax.Array) -> jax.Array:
    """values [K] -> [U], the value of each unit's arm (padding gets arm 0's, always masked)."""
    if values.shape[0] > _SELECT_MAX_ARMS:
        return jnp.take(values, jnp.maximum(arm, 0))
    out = jnp.broadcast_to(values[0], arm.shape)
    for k in range(1, values.shape[0]):
        out = jnp.where(arm == k, values[k], out)
    return out


def _arm_sums(x: jax.Array, arm: jax.Array, num_arms: int) -> jax.Array:
    """sum of x [U] over the units of each arm -> [K] (padding, arm -1, counts nowhere)."""
    if num_arms > _SELECT_MAX_ARMS:
        return x @ jax.nn.one_hot(arm, num_arms, dtype=x.dtype)
    return jnp.stack([jnp.sum(jnp.where(arm == k, x, jnp.zeros((), x.dtype))) for k in range(num_arms)])


def delay_cdf(elapsed: jax.Array, rate: jax.Array) -> jax.Array:
    """F(e) = 1 - exp(-rate e) elementwise; exactly 0 at e = 0, also for rate = inf."""
    return jnp.where(elapsed > 0, -jnp.expm1(-rate * jnp.where(elapsed > 0, elapsed, 0.0)), 0.0)


def _blocks(obs: Observation) -> tuple[jax.Array, int]:
    """(arm of each block [nb], rows per block): obs.block_arm, or one unit a block."""
    if obs.block_arm is None:
        return obs.arm, 1
    return obs.block_arm, obs.arm.shape[0] // obs.block_arm.shape[0]


def _unit_sums(obs: Observation, x: jax.Array, num_arms: int) -> jax.Array:
    """Sum of x [U] (zero on padding units) over the units of each arm -> [K]."""
    block_arm, size = _blocks(obs)
    if size > 1:
        x = jnp.sum(x.reshape(block_arm.shape[0], size), axis=1)
    return _arm_sums(x, block_arm, num_arms)


def _unit_values(obs: Observation, values: jax.Array) -> jax.Array:
    """values [K] -> [U], the value of each unit's arm (padding gets some arm's, always masked)."""
    block_arm, size = _blocks(obs)
    if size == 1:
        return _per_unit(values, obs.arm)
    return jnp.repeat(_per_unit(values, block_arm), size, total_repeat_length=obs.arm.shape[0])


def group_by_arm(obs: Observation, num_arms: int, block: int = 128) -> Observation:
    """The same units, reordered so that every arm's units fill whole blocks of `block` rows (arm
    0's first, in their original order, then arm 1's, ...), padded with empty units; block_arm
    says whose each block is. U' = block * (ceil(U / block) + K) rows. Estimates are unchanged
    (up to the order of floating-point sums)."""
    size = obs.arm.shape[0]
    num_blocks = -(-size // block) + num_arms
    onehot = jax.nn.one_hot(obs.arm, num_arms, dtype=jnp.int32)  # [U, K]
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), jnp.maximum(obs.arm, 0)[:, None], 1)[:, 0] - 1
    counts = onehot.sum(0)
    arm_blocks = (counts + block - 1) // block  # [K]
    first_block = jnp.cumsum(arm_blocks) - arm_blocks  # [K]
    target = jnp.where(obs.arm >= 0, first_block[jnp.maximum(obs.arm, 0)] * block + rank, num_blocks * block)

    def place(x, fill):
        return jnp.full((num_blocks * block,), fill, x.dtype).at[target].set(x, mode="drop")

    b = jnp.arange(num_blocks)
    block_arm = jnp.sum(b[:, None] >= first_block[None, 1:], axis=1).astype(jnp.int32)
    block_arm = jnp.where(b < arm_blocks.sum(), block_arm, -1)
    return Observation(place(obs.arm, -1), place(obs.elapsed, 0), place(obs.converted, False),
                       place(obs.delay, 0), obs.current_t, block_arm)


def arm_counts(obs: Observation, num_arms: int) -> tuple[jax.Array, jax.Array]:
    """Conversions seen C_k and units assigned N_k, both [K]."""
    dtype = obs.elapsed.dtype
    return _unit_sums(obs, obs.converted.astype(dtype), num_arms), _unit_sums(obs, (obs.arm >= 0).astype(dtype), num_arms)


def effective_exposure(obs: Observation, rate: jax.Array) -> jax.Array:
    """N~_k = sum over the arm's units of F(e_i; rate_k). rate [K] -> [K]."""
    return _unit_sums(obs, delay_cdf(obs.elapsed, _unit_values(obs, rate)), rate.shape[0])


def _safe_div(num, den):
    return num / jnp.maximum(den, jnp.finfo(jnp.result_type(den)).tiny)


# ----------------------------------------------------------------------------- estimation


def _pending_weights(obs: Observation, rate: jax.Array, cvr: jax.Array) -> jax.Array:
    """E-step: w_i = P(unit converts eventually | data) = theta S / (1 - theta + theta S), S = exp(-lambda e);
    1 for seen conversions. [U]. theta is clipped to [0, 1] (the released code would give negative
    weights for theta > 1)."""
    theta = jnp.clip(_per_unit(cvr, obs.arm), 0.0, 1.0)
    survival = jnp.exp(-_per_unit(rate, obs.arm) * obs.elapsed)
    den = 1.0 - theta + theta * survival
    pending = jnp.where(den > 0, theta * survival / jnp.where(den > 0, den, 1.0), 1.0)
    return jnp.where(obs.converted, 1.0, pending)


def em_step(obs: Observation, rate: jax.Array, cvr: jax.Array):
    """One round of the released D-TS estimator; rate, cvr [K] -> (rate, cvr, conversions, exposure), all [K].

    lambda = C / sum_i w_i tau_i (tau = observed delay if converted, else elapsed), then
    theta = C / N~(lambda). An arm with no conversion yet has an unidentified delay rate (the
    likelihood is flat as lambda -> 0): it keeps its previous rate (so the warm start survives),
    gets theta = 0 and effective exposure 0, the lambda -> 0 limit the released code reaches in
    its first round, so its Thompson posterior is Beta(1, 1).
    """
    onehot = _onehot(obs, rate.shape[0])
    conversions = obs.converted.astype(onehot.dtype) @ onehot
    weights = _pending_weights(obs, rate, cvr)
    exposure_time = jnp.where(obs.converted, obs.delay, obs.elapsed)
    seen = conversions > 0
    rate = jnp.where(seen, _safe_div(conversions, (weights * exposure_time) @ onehot), rate)
    exposure = jnp.where(seen, effective_exposure(obs, rate), 0.0)
    cvr = jnp.where(seen, jnp.clip(_safe_div(conversions, exposure), 0.0, 1.0), 0.0)
    return rate, cvr, conversions, exposure


def em_fit(obs: Observation, state: ArmState, cycles: int = EM_CYCLES) -> ArmState:
    """`cycles` rounds of `em_step` warm-started from state.delay_rate / state.cvr: the same numbers
    (up to floating-point rounding: order of sums, F as 1 - S), with fewer passes over the units.

    C_k, N_k and the sum of seen delays are counted once. Each round makes one pass for the E-step
    weights (lambda update) and one that evaluates S = exp(-lambda_new e) once per unit: F = 1 - S
    gives the effective exposure (theta update; absolute error <= 1.2e-16 per unit, where expm1
    would give a relative one, immaterial in the sum) and S the survival in the next round's
    weights. Per-arm sums use obs.block_arm when the units come grouped by arm (see
    `group_by_arm`), which is much faster on CPU than masked sums. cycles = 0 returns the counts
    and the exposure at the warm-start rate.
    """
    num_arms = state.delay_rate.shape[0]
    dtype = obs.elapsed.dtype
    tiny = jnp.finfo(dtype).tiny
    elapsed, converted = obs.elapsed, obs.converted
    positive = elapsed > 0
    elapsed_pos = jnp.where(positive, elapsed, 0.0)

    def sums(x):
        return _unit_sums(obs, x, num_arms)

    def survival_at(rate):  # [U], exp(-rate e), 1 where e == 0 (also for rate = inf)
        return jnp.where(positive, jnp.exp(-_unit_values(obs, rate) * elapsed_pos), 1.0)

    conversions, clicks = arm_counts(obs, num_arms)
    delay_sum = sums(jnp.where(converted, obs.delay, 0.0))
    seen = conversions > 0

    def cycle(rate, cvr, survival):  # one round; survival [U] = S(e) at `rate`
        theta = _unit_values(obs, jnp.clip(cvr, 0.0, 1.0))
        den = 1.0 - theta + theta * survival  # E-step weights as in _pending_weights
        weights = jnp.where(den > 0, theta * survival / jnp.where(den > 0, den, 1.0), 1.0)
        pending = sums(jnp.where(converted, 0.0, weights * elapsed))
        rate = jnp.where(seen, conversions / jnp.maximum(delay_sum + pending, tiny), rate)
        survival = survival_at(rate)
        exposure = jnp.where(seen, sums(1.0 - survival), 0.0)
        cvr = jnp.where(seen, jnp.clip(conversions / jnp.maximum(exposure, tiny), 0.0, 1.0), 0.0)
        return rate, cvr, exposure, survival

    if cycles == 0:
        exposure = jnp.where(seen, sums(1.0 - survival_at(state.delay_rate)), 0.0)
        rate, cvr = state.delay_rate, state.cvr
    else:
        carry = cycle(state.delay_rate, state.cvr, survival_at(state.delay_rate))
        rate, cvr, exposure, _ = jax.lax.fori_loop(1, cycles, lambda _, c: cycle(*c[:2], c[3]), carry)
    return state.replace(delay_rate=rate, cvr=cvr, conversions=conversions, clicks=clicks, exposure=exposure)


def known_delay_fit(obs: Observation, state: ArmState) -> ArmState:
    """Corrected counts with the known rate state.delay_rate ("Known Dist" policies)."""
    conversions, clicks = arm_counts(obs, state.delay_rate.shape[0])
    exposure = effective_exposure(obs, state.delay_rate)
    cvr = jnp.clip(_safe_div(conversions, exposure), 0.0, 1.0)
    return state.replace(cvr=cvr, conversions=conversions, clicks=clicks, exposure=exposure)


def log_likelihood(obs: Observation, rate: jax.Array, cvr: jax.Array) -> jax.Array:
    """Censored-exponential log-likelihood per arm [K]:
    sum_seen [log theta + log lambda - lambda d] + sum_unseen log(1 - theta + theta exp(-lambda e))."""
    onehot = _onehot(obs, rate.shape[0])
    theta, lam = _per_unit(cvr, obs.arm), _per_unit(rate, obs.arm)
    seen = jnp.log(theta) + jnp.log(lam) - lam * obs.delay
    unseen = jnp.log1p(theta * jnp.expm1(-lam * obs.elapsed))
    return jnp.where(obs.converted, seen, unseen) @ onehot


def mle_em_step(obs: Observation, rate: jax.Array, cvr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One round of the textbook EM for the maximum-likelihood (theta, lambda); [K] -> ([K], [K]).

    With A = C + sum_unseen w_i the expected number of eventual converters:
    lambda = A / (sum_seen d_i + sum_unseen w_i (e_i + 1/lambda)), theta = A / N. Its lambda fixed
    point is the released one; its theta fixed point solves the theta score equation, which the
    released theta = C / N~ only approximates. The likelihood never decreases along it.
    """
    onehot = _onehot(obs, rate.shape[0])
    weights = _pending_weights(obs, rate, cvr)
    lam = _per_unit(rate, obs.arm)
    expected_delay = jnp.where(obs.converted, obs.delay, obs.elapsed + 1.0 / lam)
    converters = weights @ onehot
    _, clicks = arm_counts(obs, rate.shape[0])
    return converters / ((weights * expected_delay) @ onehot), converters / clicks


# ----------------------------------------------------------------------------- posterior sampling


def ts_params(conversions, exposure, prior=(1.0, 1.0)):
    """Thompson posterior Beta(a, b) = Beta(a0 + C, b0 + max(0, N~ - C)); [K] -> ([K], [K]).
    With the default Beta(1, 1) prior this is the released Beta(1 + C, max(1, 1 + N~ - C))."""
    return prior[0] + conversions, prior[1] + jnp.maximum(exposure - conversions, 0.0)


def _normals(u: jax.Array) -> jax.Array:
    """Box-Muller: uniforms u [2, m] in [0, 1) -> [2m] independent standard normals. Inside the
    sampler it beats jax.random.normal (float64 erf_inv) end to end on CPU by 1.3-1.5x."""
    radius = jnp.sqrt(-2.0 * jnp.log1p(-u[0]))  # 1 - u in (0, 1]
    angle = 2.0 * jnp.pi * u[1]
    return jnp.concatenate([radius * jnp.cos(angle), radius * jnp.sin(angle)])


def _uniforms(key, stream, shape, dtype) -> jax.Array:
    """Uniforms in [0, 1) of shape; each `stream` (int) of one key gives independent numbers."""
    return jax.random.uniform(jax.random.fold_in(key, stream), shape, dtype)


def _mt_proposals(u, d, c, log_d):
    """One Marsaglia-Tsang (2000) proposal per element for Gamma(d + 1/3), d + 1/3 >= 1; d, c,
    log_d [N], u [4, ceil(N / 2)] uniforms in [0, 1). Returns (log of the proposal d v, accepted,
    the acceptance uniforms [N]). The normals come from `_normals` of u[:2], the acceptance test is
    the exact one (squeeze, then the log test) on u[2:]."""
    n = d.shape[0]
    x = _normals(u[:2])[:n]
    accept_u = u[2:].reshape(-1)[:n]
    t = 1.0 + c * x
    valid = t > 0
    log_t = jnp.log(jnp.where(valid, t, 1.0))
    x2 = x * x
    v = t * t * t
    accept = valid & ((accept_u < 1.0 - 0.0331 * x2 * x2) | (jnp.log(accept_u) < 0.5 * x2 + d * (1.0 - v + 3.0 * log_t)))
    return log_d + 3.0 * log_t, accept, accept_u


def _redraw_block(n: int) -> int:
    """Elements per redraw block: a divisor of n in [16, 64] if there is one (no padding), else 32."""
    return next((b for b in range(32, 65) if n % b == 0), next((b for b in range(31, 15, -1) if n % b == 0), 32))


def log_gamma_sample(key, alpha, shape, dtype=None) -> jax.Array:
    """log of independent Gamma(alpha, 1) variates; alpha broadcasts to shape. Exact rejection
    sampling (Marsaglia & Tsang 2000; alpha < 1 through Gamma(alpha) = Gamma(alpha + 1) U^(1/alpha)).

    Vectorised: one proposal for every element; then rounds that redraw a few blocks of elements
    holding rejected ones (fresh proposals, taken only by the rejected elements) until every
    element is accepted. The first such round is drawn with the first proposals (rejections are
    rare: 5% of proposals at alpha = 1, 0.3% at 10, 0.003% at 1000), so the loop seldom runs.
    An element with alpha < 1, once accepted, takes its U from a later round's fresh uniforms."""
    dtype = dtype or jnp.result_type(alpha)
    alpha = jnp.asarray(alpha, dtype)
    n = math.prod(shape)
    block = _redraw_block(n)
    num_blocks = -(-n // block)
    size = num_blocks * block
    redraw = max(2, num_blocks // 32)  # blocks redrawn per round

    def params(a):  # shape parameters of the Marsaglia-Tsang proposal for Gamma(a) (a + 1 if a < 1)
        d = jnp.where(a < 1, a + 1.0, a) - 1.0 / 3.0
        return d, 1.0 / jnp.sqrt(9.0 * d), jnp.log(d)

    def flat(x, fill):  # broadcast to shape, flatten, pad to whole blocks: [size]
        return jnp.pad(jnp.broadcast_to(x, shape).reshape(n), (0, size - n), constant_values=fill)

    u = _uniforms(key, 0, (4, (size + redraw * block) // 2), dtype)
    log_g, accepted, _ = _mt_proposals(u[:, : size // 2], *(flat(x, 1.0) for x in params(alpha)))
    accepted = accepted | (jnp.arange(size) >= n)  # padding needs no variate
    alpha = flat(alpha, 1.0).reshape(num_blocks, block)
    as_blocks = lambda x: x.reshape(num_blocks, block)

    def redraw_round(carry, u):  # u [4, redraw * block / 2] fresh uniforms
        log_g, accepted, todo = carry  # [nb, block]; todo: accepted, alpha < 1, not boosted yet
        rows = jnp.nonzero(~(accepted & ~todo).all(axis=1), size=redraw, fill_value=num_blocks)[0]  # [redraw]
        at = jnp.minimum(rows, num_blocks - 1)
        alpha_at = alpha[at]
        proposal, ok, fresh_u = _mt_proposals(u, *(x.reshape(-1) for x in params(alpha_at)))
        was, boost = accepted[at], todo[at]
        take = ok.reshape(was.shape) & ~was  # only rejected elements take the fresh proposal
        # Gamma(alpha) = Gamma(alpha + 1) U^(1/alpha) with a uniform this element has not used: the
        # acceptance uniform of the fresh proposal it does not need (1 - U in (0, 1])
        boost_by = jnp.where(boost, jnp.log1p(-fresh_u.reshape(was.shape)) / alpha_at, 0.0)
        new = jnp.where(take, proposal.reshape(was.shape), log_g[at] + boost_by)
        return (log_g.at[rows].set(new, mode="drop"), accepted.at[rows].set(was | take, mode="drop"),
                todo.at[rows].set(take & (alpha_at < 1), mode="drop"))

    accepted = as_blocks(accepted)
    carry = redraw_round((as_blocks(log_g), accepted, accepted & (alpha < 1)), u[:, size // 2 :])

    def loop_round(carry):
        *carry, r = carry
        fresh = _uniforms(key, r, (4, redraw * block // 2), dtype)  # stream r >= 1: fresh numbers
        return (*redraw_round(carry, fresh), r + 1)

    log_g = jax.lax.while_loop(lambda carry: ~jnp.all(carry[1] & ~carry[2]), loop_round, (*carry, jnp.uint32(1)))[0]
    return log_g.reshape(size)[:n].reshape(shape)


def _beta_logit(key, a, b, shape, dtype):
    """log G_a - log G_b for independent gammas: the logit of a Beta(a, b) variate. [shape]."""
    shape = tuple(shape)
    alpha = jnp.stack([jnp.broadcast_to(jnp.asarray(a, dtype), shape), jnp.broadcast_to(jnp.asarray(b, dtype), shape)])
    log_g = log_gamma_sample(key, alpha, (2, *shape), dtype)
    return log_g[0] - log_g[1]


def beta_sample(key, a, b, shape, dtype=None) -> jax.Array:
    """Exact Beta(a, b) variates G_a / (G_a + G_b) of two `log_gamma_sample` gammas (in log space,
    so tiny shapes do not underflow); a, b broadcast to shape. A drop-in for jax.random.beta, whose
    per-element rejection loops are slow on CPU, with different draws for the same key."""
    dtype = dtype or jnp.result_type(a, b)
    return 1.0 / (1.0 + jnp.exp(-_beta_logit(key, a, b, shape, dtype)))


def ts_assign(key, a, b, num_requests: int) -> jax.Array:
    """One posterior draw per request; request j goes to argmax_k theta_k^(j). [K] -> [B] int32.
    theta = Beta(a, b) is increasing in its logit log G_a - log G_b, so the argmax is taken there."""
    logits = _beta_logit(key, a, b, (num_requests, a.shape[0]), jnp.result_type(a, b))
    return jnp.argmax(logits, axis=1).astype(jnp.int32)


def softmax_assign(key, probs, num_requests: int) -> jax.Array:
    """Independent categorical draws from probs [K] -> [B] int32."""
    return jax.random.categorical(key, jnp.log(probs), shape=(num_requests,)).astype(jnp.int32)


def decision_stats(key, a, b, num_draws: int) -> tuple[jax.Array, jax.Array]:
    """Monte-Carlo P(arm is best) [K] and value remaining [] from Beta(a, b) posteriors.

    Value remaining (Scott 2015) is the 95th percentile over draws of
    (max_k theta_k - theta_leader) / theta_leader, leader = argmax P(best).
    """
    draws = beta_sample(key, a, b, (num_draws, a.shape[0]), jnp.result_type(a, b))  # [M, K]
    prob_best = jax.nn.one_hot(jnp.argmax(draws, axis=1), a.shape[0], dtype=draws.dtype).mean(0)
    leader = draws[:, jnp.argmax(prob_best)]
    value_remaining = jnp.quantile(_safe_div(draws.max(axis=1) - leader, leader), 0.95)
    return prob_best, value_remaining


STOP_RULES = ("prob_best", "value_remaining")


def stop_decision(prob_best, value_remaining, rule: str, threshold: float):
    """Our stopping rule (not in the paper or its code): 'prob_best' stops once max_k P(best) >=
    threshold (e.g. 0.95); 'value_remaining' stops once the 95th percentile of the relative value
    remaining is <= threshold (e.g. 0.01). Works on numpy or jax arrays, broadcasting over leading axes."""
    if rule == "prob_best":
        return prob_best.max(-1) >= threshold
    if rule == "value_remaining":
        return value_remaining <= threshold
    raise ValueError(f"unknown stopping rule {rule!r}; use one of {STOP_RULES}.")


# ----------------------------------------------------------------------------- softmax baselines


def ducb_probs(conversions, clicks, exposure, current_t, epsilon: float = 0.1) -> jax.Array:
    """D-UCB (Vernade, Cappe, Perchet 2017) made probabilistic as released; [K] -> probs [K].

    ucb = C/N~ + sqrt(N/N~) sqrt((1 + eps) log t / (2 N~)); probs = softmax(ucb / sum_k pv_k) with
    pv_k = (ucb_k - C_k/N~_k) / N~_k. An arm with N~ = 0 has an infinite index: such arms share
    all the probability.
    """
    unexposed = exposure <= 0
    exp_safe = jnp.where(unexposed, 1.0, exposure)
    bonus = jnp.sqrt(clicks / exp_safe) * jnp.sqrt((1.0 + epsilon) * jnp.log(jnp.maximum(current_t, 1.0)) / (2.0 * exp_safe))
    ucb = conversions / exp_safe + bonus
    scaled = ucb / jnp.maximum(jnp.sum(jnp.where(unexposed, 0.0, bonus / exp_safe)), 1e-300)
    probs = jax.nn.softmax(jnp.where(unexposed, -jnp.inf, scaled))
    return jnp.where(jnp.any(unexposed), unexposed / jnp.sum(unexposed), probs)


@functools.cache
def gauss_legendre01(level: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes (ascending) and weights on [0, 1], [level] each."""
    nodes, weights = np.polynomial.legendre.leggauss(level)
    return (nodes + 1.0) / 2.0, weights / 2.0


def grid_posterior_quantiles(
    obs: Observation, num_arms: int, level: int = 50, quantiles=(0.1, 0.5, 0.9), prior=(1.0, 1.0, 1.0, 1.0)
) -> jax.Array:
    """Quantiles of the marginal posterior of theta on a level x level Gauss-Legendre grid; [Q, K].

    Exact likelihood (`log_likelihood`) with Beta(prior[0], prior[1]) on theta and
    Beta(prior[2], prior[3]) on lambda in (0, 1). As released, quantiles (sorted ascending) are
    read off the grid: quantile q_m sits at the first theta node after q_{m-1}'s whose cumulative
    mass exceeds q_m, or the node before it if that one's cumulative mass is closer to q_m.
    """
    nodes_np, weights_np = gauss_legendre01(level)
    dtype = obs.elapsed.dtype
    nodes, log_w = jnp.asarray(nodes_np, dtype), jnp.log(jnp.asarray(weights_np, dtype))
    onehot = _onehot(obs, num_arms)
    conversions = obs.converted.astype(dtype) @ onehot  # [K]
    delay_sum = obs.delay @ onehot  # [K], delays are 0 where not converted
    unseen = onehot * (~obs.converted)[:, None]  # [U, K]
    survival_minus_1 = jnp.expm1(-nodes[:, None] * obs.elapsed[None, :])  # [L, U], lambda on rows

    def unseen_loglik(theta):  # [] -> [L, K]
        return jnp.log1p(theta * survival_minus_1) @ unseen

    loglik = jax.lax.map(unseen_loglik, nodes)  # [J (theta), L (lambda), K]
    loglik += conversions * (jnp.log(nodes)[:, None, None] + jnp.log(nodes)[None, :, None])
    loglik -= nodes[None, :, None] * delay_sum
    log_prior = jax.scipy.stats.beta.logpdf(nodes, prior[0], prior[1])[:, None] + jax.scipy.stats.beta.logpdf(
        nodes, prior[2], prior[3]
    )[None, :]
    log_mass = loglik + (log_prior + log_w[:, None] + log_w[None, :])[..., None]
    marginal = jax.nn.softmax(jax.nn.logsumexp(log_mass, axis=1), axis=0)  # [J, K]
    cdf = jnp.cumsum(marginal, axis=0)  # [J, K]

    index = jnp.arange(level)[:, None]
    out, previous = [], jnp.full((num_arms,), -1)
    for q in sorted(quantiles):
        crossed = (cdf > q) & (index > previous)
        pos = jnp.where(crossed.any(0), jnp.argmax(crossed, axis=0), level - 1)  # [K]
        cdf_at = jnp.take_along_axis(cdf, pos[None], 0)[0]
        cdf_before = jnp.where(pos > 0, jnp.take_along_axis(cdf, jnp.maximum(pos - 1, 0)[None], 0)[0], 0.0)
        closest = jnp.where(jnp.abs(q - cdf_at) < jnp.abs(q - cdf_before), pos, jnp.maximum(pos - 1, 0))
        out.append(nodes[closest])
        previous = pos
    order = np.argsort(np.argsort(quantiles))
    return jnp.stack(out)[order]


def full_bayes_probs(quantiles: jax.Array, clicks: jax.Array) -> jax.Array:
    """Released softmax of the posterior median: quantiles [3, K] = (q10, q50, q90); probs [K] =
    softmax(q50 / sum_k pv_k), pv_k = (q90_k - q10_k) / N_k."""
    spread = (quantiles[2] - quantiles[0]) / jnp.maximum(clicks, 1.0)
    return jax.nn.softmax(quantiles[1] / jnp.maximum(spread.sum(), 1e-300))


# ----------------------------------------------------------------------------- policies


class Policy(NamedTuple):
    """A pure allocation policy. `known_delay` policies need init_state(delay_rate=true rate)."""

    name: str
    update: Callable[[ArmState, Observation], ArmState]  # state, data at an update -> state
    assign: Callable[[ArmState, jax.Array, int], jax.Array]  # state, key, B -> arms [B] int32
    known_delay: bool = False
    em_cycles: int = 0  # > 0: update is em_fit(obs, state, em_cycles), the stopping rule's estimator


POLICY_LABELS = {
    "random": "Random",
    "naive_ts": "Naive TS",
    "dts": "D-TS",
    "dts_known": "Known Dist D-TS",
    "ducb": "D-UCB",
    "ducb_known": "Known Dist D-UCB",
    "full_bayes": "Full Bayesian",
}


def _ts_assign_state(state: ArmState, key, num_requests: int):
    return ts_assign(key, *ts_params(state.conversions, state.exposure), num_requests)


def _softmax_assign_state(state: ArmState, key, num_requests: int):
    return softmax_assign(key, state.probs, num_requests)


@functools.cache
def make_policy(name: str, *, em_cycles: int = EM_CYCLES, ucb_epsilon: float = 0.1, grid_level: int = 50) -> Policy:
    """The policies of the paper by name (see POLICY_LABELS). Cached, so equal arguments give the
    same object (it is a static argument of the jitted simulator)."""

    def counts_only(state, obs):
        conversions, clicks = arm_counts(obs, state.cvr.shape[0])
        return state.replace(conversions=conversions, clicks=clicks, cvr=_safe_div(conversions, clicks))

    def naive(state, obs):
        state = counts_only(state, obs)
        return state.replace(exposure=state.clicks)

    def with_ducb(fit):
        def update(state, obs):
            state = fit(state, obs)
            probs = ducb_probs(state.conversions, state.clicks, state.exposure, obs.current_t, ucb_epsilon)
            return state.replace(probs=probs)

        return update

    def full_bayes(state, obs):
        state = counts_only(state, obs)
        q = grid_posterior_quantiles(obs, state.cvr.shape[0], grid_level)
        return state.replace(cvr=q[1], probs=full_bayes_probs(q, state.clicks))

    def em(state, obs):
        return em_fit(obs, state, em_cycles)

    def known(state, obs):
        return known_delay_fit(obs, state)

    table = {
        "random": Policy(name, counts_only, _softmax_assign_state),
        "naive_ts": Policy(name, naive, _ts_assign_state),
        "dts": Policy(name, em, _ts_assign_state, em_cycles=em_cycles),
        "dts_known": Policy(name, known, _ts_assign_state, known_delay=True),
        "ducb": Policy(name, with_ducb(em), _softmax_assign_state),
        "ducb_known": Policy(name, with_ducb(known), _softmax_assign_state, known_delay=True),
        "full_bayes": Policy(name, full_bayes, _softmax_assign_state),
    }
    if name not in table:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(POLICY_LABELS)}.")
    return table[name]
