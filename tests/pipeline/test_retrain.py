"""The continuous-training loop end to end, on daily partitions of the built-in log, with TF Serving's stand-in
serving the export base: a good day is published as the next version and promoted while a client scores through
``stable`` without a failed request; a broken day is refused by the data checks and a candidate trained on
shuffled labels by the gate, and neither publishes anything."""
import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import datagen
from pipeline import retrain as R
from serving import tf_serving_config as tsc

EPOCHS = ["--epochs", "2"]


def _versions(base):
    return sorted(int(d) for d in os.listdir(base) if d.isdigit())


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    cfg = datagen.GeneratorConfig(rows=36_000, seed=0, days=4, new_items=0.1, price_drift=0.01)
    datagen.write_partitions(cfg, str(root / "logs"), break_partition=3, break_kind="labels", progress=False)
    # day 2 again with its label columns shuffled across rows (together, so the funnel holds): same rates
    table = pq.read_table(str(root / "logs" / "day-02"))
    perm = np.random.default_rng(0).permutation(table.num_rows)
    for name in ("click", "cart", "wish", "purchase", "staytime"):
        table = table.set_column(table.schema.get_field_index(name), name, table.column(name).take(perm))
    os.makedirs(root / "shuffled")
    pq.write_table(table, str(root / "shuffled" / "part-00000.parquet"))

    from pipeline import run as run_mod

    work = str(root / "work")
    summary = run_mod.run(["--data", str(root / "logs" / "day-01" / "*.parquet"), "--work-dir", work, "--epochs", "2",
                           "--batch-size", "256", "--score-rows", "4", "--runner=DirectRunner"])
    return {"root": root, "work": work, "summary": summary, "export_base": os.path.dirname(summary["export"])}


def _retrain(loop, data, *extra):
    return R.main(["--base", loop["work"], "--data", data, *EPOCHS, *extra])


def test_broken_day_and_shuffled_labels_are_refused_and_a_good_day_is_published_under_load(loop, tmp_path):
    from tests.serving.fake_tf_serving import FakeTFServing
    from tests.serving.test_promote import ContinuousScoring

    root, base = loop["root"], loop["export_base"]
    assert _versions(base) == [1]
    config = str(tmp_path / tsc.MODELS_CONFIG)
    tsc.write_configs(str(tmp_path), [tsc.ServedModel("esm2", base, versions=[1], labels={"stable": 1})])
    server = FakeTFServing(model_config_file=config, file_system_poll_wait_seconds=0.2,
                           allow_version_labels_for_unavailable_models=True).start()
    from serving.examples import serialize_rows
    from transforms.features import BUILTIN

    rows = pq.read_table(str(root / "logs" / "day-04")).slice(0, 8).to_pylist()
    examples = serialize_rows(rows, BUILTIN)
    serving = ["--serving-config", config, "--target", server.target, "--keep", "2"]
    client = ContinuousScoring(server.target, examples, pause_s=0.02).__enter__()
    try:
        # the broken day (post-click feed stopped): refused by the data checks, nothing trained or published
        assert _retrain(loop, str(root / "logs" / "day-03" / "*.parquet"), *serving) == R.EXIT_DATA
        broken = sorted(glob.glob(os.path.join(loop["work"], "retrain", "*", "anomalies.json")))[-1]
        anomalies = json.load(open(broken))
        assert anomalies["blocking"] and {a["column"] for a in anomalies["anomalies"] if a["blocking"]} >= {"cart"}
        assert not os.path.exists(os.path.join(os.path.dirname(broken), "checkpoints"))
        # shuffled labels: the data pass, the gate refuses the candidate; nothing is published
        assert _retrain(loop, str(root / "shuffled" / "*.parquet"), *serving) == R.EXIT_REFUSED
        verdict = json.load(open(sorted(glob.glob(os.path.join(loop["work"], "retrain", "*", "evaluation.json")))[-1]))
        assert not verdict["blessed"] and any(r.startswith("ctr AUC") for r in verdict["reasons"])
        assert verdict["candidate_report"]["ctr"]["auc"] < 0.6
        assert _versions(base) == [1]
        # the real days 2 and 4: published as versions 2 and 3 and promoted while the client scores
        assert _retrain(loop, str(root / "logs" / "day-02" / "*.parquet"), *serving) == R.EXIT_PUBLISHED
        assert _retrain(loop, str(root / "logs" / "day-04" / "*.parquet"), *serving) == R.EXIT_PUBLISHED
    finally:
        client.__exit__()
        server.stop(0)
    seen, failures = client.seen, client.failures
    assert failures == []
    assert seen[0] == 1 and seen[-1] == 3 and seen == sorted(seen)
    assert _versions(base) == [2, 3]  # retention: keep 2, version 1 deleted after it unloaded
    state = json.load(open(os.path.join(loop["work"], "retrain", R.STATE_FILE)))
    assert state["champion"] == os.path.join(base, "3")
    assert [p["published"] is not None for p in state["partitions"]] == [True, False, True, True]
