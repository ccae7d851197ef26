"""Shared helpers of the light planted-truth tests."""
import numpy as np


def rank_auc(y, s) -> float:
    """Mann-Whitney AUC of scores ``s`` for binary labels ``y``, tied scores given their mean rank."""
    y, s = np.asarray(y).reshape(-1).astype(bool), np.asarray(s).reshape(-1)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = (first + (counts + 1) / 2)[inverse]
    n_pos = y.sum()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos)))
