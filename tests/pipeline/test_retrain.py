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


# ---- --refresh-vocabulary and --replay --------------------------------------------------------------------------
LENIENT_GATE = ["--auc-tolerance", "1", "--logloss-tolerance", "100", "--max-ece", "1", "--min-auc", "0"]


def _records(pattern):
    """Rows in the transformed shards matching ``pattern``, counted on disk (``__rows__`` of each record)."""
    from tests.pipeline.beam.shard_rows import rows_on_disk

    files = sorted(glob.glob(pattern))
    assert files, pattern
    return rows_on_disk(files)


def _ids(pattern, key):
    """Every value of the int64 feature ``key`` in the shards matching ``pattern`` (each record: its rows')."""
    import tensorflow as tf

    ids = []
    for record in tf.data.TFRecordDataset(sorted(glob.glob(pattern)), compression_type="GZIP").as_numpy_iterator():
        ids.extend(tf.train.Example.FromString(record).features.feature[key].int64_list.value)
    return np.asarray(ids)


def _vocab(tft_dir, name):
    with open(os.path.join(tft_dir, "transform_fn", "assets", f"vocab_{name}"), "rb") as fh:
        return fh.read().splitlines()


@pytest.fixture(scope="module")
def small_loop(tmp_path_factory):
    """A base run on day 1 of a 3-day log (1000 rows a day, a third of the catalogue appearing over the span)."""
    root = tmp_path_factory.mktemp("small-loop")
    cfg = datagen.GeneratorConfig(rows=3_000, seed=1, days=3, new_items=0.3)
    datagen.write_partitions(cfg, str(root / "logs"), progress=False)
    from pipeline import run as run_mod

    work = str(root / "work")
    run_mod.run(["--data", str(root / "logs" / "day-01" / "*.parquet"), "--work-dir", work, "--epochs", "1",
                 "--batch-size", "256", "--score-rows", "2", "--runner=DirectRunner"])
    return {"root": root, "work": work}


def test_refresh_vocabulary_with_replay_then_a_replay_on_the_refreshed_graph(small_loop):
    root, work = small_loop["root"], small_loop["work"]
    day = lambda d: str(root / "logs" / f"day-{d:02d}" / "*.parquet")  # noqa: E731
    base_graph = os.path.join(work, "preprocessed", "transform_fn_output")
    # day 2, vocabularies re-analyzed over days 1-2, trained on day 2 and day 1 (transformed again: new ids)
    assert R.main(["--base", work, "--data", day(2), "--epochs", "1", "--refresh-vocabulary", "--window", "2",
                   "--replay", *LENIENT_GATE, "--runner=DirectRunner"]) == R.EXIT_PUBLISHED
    first = json.load(open(os.path.join(work, "retrain", "001", "summary.json")))
    graph = os.path.join(work, "retrain", "001", "preprocessed", "transform_fn_output")
    day1_rows = pq.read_table(str(root / "logs" / "day-01")).num_rows
    assert first["rows"]["rows_replay"] == day1_rows
    new_train = _records(os.path.join(work, "retrain", "001", "preprocessed", "data", "train", "part-*"))
    assert first["training"]["train_examples"] == day1_rows + new_train
    assert first["training"]["steps_run"] == -(-(day1_rows + new_train) // 256)  # one epoch over both
    assert first["vocabulary_refresh"]["window"] == ["base", "001"]
    # every base token survives (day 1 is in the window); the tokens added are items day 2 brought (to >= 2 rows)
    day2_items = {str(i).encode() for i in pq.read_table(str(root / "logs" / "day-02")).column("item_id").to_pylist()}
    assert set(_vocab(base_graph, "item_id")) <= set(_vocab(graph, "item_id"))
    added = set(_vocab(graph, "item_id")) - set(_vocab(base_graph, "item_id"))
    assert added and added <= day2_items
    assert first["vocabulary_refresh"]["fields"]["item_id_id"]["new"] == len(added)
    # per-user state holds raw item ids (not vocabulary ids), so the refresh leaves it valid
    raw_items = {str(i) for d in (1, 2) for i in pq.read_table(str(root / "logs" / f"day-{d:02d}")).column("item_id")
                 .to_pylist()}
    states = [json.loads(line) for path in glob.glob(os.path.join(work, "retrain", "001", "preprocessed", "user_state",
                                                                   "part-*.jsonl")) for line in open(path)]
    history = {h for s in states for h in s["state"]["history"]}
    assert history and history <= raw_items
    # the refreshed graph is the loop's and the published export's
    state = json.load(open(os.path.join(work, "retrain", R.STATE_FILE)))
    assert state["tft_dir"] == graph and state["champion"] == first["published"]
    exported = glob.glob(os.path.join(first["published"], "assets*", "vocab_item_id"))
    assert exported and open(exported[0], "rb").read().splitlines() == _vocab(graph, "item_id")

    # day 3 with --replay only: transformed with the refreshed graph; day 2's TFRecords (same graph) are reused
    assert R.main(["--base", work, "--data", day(3), "--epochs", "1", "--replay", *LENIENT_GATE,
                   "--runner=DirectRunner"]) == R.EXIT_PUBLISHED
    second = json.load(open(os.path.join(work, "retrain", "002", "summary.json")))
    assert second["replay"] == {"previous": "001", "retransformed": False}
    day2 = [_records(os.path.join(work, "retrain", "001", "preprocessed", "data", s, "part-*"))
            for s in ("train", "eval")]
    day3 = _records(os.path.join(work, "retrain", "002", "preprocessed", "data", "train", "part-*"))
    assert second["training"]["train_examples"] == sum(day2) + day3
    # day 3's ids are the refreshed vocabulary's: its OOV rows are exactly those whose item it lacks
    ids = np.concatenate([_ids(os.path.join(work, "retrain", "002", "preprocessed", "data", s, "part-*"), "item_id_id")
                          for s in ("train", "eval")])
    vocab = set(_vocab(graph, "item_id"))
    day3_items = [str(i).encode() for i in pq.read_table(str(root / "logs" / "day-03")).column("item_id").to_pylist()]
    assert len(ids) == len(day3_items)
    assert int(np.sum(ids >= len(vocab))) == sum(i not in vocab for i in day3_items)
    assert any(i in added for i in day3_items)
