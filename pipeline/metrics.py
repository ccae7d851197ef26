"""Offline ranking metrics computed in numpy (independent of TensorFlow's streaming approximations)."""
from __future__ import annotations

import numpy as np


def auc(labels, scores) -> float:
    """Exact ROC AUC by the rank-sum (Mann-Whitney U) formula, ties given the average rank.

    Returns NaN when only one class is present.
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Average ranks (1-based) over runs of equal scores, vectorised.
    new_run = np.r_[True, sorted_s[1:] != sorted_s[:-1]]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = (0.5 * (starts + ends - 1) + 1.0)[np.cumsum(new_run) - 1]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels, probs, eps: float = 1e-7) -> float:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
