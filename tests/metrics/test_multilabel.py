"""Multi-label metrics (jdjax/metrics/multilabel.py): AP against a plain NumPy twin of the spec's
formula, the no-positive class, the known mask, hand-computed CF1/OF1, summarize and bad inputs."""

import numpy as np
import pytest

from jdjax.metrics import multilabel as ML


def _numpy_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Spec §0: per class, sort by score (descending); AP = mean over the positives of the precision
    at their rank; 0 without positives."""
    out = np.zeros(scores.shape[1])
    for c in range(scores.shape[1]):
        y = labels[np.argsort(-scores[:, c]), c]
        hits = np.cumsum(y)
        ranks = np.arange(1, len(y) + 1)
        out[c] = (hits / ranks)[y == 1].sum() / max(y.sum(), 1)
    return out


def _random(n=200, c=7, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.permutation(n * c).reshape(n, c) / (n * c) + rng.normal(size=(n, c))  # tie-free
    labels = (rng.random((n, c)) < np.linspace(0.05, 0.5, c)).astype(np.int32)
    return scores, labels


def test_ap_matches_the_numpy_formula():
    for seed in range(3):
        scores, labels = _random(seed=seed)
        ap = ML.average_precision(scores, labels)
        assert ap.shape == (7,)
        np.testing.assert_allclose(ap, _numpy_ap(scores, labels), rtol=1e-12)
        np.testing.assert_allclose(ML.mean_average_precision(scores, labels), 100 * _numpy_ap(scores, labels).mean())


def test_ap_by_hand_and_perfect_ranking():
    scores = np.array([[0.9], [0.8], [0.7], [0.6]])
    labels = np.array([[1], [0], [1], [0]])
    np.testing.assert_allclose(ML.average_precision(scores, labels), [(1 / 1 + 2 / 3) / 2])
    np.testing.assert_allclose(ML.average_precision(-scores, 1 - labels), [(1 / 1 + 2 / 3) / 2])
    assert ML.mean_average_precision(labels * 2.0, labels) == 100.0


def test_class_without_positive_scores_zero_and_counts():
    scores, labels = _random(50, 4)
    labels[:, 2] = 0
    labels[0, [0, 1, 3]] = 1
    ap = ML.average_precision(scores, labels)
    assert ap[2] == 0.0 and (ap[[0, 1, 3]] > 0).all()
    np.testing.assert_allclose(ML.mean_average_precision(scores, labels), 100 * ap.sum() / 4)


def test_known_mask_drops_entries_before_ranking():
    scores, labels = _random(80, 3, seed=4)
    known = np.random.default_rng(1).random(scores.shape) < 0.6
    ap = ML.average_precision(scores, labels, known)
    for c in range(3):
        keep = known[:, c]
        np.testing.assert_allclose(ap[c], _numpy_ap(scores[keep, c : c + 1], labels[keep, c : c + 1])[0], rtol=1e-12)
    # hiding the top-scored negative raises the AP; hiding every positive gives 0
    s, y = np.array([[0.9], [0.5], [0.1]]), np.array([[0], [1], [0]])
    assert ML.average_precision(s, y)[0] == 0.5
    assert ML.average_precision(s, y, known=np.array([[False], [True], [True]]))[0] == 1.0
    assert ML.average_precision(s, y, known=np.array([[True], [False], [True]]))[0] == 0.0


def test_f1_by_hand():
    probs = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1], [0.8, 0.6, 0.3], [0.5, 0.1, 0.2]])
    labels = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 1]])
    # predicted (> 0.5): class 0 rows {0, 2}, class 1 rows {1, 2}, class 2 row {0}; 0.5 itself is not above
    # class 0: tp 1 fp 1 fn 1; class 1: tp 2 fp 0 fn 0; class 2: tp 1 fp 0 fn 1
    cp, cr = (1 / 2 + 1 + 1) / 3, (1 / 2 + 1 + 1 / 2) / 3
    op, orec = 4 / 5, 4 / 6
    out = ML.f1_at(probs, labels)
    expected = {"CP": cp, "CR": cr, "CF1": 2 * cp * cr / (cp + cr), "OP": op, "OR": orec,
                "OF1": 2 * op * orec / (op + orec)}
    assert out.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_allclose(out[k], 100 * v, rtol=1e-12, err_msg=k)


def test_f1_zero_divisions():
    labels = np.array([[1, 0], [0, 0]])
    out = ML.f1_at(np.zeros((2, 2)), labels)  # nothing predicted
    assert out == {"CP": 0.0, "CR": 0.0, "CF1": 0.0, "OP": 0.0, "OR": 0.0, "OF1": 0.0}
    out = ML.f1_at(np.array([[0.9, 0.0], [0.0, 0.0]]), labels)  # class 1: no positive, no prediction -> 0
    assert out["CP"] == 50.0 and out["OP"] == 100.0 and out["OF1"] == 100.0


def test_summarize_from_logits_or_scores():
    scores, labels = _random(60, 5, seed=2)
    logits = scores * 3
    from_logits = ML.summarize({"logits": logits, "labels": labels})
    assert set(from_logits) == {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"}
    from_scores = ML.summarize({"scores": 1 / (1 + np.exp(-logits)), "labels": labels})
    for k in from_logits:
        np.testing.assert_allclose(from_logits[k], from_scores[k], rtol=1e-9, err_msg=k)
    # logits far in the tail keep their order (float32 probabilities would all be 1.0)
    big = np.array([[40.0], [30.0], [35.0]], np.float32)
    assert ML.summarize({"logits": big, "labels": np.array([[1], [0], [1]])})["mAP"] == 100.0
    with pytest.raises(ValueError, match="'logits' or 'scores'"):
        ML.summarize({"probs": scores, "labels": labels})


def test_bad_inputs():
    scores, labels = _random(10, 3)
    scores[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 of 30 scores are not finite .*image 4, class 1"):
        ML.average_precision(scores, labels)
    with pytest.raises(ValueError, match="not finite"):
        ML.summarize({"logits": scores, "labels": labels})
    with pytest.raises(ValueError, match=r"\[N images, C classes\]"):
        ML.average_precision(np.zeros((10, 3)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="0 or 1"):
        ML.f1_at(np.zeros((2, 2)), np.array([[1, -1], [0, 0]]))
    with pytest.raises(ValueError, match="known"):
        ML.average_precision(np.zeros((10, 3)), np.zeros((10, 3)), known=np.ones((10, 2), bool))
