import itertools
import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import f1_score, ndcg_score, precision_score, recall_score, roc_auc_score
from sklearn.metrics import log_loss as sk_log_loss

from pipeline.evaluation.metrics import (
    auc,
    calibration,
    gauc,
    log_loss,
    ndcg_at_k,
    precision_recall_f1_at_top,
    rela_impr,
    segment_auc,
)


def _grouped_data(seed, n_groups=150, max_size=14, positive_rate=0.3, decimals=1):
    """Random groups of 1..max_size rows; scores rounded to create many ties (within and across groups)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_size + 1, n_groups)
    groups = np.repeat(np.arange(n_groups) * 7 + 3, sizes)       # non-contiguous group ids
    perm = rng.permutation(len(groups))                           # rows of a group are interleaved
    groups = groups[perm]
    y = (rng.random(len(groups)) < positive_rate).astype(int)
    s = np.round(rng.random(len(groups)) + 0.3 * y, decimals)
    return y, s, groups, rng


# ---------------------------------------------------------------------------------------------- AUC

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(5000) < 0.1
    s = np.round(rng.random(5000) + 0.3 * y, 2)  # rounding creates many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_hand_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert auc([0, 1, 0, 1], [0.1, 0.4, 0.5, 0.8]) == 0.75
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


# --------------------------------------------------------------------------------------------- GAUC

def test_gauc_hand_case():
    # A: y=[1,0,0] s=[.9,.5,.95] -> pos beats .5, loses to .95          -> AUC_A = 1/2,  3 rows
    # B: y=[1,1,0,0] s=[.3,.6,.3,.1] -> (.3: tie .5 + 1) + (.6: 1 + 1) = 3.5/4 -> AUC_B = 0.875, 4 rows
    # C: y=[0,0] and D: y=[1] lack a class -> skipped
    # impressions: (3*0.5 + 4*0.875) / 7 = 5/7 ; uniform: (0.5 + 0.875) / 2 = 0.6875
    y = [1, 0, 0, 1, 1, 0, 0, 0, 0, 1]
    s = [.9, .5, .95, .3, .6, .3, .1, .2, .4, .7]
    g = ["A", "A", "A", "B", "B", "B", "B", "C", "C", "D"]
    r = gauc(y, s, g)
    assert r.value == pytest.approx(5 / 7, abs=1e-12)
    assert (r.n_groups, r.n_groups_total) == (2, 4)
    u = gauc(y, s, g, weight="uniform")
    assert u.value == pytest.approx(0.6875, abs=1e-12)
    assert u.n_groups == 2
    # the same rows shuffled give the same answer
    p = np.random.default_rng(0).permutation(len(y))
    assert gauc(np.array(y)[p], np.array(s)[p], np.array(g)[p]).value == pytest.approx(5 / 7, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weight", ["impressions", "uniform"])
def test_gauc_matches_per_group_sklearn_loop(seed, weight):
    y, s, groups, _ = _grouped_data(seed)
    num = den = 0.0
    used = 0
    for g in np.unique(groups):
        m = groups == g
        if len(set(y[m])) < 2:
            continue
        w = m.sum() if weight == "impressions" else 1.0
        num += w * roc_auc_score(y[m], s[m])
        den += w
        used += 1
    r = gauc(y, s, groups, weight=weight)
    assert used > 20
    assert r.value == pytest.approx(num / den, abs=1e-12)
    assert r.n_groups == used
    assert r.n_groups_total == len(np.unique(groups))


def test_gauc_no_usable_group():
    r = gauc([1, 1, 0], [0.1, 0.2, 0.3], [1, 1, 2])
    assert np.isnan(r.value) and r.n_groups == 0 and r.n_groups_total == 2


# -------------------------------------------------------------------------------------- segment AUC

def test_segment_auc_hand_case():
    # x: y=[1,0] s=[.8,.2] -> 1.0 ; y: y=[0,1,0] s=[.7,.4,.4] -> (0 + 0.5)/2 = 0.25 ; z: only negatives
    r = segment_auc([1, 0, 0, 1, 0, 0], [.8, .2, .7, .4, .4, .9], ["x", "x", "y", "y", "y", "z"])
    assert r.per_segment["x"] == 1.0
    assert r.per_segment["y"] == 0.25
    assert np.isnan(r.per_segment["z"])
    assert r.worst == ("y", 0.25)
    assert r.n_rows == {"x": 2, "y": 3, "z": 1}
    assert r.n_positives == {"x": 1, "y": 1, "z": 0}


@pytest.mark.parametrize("seed", [0, 1])
def test_segment_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    seg = rng.choice(np.array(["new", "active", "churning", "vip", "tiny"]), 3000, p=[.3, .3, .2, .199, .001])
    y = (rng.random(3000) < 0.15).astype(int)
    s = np.round(rng.random(3000) + 0.2 * y * (seg != "churning"), 2)
    r = segment_auc(y, s, seg)
    expected = {}
    for name in np.unique(seg):
        m = seg == name
        expected[str(name)] = roc_auc_score(y[m], s[m]) if len(set(y[m])) == 2 else float("nan")
        assert r.n_rows[str(name)] == m.sum()
    assert set(r.per_segment) == set(expected)
    for name, value in expected.items():
        if np.isnan(value):
            assert np.isnan(r.per_segment[name])
        else:
            assert r.per_segment[name] == pytest.approx(value, abs=1e-12)
    valid = {k: v for k, v in expected.items() if not np.isnan(v)}
    worst = min(valid, key=valid.get)
    assert r.worst[0] == worst and r.worst[1] == pytest.approx(valid[worst], abs=1e-12)


def test_segment_auc_keys_are_plain_python():
    r = segment_auc([1, 0, 1, 0], [.9, .1, .2, .8], np.array([3, 3, 5, 5]))
    assert r.per_segment == {3: 1.0, 5: 0.0}
    assert type(next(iter(r.per_segment))) is int
    assert r.worst == (5, 0.0)
    assert segment_auc([1, 1], [.1, .2], ["a", "b"]).worst is None


# --------------------------------------------------------------------------------------------- NDCG

def test_ndcg_hand_case():
    # u1: gains [1,0,1,0], scores [.9,.8,.3,.5], k=3 -> ranked gains 1,0,0 | 1 -> DCG = 1
    #     IDCG@3 = 1 + 1/log2(3) = 1.6309298 -> NDCG = 0.6131472
    # u2: gains [0,1] tied scores: pessimistic puts the 0 first -> 1/log2(3) = 0.6309298
    #     average: mean gain .5 * (1 + 1/log2(3)) = 0.8154649
    # u3: no positive gain -> excluded
    gains = [1, 0, 1, 0, 0, 1, 0, 0]
    scores = [.9, .8, .3, .5, .5, .5, .1, .2]
    groups = ["u1"] * 4 + ["u2"] * 2 + ["u3"] * 2
    u1 = 1 / (1 + 1 / math.log2(3))
    r = ndcg_at_k(gains, scores, groups, k=3)
    assert r.value == pytest.approx((u1 + 1 / math.log2(3)) / 2, abs=1e-12)      # 0.6220385
    assert (r.n_groups, r.n_groups_total) == (2, 3)
    a = ndcg_at_k(gains, scores, groups, k=3, ties="average")
    assert a.value == pytest.approx((u1 + 0.5 * (1 + 1 / math.log2(3))) / 2, abs=1e-12)  # 0.7143061
    # k=1: u1 top item is a positive -> 1 ; u2 pessimistic -> 0, average -> 0.5
    assert ndcg_at_k(gains, scores, groups, k=1).value == pytest.approx(0.5)
    assert ndcg_at_k(gains, scores, groups, k=1, ties="average").value == pytest.approx(0.75)


def test_ndcg_pessimistic_ties_do_not_depend_on_row_order():
    # a constant model: the positive is listed first in one log and last in the other
    first = ndcg_at_k([1, 0, 0], [0.5, 0.5, 0.5], [1, 1, 1], k=3).value
    last = ndcg_at_k([0, 0, 1], [0.5, 0.5, 0.5], [1, 1, 1], k=3).value
    assert first == last == pytest.approx(0.5)        # positive ranked 3rd: 1/log2(4) = 0.5


def _sklearn_group_ndcg(gains, scores, groups, k, strictify):
    """Mean over groups with a positive gain of sklearn's ndcg_score, one group at a time."""
    values = []
    for g in np.unique(groups):
        m = groups == g
        gn, sc = gains[m], scores[m]
        if gn.sum() <= 0:
            continue
        if len(gn) == 1:                 # sklearn refuses one document; NDCG of one relevant item is 1
            values.append(1.0)
            continue
        if strictify:                    # pessimistic tie-break made explicit: strictly ordered scores
            order = sorted(range(len(gn)), key=lambda i: (-sc[i], gn[i]))
            sc = np.empty(len(gn))
            sc[order] = -np.arange(len(gn), dtype=float)
        values.append(ndcg_score([gn], [sc], k=k))
    return float(np.mean(values)), len(values)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 5, 50])
@pytest.mark.parametrize("ties", ["pessimistic", "average"])
def test_ndcg_matches_sklearn_per_group(seed, k, ties):
    y, s, groups, rng = _grouped_data(seed)
    gains = y * rng.integers(1, 4, len(y))           # graded relevance 0..3
    expected, used = _sklearn_group_ndcg(gains, s, groups, k, strictify=(ties == "pessimistic"))
    r = ndcg_at_k(gains, s, groups, k, ties=ties)
    assert r.value == pytest.approx(expected, abs=1e-12)
    assert r.n_groups == used


def test_ndcg_ties_matter_on_this_data():
    # guard: the random data really has ties that change the result, so the tie tests can fail
    y, s, groups, rng = _grouped_data(0)
    gains = y * rng.integers(1, 4, len(y))
    assert ndcg_at_k(gains, s, groups, 3).value < ndcg_at_k(gains, s, groups, 3, ties="average").value - 1e-4


def test_ndcg_without_ties_equals_plain_sklearn():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(40), 12)
    gains = rng.integers(0, 3, len(groups)) * (rng.random(len(groups)) < 0.4)
    s = rng.random(len(groups))
    expected = np.mean([ndcg_score([gains[groups == g]], [s[groups == g]], k=4)
                        for g in range(40) if gains[groups == g].sum() > 0])
    assert ndcg_at_k(gains, s, groups, 4).value == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------- precision / recall@top

def test_precision_recall_f1_at_top_hand_case():
    y = [1, 0, 1, 0, 0, 1, 0, 0, 0, 0]
    s = [.9, .8, .7, .7, .6, .5, .4, .3, .2, .1]
    # top 30% = 3 rows:
    # .9(1) .8(0) and one of the tied .7 pair {1, 0}
    r = precision_recall_f1_at_top(y, s, 0.3)
    assert r.n_top == 3 and r.threshold == 0.7
    assert (r.true_positives, r.precision, r.recall, r.f1) == pytest.approx((1, 1 / 3, 1 / 3, 1 / 3))  # negative taken
    a = precision_recall_f1_at_top(y, s, 0.3, ties="average")
    assert (a.true_positives, a.precision, a.recall, a.f1) == pytest.approx((1.5, 0.5, 0.5, 0.5))       # half of the pair
    # top 50% = 5 rows: tp 2 -> P 0.4, R 2/3, F1 = 2*.4*(2/3)/(.4+2/3) = 0.5
    h = precision_recall_f1_at_top(y, s, 0.5)
    assert (h.n_top, h.precision, h.recall, h.f1) == pytest.approx((5, 0.4, 2 / 3, 0.5))
    # 1% of 10 rows rounds up to one row: the .9 positive -> P 1, R 1/3, F1 0.5
    o = precision_recall_f1_at_top(y, s, 0.01)
    assert (o.n_top, o.precision, o.recall, o.f1) == pytest.approx((1, 1.0, 1 / 3, 0.5))
    # everything: P = 3/10, R = 1
    e = precision_recall_f1_at_top(y, s, 1.0)
    assert (e.n_top, e.precision, e.recall) == pytest.approx((10, 0.3, 1.0))
    # 7% of 100 rows is 7 (0.07 * 100 == 7.000000000000001 in floats: must not become 8)
    assert precision_recall_f1_at_top(np.tile(y, 10), np.arange(100.0), 0.07).n_top == 7


def test_precision_recall_f1_at_top_degenerate():
    r = precision_recall_f1_at_top([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert r.precision == 0 and np.isnan(r.recall) and np.isnan(r.f1)
    z = precision_recall_f1_at_top([1, 0, 0], [0.1, 0.2, 0.3], 0.34)     # 2 rows, both negative
    assert (z.n_top, z.precision, z.recall, z.f1) == (2, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction", [0.001, 0.006, 0.01, 0.05, 0.37])
def test_precision_recall_f1_at_top_matches_sorted_loop_and_sklearn(seed, fraction):
    rng = np.random.default_rng(seed)
    n = 20011
    y = (rng.random(n) < 0.02).astype(int)
    s = np.round(rng.random(n) * 0.6 + 0.4 * y * rng.random(n), 2)       # heavy ties
    n_top = max(1, math.ceil(fraction * n))                             # no float noise at these values
    ranked = sorted(range(n), key=lambda i: (-s[i], y[i]))              # negatives first among ties
    pred = np.zeros(n, dtype=int)
    pred[ranked[:n_top]] = 1
    r = precision_recall_f1_at_top(y, s, fraction)
    assert r.n_top == n_top
    assert r.precision == pytest.approx(precision_score(y, pred), abs=1e-12)
    assert r.recall == pytest.approx(recall_score(y, pred), abs=1e-12)
    assert r.f1 == pytest.approx(f1_score(y, pred), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_precision_at_top_average_ties_is_expectation_over_all_orderings(seed):
    rng = np.random.default_rng(seed)
    n = 7
    y = (rng.random(n) < 0.45).astype(int)
    y[0] = 1
    s = rng.choice([0.2, 0.5, 0.9], n)
    for fraction in (0.15, 0.3, 0.5, 0.72):
        n_top = math.ceil(fraction * n)
        tps = []
        for perm in itertools.permutations(range(n)):                    # every tie order equally likely
            rank = sorted(range(n), key=lambda i: (-s[i], perm[i]))
            tps.append(sum(y[i] for i in rank[:n_top]))
        r = precision_recall_f1_at_top(y, s, fraction, ties="average")
        assert r.true_positives == pytest.approx(np.mean(tps), abs=1e-12)
        assert r.precision == pytest.approx(np.mean(tps) / n_top, abs=1e-12)
        assert r.recall == pytest.approx(np.mean(tps) / y.sum(), abs=1e-12)


# ------------------------------------------------------------------------------------------ RelaImpr

def test_rela_impr():
    # hand: ((0.75-.5)/(0.7-.5) - 1) * 100 = (1.25 - 1) * 100 = 25 ; ((.65-.5)/.2 - 1) * 100 = -25
    assert rela_impr(0.75, 0.7) == pytest.approx(25.0)
    assert rela_impr(0.65, 0.7) == pytest.approx(-25.0)
    assert rela_impr(0.7, 0.7) == 0.0
    # STAN Table 3 (industrial CTR AUC, base MLP_Single 0.7891): printed 1.63%, 6.05%, 8.65%
    assert rela_impr(0.7938, 0.7891) == pytest.approx(1.63, abs=0.005)
    assert rela_impr(0.8066, 0.7891) == pytest.approx(6.05, abs=0.005)
    assert rela_impr(0.8141, 0.7891) == pytest.approx(8.65, abs=0.005)
    # Eq. 16 (NDCG): baseline 0 -> (0.6/0.5 - 1) * 100 = 20
    assert rela_impr(0.6, 0.5, baseline=0.0) == pytest.approx(20.0)
    np.testing.assert_allclose(rela_impr(np.array([0.75, 0.65]), 0.7), [25.0, -25.0])
    with pytest.raises(ValueError, match="base_metric"):
        rela_impr(0.7, 0.5)


# --------------------------------------------------------------------------------------- calibration

def test_calibration_hand_case():
    # 2 uniform bins [0, .5] (.5, 1]:
    #   bin 0: p .05 .15 (y 0 1) -> mean p .1, rate .5, |.5 - .1| = .4, weight 2/5
    #   bin 1: p .55 .6 .95 (y 0 1 1) -> mean p .7, rate 2/3, |.6667 - .7| = 1/30, weight 3/5
    #   ECE = .4*.4 + .6/30 = .16 + .02 = .18
    r = calibration([0, 1, 0, 1, 1], [0.05, 0.15, 0.55, 0.6, 0.95], n_bins=2)
    assert r.ece == pytest.approx(0.18, abs=1e-12)
    np.testing.assert_allclose(r.mean_predicted, [0.1, 0.7])
    np.testing.assert_allclose(r.observed_rate, [0.5, 2 / 3])
    np.testing.assert_array_equal(r.count, [2, 3])
    np.testing.assert_allclose(r.bin_lower, [0.0, 0.5])
    np.testing.assert_allclose(r.bin_upper, [0.5, 1.0])
    # a probability on an inner edge belongs to the lower bin; empty bins are left out of the curve
    e = calibration([1, 0], [0.5, 0.5], n_bins=2)
    np.testing.assert_array_equal(e.count, [2])
    assert e.bin_upper[0] == 0.5 and e.ece == 0.0
    # perfectly calibrated in each bin -> 0 ; all-wrong confident predictions -> 1
    assert calibration([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]).ece == 0.0
    assert calibration([1, 0], [0.0, 1.0]).ece == pytest.approx(1.0)
    # quantile, 2 bins over p = .1 .2 .3 .4: the median interpolates to .25 -> edges [.1, .25, .4]
    #   bin 0: p .1 .2 (y 0 1) -> |.5 - .15| = .35 ; bin 1: p .3 .4 (y 1 1) -> |1 - .35| = .65 ; ECE = .5
    q = calibration([0, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], n_bins=2, strategy="quantile")
    np.testing.assert_allclose(q.edges, [0.1, 0.25, 0.4])
    np.testing.assert_allclose(q.mean_predicted, [0.15, 0.35])
    assert q.ece == pytest.approx(0.5, abs=1e-12)


def _brute_force_calibration(y, p, edges):
    bins = [[0, 0.0, 0.0] for _ in range(len(edges) - 1)]   # count, sum p, sum y
    for yi, pi in zip(y, p):
        b = 0
        while b < len(edges) - 2 and pi > edges[b + 1]:        # (lower, upper], first bin closed
            b += 1
        bins[b][0] += 1
        bins[b][1] += pi
        bins[b][2] += yi
    ece = sum(c / len(p) * abs(sy / c - sp / c) for c, sp, sy in bins if c)
    return ece, [(c, sp / c, sy / c) for c, sp, sy in bins if c]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("n_bins", [1, 7, 10, 25])
@pytest.mark.parametrize("decimals", [2, None])
def test_calibration_matches_brute_force_and_sklearn(seed, strategy, n_bins, decimals):
    rng = np.random.default_rng(seed)
    n = 3000
    p = rng.beta(0.6, 4.0, n)                                  # skewed
    if decimals is not None:
        p = np.round(p, decimals)                              # ties, values on bin edges, duplicate quantiles
    p[:5] = [0.0, 1.0, 0.1, 0.5, 0.3]
    y = (rng.random(n) < np.clip(1.3 * p, 0, 1)).astype(int)   # miscalibrated on purpose
    r = calibration(y, p, n_bins=n_bins, strategy=strategy)
    edges = np.linspace(0, 1, n_bins + 1) if strategy == "uniform" else np.percentile(p, np.linspace(0, 100, n_bins + 1))
    ece, curve = _brute_force_calibration(y, p, edges)
    assert r.ece == pytest.approx(ece, abs=1e-12)
    assert r.ece > 0.01
    np.testing.assert_array_equal(r.count, [c for c, _, _ in curve])
    np.testing.assert_allclose(r.mean_predicted, [m for _, m, _ in curve], atol=1e-12)
    np.testing.assert_allclose(r.observed_rate, [o for _, _, o in curve], atol=1e-12)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=n_bins, strategy=strategy)
    np.testing.assert_allclose(r.observed_rate, prob_true, atol=1e-12)
    np.testing.assert_allclose(r.mean_predicted, prob_pred, atol=1e-12)
    assert r.count.sum() == n


# ------------------------------------------------------------------------------------------ log loss

def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(1000) < 0.2
    p = rng.random(1000)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p), rel=1e-6)


# ---------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, match", [
    (lambda: gauc([1, 0], [0.1, 0.2, 0.3], [1, 1]), "scores"),
    (lambda: gauc([1, 0], [0.1, 0.2], [1]), "groups"),
    (lambda: gauc([], [], []), "labels"),
    (lambda: gauc([1, 0], [0.1, 0.2], [1, 1], weight="clicks"), "weight"),
    (lambda: gauc([2, 0], [0.1, 0.2], [1, 1]), "labels"),
    (lambda: gauc([1, 0], [np.nan, 0.2], [1, 1]), "scores"),
    (lambda: segment_auc([1, 0], [0.1, 0.2], ["a"]), "segments"),
    (lambda: segment_auc([], [], []), "labels"),
    (lambda: ndcg_at_k([1, 0], [0.1, 0.2], [1, 1], k=0), "k"),
    (lambda: ndcg_at_k([1, 0], [0.1, 0.2], [1, 1], k=2.5), "k"),
    (lambda: ndcg_at_k([1, 0], [0.1], [1, 1], k=1), "scores"),
    (lambda: ndcg_at_k([-1, 0], [0.1, 0.2], [1, 1], k=1), "labels_or_gains"),
    (lambda: ndcg_at_k([], [], [], k=1), "labels_or_gains"),
    (lambda: ndcg_at_k([1, 0], [0.1, 0.2], [1, 1], k=1, ties="random"), "ties"),
    (lambda: precision_recall_f1_at_top([1, 0], [0.1, 0.2], 0.0), "fraction"),
    (lambda: precision_recall_f1_at_top([1, 0], [0.1, 0.2], 1.5), "fraction"),
    (lambda: precision_recall_f1_at_top([1, 0], [0.1, 0.2], -0.1), "fraction"),
    (lambda: precision_recall_f1_at_top([1, 0], [0.1], 0.5), "scores"),
    (lambda: precision_recall_f1_at_top([], [], 0.5), "labels"),
    (lambda: calibration([1, 0], [0.1, 1.2]), "probs"),
    (lambda: calibration([1, 0], [-0.1, 0.2]), "probs"),
    (lambda: calibration([1, 0], [np.nan, 0.2]), "probs"),
    (lambda: calibration([1, 0], [0.1]), "probs"),
    (lambda: calibration([], []), "labels"),
    (lambda: calibration([1, 0], [0.1, 0.2], n_bins=0), "n_bins"),
    (lambda: calibration([1, 0], [0.1, 0.2], strategy="kmeans"), "strategy"),
    (lambda: log_loss([1, 0], [0.1]), "probs"),
    (lambda: log_loss([], []), "labels"),
    (lambda: auc([1, 0], [0.1]), "differ in length"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_normalized_mutual_info_matches_sklearn():
    from sklearn.metrics import normalized_mutual_info_score

    from pipeline.evaluation.metrics import normalized_mutual_info

    rng = np.random.default_rng(7)
    t = rng.integers(0, 5, 2000)
    a = np.where(rng.random(2000) < 0.6, t * 3 % 7, rng.integers(0, 7, 2000))   # partly informative, renamed
    assert normalized_mutual_info(t, a) == pytest.approx(normalized_mutual_info_score(t, a), abs=1e-12)
    assert normalized_mutual_info(t, (t + 2) % 5) == pytest.approx(1.0)
    assert normalized_mutual_info(np.zeros(10), np.zeros(10)) == 1.0
    with pytest.raises(ValueError, match="assigned"):
        normalized_mutual_info(t, a[:-1])
