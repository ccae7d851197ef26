"""A small end-to-end run: built-in data -> Beam/TFT -> ESM² -> SavedModel -> scoring."""
import json
import math
import os

import numpy as np


def test_run_reports_aucs_beside_oracle(e2e_run):
    report = e2e_run["summary"]["eval"]
    assert set(report) == {"ctr", "ctavr", "cvr", "cvr_entire", "ctcvr"}
    ctr = report["ctr"]
    assert 0.6 < ctr["auc"] <= 1.0, ctr  # learned something from ~5k rows
    assert ctr["oracle_auc"] > ctr["auc"] - 0.05  # the true probabilities are (nearly) the ceiling
    assert report["cvr"]["n"] < report["ctr"]["n"]  # CVR judged on clicked impressions only


def test_run_leaves_a_versioned_savedmodel_and_resolved_config(e2e_run):
    summary, work = e2e_run["summary"], e2e_run["work_dir"]
    export = summary["export"]
    assert export == os.path.join(work, "export", "esm2", "1")
    assert os.path.exists(os.path.join(export, "saved_model.pb"))
    assert [n for n in os.listdir(os.path.dirname(export)) if n.startswith(".")] == []
    with open(os.path.join(work, "config.json")) as fh:
        config = json.load(fh)
    assert config["model_config"]["hidden_units"] == [128, 64, 32]
    assert config["beam_args"] == ["--runner=DirectRunner"]
    assert set(summary["timings_s"]) >= {"preprocess (Beam + tensorflow-transform)", "train esm2", "export SavedModel"}


def test_scored_raw_examples_are_probabilities_with_ctr_above_ctcvr(e2e_run):
    scored = e2e_run["summary"]["scored"]
    assert set(scored) == {"ctr", "ctavr", "cvr", "ctcvr"}
    assert len(scored["ctr"]) == 8
    for name, values in scored.items():
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in values), name
    assert np.all(np.array(scored["ctr"]) >= np.array(scored["ctcvr"]))
    assert np.all(np.array(scored["ctr"]) >= np.array(scored["ctavr"]))
