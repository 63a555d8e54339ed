"""CTR metrics on host NumPy arrays: AUC, gAUC, RelaImpr and logloss.

    auc(labels, scores)                 rank-based ROC AUC over the whole set, ties count 1/2
    gauc(labels, scores, groups)        impression-weighted mean of per-user AUC (DIN)
    rela_impr(auc_model, auc_base)      (AUC_model - 0.5) / (AUC_base - 0.5) - 1 (DIN)
    logloss(labels, probs)              mean binary cross-entropy

All take 1-D arrays of one length N. A set (or user) whose labels are all one class has no
AUC: `auc` returns NaN for it and `gauc` skips the user. A NaN or infinite score is an error
(ValueError naming how many and where), as in scikit-learn: a NaN would otherwise sort as the
top score and give a plausible-looking AUC of a broken model.
"""

from __future__ import annotations

import numpy as np


def _check(labels, scores, name: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"{name}: labels {labels.shape} and scores {scores.shape} differ in length.")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name}: labels must be 0 or 1, got values {np.unique(labels)[:10]}.")
    bad = ~np.isfinite(scores)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name}: {int(bad.sum())} of {scores.size} scores are not finite numbers (the first at index {first}: "
            f"{scores[first]}); the model's predictions are NaN or infinite. Look for NaN/inf in the inputs and for "
            "a diverging training loss."
        )
    return labels.astype(bool), scores


def _tie_averaged_ranks(keys: np.ndarray, sorted_order: np.ndarray, values: np.ndarray) -> np.ndarray:
    """1-based positions in `sorted_order`, averaged over runs of equal (`keys`, `values`).

    `sorted_order` sorts by (keys, values); `keys` lets runs restart at each group (pass zeros
    for one group). Returns ranks [N] indexed like the input (positions, not per-group ranks).
    """
    n = len(values)
    k, v = keys[sorted_order], values[sorted_order]
    starts = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]) | (v[1:] != v[:-1])])  # first index of each tie run
    ends = np.r_[starts[1:], n]  # one past the last
    run_mean = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
    ranks = np.empty(n)
    ranks[sorted_order] = np.repeat(run_mean, ends - starts)
    return ranks


def auc(labels, scores) -> float:
    """P(score of a random positive > score of a random negative), ties counted 1/2.

    Args:
      labels: [N] in {0, 1}.
      scores: [N] any real scores (probabilities or logits).

    Returns:
      The AUC, or NaN when `labels` holds only one class (or nothing).
    """
    y, s = _check(labels, scores, "auc")
    num_pos = int(y.sum())
    num_neg = y.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = _tie_averaged_ranks(np.zeros(y.size, np.int64), np.argsort(s, kind="stable"), s)
    return float((ranks[y].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def gauc(labels, scores, groups, weights=None) -> float:
    """Group AUC (DIN): sum_u w_u AUC_u / sum_u w_u over groups u with both classes.

    Args:
      labels: [N] in {0, 1}.
      scores: [N] real.
      groups: [N] group (user) ids, any sortable dtype.
      weights: None to weight each group by its number of impressions, or [N] per-example
        weights summed within a group (e.g. `labels` to weight by clicks).

    Returns:
      gAUC, or NaN when no group has both classes.
    """
    y, s = _check(labels, scores, "gauc")
    groups = np.asarray(groups).reshape(-1)
    if groups.shape != y.shape:
        raise ValueError(f"gauc: groups {groups.shape} and labels {y.shape} differ in length.")
    w = np.ones(y.size) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    _, g = np.unique(groups, return_inverse=True)  # dense group ids 0..G-1
    g = g.reshape(-1)
    order = np.lexsort((s, g))  # by group, then score
    pos_rank = _tie_averaged_ranks(g, order, s)
    num_groups = int(g.max()) + 1 if g.size else 0
    # A group's ranks are positions offset by the number of examples in earlier groups.
    size = np.bincount(g, minlength=num_groups)
    offset = np.r_[0, np.cumsum(size)[:-1]]
    rank_in_group = pos_rank - offset[g]
    num_pos = np.bincount(g, weights=y, minlength=num_groups)
    num_neg = size - num_pos
    pos_rank_sum = np.bincount(g, weights=np.where(y, rank_in_group, 0.0), minlength=num_groups)
    valid = (num_pos > 0) & (num_neg > 0)
    if not valid.any():
        return float("nan")
    group_auc = (pos_rank_sum[valid] - num_pos[valid] * (num_pos[valid] + 1) / 2.0) / (num_pos[valid] * num_neg[valid])
    group_w = np.bincount(g, weights=w, minlength=num_groups)[valid]
    if group_w.sum() <= 0:
        return float("nan")
    return float(np.sum(group_w * group_auc) / np.sum(group_w))


def rela_impr(auc_model: float, auc_base: float) -> float:
    """RelaImpr (DIN): (AUC_model - 0.5) / (AUC_base - 0.5) - 1, as a fraction (0.05 = +5 %)."""
    if auc_base == 0.5:
        raise ValueError("rela_impr: the base AUC is 0.5 (a random model), the ratio is undefined.")
    return (auc_model - 0.5) / (auc_base - 0.5) - 1.0


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities `probs` [N] (clipped to [eps, 1 - eps])."""
    y, p = _check(labels, probs, "logloss")
    if y.size == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))
