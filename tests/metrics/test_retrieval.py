"""Retrieval metrics (jdjax/metrics/retrieval.py): the spec's invariants, a hand-computed example,
ties counted once (against scipy and against the released TempMe / CLIP4Clip formula), errors."""

import numpy as np
import pytest
from scipy.stats import rankdata

from jdjax.metrics.retrieval import retrieval_metrics, retrieval_ranks, t2v_v2t_metrics

KEYS = ["R1", "R5", "R10", "MdR", "MnR", "RSum"]

# Rows are texts, columns videos; ground truth on the diagonal.
HAND = np.array([
    [0.90, 0.10, 0.30, 0.20],  # 0.90 is the largest                        -> rank 0
    [0.50, 0.40, 0.80, 0.10],  # 0.50 and 0.80 beat 0.40                    -> rank 2
    [0.70, 0.60, 0.20, 0.30],  # 0.70, 0.60 and 0.30 beat 0.20              -> rank 3
    [0.10, 0.20, 0.90, 0.35],  # 0.90 beats 0.35                            -> rank 1
])
# Columns (v2t): [.9 .5 .7 .1] -> 0; [.1 .4 .6 .2] -> 1 (0.6); [.3 .8 .2 .9] -> 3; [.2 .1 .3 .35] -> 0.


def _released_ranks(x):
    """The rank list of the released TempMe / CLIP4Clip `compute_metrics` (R@K divides by its length)."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, np.newaxis]
    return np.where(sx - d == 0)[1]


def test_identity_is_perfect():
    m = retrieval_metrics(np.eye(7))
    assert m == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 1.0, "RSum": 300.0}
    assert all(type(v) is float for v in m.values())


def test_hand_computed():
    assert retrieval_ranks(HAND).tolist() == [0, 2, 3, 1]
    assert retrieval_ranks(HAND.T).tolist() == [0, 1, 3, 0]
    m = t2v_v2t_metrics(HAND)
    assert list(m) == [f"t2v/{k}" for k in KEYS] + [f"v2t/{k}" for k in KEYS]
    expected = {
        "t2v/R1": 25.0, "t2v/R5": 100.0, "t2v/R10": 100.0, "t2v/MdR": 2.5, "t2v/MnR": 2.5, "t2v/RSum": 225.0,
        "v2t/R1": 50.0, "v2t/R5": 100.0, "v2t/R10": 100.0, "v2t/MdR": 1.5, "v2t/MnR": 2.0, "v2t/RSum": 250.0,
    }
    assert m == pytest.approx(expected)
    assert retrieval_metrics(HAND.astype(np.float32)) == pytest.approx(retrieval_metrics(HAND))


def test_ties_count_once():
    sim = np.array([
        [0.5, 0.9, 0.5, 0.5],  # one better, two tied with the truth -> rank 1
        [0.2, 0.7, 0.1, 0.0],  # rank 0
        [0.3, 0.3, 0.3, 0.3],  # all tied                              -> rank 0
        [0.0, 0.6, 0.1, 0.4],  # 0.6 beats 0.4                         -> rank 1
    ])
    assert retrieval_ranks(sim).tolist() == [1, 0, 0, 1]
    assert retrieval_metrics(sim) == pytest.approx(
        {"R1": 50.0, "R5": 100.0, "R10": 100.0, "MdR": 1.5, "MnR": 1.5, "RSum": 250.0})
    # The released formula yields 3 + 1 + 4 + 1 = 9 ranks for 4 rows: row 0 gives [1, 2, 3] and row 2
    # gives [0, 1, 2, 3], so entry i is not row i's rank and R@1 = 2/9 instead of 2/4.
    released = _released_ranks(sim)
    assert released.tolist() == [1, 2, 3, 0, 0, 1, 2, 3, 1]
    assert 100.0 * np.mean(released == 0) == pytest.approx(200.0 / 9)


def test_matches_scipy_min_rank_with_ties():
    rng = np.random.default_rng(0)
    for n in (1, 2, 13, 60):
        sim = rng.integers(0, 4, size=(n, n)).astype(np.float64)  # many ties
        expected = [rankdata(-sim[i], method="min")[i] - 1 for i in range(n)]
        assert retrieval_ranks(sim).tolist() == expected
        ranks = np.asarray(expected)
        m = retrieval_metrics(sim)
        assert m["R5"] == pytest.approx(100.0 * np.mean(ranks < 5))
        assert m["MdR"] == pytest.approx(np.median(ranks) + 1)
    # Without ties, the released formula agrees.
    sim = rng.normal(size=(50, 50))
    assert retrieval_ranks(sim).tolist() == _released_ranks(sim).tolist()


def test_random_is_chance():
    sim = np.random.default_rng(1).normal(size=(1000, 1000))
    m = retrieval_metrics(sim)
    assert 0.0 <= m["R1"] <= 1.0  # chance is 0.1%
    assert 0.0 <= m["R10"] <= 3.0  # chance is 1%
    assert 450.0 <= m["MnR"] <= 551.0  # chance is 500.5


def test_errors():
    sim = np.eye(4)
    sim[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2 holds NaN"):
        retrieval_metrics(sim)
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        retrieval_metrics(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        t2v_v2t_metrics(np.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(0, 0\)"):
        retrieval_ranks(np.zeros((0, 0)))
