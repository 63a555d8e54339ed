"""Blending ads with organic items by virtual bids: candidates, welfare, selection, VCG (spec P2).

Carrion et al., "Blending Advertising with Organic Content in E-Commerce (via Virtual Bids)",
arXiv 2105.13556 / AAAI-23. The pipeline per request is

    sequence generation -> sequence evaluation -> sequence selection -> VCG charging

on the synthetic page of `jdjax.econ.page_env`: S slots, K of them ad slots, N candidate ads.
An allocation is `assignment` int [K] (ad index in [0, N) or -1 = organic, per ad slot, no ad
twice); `page_env.layout` turns it into the displayed list.

Click models. A click model is a plain callable `ctr_fn(page, lays) -> [A, S]`: the predicted
click probabilities of A candidate layouts of one page (`lays` is a `page_env.Layout` whose
fields carry a leading [A] axis). `true_ctr_fn(p)` is the ground truth; a learned context-aware
model with the same signature plugs in unchanged. Under `jax.jit` it is a static argument (or
closed over), so reuse one object to avoid recompiling (`true_ctr_fn` is cached per `p`).

Welfare (spec formula W(a)), with virtual bids VB_ad, VB_org (the platform's value per ad click
and per organic click):

    W(a) = sum_{ad slots with ad i} (b_i + VB_ad) pCTR_i(a) + sum_{organic slots j} VB_org pCTR_j(a)

and a* = argmax_{a in candidates} W(a).

VCG with externalities, for each winning ad i (spec):

    p_i^click = [max_{a in A_-i} W(a) - (W(a*) - b_i pCTR_i(a*))] / pCTR_i(a*)

A_-i = the candidates the generator produces with ad i removed from the pool. For generators
whose candidate list does not depend on the pool (`fixed`, e.g. `Exhaustive`) that is just a mask
over the already scored list, so VCG costs no extra click-model evaluation; the others
(`Greedy`, `RandomSampling`) are rerun once per ad slot (K reruns, vectorised; the spec's
(1 + |A(a*)|) evaluations, padded to static shape). "Others' welfare" W(a*) - b_i pCTR_i(a*)
keeps the platform's virtual value VB_ad pCTR_i of i's own clicks, as the spec says, so VB_ad > 0
lowers prices and can make them negative even without externalities.

Properties (tested): with the exhaustive generator (bid-independent, A_-i a subset of the
candidates, a* the exact argmax: maximal-in-range) p_i <= b_i always, and the unclipped VCG
prices (`Payments.raw`) are truthful: an advertiser's utility value * clicks - payment is
maximised by bidding its value, whatever the others bid (a bid-grid search over 0.02x-10x the
value finds no profitable misreport beyond float rounding). p_i >= 0 is not automatic: with
complementarity (ad i raises others' clicks) or VB_ad > 0 the bracket can be negative. Prices
are clipped to [reserve, b_i] and the clip flags are returned so the clip rate can be reported;
the clipped prices are NOT exactly truthful: the same search finds profitable misreports, only
for advertisers whose truthful price was clipped, in 8 of 103 such cases (8 %) on 256
competition pages with VB_ad 0.1, VB_org 0.5, reserve 0.05 (3 of 36 with complementarity), and
in none of the 1433 unclipped ones. Generators that use the bid (top-N by bid * q, greedy by
pCTR * bid, sampling by bid * q) break truthfulness, and their reruns need not be subsets of
the candidates, so p_i > b_i (a high clip) can happen there.

Everything works on one page and is `vmap`ped over requests (`run_auctions`); shapes are static.
Choices that the spec leaves open are marked [R] and are arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdjax.econ import page_env
from jdjax.econ.page_env import EnvParams, Layout, Page

CtrFn = Callable[[Page, Layout], jax.Array]  # (page, lays with leading [A]) -> [A, S]
MECHANISMS = ("vcg", "gsp", "position")


# ---------------------------------------------------------------------------------------------
# Click models and layouts


@functools.lru_cache(maxsize=None)
def true_ctr_fn(p: EnvParams) -> CtrFn:
    """The ground-truth click model as a `ctr_fn` (one cached object per `p`, so jit reuses it)."""

    def ctr_fn(page: Page, lays: Layout) -> jax.Array:
        return jax.vmap(lambda lay: page_env.true_ctr(page.user, lay, p))(lays)  # [A, S]

    return ctr_fn


def candidate_layouts(page: Page, candidates: jax.Array, p: EnvParams) -> Layout:
    """Layouts of candidates [A, K]: every Layout field gets a leading [A] axis."""
    return jax.vmap(lambda a: page_env.layout(page, a, p))(jnp.asarray(candidates, jnp.int32))


def _best_ad_slot(p: EnvParams) -> int:
    """Index k (into p.ad_slots) of the best ad slot: the lowest slot index (position decay < 1)."""
    return int(np.argmin(p.ad_slots))


def ad_quality(page: Page, ctr_fn: CtrFn, p: EnvParams) -> jax.Array:
    """[N] independent (no-ad-context) quality q_i of every ad: the predicted CTR of ad i shown
    alone in the best ad slot (other ad slots organic), divided by position_decay**slot, so that
    q_i = the position-free relevance under the separable ground truth. [R] The reference layout
    is a choice; it is bid-free (N click-model evaluations)."""
    k, s = _best_ad_slot(p), p.ad_slots[_best_ad_slot(p)]
    cands = jnp.full((p.num_ads, len(p.ad_slots)), -1, jnp.int32).at[:, k].set(jnp.arange(p.num_ads))
    ctr = ctr_fn(page, candidate_layouts(page, cands, p))  # [N, S]
    return ctr[:, s] / (p.position_decay**s)


# ---------------------------------------------------------------------------------------------
# Candidate generation


@functools.lru_cache(maxsize=None)
def _enumerate(num_ads: int, num_ad_slots: int) -> np.ndarray:
    rows = []
    for shown in range(min(num_ads, num_ad_slots) + 1):  # number of ad slots that show an ad
        for slots in itertools.combinations(range(num_ad_slots), shown):
            for ads in itertools.permutations(range(num_ads), shown):
                row = [-1] * num_ad_slots
                for s, a in zip(slots, ads):
                    row[s] = a
                rows.append(row)
    out = np.asarray(rows, np.int32).reshape(-1, num_ad_slots)
    out.setflags(write=False)
    return out


def num_assignments(num_ads: int, num_ad_slots: int) -> int:
    """sum_j C(K, j) * N! / (N - j)!: 229 for N = 6, K = 3."""
    return len(_enumerate(num_ads, num_ad_slots))


def top_n_mask(score: jax.Array, top_n: int, pool: jax.Array | None = None) -> jax.Array:
    """[N] bool: the `top_n` ads of the pool by `score` [N] (ties broken by index)."""
    pool = jnp.ones(score.shape, bool) if pool is None else pool
    s = jnp.where(pool, score, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-s, stable=True), stable=True)  # 0 = best
    return pool & (rank < top_n)


def assignments_valid(candidates: jax.Array, ad_mask: jax.Array) -> jax.Array:
    """[A] bool: every ad that candidate a shows is allowed by ad_mask [N]."""
    ok = (candidates < 0) | ad_mask[jnp.maximum(candidates, 0)]
    return jnp.all(ok, axis=-1)


def contains(candidates: jax.Array, ad: jax.Array) -> jax.Array:
    """[A] bool: candidate a shows ad `ad` (always False for ad = -1)."""
    return (ad >= 0) & jnp.any(candidates == ad, axis=-1)


def exhaustive_assignments(num_ads: int, num_ad_slots: int, top_n: int | None = None,
                           score: jax.Array | None = None, pool: jax.Array | None = None):
    """Every assignment: each of the K ad slots organic or a distinct ad, all-organic first.

    Returns (candidates [A, K] int32, a constant NumPy array, A = sum_j C(K, j) N!/(N-j)!;
    valid [A] bool). With `top_n` < num_ads only the top-N ads of the pool by `score` [N]
    (the spec: bid * pCTR-independent quality) may appear; this is a mask over the fixed list so
    that shapes stay static. `pool` [N] bool (default all) removes ads (VCG's reruns, reserve).

    The default (all ads, top_n=None) is bid-independent, which truthfulness of the unclipped
    VCG prices needs (the maximal-in-range argument); top-N by a bid-weighted score is not.
    """
    cands = _enumerate(num_ads, num_ad_slots)
    if pool is None and (top_n is None or top_n >= num_ads):
        return cands, np.ones(len(cands), bool)
    mask = jnp.ones(num_ads, bool) if pool is None else jnp.asarray(pool, bool)
    if top_n is not None and top_n < num_ads:
        if score is None:
            raise ValueError(f"exhaustive_assignments(top_n={top_n}) needs the ad score [N] that ranks ads")
        mask = top_n_mask(score, top_n, mask)
    return cands, assignments_valid(jnp.asarray(cands), mask)


# Generators share one signature, so that the allocation and VCG's "rerun without ad i" treat
# them alike:  gen(page, pool [N] bool, quality [N], ctr_fn, p, key) -> (candidates [A, K], valid [A])
# Attributes: fixed (candidates do not depend on pool or page: reruns are masks over the scored
# list), needs_quality (uses `ad_quality`), bid_dependent (breaks truthfulness).


@dataclasses.dataclass(frozen=True)
class Exhaustive:
    """Every assignment of the pool's ads (optionally only the top_n by bid * quality [R]).
    Bid-independent, hence truthful with unclipped VCG prices, unless top_n < N (clipping the
    prices to [reserve, bid] breaks exact truthfulness; see the module docstring)."""

    top_n: int | None = None
    fixed = True

    @property
    def needs_quality(self) -> bool:
        return self.top_n is not None

    @property
    def bid_dependent(self) -> bool:
        return self.top_n is not None

    def __call__(self, page, pool, quality, ctr_fn, p, key):
        k = len(p.ad_slots)
        score = None if self.top_n is None else page.bid * quality
        cands, valid = exhaustive_assignments(p.num_ads, k, self.top_n, score, pool)
        return jnp.asarray(cands), jnp.asarray(valid)


def _greedy_score(rule: str, pctr: jax.Array, bid: jax.Array, h) -> jax.Array:
    if rule == "linear":  # lambda * pCTR + pCTR * bid
        return h * pctr + pctr * bid
    if rule == "power":  # pCTR ** t * bid
        return pctr**h * bid
    raise ValueError(f"greedy rule {rule!r}: expected 'linear' or 'power'")


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Greedy slot-by-slot sequences, one per hyper-parameter in `params` (spec; details [R]).

    Ad slots are filled in `p.ad_slots` order. At ad slot k, with the earlier choices fixed and
    the later ad slots organic, every remaining pool ad and the organic item are placed there and
    scored by the click model: rule 'linear' = lambda * pCTR + pCTR * bid (an organic item has bid 0,
    so lambda acts as its virtual bid), 'power' = pCTR**t * bid (organic scores 0, so ads fill
    every slot). The best option is kept. [R] With `ad_load_variants` every greedy sequence also
    enters with each subset of its ad slots turned organic (H * 2^K candidates), otherwise the
    H sequences plus the all-organic one. The exhaustive scorer then evaluates the list.
    Uses the bid: breaks truthfulness, and reruns without ad i need not be subsets (p_i > b_i
    possible, clipped)."""

    rule: str = "linear"
    params: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    ad_load_variants: bool = True
    fixed = False
    needs_quality = False
    bid_dependent = True

    def __call__(self, page, pool, quality, ctr_fn, p, key):
        n, k_slots = p.num_ads, len(p.ad_slots)
        bid = jnp.concatenate([page.bid, jnp.zeros((1,))])  # [N + 1], last = organic

        def sequence(h):
            assign = jnp.full((k_slots,), -1, jnp.int32)
            used = ~pool
            for k in range(k_slots):  # K is small and static
                opts = jnp.tile(assign[None], (n + 1, 1)).at[:n, k].set(jnp.arange(n, dtype=jnp.int32))
                pctr = ctr_fn(page, candidate_layouts(page, opts, p))[:, p.ad_slots[k]]  # [N + 1]
                score = _greedy_score(self.rule, pctr, bid, h)
                avail = jnp.concatenate([~used, jnp.ones((1,), bool)])
                choice = jnp.argmax(jnp.where(avail, score, -jnp.inf))
                chosen = jnp.where(choice < n, choice, -1).astype(jnp.int32)
                assign = assign.at[k].set(chosen)
                used = used | (jnp.arange(n) == chosen)
            return assign

        seqs = jax.vmap(sequence)(jnp.asarray(self.params, jnp.float32))  # [H, K]
        if self.ad_load_variants:
            keep = np.asarray(list(itertools.product([False, True], repeat=k_slots)))  # [2^K, K]
            cands = jnp.where(keep[None], seqs[:, None], -1).reshape(-1, k_slots)
        else:
            cands = jnp.concatenate([jnp.full((1, k_slots), -1, jnp.int32), seqs])
        return cands.astype(jnp.int32), jnp.ones(cands.shape[0], bool)


@dataclasses.dataclass(frozen=True)
class RandomSampling:
    """`num_samples` random sequences, slot by slot (spec; details [R]): each ad slot is organic
    with probability `organic_prob`, else shows a pool ad not yet shown, drawn with probability
    proportional to its quality score (bid * quality if `bid_weighted`, else quality). Implemented
    with the Gumbel-top-k trick (sequential sampling without replacement), so a rerun with the
    same key and ad i removed keeps every sample that did not use i (common random numbers).
    The all-organic candidate is always added. bid_weighted=True breaks truthfulness."""

    num_samples: int = 32
    organic_prob: float = 0.25
    bid_weighted: bool = True
    fixed = False
    needs_quality = True

    @property
    def bid_dependent(self) -> bool:
        return self.bid_weighted

    def __call__(self, page, pool, quality, ctr_fn, p, key):
        n, k_slots, r = p.num_ads, len(p.ad_slots), self.num_samples
        w = quality * page.bid if self.bid_weighted else quality
        logw = jnp.where(pool, jnp.log(jnp.maximum(w, 1e-30)), -jnp.inf)
        k_gumbel, k_show = jax.random.split(key)
        order = jnp.argsort(-(logw + jax.random.gumbel(k_gumbel, (r, n))), axis=-1)  # [R, N]
        show = jax.random.uniform(k_show, (r, k_slots)) >= self.organic_prob  # [R, K]
        rank = jnp.cumsum(show, axis=-1) - 1  # which draw the slot uses
        ad = jnp.take_along_axis(order, jnp.clip(rank, 0, n - 1), axis=-1)
        cands = jnp.where(show & (rank < jnp.sum(pool)), ad, -1).astype(jnp.int32)
        cands = jnp.concatenate([jnp.full((1, k_slots), -1, jnp.int32), cands])
        return cands, jnp.ones(r + 1, bool)


# ---------------------------------------------------------------------------------------------
# Evaluation and selection


def welfare(ctr: jax.Array, lays: Layout, vb_ad, vb_org) -> jax.Array:
    """W [A] of candidate layouts: sum over ad slots of (bid + vb_ad) * ctr plus sum over organic
    slots (every slot not showing an ad) of vb_org * ctr. ctr [A, S], lays with leading [A]."""
    coef = jnp.where(lays.is_ad, lays.bid + vb_ad, vb_org)  # [A, S]
    return jnp.sum(coef * ctr, axis=-1)


def score_candidates(page: Page, candidates, ctr_fn: CtrFn, vb_ad, vb_org, p: EnvParams):
    """(W [A], ctr [A, S]) of candidates [A, K] under the click model."""
    lays = candidate_layouts(page, candidates, p)
    ctr = ctr_fn(page, lays)  # [A, S]
    return welfare(ctr, lays, vb_ad, vb_org), ctr


class Allocation(NamedTuple):
    index: jax.Array  # [] index of a* in the candidate list
    assignment: jax.Array  # [K] int
    welfare: jax.Array  # [] W(a*) (predicted)
    ctr: jax.Array  # [S] predicted CTR of a*
    welfares: jax.Array  # [A] W of every candidate (invalid ones included, unmasked)


def allocate(page: Page, candidates, valid, ctr_fn: CtrFn, vb_ad, vb_org, p: EnvParams) -> Allocation:
    """Scores every candidate [A, K] with the click model and picks a* = argmax W over the valid
    ones (valid [A] bool; ties to the lowest index)."""
    candidates = jnp.asarray(candidates, jnp.int32)
    w, ctr = score_candidates(page, candidates, ctr_fn, vb_ad, vb_org, p)
    idx = jnp.argmax(jnp.where(valid, w, -jnp.inf))
    return Allocation(idx, candidates[idx], w[idx], ctr[idx], w)


# ---------------------------------------------------------------------------------------------
# VCG


class Payments(NamedTuple):
    price: jax.Array  # [K] per-click price, clipped to [reserve, bid]; 0 on organic ad slots
    raw: jax.Array  # [K] unclipped VCG price (+-inf for a flagged ad with predicted CTR 0); 0 on organic ad slots
    clip_low: jax.Array  # [K] bool: raw < reserve (beyond float tolerance), CTR-0 ads with a negative transfer included
    clip_high: jax.Array  # [K] bool: raw > bid, i.e. max over A_-i above W(a*)
    counterfactual: jax.Array  # [K] max_{a in A_-i} W(a) for the ad in each ad slot


def counterfactual_welfare(page: Page, alloc: Allocation, generator, ctr_fn: CtrFn, vb_ad, vb_org,
                           p: EnvParams, pool=None, quality=None, key=None) -> jax.Array:
    """[K] max_{a in A_-i} W(a) for the ad i of each ad slot of a* (meaningless on organic slots).

    A_-i = what `generator` produces from the pool without ad i, restricted to valid candidates
    that do not show i. For a `fixed` generator (the exhaustive list) the rerun only changes the
    validity mask, and `alloc.welfares` is reused; otherwise the rerun is scored (K reruns,
    vmapped). Use the same pool, quality and key as for the allocation."""
    n = p.num_ads
    pool = jnp.ones(n, bool) if pool is None else pool
    quality = jnp.ones(n) if quality is None else quality
    key = jax.random.key(0) if key is None else key

    def one(ad):
        pool_i = pool & (jnp.arange(n) != ad)
        cands, valid = generator(page, pool_i, quality, ctr_fn, p, key)
        valid = valid & ~contains(cands, ad)
        if generator.fixed:
            if cands.shape[0] != alloc.welfares.shape[0]:
                raise ValueError("a fixed generator must return the candidate list that was scored")
            w = alloc.welfares
        else:
            w, _ = score_candidates(page, cands, ctr_fn, vb_ad, vb_org, p)
        return jnp.max(jnp.where(valid, w, -jnp.inf))

    return jax.vmap(one)(alloc.assignment)


def vcg_payments(page: Page, alloc: Allocation, counterfactual: jax.Array, p: EnvParams,
                 reserve=0.0, tol: float = 1e-6) -> Payments:
    """Per-click VCG prices of the winning ads, by ad slot (spec formula):

        p_i = [max_{A_-i} W - (W(a*) - b_i pCTR_i(a*))] / pCTR_i(a*),  clipped to [reserve, b_i].

    With a maximal-in-range candidate set (`Exhaustive()`) `raw` is truthful; the clipped `price`
    is not exactly (see the module docstring).

    counterfactual [K] from `counterfactual_welfare`. The flags are decided in welfare units
    with an absolute tolerance tol * (1 + |W(a*)|): clip_high = max_{A_-i} W > W(a*) (impossible
    for maximal-in-range sets), clip_low = the bracket < reserve * pCTR_i. A winning ad with
    predicted CTR 0 is charged the reserve per click (it gets no clicks, so it pays nothing); its
    VCG transfer is the bracket itself, so a negative one (the ad is shown because it raises the
    others' clicks) is flagged clip_low with raw = -inf, a positive one clip_high with raw = +inf,
    and only a zero one is exact (raw = reserve). Fully vectorised over the K ad slots."""
    slots = np.asarray(p.ad_slots)
    ad = alloc.assignment
    is_ad = ad >= 0
    b = jnp.where(is_ad, page.bid[jnp.maximum(ad, 0)], 0.0)  # [K]
    c = alloc.ctr[slots]  # [K]
    others = alloc.welfare - b * c  # W(a*) minus i's own bid value
    bracket = counterfactual - others
    pos = c > 0
    atol = tol * (1.0 + jnp.abs(alloc.welfare))
    clip_high = is_ad & (counterfactual > alloc.welfare + atol)
    clip_low = is_ad & (bracket < reserve * c - atol)
    no_clicks = jnp.where(clip_low, -jnp.inf, jnp.where(clip_high, jnp.inf, reserve))  # the limit c -> 0+
    raw = jnp.where(pos, bracket / jnp.where(pos, c, 1.0), no_clicks)
    raw = jnp.where(is_ad, raw, 0.0)
    price = jnp.where(is_ad, jnp.clip(raw, reserve, b), 0.0)
    return Payments(price, raw, clip_low, clip_high, counterfactual)


class AuctionResult(NamedTuple):
    allocation: Allocation
    payments: Payments
    num_candidates: jax.Array  # [] valid candidates scored


def auction(page: Page, generator, ctr_fn: CtrFn, p: EnvParams, vb_ad=0.0, vb_org=0.0, reserve=0.0,
            key=None) -> AuctionResult:
    """Generation -> evaluation -> selection -> VCG for one page. Ads bidding below `reserve`
    leave the pool. `key` seeds random generators (the reruns reuse it). jit-able; vmap it."""
    n = p.num_ads
    key = jax.random.key(0) if key is None else key
    pool = page.bid >= reserve
    quality = ad_quality(page, ctr_fn, p) if generator.needs_quality else jnp.ones(n)
    cands, valid = generator(page, pool, quality, ctr_fn, p, key)
    alloc = allocate(page, cands, valid, ctr_fn, vb_ad, vb_org, p)
    cf = counterfactual_welfare(page, alloc, generator, ctr_fn, vb_ad, vb_org, p, pool, quality, key)
    return AuctionResult(alloc, vcg_payments(page, alloc, cf, p, reserve), jnp.sum(valid))


# ---------------------------------------------------------------------------------------------
# Baselines without externalities


def _rank_ads(page: Page, quality: jax.Array, p: EnvParams, reserve):
    """Ads ranked by bid * quality (eligible: bid >= reserve); (order [N], v sorted [N] with 0
    for ineligible, eligible sorted [N], ad-slot order [K] best (lowest slot index) first)."""
    eligible = page.bid >= reserve
    v = jnp.where(eligible, page.bid * quality, -jnp.inf)
    order = jnp.argsort(-v, stable=True)
    v_sorted = jnp.where(eligible[order], v[order], 0.0)
    return order, v_sorted, eligible[order], np.argsort(p.ad_slots, kind="stable")


def gsp(page: Page, quality: jax.Array, p: EnvParams, reserve=0.0):
    """GSP with an independent (no-context) CTR q_i (quality [N], e.g. `ad_quality`).

    Ads are ranked by bid * q; the r-th ranked ad takes the r-th best ad slot, best = lowest slot
    index (position_decay < 1); every ad slot shows an ad while eligible ads (bid >= reserve)
    remain (GSP does not blend). Price per click of the r-th ad = (bid * q of the (r+1)-th ad) / own
    q, 0 if there is none, clipped to [reserve, bid]. Returns (assignment [K], price [K])."""
    k_slots = len(p.ad_slots)
    order, v_sorted, elig, slot_order = _rank_ads(page, quality, p, reserve)
    nxt = jnp.concatenate([v_sorted[1:], jnp.zeros((1,))])[:k_slots]  # [K]
    ads = order[:k_slots]
    q = quality[ads]
    price = jnp.clip(nxt / jnp.maximum(q, 1e-30), reserve, page.bid[ads])
    assignment = jnp.full((k_slots,), -1, jnp.int32).at[slot_order].set(jnp.where(elig[:k_slots], ads, -1))
    price = jnp.zeros((k_slots,)).at[slot_order].set(jnp.where(elig[:k_slots], price, 0.0))
    return assignment, price


def position_auction(page: Page, quality: jax.Array, p: EnvParams, reserve=0.0):
    """The separable position auction's VCG: CTR = q_i * alpha_r with alpha_r = position_decay ** slot
    of the r-th best ad slot. Allocation as `gsp`; the r-th ad pays per click

        (1 / (q_r alpha_r)) * sum_{j >= r} (alpha_j - alpha_{j+1}) * v_{j+1},   alpha_K = 0,

    v_j = bid * q of the j-th ranked eligible ad (0 if none). [R] reserve enters as a clip to
    [reserve, bid]. Returns (assignment [K], price [K])."""
    k_slots = len(p.ad_slots)
    order, v_sorted, elig, slot_order = _rank_ads(page, quality, p, reserve)
    alpha = p.position_decay ** np.sort(np.asarray(p.ad_slots, np.float64))  # [K], decreasing
    alpha_next = np.concatenate([alpha[1:], [0.0]])
    v_next = jnp.concatenate([v_sorted[1:], jnp.zeros((k_slots,))])[:k_slots]  # v_{j+1}, [K]
    terms = (alpha - alpha_next) * v_next
    total = jnp.cumsum(terms[::-1])[::-1]  # sum_{j >= r}
    ads = order[:k_slots]
    price = total / jnp.maximum(quality[ads] * alpha, 1e-30)
    price = jnp.clip(price, reserve, page.bid[ads])
    assignment = jnp.full((k_slots,), -1, jnp.int32).at[slot_order].set(jnp.where(elig[:k_slots], ads, -1))
    price = jnp.zeros((k_slots,)).at[slot_order].set(jnp.where(elig[:k_slots], price, 0.0))
    return assignment, price


# ---------------------------------------------------------------------------------------------
# Outcomes under the ground truth, batched runs


class Outcome(NamedTuple):
    revenue: jax.Array  # [] expected revenue sum_i price_i * true_ctr_i
    ad_clicks: jax.Array  # [] expected ad clicks
    organic_clicks: jax.Array  # [] expected organic clicks
    welfare: jax.Array  # [] W under the true CTR (with the given virtual bids)
    advertiser_value: jax.Array  # [] sum_i bid_i * true_ctr_i


def outcomes(page: Page, assignment: jax.Array, payments: jax.Array, p: EnvParams, vb_ad=0.0,
             vb_org=0.0) -> Outcome:
    """Evaluates an allocation assignment [K] with per-click prices payments [K] (0 where organic)
    under the ground-truth click model of `page_env`."""
    lay = page_env.layout(page, assignment, p)
    ctr = page_env.true_ctr(page.user, lay, p)  # [S]
    ad_ctr = jnp.where(assignment >= 0, ctr[np.asarray(p.ad_slots)], 0.0)
    w = welfare(ctr[None], jax.tree.map(lambda x: x[None], lay), vb_ad, vb_org)[0]
    return Outcome(
        revenue=jnp.sum(payments * ad_ctr),
        ad_clicks=jnp.sum(jnp.where(lay.is_ad, ctr, 0.0)),
        organic_clicks=jnp.sum(jnp.where(lay.is_ad, 0.0, ctr)),
        welfare=w,
        advertiser_value=jnp.sum(lay.bid * ctr),
    )


def auction_outcome(page: Page, key, vb_ad, vb_org, reserve, p: EnvParams, ctr_fn: CtrFn, generator,
                    mechanism: str = "vcg") -> dict:
    """One request end to end: the mechanism's allocation and prices, and their outcomes under the
    ground truth. 'vcg' = `auction` with the generator and click model; 'gsp' / 'position' =
    the baselines with the independent quality `ad_quality(page, ctr_fn, p)` (no virtual bids,
    no blending)."""
    k_slots = len(p.ad_slots)
    if mechanism == "vcg":
        res = auction(page, generator, ctr_fn, p, vb_ad, vb_org, reserve, key)
        assignment, price = res.allocation.assignment, res.payments.price
        clip_low, clip_high, raw = res.payments.clip_low, res.payments.clip_high, res.payments.raw
        predicted = res.allocation.welfare
    elif mechanism in ("gsp", "position"):
        quality = ad_quality(page, ctr_fn, p)
        assignment, price = (gsp if mechanism == "gsp" else position_auction)(page, quality, p, reserve)
        clip_low = clip_high = jnp.zeros((k_slots,), bool)
        raw = price
        predicted = jnp.nan
    else:
        raise ValueError(f"mechanism={mechanism!r}: expected one of {MECHANISMS}")
    out = outcomes(page, assignment, price, p, vb_ad, vb_org)
    return {"assignment": assignment, "price": price, "raw_price": raw, "clip_low": clip_low,
            "clip_high": clip_high, "predicted_welfare": jnp.asarray(predicted, jnp.float32), **out._asdict()}


@functools.partial(jax.jit, static_argnames=("p", "ctr_fn", "generator", "mechanism", "chunk"))
def _run(pages, key, vb_ad, vb_org, reserve, p, ctr_fn, generator, mechanism, chunk=None):
    keys = jax.random.split(key, pages.bid.shape[0])
    one = lambda pk: auction_outcome(pk[0], pk[1], vb_ad, vb_org, reserve, p, ctr_fn, generator, mechanism)  # noqa: E731
    if chunk is None:
        return jax.vmap(one)((pages, keys))
    return jax.lax.map(one, (pages, keys), batch_size=chunk)


def summarize(per_request: dict) -> dict:
    """Means over requests, and clip rates over the ads shown (clip_rate = low or high)."""
    r = jax.device_get(per_request)
    shown = np.asarray(r["assignment"]) >= 0
    n_ads = max(int(shown.sum()), 1)
    low, high = np.asarray(r["clip_low"]) & shown, np.asarray(r["clip_high"]) & shown
    out = {k: float(np.mean(r[k])) for k in ("revenue", "ad_clicks", "organic_clicks", "welfare", "advertiser_value")}
    out.update(ads_shown=float(shown.sum(1).mean()), clip_rate=float((low | high).sum() / n_ads),
               clip_low_rate=float(low.sum() / n_ads), clip_high_rate=float(high.sum() / n_ads))
    return out


def run_auctions(pages: Page, p: EnvParams, ctr_fn: CtrFn | None = None, generator=Exhaustive(),
                 mechanism: str = "vcg", vb_ad=0.0, vb_org=0.0, reserve=0.0, key=None, chunk: int | None = None):
    """Runs the mechanism on a batch of pages (fields with a leading [B] axis; jit + vmap).

    ctr_fn defaults to the ground truth. Virtual bids and reserve are traced (sweeping them does
    not recompile); p, ctr_fn, generator, mechanism and chunk are static. chunk=None vmaps over the
    whole batch; chunk=c runs `lax.map` over chunks of c requests, which bounds the [B, A, S, ...]
    activations of a learned click model (vmapping it over a large batch is memory-bound on CPU;
    see benchmarks/ad_blending.py). Returns (per_request, summary):
    per_request = dict of [B, ...] arrays (assignment, price, raw_price, clip flags, revenue,
    ad_clicks, organic_clicks, welfare, advertiser_value, predicted_welfare), summary = `summarize`."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r}: expected one of {MECHANISMS}")
    ctr_fn = true_ctr_fn(p) if ctr_fn is None else ctr_fn
    key = jax.random.key(0) if key is None else key
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    per = _run(pages, key, f32(vb_ad), f32(vb_org), f32(reserve), p, ctr_fn, generator, mechanism, chunk)
    return per, summarize(per)
