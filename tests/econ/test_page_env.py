"""The synthetic ad-blending page environment against hand-written NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import page_click as cp
from jdjax.econ import page_env as pe


def params(variant="competition", **overrides):
    cfg = cp.env_config(variant)
    cfg.update(overrides)
    return pe.EnvParams.from_config(cfg)


def numpy_ctr(user, x, cat, is_ad, p):
    """Loop version of the documented ground truth."""
    out = np.zeros(p.num_slots)
    for s in range(p.num_slots):
        q = 1 / (1 + np.exp(-(x[s] @ user + (p.ad_bias if is_ad[s] else p.organic_bias))))
        similar = sum(cat[t] == cat[s] for t in (s - 1, s + 1) if 0 <= t < p.num_slots)
        out[s] = min(max(q * p.position_decay**s * (1 - p.gamma * similar / 2), 0.0), 1.0)
    return out


def test_layout_puts_ads_in_their_slots_and_organic_items_in_rank_order():
    p = params()
    page = pe.sample_page(jax.random.key(3), pe.category_centres(0, p), p)
    lay = pe.layout(page, jnp.array([2, -1, 0]), p)
    ad = np.asarray(lay.ad)
    assert ad.tolist() == [-1, 2, -1, -1, -1, -1, -1, 0, -1, -1]
    organic_slots = np.flatnonzero(ad < 0)
    np.testing.assert_array_equal(np.asarray(lay.x)[organic_slots], np.asarray(page.org_x)[: len(organic_slots)])
    np.testing.assert_array_equal(np.asarray(lay.x)[1], np.asarray(page.ad_x)[2])
    np.testing.assert_allclose(np.asarray(lay.bid)[[1, 7]], np.asarray(page.bid)[[2, 0]])
    assert np.asarray(lay.bid)[organic_slots].sum() == 0


@pytest.mark.parametrize("variant", ["competition", "complementarity", "none"])
def test_true_ctr_matches_the_documented_formula(variant):
    p = params(variant)
    centres = pe.category_centres(0, p)
    for seed in range(5):
        k_page, k_assign = jax.random.split(jax.random.key(seed))
        page = pe.sample_page(k_page, centres, p)
        lay = pe.layout(page, pe.random_assignment(k_assign, p), p)
        got = np.asarray(pe.true_ctr(page.user, lay, p))
        want = numpy_ctr(*(np.asarray(a) for a in (page.user, lay.x, lay.cat, lay.is_ad)), p)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_externality_signs():
    """A same-category neighbour lowers CTR under competition, raises it under complementarity."""
    user = jnp.zeros(8)
    x = jnp.zeros((10, 8))
    lonely = pe.Layout(x, jnp.arange(10), jnp.zeros(10, bool), -jnp.ones(10, int), jnp.zeros(10))
    paired = lonely._replace(cat=lonely.cat.at[1].set(0))  # slots 0 and 1 share a category
    for variant, sign in (("competition", -1), ("complementarity", 1), ("none", 0)):
        p = params(variant)
        delta = pe.true_ctr(user, paired, p)[0] - pe.true_ctr(user, lonely, p)[0]
        assert np.sign(float(delta)) == sign


def test_random_assignment_never_repeats_an_ad():
    p = params()
    for seed in range(50):
        a = np.asarray(pe.random_assignment(jax.random.key(seed), p, ad_rate=1.0))
        assert len(set(a.tolist())) == len(a) and a.min() >= 0 and a.max() < p.num_ads


def test_click_log_is_seeded_and_labels_follow_ctr():
    p = params()
    a, b = pe.click_log(0, p, 3000), pe.click_log(0, p, 3000)
    other = pe.click_log(0, p, 3000, stream=1)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["x"], other["x"])
    np.testing.assert_array_equal(pe.click_log(0, p, 1200)["x"][:1000], pe.click_log(0, p, 1000)["x"])
    assert a["x"].shape == (3000, 10, 8) and a["label"].dtype == np.float32
    # 30k Bernoulli draws: the click rate is within 4 standard errors of the mean true CTR.
    se = np.sqrt(a["ctr"].mean() * (1 - a["ctr"].mean()) / a["ctr"].size)
    assert abs(a["label"].mean() - a["ctr"].mean()) < 4 * se
    # Under the logging policy every ad slot shows an ad about log_ad_rate of the time.
    ad_share = a["is_ad"][:, list(p.ad_slots)].mean()
    assert abs(ad_share - p.log_ad_rate) < 0.03


def test_bad_env_configs_are_named():
    cfg = cp.env_config()
    cfg.variant = "cooperation"
    cfg.ad_slots = (1, 1, 12)
    cfg.position_decay = 1.5
    errors = "; ".join(pe.env_errors(cfg))
    assert "env.variant" in errors and "env.ad_slots" in errors and "env.position_decay" in errors
    with pytest.raises(ValueError, match="env.variant"):
        pe.EnvParams.from_config(cfg)
