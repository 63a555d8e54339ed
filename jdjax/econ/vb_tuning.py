"""Tuning virtual bids (spec P2): golden-section search for one VB, SPSA for several, the business
objective they maximise, and the revenue / organic-click frontier traced by sweeping VB_org.

The outer problem is max_VB J(VB), J a business KPI measured on the allocation that the virtual
bids induce (online buckets in the paper; here offline replay of `allocation.run_auctions` on a
fixed set of pages, outcomes under the ground-truth CTR; `replay_evaluator`). VBs act as Lagrange
multipliers of "max revenue s.t. engagement >= target" [R, standard reading], so J is a
revenue with an organic-click guardrail (`penalized_objective`). With a fixed set of pages J is
deterministic but piecewise constant in the VBs (the argmax is discrete).

The optimisers are plain Python over a black-box J (each evaluation is one jitted batch of
auctions) and maximise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...


class GoldenResult(NamedTuple):
    x: float  # best evaluated point
    value: float  # J(x)
    history: list  # [(x, J(x))] in evaluation order
    bracket: tuple  # final (lo, hi)


def golden_section(f: Callable[[float], float], lo: float, hi: float, num_evals: int = 20) -> GoldenResult:
    """Maximises a (unimodal) scalar f on [lo, hi] by golden-section search with ratio 0.618:
    two interior points, then one new evaluation per step, the bracket shrinking by 0.618 each
    time. Uses exactly `num_evals` (>= 2) evaluations; returns the best evaluated point, its
    value, the history and the final bracket."""
    if not hi > lo:
        raise ValueError(f"golden_section: need lo < hi, got [{lo}, {hi}]")
    if num_evals < 2:
        raise ValueError(f"golden_section: num_evals={num_evals} must be >= 2")
    history = []

    def ev(x):
        v = float(f(x))
        history.append((float(x), v))
        return v

    a, b = float(lo), float(hi)
    c, d = b - INV_PHI * (b - a), a + INV_PHI * (b - a)
    fc, fd = ev(c), ev(d)
    for _ in range(num_evals - 2):
        if fc >= fd:  # the maximum lies in [a, d]
            b, d, fd = d, c, fc
            c = b - INV_PHI * (b - a)
            fc = ev(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + INV_PHI * (b - a)
            fd = ev(d)
    x, v = max(history, key=lambda h: h[1])
    return GoldenResult(x, v, history, (a, b))


class SPSAResult(NamedTuple):
    x: np.ndarray  # [m] final iterate
    trajectory: np.ndarray  # [T + 1, m] iterates v_0 .. v_T
    evaluations: np.ndarray  # [T, 2] J(v + c_k Delta), J(v - c_k Delta)
    gains: np.ndarray  # [T, 2] (a_k, c_k)


def spsa(f: Callable[[np.ndarray], float], x0: Sequence[float], lower=None, upper=None, num_iters: int = 100,
         a: float = 0.1, c: float = 0.1, big_a: float | None = None, alpha: float = 0.602, gamma: float = 0.101,
         seed: int = 0) -> SPSAResult:
    """Maximises f over a box by simultaneous-perturbation stochastic approximation (Spall 1998):

        Delta_k ~ Rademacher {+-1}^m,   g_k = (f(v + c_k Delta) - f(v - c_k Delta)) / (2 c_k) * Delta^-1
        v_{k+1} = Proj_box(v_k + a_k g_k),   a_k = a / (k + 1 + A)^alpha,   c_k = c / (k + 1)^gamma

    with Spall's exponents 0.602 / 0.101 and A = 10 % of num_iters by default (the paper's gains
    are unknown [R]: a, c and A are arguments). Two evaluations per iteration; the perturbed points
    are not projected (keep c small against the box, or make f accept them). Seeded."""
    rng = np.random.default_rng(seed)
    v = np.asarray(x0, np.float64).copy()
    lower = np.full_like(v, -np.inf) if lower is None else np.broadcast_to(np.asarray(lower, np.float64), v.shape)
    upper = np.full_like(v, np.inf) if upper is None else np.broadcast_to(np.asarray(upper, np.float64), v.shape)
    big_a = 0.1 * num_iters if big_a is None else big_a
    v = np.clip(v, lower, upper)
    traj, evals, gains = [v.copy()], [], []
    for k in range(num_iters):
        a_k, c_k = a / (k + 1 + big_a) ** alpha, c / (k + 1) ** gamma
        delta = rng.choice([-1.0, 1.0], size=v.shape)
        f_plus, f_minus = float(f(v + c_k * delta)), float(f(v - c_k * delta))
        g = (f_plus - f_minus) / (2.0 * c_k) / delta  # Delta^-1 = Delta for +-1 entries
        v = np.clip(v + a_k * g, lower, upper)
        traj.append(v.copy())
        evals.append((f_plus, f_minus))
        gains.append((a_k, c_k))
    return SPSAResult(v, np.stack(traj), np.asarray(evals), np.asarray(gains))


def penalized_objective(revenue, organic_clicks, floor: float, penalty: float):
    """[R] J = revenue - penalty * max(0, floor - organic_clicks): revenue with an organic-click
    guardrail as a hinge penalty (a large penalty makes the floor nearly hard). Works on floats and
    arrays."""
    return revenue - penalty * np.maximum(0.0, floor - organic_clicks)


def business_objective(evaluate: Callable[..., dict], floor: float, penalty: float) -> Callable[..., float]:
    """J(vb) from evaluate(vb) -> dict with 'revenue' and 'organic_clicks' (means per request)."""

    def objective(*vb) -> float:
        r = evaluate(*vb)
        return float(penalized_objective(r["revenue"], r["organic_clicks"], floor, penalty))

    return objective


def replay_evaluator(pages, p, ctr_fn=None, generator=None, reserve: float = 0.0, key=None,
                    chunk: int | None = None) -> Callable[..., dict]:
    """Offline replay: evaluate(vb_org, vb_ad=0.0) runs the VCG auction (`allocation.run_auctions`)
    on the fixed pages with those virtual bids and returns `allocation.summarize` (mean revenue,
    ad clicks, organic clicks under the ground truth, clip rates). VBs are traced, so one
    compilation serves every evaluation; chunk as in `allocation.run_auctions`. For SPSA over (vb_ad, vb_org): `lambda v: J(v[1], v[0])`."""
    from jdjax.econ import allocation as al

    generator = al.Exhaustive() if generator is None else generator

    def evaluate(vb_org: float, vb_ad: float = 0.0) -> dict:
        _, summary = al.run_auctions(pages, p, ctr_fn, generator, "vcg", float(vb_ad), float(vb_org), reserve, key,
                                       chunk)
        return summary

    return evaluate


def frontier(evaluate: Callable[[float], dict], vb_org_grid: Sequence[float],
             keys: Sequence[str] = ("revenue", "ad_clicks", "organic_clicks")) -> dict:
    """Sweeps VB_org: {'vb_org': [G], key: [G] for each key} from evaluate(vb_org) -> dict, the
    points of the revenue / ad-click / organic-click trade-off (organic clicks rise weakly with
    VB_org under a correct click model; revenue is the VCG revenue, not the objective W, so it
    need not fall monotonically)."""
    rows = [evaluate(float(v)) for v in vb_org_grid]
    out = {"vb_org": np.asarray(vb_org_grid, np.float64)}
    for k in keys:
        out[k] = np.asarray([r[k] for r in rows], np.float64)
    return out
