"""The evaluation report: each figure checked against scikit-learn or a brute-force computation."""
import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline.evaluation import evaluate as ev


def _data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    true_ctr = rng.uniform(0.02, 0.4, n)
    click = (rng.random(n) < true_ctr).astype(np.int64)
    true_cvr = rng.uniform(0.05, 0.6, n)
    purchase = (click & (rng.random(n) < true_cvr)).astype(np.int64)
    noisy = lambda p: np.clip(p + rng.normal(0, 0.1, n), 0.001, 0.999)  # noqa: E731
    preds = {"ctr": noisy(true_ctr), "cvr": noisy(true_cvr), "ctcvr": noisy(true_ctr * true_cvr),
             "scenario": rng.dirichlet(np.ones(4), n)}  # a multi-column output is carried, not scored
    users = rng.integers(0, 120, n)
    users[:50] = -1                                   # OOV bucket rows: not a user
    labels = {"click": click, "purchase": purchase, "true_ctr": true_ctr, "true_cvr": true_cvr,
              "true_ctcvr": true_ctr * true_cvr, ev.USER_KEY: users,
              ev.SEGMENT_KEY: np.array(["a", "b", "c"], dtype=object)[rng.integers(0, 3, n)]}
    return preds, labels


def test_report_matches_independent_implementations():
    preds, labels = _data()
    report = ev.evaluate(preds, labels)
    assert set(report) == {"ctr", "cvr", "cvr_entire", "ctcvr"}   # no ctavr output, no scenario task
    y, s = labels["click"], preds["ctr"]
    ctr = report["ctr"]
    assert ctr["auc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert ctr["logloss"] == pytest.approx(skm.log_loss(y, s), rel=1e-9)
    assert ctr["oracle_auc"] == pytest.approx(skm.roc_auc_score(y, labels["true_ctr"]), abs=1e-12)

    # GAUC by brute force over users holding both classes, OOV rows (-1) left out.
    users = labels[ev.USER_KEY]
    per, w = [], []
    for u in np.unique(users[users >= 0]):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            per.append(skm.roc_auc_score(y[m], s[m]))
            w.append(m.sum())
    assert ctr["gauc"] == pytest.approx(np.average(per, weights=w), abs=1e-12)
    assert ctr["gauc_uniform"] == pytest.approx(np.mean(per), abs=1e-12)
    assert ctr["gauc_users"] == len(per)

    # Per-segment AUC and the worst segment.
    seg = labels[ev.SEGMENT_KEY]
    expected = {k: skm.roc_auc_score(y[seg == k], s[seg == k]) for k in ("a", "b", "c")}
    assert ctr["segment_auc"] == pytest.approx(expected, abs=1e-12)
    worst = min(expected, key=expected.get)
    assert ctr["worst_segment"][0] == worst

    # Top 10%: precision and recall by sorting.
    top = np.argsort(-s, kind="mergesort")[: int(np.ceil(0.1 * len(s)))]
    assert ctr["precision@10%"] == pytest.approx(y[top].mean(), abs=1e-12)
    assert ctr["recall@10%"] == pytest.approx(y[top].sum() / y.sum(), abs=1e-12)


def test_cvr_is_judged_on_clicks_and_over_the_entire_space():
    preds, labels = _data(seed=1)
    report = ev.evaluate(preds, labels)
    clicked = labels["click"] > 0
    assert report["cvr"]["n"] == clicked.sum()
    assert report["cvr"]["auc"] == pytest.approx(
        skm.roc_auc_score(labels["purchase"][clicked], preds["cvr"][clicked]), abs=1e-12)
    assert report["cvr_entire"]["n"] == len(clicked)
    assert report["cvr_entire"]["auc"] == pytest.approx(skm.roc_auc_score(labels["purchase"], preds["cvr"]), abs=1e-12)


def test_roc_curve_agrees_with_sklearn_at_its_thresholds():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.3 * y, 2)        # rounded: many tied scores
    curve = ev.roc_curve(y, s, points=201)
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(curve["tpr"], np.interp(curve["fpr"], fpr, tpr), atol=1e-12)
    # The area under the resampled curve approaches the AUC.
    assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(skm.roc_auc_score(y, s), abs=5e-3)


def test_calibration_of_the_oracle_beats_a_miscalibrated_model():
    preds, labels = _data(n=20000, seed=2)
    preds["ctr"] = np.clip(labels["true_ctr"] * 1.8, 0, 1)        # same ranking, probabilities too high
    report = ev.evaluate(preds, labels)
    assert report["ctr"]["auc"] == pytest.approx(report["ctr"]["oracle_auc"], abs=1e-9)
    assert report["ctr"]["ece"] > 0.1 > report["ctr"]["oracle"]["ece"]


def test_format_report_shows_model_and_oracle():
    preds, labels = _data()
    text = ev.format_report(ev.evaluate(preds, labels))
    auc = ev.evaluate(preds, labels)["ctr"]["auc"]
    assert f"{auc:.4f}" in text and "oracle" in text and "cvr_entire" in text


def test_eval_config_is_validated():
    with pytest.raises(ValueError, match="top_fraction"):
        ev.EvalConfig(top_fraction=0)


def test_latent_assignments_are_scored_by_nmi():
    preds, labels = _data(seed=4)
    n = len(labels["click"])
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, n)
    labels["true_scenario"] = truth
    dist = np.full((n, 4), 0.1)
    dist[np.arange(n), (truth + 1) % 4] = 0.7          # the right partition under other names
    preds["scenario"] = dist
    report = ev.evaluate(preds, labels)
    assert report["scenario"]["nmi"] == pytest.approx(1.0)
    preds["scenario"] = rng.dirichlet(np.ones(4), n)    # unrelated assignments
    report = ev.evaluate(preds, labels)
    assert report["scenario"]["nmi"] == pytest.approx(
        skm.normalized_mutual_info_score(truth, preds["scenario"].argmax(1)), abs=1e-12)
    assert report["scenario"]["nmi"] < 0.05
    assert "NMI" in ev.format_report(report)


def test_few_event_users_slice():
    preds, labels = _data(seed=5)
    n = len(labels["click"])
    labels[ev.PRIOR_EVENTS_KEY] = np.random.default_rng(1).integers(0, 30, n).astype(np.float32)
    report = ev.evaluate(preds, labels, ev.EvalConfig(few_events=5))
    few = labels[ev.PRIOR_EVENTS_KEY] < 5
    assert report["ctr"]["few_events_rows"] == few.sum()
    assert report["ctr"]["few_events_auc"] == pytest.approx(
        skm.roc_auc_score(labels["click"][few], preds["ctr"][few]), abs=1e-12)
    assert report["ctr"]["oracle"]["few_events_auc"] == pytest.approx(
        skm.roc_auc_score(labels["click"][few], labels["true_ctr"][few]), abs=1e-12)


def test_worst_segment_ignores_segments_too_small_for_a_stable_auc():
    preds, labels = _data(seed=6)
    n = len(labels["click"])
    seg = np.array(["big"] * n, dtype=object)
    tiny = np.flatnonzero(labels["click"] == 1)[:3]
    seg[tiny] = "tiny"                                   # three positives only
    seg[np.flatnonzero(labels["click"] == 0)[:40]] = "tiny"
    labels[ev.SEGMENT_KEY] = seg
    report = ev.evaluate(preds, labels, ev.EvalConfig(min_segment_class_rows=30))
    assert "tiny" in report["ctr"]["segment_auc"]
    assert report["ctr"]["worst_segment"][0] == "big"
    report = ev.evaluate(preds, labels, ev.EvalConfig(min_segment_class_rows=3))
    expected = min(report["ctr"]["segment_auc"].items(), key=lambda kv: kv[1])
    assert report["ctr"]["worst_segment"] == [expected[0], pytest.approx(expected[1])]
