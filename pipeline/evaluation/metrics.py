"""Offline ranking metrics computed in numpy (independent of TensorFlow's streaming approximations).

Every function takes flat array-likes of equal length and is vectorised (one or two sorts, then
``np.bincount``); none loops over groups in Python.

Conventions shared by all functions:

* ``labels`` are binary (0/1 or bool). ``auc`` and ``log_loss`` keep their historical leniency; the
  other functions raise ``ValueError`` for any label outside {0, 1}.
* Bad input raises ``ValueError`` whose message starts with the offending argument's name: lengths that
  differ, empty arrays, NaN scores, ``fraction`` outside (0, 1], ``k`` < 1, probabilities outside [0, 1]
  (``calibration``), unknown ``weight`` / ``ties`` / ``strategy``.
  Exception kept for compatibility: ``auc`` of empty input returns NaN (the evaluation report prints it
  beside ``n = 0``) like any other input with a single class.
* Ties in scores. ``auc``, ``gauc`` and ``segment_auc`` give tied scores the average rank (a tied
  positive/negative pair counts 1/2), which equals the expected AUC over random orderings of the ties.
  The top-k style metrics (``ndcg_at_k``, ``precision_recall_f1_at_top``) take ``ties=``:

  - ``"pessimistic"`` (default): among equal scores the items with the *lower* label/gain are ranked
    first, so a model never gains from a tie (a constant model gets the worst case) and the result does
    not depend on the order of the rows (logs are often sorted by display position, which would reward a
    row-order tie-break).
  - ``"average"``: the expectation over all orderings of the tied items (for NDCG this is
    ``sklearn.metrics.ndcg_score``'s default, McSherry & Najork 2008; for the top fraction, the tied run
    that straddles the cut-off contributes its positive rate times the remaining slots).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

_TIES = ("pessimistic", "average")


# --------------------------------------------------------------------------------------------------
# validation helpers

def _flat(name: str, values, dtype=np.float64) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=dtype).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot be read as {np.dtype(dtype).name} values ({e})") from None
    if arr.size == 0:
        raise ValueError(f"{name}: empty array")
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    """Raises naming the first argument whose length differs from the first argument's."""
    names = list(arrays)
    ref = len(arrays[names[0]])
    for name in names[1:]:
        if len(arrays[name]) != ref:
            raise ValueError(f"{name}: length {len(arrays[name])} differs from {names[0]} ({ref})")


def _binary_labels(labels, name: str = "labels") -> np.ndarray:
    y = _flat(name, labels)
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        raise ValueError(f"{name}: must be 0/1, found {float(y[bad][0])!r} at index {int(np.flatnonzero(bad)[0])}")
    return y


def _scores(scores, name: str = "scores") -> np.ndarray:
    s = _flat(name, scores)
    if np.isnan(s).any():
        raise ValueError(f"{name}: contains NaN at index {int(np.flatnonzero(np.isnan(s))[0])}")
    return s


def _group_codes(groups, name: str = "groups") -> Tuple[np.ndarray, np.ndarray]:
    """(unique group values in sorted order, integer code per row)."""
    g = np.asarray(groups).reshape(-1)
    if g.size == 0:
        raise ValueError(f"{name}: empty array")
    try:
        uniques, codes = np.unique(g, return_inverse=True)
    except TypeError as e:
        raise ValueError(f"{name}: values cannot be compared/sorted ({e})") from None
    return uniques, codes.reshape(-1)


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _py(value: Any) -> Any:
    """numpy scalar -> plain Python value (for dictionary keys)."""
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------------------------------
# AUC family

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


def _grouped_auc(y: np.ndarray, s: np.ndarray, codes: np.ndarray, n_groups: int):
    """Per-group rank-sum AUC (ties averaged) in one sort.

    Returns (auc per group, NaN where a group lacks a class; rows per group; positives per group).
    """
    order = np.lexsort((s, codes))                      # by group, then score ascending
    gs, ss, ys = codes[order], s[order], y[order]
    n = len(ys)
    new_run = np.r_[True, (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], n]
    mean_pos = (0.5 * (starts + ends - 1))[np.cumsum(new_run) - 1]   # 0-based, averaged over ties
    counts = np.bincount(gs, minlength=n_groups)
    group_start = np.r_[0, np.cumsum(counts)[:-1]]
    rank_in_group = mean_pos - group_start[gs] + 1.0                  # 1-based rank within the group
    n_pos = np.bincount(gs, weights=ys, minlength=n_groups)
    rank_sum = np.bincount(gs, weights=rank_in_group * ys, minlength=n_groups)
    n_neg = counts - n_pos
    both = (n_pos > 0) & (n_neg > 0)
    out = np.full(n_groups, np.nan)
    out[both] = (rank_sum[both] - n_pos[both] * (n_pos[both] + 1) / 2.0) / (n_pos[both] * n_neg[both])
    return out, counts, n_pos.astype(np.int64)


@dataclass(frozen=True)
class GroupedMetric:
    """A metric averaged over groups (users, requests).

    ``value``: the average (NaN when no group qualifies); ``n_groups``: groups that entered the average;
    ``n_groups_total``: distinct groups in the input (the rest were skipped: a single class for GAUC, no
    positive gain for NDCG).
    """
    value: float
    n_groups: int
    n_groups_total: int


def gauc(labels, scores, groups, weight: str = "impressions") -> GroupedMetric:
    """Group AUC (ESM² Eq. 13): sum_u w_u AUC_u / sum_u w_u over groups holding both classes.

    ``weight="impressions"``: w_u = rows of group u (the default here); ``"uniform"``: w_u = 1 (what the
    ESM² paper reports). Per-group AUC is the rank-sum AUC with ties averaged, as in ``auc``.
    Returns a ``GroupedMetric`` (value, groups used, groups in the input).
    """
    _check_choice("weight", weight, ("impressions", "uniform"))
    y = _binary_labels(labels)
    s = _scores(scores)
    uniques, codes = _group_codes(groups)
    _same_length(labels=y, scores=s, groups=codes)
    per_group, counts, _ = _grouped_auc(y, s, codes, len(uniques))
    used = ~np.isnan(per_group)
    if not used.any():
        return GroupedMetric(float("nan"), 0, len(uniques))
    w = counts[used].astype(np.float64) if weight == "impressions" else np.ones(int(used.sum()))
    return GroupedMetric(float(np.dot(w, per_group[used]) / w.sum()), int(used.sum()), len(uniques))


@dataclass(frozen=True)
class SegmentAUC:
    """``per_segment``: segment -> AUC (NaN when the segment lacks a class); ``n_rows`` / ``n_positives``:
    segment -> counts; ``worst``: (segment, AUC) with the lowest AUC among segments holding both classes
    (the first in sorted segment order on equal AUC), or None when no segment has both classes."""
    per_segment: Dict[Any, float]
    n_rows: Dict[Any, int]
    n_positives: Dict[Any, int]
    worst: Optional[Tuple[Any, float]]


def segment_auc(labels, scores, segments) -> SegmentAUC:
    """AUC within each segment (business segment, scenario, ...) and the worst segment."""
    y = _binary_labels(labels)
    s = _scores(scores)
    uniques, codes = _group_codes(segments, "segments")
    _same_length(labels=y, scores=s, segments=codes)
    per_group, counts, n_pos = _grouped_auc(y, s, codes, len(uniques))
    keys = [_py(u) for u in uniques]
    valid = np.flatnonzero(~np.isnan(per_group))
    worst = None
    if valid.size:
        i = int(valid[np.argmin(per_group[valid])])        # argmin: first of equal minima
        worst = (keys[i], float(per_group[i]))
    return SegmentAUC(
        per_segment={k: float(a) for k, a in zip(keys, per_group)},
        n_rows={k: int(c) for k, c in zip(keys, counts)},
        n_positives={k: int(p) for k, p in zip(keys, n_pos)},
        worst=worst,
    )


def rela_impr(model_metric: float, base_metric: float, baseline: float = 0.5) -> float:
    """RelaImpr in percent (STAN Eq. 15): ((model - 0.5) / (base - 0.5) - 1) * 100.

    E.g. STAN's industrial CTR AUC 0.8141 over the MLP_Single base 0.7891 gives 8.65 (Table 3: 8.65%).
    ``baseline`` is the random guesser's value (0.5 for AUC/GAUC); ``baseline=0`` gives the NDCG form
    (Eq. 16). Works elementwise on arrays.
    """
    m = np.asarray(model_metric, dtype=np.float64)
    b = np.asarray(base_metric, dtype=np.float64)
    if np.any(b == baseline):
        raise ValueError(f"base_metric: equals the random baseline {baseline}; RelaImpr is undefined")
    out = ((m - baseline) / (b - baseline) - 1.0) * 100.0
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------------------------------
# top-k metrics

def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: must be an integer >= 1, got {k!r}")
    return int(k)


def ndcg_at_k(labels_or_gains, scores, groups, k: int, ties: str = "pessimistic") -> GroupedMetric:
    """Mean NDCG@k over groups (users or requests) with at least one positive gain.

    DCG@k = sum_{i<k} gain_(i) / log2(i + 2) over the group's rows ranked by score descending; gains are
    used linearly as given (binary labels, or graded relevance; pass ``2**rel - 1`` for exponential
    gains) and must be >= 0. IDCG@k ranks by gain. A group shorter than k uses all its rows. Groups whose
    gains are all zero (IDCG = 0) are excluded; the groups used are averaged with equal weight.
    Ties in scores: see the module docstring (``"pessimistic"``: lower gain first among equal scores;
    ``"average"``: expectation over tie orderings, = sklearn's ``ndcg_score`` default).
    Returns a ``GroupedMetric`` (value, groups used, groups in the input).
    """
    k = _check_k(k)
    _check_choice("ties", ties, _TIES)
    gain = _flat("labels_or_gains", labels_or_gains)
    if not np.isfinite(gain).all() or (gain < 0).any():
        raise ValueError("labels_or_gains: must be finite and >= 0")
    s = _scores(scores)
    uniques, codes = _group_codes(groups)
    _same_length(labels_or_gains=gain, scores=s, groups=codes)
    n_groups = len(uniques)
    counts = np.bincount(codes, minlength=n_groups)
    group_start = np.r_[0, np.cumsum(counts)[:-1]]

    def discounts(sorted_codes: np.ndarray) -> np.ndarray:
        pos = np.arange(len(sorted_codes)) - group_start[sorted_codes]     # 0-based rank within group
        return np.where(pos < k, 1.0 / np.log2(pos + 2.0), 0.0)

    # Ranking by the model: group, score descending, then (pessimistic) gain ascending.
    order = np.lexsort((gain, -s, codes))
    gs, ss, gn = codes[order], s[order], gain[order]
    disc = discounts(gs)
    if ties == "average":
        new_run = np.r_[True, (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])]
        run = np.cumsum(new_run) - 1
        gn = (np.bincount(run, weights=gn) / np.bincount(run))[run]       # tied rows share the mean gain
    dcg = np.bincount(gs, weights=gn * disc, minlength=n_groups)

    ideal = np.lexsort((-gain, codes))
    idcg = np.bincount(codes[ideal], weights=gain[ideal] * discounts(codes[ideal]), minlength=n_groups)

    used = idcg > 0
    if not used.any():
        return GroupedMetric(float("nan"), 0, n_groups)
    return GroupedMetric(float(np.mean(dcg[used] / idcg[used])), int(used.sum()), n_groups)


@dataclass(frozen=True)
class TopFractionResult:
    """Precision / recall / F1 of "the top ``n_top`` impressions by score are predicted positive".

    ``threshold``: the lowest score inside the top set. ``true_positives`` may be fractional with
    ``ties="average"``. ``recall`` (and so ``f1``) is NaN when there are no positives; ``f1`` is 0 when
    precision and recall are both 0.
    """
    precision: float
    recall: float
    f1: float
    n_top: int
    true_positives: float
    threshold: float


def precision_recall_f1_at_top(labels, scores, fraction: float, ties: str = "pessimistic") -> TopFractionResult:
    """ESM² Tables 4-5: sort impressions by score descending, call the top ``fraction`` positive.

    ``n_top = max(1, ceil(fraction * N))`` (the product is first rounded to 9 decimals so that float noise
    such as 0.07 * 100 = 7.000000000000001 does not add a row). Ties at the cut-off: see the module
    docstring (``"pessimistic"``: negatives enter the top set first; ``"average"``: expected counts).
    """
    if isinstance(fraction, (bool, np.bool_)) or not isinstance(fraction, (int, float, np.integer, np.floating)) \
            or not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"fraction: must be a number in (0, 1], got {fraction!r}")
    _check_choice("ties", ties, _TIES)
    y = _binary_labels(labels)
    s = _scores(scores)
    _same_length(labels=y, scores=s)
    n = len(y)
    n_top = max(1, int(math.ceil(round(float(fraction) * n, 9))))
    order = np.lexsort((y, -s))                # score descending, negatives first among equal scores
    threshold = float(s[order[n_top - 1]])
    if ties == "pessimistic":
        tp = float(y[order[:n_top]].sum())
    else:
        above = s > threshold
        tied = s == threshold
        tp = float(y[above].sum() + (n_top - above.sum()) * y[tied].sum() / tied.sum())
    n_pos = float(y.sum())
    precision = tp / n_top
    recall = tp / n_pos if n_pos > 0 else float("nan")
    if np.isnan(recall):
        f1 = float("nan")
    elif precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return TopFractionResult(precision, recall, f1, n_top, tp, threshold)


# --------------------------------------------------------------------------------------------------
# probabilities

def log_loss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps]."""
    y = _flat("labels", labels)
    p = _flat("probs", probs)
    _same_length(labels=y, probs=p)
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@dataclass(frozen=True)
class CalibrationResult:
    """Expected calibration error and the reliability curve.

    The curve lists the non-empty bins in increasing order (as ``sklearn.calibration.calibration_curve``
    does): ``bin_lower``/``bin_upper`` edges, ``mean_predicted`` (mean probability), ``observed_rate``
    (mean label) and ``count``. ``edges`` holds all ``n_bins + 1`` edges.
    """
    ece: float
    bin_lower: np.ndarray
    bin_upper: np.ndarray
    mean_predicted: np.ndarray
    observed_rate: np.ndarray
    count: np.ndarray
    edges: np.ndarray


def calibration(labels, probs, n_bins: int = 10, strategy: str = "uniform") -> CalibrationResult:
    """ECE = sum_b n_b / N * |mean(y_b) - mean(p_b)| and the reliability curve.

    ``strategy="uniform"``: ``n_bins`` equal-width bins on [0, 1]; ``"quantile"``: edges at the
    ``np.percentile`` quantiles of ``probs`` (equal counts up to ties; duplicate edges leave empty bins,
    which are dropped). Bin assignment is sklearn's: ``np.searchsorted(edges[1:-1], p)``, i.e. a bin is
    (lower, upper] except the first, which also holds its lower edge.
    """
    if isinstance(n_bins, (bool, np.bool_)) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins: must be an integer >= 1, got {n_bins!r}")
    _check_choice("strategy", strategy, ("uniform", "quantile"))
    y = _binary_labels(labels)
    p = _flat("probs", probs)
    _same_length(labels=y, probs=p)
    outside = ~((p >= 0) & (p <= 1))                          # also catches NaN
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(f"probs: must lie in [0, 1], found {float(p[i])!r} at index {i}")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        edges = np.percentile(p, np.linspace(0.0, 100.0, n_bins + 1))
    ids = np.searchsorted(edges[1:-1], p)
    count = np.bincount(ids, minlength=n_bins)
    sum_p = np.bincount(ids, weights=p, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y, minlength=n_bins)
    nz = count > 0
    mean_p = sum_p[nz] / count[nz]
    rate = sum_y[nz] / count[nz]
    ece = float(np.sum(count[nz] / len(p) * np.abs(rate - mean_p)))
    idx = np.flatnonzero(nz)
    return CalibrationResult(ece, edges[idx], edges[idx + 1], mean_p, rate, count[nz], edges)


# --------------------------------------------------------------------------------------------------
# clustering

def normalized_mutual_info(truth, assigned) -> float:
    """NMI of two labelings with the arithmetic-mean normaliser: I(T; A) / ((H(T) + H(A)) / 2).

    Used to check that a model's latent assignments (e.g. MUSENET's scenarios) recover the generator's
    hidden ones; 1 = the same partition up to renaming, 0 = independent. Equals
    ``sklearn.metrics.normalized_mutual_info_score`` (average_method="arithmetic"); two single-cluster
    labelings give 1.
    """
    t_keys, t = _group_codes(truth, "truth")
    a_keys, a = _group_codes(assigned, "assigned")
    _same_length(truth=t, assigned=a)
    n = len(t)
    joint = np.bincount(t * len(a_keys) + a, minlength=len(t_keys) * len(a_keys)).reshape(len(t_keys), len(a_keys))
    p = joint / n
    pt, pa = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(pt, pa)[nz])))
    ht = float(-np.sum(pt[pt > 0] * np.log(pt[pt > 0])))
    ha = float(-np.sum(pa[pa > 0] * np.log(pa[pa > 0])))
    if ht == 0.0 and ha == 0.0:
        return 1.0
    return float(max(0.0, mi) / ((ht + ha) / 2.0))
