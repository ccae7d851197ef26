"""The validation gate: the verdict rule on hand-made reports, and real exports judged on the same raw rows."""
import os

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from pipeline.evaluation import gate as G


def _report(auc, logloss, ece=0.01, tasks=("ctr", "ctcvr"), positives=100):
    return {t: {"auc": auc, "logloss": logloss, "ece": ece, "positives": positives} for t in tasks}


def test_candidate_at_least_as_good_is_blessed_and_a_worse_one_refused_with_reasons():
    cfg = G.GateConfig(auc_tolerance=0.005, logloss_tolerance=0.02, max_ece=0.05, min_auc=0.55)
    champion = _report(0.80, 0.200)
    assert G.judge(_report(0.796, 0.203), champion, cfg)["blessed"]           # within both tolerances
    worse = G.judge(_report(0.79, 0.200), champion, cfg)                       # 0.010 AUC lost > 0.005
    assert not worse["blessed"]
    assert worse["reasons"] == ["ctr AUC 0.7900, needs >= 0.7950", "ctcvr AUC 0.7900, needs >= 0.7950"]
    looser = G.judge(_report(0.80, 0.2041), champion, cfg)                     # LogLoss +2.05% > 2%
    assert looser["reasons"][0] == "ctr LogLoss 0.2041, needs <= 0.2040"
    uncalibrated = G.judge(_report(0.81, 0.19, ece=0.06), champion, cfg)
    assert uncalibrated["reasons"][0] == "ctr ECE 0.0600, needs <= 0.0500"
    text = G.format_verdict(worse)
    assert "REFUSED" in text and "0.8000" in text and "0.7900" in text


def test_tasks_with_too_few_positives_are_not_judged_but_the_main_task_always_is():
    cand, champ = _report(0.70, 0.3, positives=12), _report(0.80, 0.2, positives=12)
    verdict = G.judge(cand, champ, G.GateConfig(min_positives=30))
    assert set(verdict["skipped"]) == {"ctcvr"} and "12 positives" in verdict["skipped"]["ctcvr"]
    assert not verdict["blessed"] and all(r.startswith("ctr ") for r in verdict["reasons"])
    assert G.judge(_report(0.80, 0.2, positives=12), champ, G.GateConfig(min_positives=30))["blessed"]


def test_first_model_is_judged_against_the_floors_only():
    assert G.judge(_report(0.60, 5.0), None)["blessed"]
    refused = G.judge(_report(0.52, 0.1), None)
    assert not refused["blessed"] and refused["reasons"][0] == "ctr AUC 0.5200, needs >= 0.5500"
    assert {c["metric"] for c in refused["checks"]} == {"auc_floor", "ece"}


@pytest.fixture(scope="module")
def exports(e2e_run, tmp_path_factory):
    """The e2e run's trained ESM² export and an untrained ESM² (same transform graph) exported beside it."""
    import pyarrow.parquet as pq
    import tensorflow_transform as tft

    from pipeline.training.train import model_inputs
    from serving.export import export_saved_model
    from tests.serving.conftest import _build_esm2
    from transforms.features import BUILTIN

    tft_dir = os.path.join(e2e_run["work_dir"], "preprocessed", "transform_fn_output")
    untrained = _build_esm2(model_inputs(BUILTIN, tft.TFTransformOutput(tft_dir)))
    base = str(tmp_path_factory.mktemp("gate"))
    random_dir = export_saved_model(untrained, tft_dir, BUILTIN, base, "esm2")
    data_dir = e2e_run["summary"]["input"]["dir"]
    rows = pq.read_table(os.path.join(data_dir, "part-00000.parquet")).slice(0, 3000).to_pylist()
    return {"trained": e2e_run["summary"]["export"], "untrained": random_dir, "rows": rows}


def test_exports_judged_on_the_same_raw_rows(exports):
    import tensorflow as tf

    from serving.examples import serialize_rows
    from transforms.features import BUILTIN

    rows = exports["rows"]
    refused = G.gate(exports["untrained"], exports["trained"], rows, BUILTIN)
    assert not refused["blessed"] and any(r.startswith("ctr AUC") for r in refused["reasons"])
    blessed = G.gate(exports["trained"], exports["untrained"], rows, BUILTIN,
                     G.GateConfig(max_ece=1.0, min_auc=0.5))
    assert blessed["blessed"], blessed["reasons"]
    # the CTR figures recomputed independently: the SavedModel called directly, sklearn on the raw labels
    fn = tf.saved_model.load(exports["trained"]).signatures["serving_default"]
    ctr = fn(examples=tf.constant(serialize_rows(rows, BUILTIN)))["ctr"].numpy().reshape(-1)
    clicks = np.array([r["click"] for r in rows])
    report = blessed["candidate_report"]["ctr"]
    assert report["auc"] == pytest.approx(roc_auc_score(clicks, ctr), abs=1e-6)
    assert report["logloss"] == pytest.approx(log_loss(clicks, np.clip(ctr, 1e-7, 1 - 1e-7)), rel=1e-4)
    assert report["n"] == len(rows) and report["positives"] == clicks.sum()
    assert refused["champion_report"]["ctr"]["auc"] == pytest.approx(report["auc"])
