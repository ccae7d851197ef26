"""Shared helpers of the light planted-truth tests."""
import numpy as np
import tensorflow as tf


def rank_auc(y, s) -> float:
    """Mann-Whitney AUC of scores ``s`` for binary labels ``y``, tied scores given their mean rank."""
    y, s = np.asarray(y).reshape(-1).astype(bool), np.asarray(s).reshape(-1)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = (first + (counts + 1) / 2)[inverse]
    n_pos = y.sum()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos)))


def running_means(user, labels):
    """``pl_<name>`` for every label: each row's user's mean of that label over the user's earlier rows (rows in
    time order), 0 for a user's first row. The leakage-safe targets of STAN's Eq. 10."""
    user = np.asarray(user).reshape(-1)
    out = {}
    for name, values in labels.items():
        total, count, pl = {}, {}, np.zeros(len(user))
        for i, (u, y) in enumerate(zip(user, np.asarray(values).reshape(-1))):
            pl[i] = total[u] / count[u] if count.get(u) else 0.0
            total[u], count[u] = total.get(u, 0.0) + y, count.get(u, 0) + 1
        out[f"pl_{name}"] = pl
    return out


def column(values, dtype):
    """``values`` as a [B, 1] tensor of ``dtype``, the models' input layout."""
    return tf.constant(np.asarray(values).reshape(-1, 1).astype(dtype))
