"""Text-video retrieval metrics on host NumPy arrays: R@K, median and mean rank, R-Sum.

    retrieval_ranks(sim)      0-based rank of each row's ground truth (the diagonal)
    retrieval_metrics(sim)    {'R1', 'R5', 'R10', 'MdR', 'MnR', 'RSum'} of the rows of `sim`
    t2v_v2t_metrics(sim)      the same for text->video (rows of sim) and video->text (rows of sim.T),
                              keys 't2v/R1', ..., 'v2t/RSum'

`sim` is a square [N, N] similarity matrix, row i a query and column i its match
(TempMe / CLIP4Clip `compute_metrics`, vision_token_merging.md §2.5). R@K is the percentage of
rows whose rank is < K; MdR = median(rank) + 1; MnR = mean(rank) + 1; RSum = R1 + R5 + R10.

Ties: rank = the number of entries of the row strictly greater than its diagonal value, so
candidates that tie with the ground truth do not push it down (scipy's `rankdata(-row,
method='min') - 1`). Each row gives exactly one rank. The released TempMe / CLIP4Clip code takes
`np.where(np.sort(-S, 1) - diag(-S)[:, None] == 0)[1]` instead: a row whose diagonal ties with
k other entries contributes k + 1 ranks, so the rank list is longer than N, its i-th entry no
longer belongs to row i, and R@K divides by the wrong count. On continuous features ties are
rare and both agree; on quantised or duplicated features they do not.
"""

from __future__ import annotations

import numpy as np

RECALL_AT = (1, 5, 10)


def retrieval_ranks(sim) -> np.ndarray:
    """int64 [N]: rank[i] = #{j : sim[i, j] > sim[i, i]} (0 = retrieved first).

    Raises ValueError for a matrix that is not square and non-empty, or that holds NaN.
    """
    s = np.asarray(sim, np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(
            f"Retrieval metrics need a non-empty square [queries, candidates] similarity matrix with "
            f"the ground truth on the diagonal, got shape {s.shape}. For several captions per "
            "video, evaluate one caption per video (or reorder so that row i matches column i)."
        )
    nan_rows = np.flatnonzero(np.isnan(s).any(axis=1))
    if nan_rows.size:
        raise ValueError(
            f"Similarity row {nan_rows[0]} holds NaN ({nan_rows.size} rows do), so its rank is "
            "undefined. Check the features for NaN (e.g. an all-zero vector L2-normalised)."
        )
    diag = np.diagonal(s)[:, None]  # [N, 1]
    return (s > diag).sum(axis=1).astype(np.int64)  # [N]


def retrieval_metrics(sim) -> dict[str, float]:
    """R@1/5/10 (percent), MdR, MnR (1-based) and RSum of the rows of square `sim`."""
    ranks = retrieval_ranks(sim)
    out = {f"R{k}": float(np.mean(ranks < k) * 100.0) for k in RECALL_AT}
    out["MdR"] = float(np.median(ranks) + 1)
    out["MnR"] = float(np.mean(ranks) + 1)
    out["RSum"] = sum(out[f"R{k}"] for k in RECALL_AT)
    return out


def t2v_v2t_metrics(sim) -> dict[str, float]:
    """Both directions of a [texts, videos] matrix: 't2v/<key>' from sim, 'v2t/<key>' from sim.T."""
    sim = np.asarray(sim, np.float64)
    t2v = retrieval_metrics(sim)
    v2t = retrieval_metrics(sim.T)
    return {**{f"t2v/{k}": v for k, v in t2v.items()}, **{f"v2t/{k}": v for k, v in v2t.items()}}
