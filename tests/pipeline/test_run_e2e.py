"""A small end-to-end run: built-in data -> Beam/TFT -> ESM² -> SavedModel -> scoring."""
import glob
import json
import math
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tests.pipeline.beam.shard_rows import rows_on_disk


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


def test_every_input_row_is_published_exactly_once(e2e_run):
    """Rows counted in the input Parquet files (pyarrow metadata) == rows in == the records in the train,
    eval and test TFRecord shards + the dead-letter lines, each counted on disk here."""
    pp, work = e2e_run["summary"]["preprocess"], e2e_run["work_dir"]
    n_input = sum(pq.ParquetFile(f).metadata.num_rows
                  for f in glob.glob(os.path.join(e2e_run["summary"]["input"]["dir"], "*.parquet")))
    records = {s: rows_on_disk(glob.glob(os.path.join(work, "preprocessed", "data", s, "part-*")))
        for s in ("train", "eval", "test")}
    rejected = 0
    for path in glob.glob(os.path.join(work, "preprocessed", "rejected", "part*")):
        with open(path) as fh:
            rejected += sum(1 for line in fh if line.strip())
    assert n_input == 6000 == pp["rows_in"] == sum(records.values()) + rejected
    assert {s: pp[f"rows_{s}"] for s in records} == records and pp["rows_rejected"] == rejected
    assert records["eval"] > 0 and records["test"] == 0


def _auc(scores, labels):
    """Mann-Whitney U / (n1 n0), ties at mid-rank."""
    from scipy.stats import rankdata

    r = rankdata(scores)
    pos = labels == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return (r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def test_export_ranks_the_eval_split_above_label_shuffled_chance(e2e_run):
    """The eval split's raw rows (time split at 80% of the span, worked out from the Parquet files) scored
    through the exported SavedModel: the CTR AUC against the true clicks beats every one of 20 label-shuffled
    AUCs of the same scores (which average 0.5) by 0.1. (Raw rows carry no per-user ``uf_*`` columns - Beam computes those -
    so this AUC is a floor of the report's, not equal to it.)"""
    from serving.examples import serialize_rows
    from serving.score import score_saved_model
    from transforms.features import BUILTIN

    raw = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(
        os.path.join(e2e_run["summary"]["input"]["dir"], "*.parquet")))])
    cutoff = raw.timestamp.min() + (raw.timestamp.max() - raw.timestamp.min()) * 0.8
    rows = raw[raw.timestamp >= cutoff].to_dict("records")
    assert len(rows) == e2e_run["summary"]["eval"]["ctr"]["n"]
    scores = score_saved_model(e2e_run["summary"]["export"], serialize_rows(rows, BUILTIN))["ctr"]
    clicks = np.array([r["click"] for r in rows])
    auc = _auc(scores, clicks)
    rng = np.random.default_rng(0)
    shuffled = [_auc(scores, rng.permutation(clicks)) for _ in range(20)]
    assert abs(np.mean(shuffled) - 0.5) < 0.03 and auc > max(shuffled) + 0.1, (auc, shuffled)
