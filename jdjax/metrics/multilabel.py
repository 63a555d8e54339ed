"""Multi-label classification metrics on host NumPy arrays: per-class AP, mAP, CF1/OF1.

    average_precision(scores, labels, known=None)   [C] non-interpolated AP per class
    mean_average_precision(scores, labels, known)   100 * mean over classes of the AP
    f1_at(probs, labels, threshold=0.5)             {'CP', 'CR', 'CF1', 'OP', 'OR', 'OF1'} in percent
    summarize(out)                                  {'mAP', 'CP', ..., 'OF1'} of a whole split

`scores`, `probs` and `labels` are [N, C] (N images, C classes); labels are 0/1.

AP (spec ctr_and_multilabel.md §0, SCPNet utils.py): per class k, rank the images by score;
AP_k = (1 / P_k) sum over the positives i of precision@rank(i), P_k the number of positives.
This is scikit-learn's `average_precision_score` (used here) when no scores tie; with ties,
scikit-learn takes a tied block as one threshold, while SCPNet's `argsort` order depends on the
sort. SCPNet divides by P_k + 1e-8, so a class with no positive scores 0 (and the others differ
in the 8th digit): here a class with no positive also scores 0, and counts in the mean, as in
the official numbers. `known` [N, C] (bool) drops entries per class before ranking, for
evaluation on partially labelled data.

F1 (the CP/CR/CF1, OP/OR/OF1 of ML-GCN, Chen et al. 2019): an entry is predicted positive when
prob > threshold (SCPNet's `gt`). Per class c, P_c = TP_c / (TP_c + FP_c) and R_c = TP_c / (TP_c
+ FN_c), 0 when the denominator is 0; CP, CR = means over classes; CF1 = 2 CP CR / (CP + CR).
OP, OR, OF1: the same from the counts summed over classes. Any F1 whose P + R is 0 is 0.
(SCPNet's test() prints the mean of per-class F1 as its "F_C"; this is the ML-GCN CF1.)

A NaN or infinite score is an error (ValueError naming how many and where), as in
jdjax.metrics.ctr: NaN would otherwise sort first and give a plausible AP for a broken model.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score


def _check(scores, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(float64 [N, C] scores, bool [N, C] labels) or ValueError."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels)
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"{name}: scores {s.shape} and labels {y.shape} must both be [N images, C classes].")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name}: labels must be 0 or 1, got values {np.unique(y)[:10]}.")
    bad = ~np.isfinite(s)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: {int(bad.sum())} of {s.size} scores are not finite numbers (the first at image {row}, "
            f"class {col}: {s[row, col]}); the model's predictions are NaN or infinite. Look for NaN/inf in the "
            "inputs and for a diverging training loss."
        )
    return s, y.astype(bool)


def average_precision(scores, labels, known=None) -> np.ndarray:
    """Non-interpolated AP of each class.

    Args:
      scores: [N, C] real scores (logits or probabilities; only the order counts).
      labels: [N, C] in {0, 1}.
      known: optional [N, C] bool; entries with False are left out of their class's ranking.

    Returns:
      float64 [C] in [0, 1]; 0 for a class with no (known) positive.
    """
    s, y = _check(scores, labels, "average_precision")
    if known is None:
        known = np.ones_like(y)
    known = np.asarray(known, bool)
    if known.shape != y.shape:
        raise ValueError(f"average_precision: known {known.shape} must have the shape of labels {y.shape}.")
    ap = np.zeros(y.shape[1])
    for c in range(y.shape[1]):
        keep = known[:, c]
        yc = y[keep, c]
        if yc.any():
            ap[c] = average_precision_score(yc, s[keep, c])
    return ap


def mean_average_precision(scores, labels, known=None) -> float:
    """mAP in percent: 100 * mean over all C classes of `average_precision` (no-positive classes count 0)."""
    return float(100.0 * average_precision(scores, labels, known).mean())


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _f1(p, r) -> float:
    return float(_ratio(2 * p * r, p + r))


def f1_at(probs, labels, threshold: float = 0.5) -> dict[str, float]:
    """Per-class-averaged (CP, CR, CF1) and overall (OP, OR, OF1) precision/recall/F1, in percent.

    Args:
      probs: [N, C] probabilities; an entry is predicted positive when prob > threshold.
      labels: [N, C] in {0, 1}.
    """
    p, y = _check(probs, labels, "f1_at")
    pred = p > threshold  # [N, C]
    tp = (pred & y).sum(0)  # [C]
    fp = (pred & ~y).sum(0)
    fn = (~pred & y).sum(0)
    cp, cr = _ratio(tp, tp + fp).mean(), _ratio(tp, tp + fn).mean()
    op, orec = _ratio(tp.sum(), (tp + fp).sum()), _ratio(tp.sum(), (tp + fn).sum())
    out = {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": orec, "OF1": _f1(op, orec)}
    return {k: float(100.0 * v) for k, v in out.items()}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def summarize(out: dict[str, np.ndarray], threshold: float = 0.5) -> dict[str, float]:
    """{'mAP', 'CP', 'CR', 'CF1', 'OP', 'OR', 'OF1'} (percent) of a whole split.

    Args:
      out: 'labels' [N, C] in {0, 1} and either 'logits' [N, C] (ranked as they are, sigmoid for
        the F1s: the logits keep an order that saturated float32 probabilities may tie) or
        'scores' [N, C] probabilities.
    """
    if "logits" in out:
        ranking = np.asarray(out["logits"], np.float64)
        _check(ranking, out["labels"], "summarize")
        probs = _sigmoid(ranking)
    elif "scores" in out:
        ranking = probs = out["scores"]
    else:
        raise ValueError(f"summarize needs 'logits' or 'scores' [N, C] beside 'labels'; got keys {sorted(out)}.")
    return {"mAP": mean_average_precision(ranking, out["labels"]), **f1_at(probs, out["labels"], threshold)}
