"""CTR metrics against scikit-learn and hand-computed cases."""

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from jdjax.metrics import ctr


def _data(n=500, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + y
    if ties:
        s = np.round(s, 1)
    return y, s


@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_sklearn(ties):
    y, s = _data(ties=ties)
    assert ctr.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_hand_cases():
    assert ctr.auc([0, 1], [0.1, 0.9]) == 1.0
    assert ctr.auc([1, 0], [0.1, 0.9]) == 0.0
    assert ctr.auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all ties count one half
    assert np.isnan(ctr.auc([1, 1], [0.1, 0.2]))


def _gauc_reference(y, s, g, w=None):
    num, den = 0.0, 0.0
    w = np.ones(len(y)) if w is None else w
    for u in np.unique(g):
        sel = g == u
        if y[sel].min() == y[sel].max():
            continue
        num += w[sel].sum() * roc_auc_score(y[sel], s[sel])
        den += w[sel].sum()
    return num / den


@pytest.mark.parametrize("ties", [False, True])
def test_gauc_matches_per_user_sklearn(ties):
    y, s = _data(n=800, seed=1, ties=ties)
    g = np.random.default_rng(2).integers(0, 60, len(y)) * 7 + 3  # sparse, unsorted user ids
    assert ctr.gauc(y, s, g) == pytest.approx(_gauc_reference(y, s, g), abs=1e-12)
    assert ctr.gauc(y, s, g, weights=y) == pytest.approx(_gauc_reference(y, s, g, y.astype(float)), abs=1e-12)


def test_gauc_skips_single_class_users():
    y = np.array([1, 0, 1, 1, 0, 0])
    s = np.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.7])
    g = np.array([5, 5, 7, 7, 9, 9])  # user 5: AUC 1; users 7 and 9 are one class
    assert ctr.gauc(y, s, g) == 1.0
    assert np.isnan(ctr.gauc(y[2:], s[2:], g[2:]))


def test_logloss_matches_sklearn():
    y, s = _data(seed=3)
    p = 1.0 / (1.0 + np.exp(-s))
    assert ctr.logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)


def test_rela_impr():
    assert ctr.rela_impr(0.8789, 0.8720) == pytest.approx(0.0185, abs=1e-4)  # KFAtt paper, derived value
    with pytest.raises(ValueError, match="undefined"):
        ctr.rela_impr(0.7, 0.5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="differ in length"):
        ctr.auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="must be 0 or 1"):
        ctr.auc([0, 2], [0.1, 0.2])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise_like_sklearn(bad):
    """A NaN score used to count as the top score: a plausible AUC of a broken model."""
    y = np.array([0, 1, 0, 1])
    s = np.array([0.1, bad, 0.3, 0.2])
    with pytest.raises(ValueError):
        roc_auc_score(y, s)
    for name, call in (("auc", lambda: ctr.auc(y, s)), ("gauc", lambda: ctr.gauc(y, s, [0, 0, 1, 1])),
                       ("logloss", lambda: ctr.logloss(y, s))):
        with pytest.raises(ValueError, match=rf"{name}: 1 of 4 scores are not finite numbers \(the first at index 1"):
            call()
