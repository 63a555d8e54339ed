"""Ad blending allocation and VCG (spec P2) against NumPy / itertools brute force and the spec's invariants."""

import functools
import itertools
import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import page_click as cp
from jdjax.econ import allocation as al
from jdjax.econ import page_env as pe

NUM_PAGES = 64


def env(variant="competition", **overrides):
    c = cp.env_config(variant)
    for k, v in overrides.items():
        c[k] = v
    return pe.EnvParams.from_config(c)


@functools.lru_cache(maxsize=None)
def _pages():
    """Pages of the default environment: a Page does not depend on gamma or the ad slots, so one
    compiled sampler serves every variant (sampling compiles slowly on CPU)."""
    p = env()
    return jax.jit(pe.sample_pages, static_argnums=(2, 3))(jax.random.key(1), pe.category_centres(0, p), p, NUM_PAGES)


def pages_of(p, num=NUM_PAGES, seed=0):
    """`num` of the default pages for environment p (the first p.num_ads ads), rotated by `seed`."""
    base = env()
    assert p.num_slots == base.num_slots and p.num_ads <= base.num_ads
    assert num <= NUM_PAGES
    idx = (np.arange(num) + 7 * seed) % NUM_PAGES
    pages = jax.tree.map(lambda x: x[idx], _pages())
    n = p.num_ads
    return pages._replace(ad_x=pages.ad_x[:, :n], ad_cat=pages.ad_cat[:, :n], bid=pages.bid[:, :n])


def page_np(pages, b):
    return {k: np.asarray(v[b], np.float64) for k, v in pages._asdict().items()}


# ----- an independent NumPy model of the environment (module docstring of page_env)


def np_ctr(pg, assignment, p):
    s_num = p.num_slots
    ad_in_slot = np.full(s_num, -1)
    ad_in_slot[list(p.ad_slots)] = assignment
    xs, cats, is_ad, bids = [], [], [], []
    org = 0
    for s in range(s_num):
        a = ad_in_slot[s]
        if a >= 0:
            xs.append(pg["ad_x"][a]), cats.append(pg["ad_cat"][a]), is_ad.append(True), bids.append(pg["bid"][a])
        else:
            xs.append(pg["org_x"][org]), cats.append(pg["org_cat"][org]), is_ad.append(False), bids.append(0.0)
            org += 1
    xs, is_ad, bids = np.array(xs), np.array(is_ad), np.array(bids)
    q = 1 / (1 + np.exp(-(xs @ pg["user"] + np.where(is_ad, p.ad_bias, p.organic_bias))))
    ctr = np.empty(s_num)
    for s in range(s_num):
        same = sum(1 for t in (s - 1, s + 1) if 0 <= t < s_num and cats[t] == cats[s])
        ctr[s] = np.clip(q[s] * p.position_decay**s * (1 - p.gamma * same / 2), 0, 1)
    return ctr, is_ad, bids


def np_welfare(pg, assignment, p, vb_ad, vb_org):
    ctr, is_ad, bids = np_ctr(pg, assignment, p)
    return float(np.sum(np.where(is_ad, (bids + vb_ad) * ctr, vb_org * ctr)))


def itertools_assignments(n, k):
    return [a for a in itertools.product(range(-1, n), repeat=k) if len([x for x in a if x >= 0]) == len({x for x in a if x >= 0})]


def np_quality(pg, p):
    """Position-free relevance of every ad (the separable model's q_i)."""
    return 1 / (1 + np.exp(-(pg["ad_x"] @ pg["user"] + p.ad_bias)))


# ----- candidates


def test_exhaustive_count_matches_itertools():
    cands, valid = al.exhaustive_assignments(6, 3)
    assert cands.shape == (229, 3) and valid.all() and al.num_assignments(6, 3) == 229
    assert sorted(map(tuple, cands.tolist())) == sorted(itertools_assignments(6, 3))
    assert tuple(cands[0]) == (-1, -1, -1)
    for n, k in ((3, 3), (4, 2), (2, 3)):
        assert sorted(map(tuple, al.exhaustive_assignments(n, k)[0].tolist())) == sorted(itertools_assignments(n, k))


def test_top_n_mask_keeps_static_shape():
    score = np.array([0.3, 2.0, 0.1, 1.5, 0.9, 0.2])
    cands, valid = al.exhaustive_assignments(6, 3, top_n=3, score=score)
    assert cands.shape == (229, 3)
    allowed = {1, 3, 4}
    expect = [all(a < 0 or a in allowed for a in row) for row in cands.tolist()]
    np.testing.assert_array_equal(np.asarray(valid), expect)
    assert int(np.sum(valid)) == len(itertools_assignments(3, 3))
    with pytest.raises(ValueError, match="score"):
        al.exhaustive_assignments(6, 3, top_n=3)


@pytest.mark.parametrize("num_ads", [6, 3])
def test_brute_force_equals_permutation_search(num_ads):
    p = env("competition", num_ads=num_ads)
    pages = pages_of(p, 16)
    vb_ad, vb_org = 0.2, 0.7
    cands, valid = al.exhaustive_assignments(p.num_ads, len(p.ad_slots))
    ctr_fn = al.true_ctr_fn(p)
    alloc = jax.jit(jax.vmap(lambda pg: al.allocate(pg, cands, valid, ctr_fn, vb_ad, vb_org, p)))(pages)
    for b in range(16):
        pg = page_np(pages, b)
        brute = {a: np_welfare(pg, np.array(a), p, vb_ad, vb_org) for a in itertools_assignments(p.num_ads, 3)}
        best = max(brute.values())
        chosen = tuple(int(x) for x in alloc.assignment[b])
        assert brute[chosen] == pytest.approx(best, rel=1e-5, abs=1e-6)
        assert float(alloc.welfare[b]) == pytest.approx(best, rel=1e-4)
        np.testing.assert_allclose(  # the scorer's W equals the NumPy model on every candidate
            np.asarray(alloc.welfares[b]), [brute[tuple(a)] for a in cands.tolist()], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("generator", [al.Exhaustive(top_n=4), al.Greedy("power", (0.5, 2.0), ad_load_variants=False),
                                       al.RandomSampling(8)],
                         ids=lambda g: repr(g))
def test_selected_welfare_is_max_over_candidates(generator):
    p = env("complementarity")
    pages = pages_of(p, 16)
    ctr_fn = al.true_ctr_fn(p)

    def one(pg, key):
        pool = pg.bid >= 0.0
        quality = al.ad_quality(pg, ctr_fn, p)
        cands, valid = generator(pg, pool, quality, ctr_fn, p, key)
        return cands, valid, al.allocate(pg, cands, valid, ctr_fn, 0.1, 0.5, p)

    cands, valid, alloc = jax.jit(jax.vmap(one))(pages, jax.random.split(jax.random.key(3), 16))
    w = np.where(valid, alloc.welfares, -np.inf)
    assert np.all(np.asarray(alloc.welfare)[:, None] >= w)
    np.testing.assert_array_equal(np.asarray(alloc.welfare), w.max(1))
    # every candidate is a legal assignment: distinct ads
    for row in np.asarray(cands).reshape(-1, 3):
        ads = row[row >= 0]
        assert len(set(ads)) == len(ads) and np.all(ads < p.num_ads)


def test_ad_quality_is_relevance_without_externality():
    p = env("none")
    pages = pages_of(p, 4)
    q = jax.jit(jax.vmap(lambda pg: al.ad_quality(pg, al.true_ctr_fn(p), p)))(pages)
    for b in range(4):
        np.testing.assert_allclose(np.asarray(q[b]), np_quality(page_np(pages, b), p), rtol=1e-5)


# ----- VCG


@pytest.mark.parametrize("variant", ["competition", "complementarity", "none"])
def test_vcg_payments_at_most_bids(variant):
    p = env(variant)
    pages = pages_of(p, NUM_PAGES, seed=1)
    reserve = 0.05
    per, summary = al.run_auctions(pages, p, vb_ad=0.0, vb_org=0.5, reserve=reserve)
    shown = np.asarray(per["assignment"]) >= 0
    bid = np.take_along_axis(np.asarray(pages.bid), np.maximum(np.asarray(per["assignment"]), 0), 1)
    raw, price = np.asarray(per["raw_price"]), np.asarray(per["price"])
    low, high = np.asarray(per["clip_low"]), np.asarray(per["clip_high"])
    # maximal-in-range: the unclipped price never exceeds the bid (up to float rounding) ...
    assert np.all(raw[shown] <= bid[shown] * (1 + 1e-4) + 1e-6)
    assert not high.any() and summary["clip_high_rate"] == 0.0
    # ... and after clipping price in [reserve, bid]; organic slots pay 0
    assert np.all(price[shown] <= bid[shown]) and np.all(price[shown] >= reserve)
    assert np.all(price[~shown] == 0) and not (low | high)[~shown].any()
    # negative (below-reserve) prices only show up through the clip flag
    np.testing.assert_allclose(price[shown & ~low], np.minimum(raw, bid)[shown & ~low], rtol=1e-6, atol=1e-7)
    assert np.all(price[low] == reserve) and np.all(raw[low] < reserve)
    assert np.all(raw[shown & ~low] >= reserve - 1e-4)
    assert summary["clip_rate"] == pytest.approx(low.sum() / shown.sum())
    print(f"{variant}: {int((raw[shown] < 0).sum())} negative raw prices of {int(shown.sum())} ads, clip rate {summary['clip_rate']:.3f}")
    if variant == "none":  # without externalities and with VB_ad = 0 the bracket is >= 0 (removing i only helps others)
        assert np.all(raw[shown] >= -1e-4)


def test_vcg_high_clip_only_for_rerun_generators():
    """Bid-dependent generators' reruns need not be subsets: prices may exceed bids before clipping."""
    p = env("competition")
    pages = pages_of(p, 32, seed=2)
    for gen in (al.Greedy(params=(0.0, 1.0)), al.RandomSampling(8)):
        per, _ = al.run_auctions(pages, p, generator=gen, vb_org=0.5)
        shown = np.asarray(per["assignment"]) >= 0
        bid = np.take_along_axis(np.asarray(pages.bid), np.maximum(np.asarray(per["assignment"]), 0), 1)
        raw, price, high = np.asarray(per["raw_price"]), np.asarray(per["price"]), np.asarray(per["clip_high"])
        assert np.all(price[shown] <= bid[shown])
        assert np.all(raw[shown & ~high] <= bid[shown & ~high] * (1 + 1e-4) + 1e-6)
        np.testing.assert_array_equal(price[high], bid[high])


def test_single_ad_slot_is_second_price():
    p = env("none", ad_slots=(4,))
    pages = pages_of(p, NUM_PAGES, seed=3)
    per, _ = al.run_auctions(pages, p)
    gsp, _ = al.run_auctions(pages, p, mechanism="gsp")
    for b in range(NUM_PAGES):
        pg = page_np(pages, b)
        v = pg["bid"] * np_quality(pg, p)
        win, second = np.argsort(-v)[:2]
        assert int(per["assignment"][b, 0]) == win
        expect = v[second] / np_quality(pg, p)[win]  # second price in bid * pCTR units
        assert float(per["price"][b, 0]) == pytest.approx(expect, rel=1e-4)
        assert float(gsp["price"][b, 0]) == pytest.approx(expect, rel=1e-4)  # GSP = VCG with one slot


def np_position_vcg(bid, q, alpha):
    """Classic position-auction VCG (Varian / Edelman et al.), slots with CTR alpha[r] (decreasing)."""
    v = bid * q
    order = np.argsort(-v)
    k = len(alpha)
    vs = np.concatenate([v[order], np.zeros(k + 1)])
    al_ext = np.concatenate([alpha, [0.0]])
    prices = []
    for r in range(k):
        total = sum((al_ext[j] - al_ext[j + 1]) * vs[j + 1] for j in range(r, k))
        prices.append(total / (q[order[r]] * alpha[r]))
    return order[:k], np.array(prices)


def test_separable_vcg_equals_position_auction():
    p = env("none", ad_slots=(7, 1, 4))  # unsorted on purpose
    pages = pages_of(p, NUM_PAGES, seed=4)
    per, _ = al.run_auctions(pages, p)  # VB = 0, gamma = 0, exhaustive VCG
    pos, _ = al.run_auctions(pages, p, mechanism="position")
    alpha = p.position_decay ** np.array([1.0, 4.0, 7.0])
    slot_of_rank = np.argsort(p.ad_slots)  # ad slot k of the r-th best slot
    for b in range(NUM_PAGES):
        pg = page_np(pages, b)
        ads, prices = np_position_vcg(pg["bid"], np_quality(pg, p), alpha)
        np.testing.assert_array_equal(np.asarray(per["assignment"][b])[slot_of_rank], ads)
        np.testing.assert_allclose(np.asarray(per["price"][b])[slot_of_rank], prices, rtol=2e-4, atol=5e-5)
        np.testing.assert_array_equal(np.asarray(pos["assignment"][b])[slot_of_rank], ads)
        np.testing.assert_allclose(np.asarray(pos["price"][b])[slot_of_rank], prices, rtol=2e-4, atol=5e-5)


def test_organic_clicks_monotone_in_vb_org():
    p = env("competition")
    pages = pages_of(p, NUM_PAGES, seed=5)
    organic = []
    for vb in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0):
        per, _ = al.run_auctions(pages, p, vb_ad=0.1, vb_org=vb)
        organic.append(np.asarray(per["organic_clicks"]))
    organic = np.stack(organic)  # [grid, B]
    assert np.all(np.diff(organic, axis=0) >= -1e-5)
    assert organic[-1].mean() > organic[0].mean()


def test_gsp_hand_made_page():
    p = env("none", num_ads=4, ad_slots=(5, 2))  # best ad slot = slot 2, i.e. ad slot index 1
    d = p.feature_dim
    page = pe.Page(user=np.zeros(d, np.float32), ad_x=np.zeros((4, d), np.float32), ad_cat=np.arange(4),
                   bid=np.array([1.0, 3.0, 2.0, 0.5], np.float32), org_x=np.zeros((10, d), np.float32),
                   org_cat=np.zeros(10, np.int32))
    q = np.array([0.5, 0.1, 0.2, 0.8], np.float32)  # bid * q = 0.5, 0.3, 0.4, 0.4 -> ranking 0, 2, 3, 1
    assignment, price = al.gsp(page, q, p)
    np.testing.assert_array_equal(assignment, [2, 0])  # top ad in slot 2 (ad slot 1), second in slot 5
    np.testing.assert_allclose(price, [0.4 / 0.2, 0.4 / 0.5], rtol=1e-6)
    assignment, price = al.gsp(page, q, p, reserve=2.5)  # only ad 1 (bid 3) is eligible
    np.testing.assert_array_equal(assignment, [-1, 1])
    np.testing.assert_allclose(price, [0.0, 2.5])
    # position-auction VCG on the same page: sum formula over the lower slot
    a1, a2 = p.position_decay**2, p.position_decay**5
    assignment, price = al.position_auction(page, q, p)
    np.testing.assert_allclose(price, [0.4 * a2 / (0.2 * a2), ((a1 - a2) * 0.4 + a2 * 0.4) / (0.5 * a1)], rtol=1e-5)


def test_outcomes_by_hand():
    p = env("none")
    pages = pages_of(p, 1)
    pg = jax.tree.map(lambda x: x[0], pages)
    assignment = np.array([2, -1, 0])
    price = np.array([0.3, 0.0, 0.2])
    out = jax.jit(lambda pg: al.outcomes(pg, assignment, price, p, vb_ad=0.1, vb_org=0.5))(pg)
    ctr, is_ad, bids = np_ctr(page_np(pages, 0), assignment, p)
    assert float(out.revenue) == pytest.approx(0.3 * ctr[1] + 0.2 * ctr[7], rel=1e-5)
    assert float(out.ad_clicks) == pytest.approx(ctr[is_ad].sum(), rel=1e-5)
    assert float(out.organic_clicks) == pytest.approx(ctr[~is_ad].sum(), rel=1e-5)
    assert float(out.welfare) == pytest.approx(np_welfare(page_np(pages, 0), assignment, p, 0.1, 0.5), rel=1e-5)
    with pytest.raises(ValueError, match="mechanism"):
        al.run_auctions(pages, p, mechanism="first_price")


def test_chunked_run_equals_vmapped():
    p = env("complementarity")
    pages = pages_of(p, NUM_PAGES, seed=1)  # as test_vcg_payments_at_most_bids: the vmapped run is compiled
    per, summary = al.run_auctions(pages, p, vb_ad=0.1, vb_org=0.5, reserve=0.05)
    per_c, summary_c = al.run_auctions(pages, p, vb_ad=0.1, vb_org=0.5, reserve=0.05, chunk=16)
    np.testing.assert_array_equal(per["assignment"], per_c["assignment"])
    np.testing.assert_allclose(per["price"], per_c["price"], rtol=1e-5, atol=1e-6)
    assert summary_c == pytest.approx(summary, rel=1e-5)


# ----- incentives: a misreport search, and ads with predicted CTR 0


MISREPORT_GRID = np.concatenate([[1.0], np.geomspace(0.02, 10.0, 24)])  # report = multiple of the value; truth first


def misreport_gains(p, pages, vb_ad, vb_org, reserve, chunk=8):
    """For every page and ad i, with the others' bids fixed, the best gain over bidding the value
    (the page's bid) from reporting value * m for m on MISREPORT_GRID; utility = value * clicks -
    payment, clicks = predicted CTR of i in the chosen allocation (the true CTR here).
    Returns (gain with unclipped prices [B, N], gain with clipped prices [B, N], truthful price
    clipped [B, N] bool)."""
    ctr_fn, slots = al.true_ctr_fn(p), np.asarray(p.ad_slots)

    def one(pg):
        res = al.auction(pg, al.Exhaustive(), ctr_fn, p, vb_ad, vb_org, reserve)
        return (res.allocation.assignment, res.allocation.ctr[slots], res.payments.raw, res.payments.price,
                res.payments.clip_low | res.payments.clip_high)

    run = jax.jit(jax.vmap(one))
    n, g = p.num_ads, len(MISREPORT_GRID)
    out, pages = [], jax.tree.map(np.asarray, pages)
    for start in range(0, pages.bid.shape[0], chunk):
        pg = jax.tree.map(operator.itemgetter(slice(start, start + chunk)), pages)
        value = pg.bid.astype(np.float64)  # [b, N]
        b = value.shape[0]
        bids = np.broadcast_to(value[:, None, None, :], (b, n, g, n)).copy()  # [b, ad i, grid, N]
        for i in range(n):
            bids[:, i, :, i] = value[:, i, None] * MISREPORT_GRID
        batch = jax.tree.map(lambda x: np.repeat(x, n * g, 0), pg)._replace(bid=bids.reshape(-1, n).astype(np.float32))
        a, c, raw, price, clipped = (np.asarray(x).reshape(b, n, g, -1) for x in run(batch))
        mine = a == np.arange(n)[None, :, None, None]  # [b, N, G, K]: ad i's ad slot
        clicks = np.sum(mine * c, -1)
        u_raw = value[..., None] * clicks - np.sum(np.where(mine & (c > 0), raw * c, 0.0), -1)
        u_clip = value[..., None] * clicks - np.sum(mine * price * c, -1)
        out.append((u_raw.max(-1) - u_raw[..., 0], u_clip.max(-1) - u_clip[..., 0], np.any(mine & clipped, -1)[..., 0]))
    return tuple(np.concatenate(x) for x in zip(*out))


@pytest.mark.parametrize("variant", ["competition", "complementarity"])
def test_unclipped_vcg_has_no_profitable_misreport(variant):
    """Exhaustive (maximal-in-range, bid-independent) VCG: bidding the value is a best response
    with the unclipped prices, for every advertiser of every page, whatever the others bid."""
    p = env(variant)
    gain_raw, gain_clip, clipped = misreport_gains(p, pages_of(p, 32, seed=6), vb_ad=0.1, vb_org=0.5, reserve=0.05)
    assert gain_raw.max() <= 1e-5, f"profitable misreport with unclipped VCG prices: gain {gain_raw.max():.2e}"
    # Clipping is what breaks it: only ads whose truthful price was clipped gain by misreporting.
    assert np.all(gain_clip[~clipped] <= 1e-5)
    print(f"{variant}: {int(clipped.sum())} clipped of {clipped.size} (page, ad) pairs, "
          f"{int((gain_clip[clipped] > 1e-5).sum())} of them with a profitable misreport under the clipped prices")


class ZeroCtrForAd0:
    """The true click model, except that ad 0 gets no clicks itself and raises the CTR of every
    other item on the page by half: the welfare-maximising page shows it, and its VCG transfer is
    negative (removing it costs the others clicks)."""

    def __init__(self, p):
        self.true = al.true_ctr_fn(p)

    def __call__(self, page, lays):
        ctr = self.true(page, lays)  # [A, S]
        ad0 = lays.ad == 0  # [A, S]
        shown = jnp.any(ad0, axis=-1, keepdims=True)
        return jnp.where(ad0, 0.0, jnp.where(shown, jnp.minimum(1.5 * ctr, 1.0), ctr))


def test_winning_ad_with_zero_ctr_is_flagged_and_counted():
    p = env("competition")
    pages = pages_of(p, 16, seed=7)
    per, summary = al.run_auctions(pages, p, ctr_fn=ZeroCtrForAd0(p), vb_org=0.5, reserve=0.05)
    assignment = np.asarray(per["assignment"])
    zero = assignment == 0  # ad 0 wins an ad slot: predicted CTR 0, negative transfer
    assert zero.any(axis=1).sum() >= 8
    low, high = np.asarray(per["clip_low"]), np.asarray(per["clip_high"])
    assert low[zero].all() and not high[zero].any()
    assert np.all(np.asarray(per["raw_price"])[zero] == -np.inf) and np.all(np.asarray(per["price"])[zero] == 0.05)
    shown = assignment >= 0
    assert summary["clip_low_rate"] == pytest.approx(low[shown].sum() / shown.sum())
    assert summary["clip_rate"] >= zero.sum() / shown.sum()


def test_zero_ctr_transfer_signs():
    """vcg_payments on a hand-made allocation: a winner with predicted CTR 0 in every ad slot, with
    a negative, positive and zero transfer (max over A_-i minus the others' welfare)."""
    p = env("none")
    page = jax.tree.map(lambda x: x[0], pages_of(p, 1))
    ctr = np.full(p.num_slots, 0.1, np.float32)
    ctr[list(p.ad_slots)] = 0.0
    alloc = al.Allocation(index=np.int32(0), assignment=np.array([0, 1, 2], np.int32), welfare=np.float32(1.0),
                          ctr=ctr, welfares=np.zeros(1, np.float32))
    pay = al.vcg_payments(page, alloc, np.array([0.9, 1.1, 1.0], np.float32), p, reserve=0.05)
    np.testing.assert_array_equal(pay.clip_low, [True, False, False])
    np.testing.assert_array_equal(pay.clip_high, [False, True, False])
    np.testing.assert_array_equal(pay.raw, np.array([-np.inf, np.inf, 0.05], np.float32))
    np.testing.assert_allclose(pay.price, [0.05, page.bid[1], 0.05])
