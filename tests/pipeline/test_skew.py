"""pipeline.skew: the data checks on logged serving requests (PredictionLog TFRecord files and JSONL) against
training statistics written here with StatisticsFn over half of a 20k-row built-in log (per-user features
included); the other half, sent as requests, passes, and broken requests are found and named with figures
recomputed with numpy."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline.beam import data_checks as dc
from pipeline import skew
from pipeline.datagen import GeneratorConfig, generate_blocks
from pipeline.beam.sources import canonical_columns
from pipeline.beam.user_features import compute_user_features
from serving.examples import serialize_rows
from serving.warmup import build_records
from transforms import features as F
from transforms.features import BUILTIN

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMA = os.path.join(REPO, "transforms", "schemas", "builtin.yaml")


def _log():
    """The 20k-row log as one column dict (masked values -> None), with the per-user features computed over the
    whole log (each user's strictly earlier events), and each row's block number."""
    blocks = list(generate_blocks(GeneratorConfig(rows=20_000, seed=0)))
    cols = {k: [None if m else x for x, m in zip(np.ma.getdata(v).tolist(), np.ma.getmaskarray(v).tolist())]
            for k in blocks[0] for v in [np.ma.concatenate([b[k] for b in blocks])]}
    n = len(cols["user_id"])
    users = np.asarray(cols["user_id"])
    for name in (F.UF_COUNT, F.UF_IN_HISTORY, F.UF_REPEAT_RATIO, F.UF_HISTORY) + tuple(
            F.uf_rate(l) for l in BUILTIN.labels.transformed):
        cols[name] = [None] * n
    for u in np.unique(users):
        idx = np.flatnonzero(users == u)  # already in time order
        derived = compute_user_features({k: [cols[k][i] for i in idx] for k in
                                         ("timestamp", "item_id", "click", "cart", "wish", "purchase")}, BUILTIN)
        for name, values in derived.items():
            for i, v in zip(idx, values):
                cols[name][i] = v
    block = np.concatenate([np.full(len(b["user_id"]), k) for k, b in enumerate(blocks)])
    return cols, block


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(training statistics path, its proto, request rows as dicts): even blocks train, odd blocks are served."""
    cols, block = _log()
    types = canonical_columns(BUILTIN)
    fn = dc.StatisticsFn(BUILTIN, "train")
    acc = fn.create_accumulator()
    for k in range(0, block.max() + 1, 2):
        idx = np.flatnonzero(block == k)
        acc = fn.add_input(acc, pa.RecordBatch.from_arrays(
            [pa.array([cols[c][i] for i in idx], type=t) for c, t in types.items()], list(types)))
    reference = fn.extract_output(acc)
    path = str(tmp_path_factory.mktemp("train") / "statistics.pb")
    dc.write_statistics(reference, path)
    served = np.flatnonzero(block % 2 == 1)
    rows = [{c: cols[c][i] for c in BUILTIN.serving_columns} for i in served]
    return path, reference, rows


def _predictionlog(path, rows, per_request=100, extra=()):
    """Rows -> raw tf.Examples -> PredictionLog records of ``per_request`` examples (serving.warmup's records),
    plus ``extra`` raw TFRecord payloads."""
    import tensorflow as tf

    examples = serialize_rows(rows, BUILTIN)
    with tf.io.TFRecordWriter(str(path)) as w:
        for s in range(0, len(examples), per_request):
            chunk = examples[s:s + per_request]
            for record in build_records("ranker", chunk, batch_sizes=(len(chunk),)):
                w.write(record.SerializeToString())
        for payload in extra:
            w.write(payload)
    return str(path)


def _jsonl(path, rows, extra_lines=()):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return str(path)


def _run(world, requests, tmp_path, capsys, *more):
    stats_path = world[0]
    out = tmp_path / "out"
    code = skew.main(["--statistics", stats_path, "--schema", SCHEMA, "--requests", str(requests),
                      "--out", str(out), *more])
    printed = capsys.readouterr()
    doc = json.loads((out / "skew.json").read_text()) if (out / "skew.json").exists() else None
    return code, doc, printed


def _found(doc):
    return {(a["check"], a["column"]): a["blocking"] for a in doc["anomalies"]}


def _numpy_linf(reference, column, values):
    """L-inf distance between the training histogram's masses and ``values`` counted over its buckets
    (lo, hi]: the bucket edges and counts read straight from the proto."""
    f = next(f for f in reference.datasets[0].features if f.path.step[0] == column)
    buckets = f.num_stats.histograms[0].buckets
    edges = np.array([b.high_value for b in buckets][:-1])
    p = np.array([b.sample_count for b in buckets]) / sum(b.sample_count for b in buckets)
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    counts = np.array([np.sum((x > lo) & (x <= hi)) for lo, hi in
                       zip(np.concatenate([[-np.inf], edges]), np.concatenate([edges, [np.inf]]))])
    return float(np.max(np.abs(counts / len(x) - p)))


def test_requests_of_the_same_generator_pass_through_base_and_predictionlog(world, tmp_path, capsys):
    stats_path, reference, rows = world
    base = tmp_path / "base"
    os.makedirs(base / "retrain")
    (base / "retrain" / "state.json").write_text(json.dumps(
        {"reference_statistics": stats_path, "schema": SCHEMA, "reference_reject_rate": 0.01}))
    requests = _predictionlog(tmp_path / "requests.tfrecord", rows)
    code = skew.main(["--base", str(base), "--requests", requests])
    printed = capsys.readouterr().out
    doc = json.loads((base / "skew" / "skew.json").read_text())
    assert code == 0 and doc["anomalies"] == [] and not doc["blocking"]
    n_requests = -(-len(rows) // 100)
    assert doc["requests"]["read"] == n_requests and doc["requests"]["rows"] == len(rows) == 10_000
    assert doc["requests"]["unparseable"] == 0
    assert f"skew: {n_requests} requests read, {len(rows)} rows, 0 unparseable" in printed
    assert "data checks: no anomalies" in printed
    # the requests' statistics against numpy: a raw feature and a per-user one (uf_* are serving inputs)
    stats = dc.read_statistics(str(base / "skew" / "statistics.pb"))
    feats = {f.path.step[0]: f for f in stats.datasets[0].features}
    for column in ("item_price", F.UF_COUNT, F.uf_rate(F.CLICK)):
        x = np.array([r[column] for r in rows if r[column] is not None], dtype=np.float32).astype(np.float64)
        assert feats[column].num_stats.common_stats.num_non_missing == len(x)
        assert feats[column].num_stats.mean == pytest.approx(x.mean(), rel=1e-6)
    assert feats[F.UF_COUNT].num_stats.mean > 1
    assert feats["item_brand"].string_stats.common_stats.num_missing == sum(r["item_brand"] is None for r in rows)
    assert "click" not in feats or feats["click"].num_stats.common_stats.num_non_missing == 0


def test_prices_times_three_drift_with_the_numpy_figure(world, tmp_path, capsys):
    _, reference, rows = world
    shifted = [dict(r, item_price=None if r["item_price"] is None else r["item_price"] * 3) for r in rows[::2]]
    code, doc, printed = _run(world, _predictionlog(tmp_path / "req", shifted), tmp_path, capsys)
    assert code == 0  # drift is a warning in the default spec
    assert _found(doc) == {("drift", "item_price"): False}
    # the figure: the float32 values the requests carried, counted over the training buckets
    sent = [None if r["item_price"] is None else float(np.float32(r["item_price"])) for r in shifted]
    expected = _numpy_linf(reference, "item_price", sent)
    assert doc["anomalies"][0]["value"] == pytest.approx(expected, abs=1e-9) and expected > 0.2
    assert f"drift          item_price  L-inf distance {expected:.3f}" in printed.out


def test_requests_without_item_brand_are_blocking(world, tmp_path, capsys):
    _, _, rows = world
    dropped = [{k: v for k, v in r.items() if k != "item_brand"} for r in rows[::3]]
    code, doc, printed = _run(world, _predictionlog(tmp_path / "req", dropped), tmp_path, capsys)
    assert code == 3 and doc["blocking"]
    assert _found(doc) == {("missing_rate", "item_brand"): True, ("missing_column", "item_brand"): True}
    miss = next(a for a in doc["anomalies"] if a["check"] == "missing_rate")
    assert miss["value"] == 1.0
    assert "data check failed: missing_column item_brand" in printed.out


def test_a_per_user_feature_the_feature_store_stopped_sending_is_blocking(world, tmp_path, capsys):
    _, _, rows = world
    dropped = [dict(r, uf_count=None) for r in rows[::3]]
    code, doc, _ = _run(world, _jsonl(tmp_path / "req.jsonl", dropped), tmp_path, capsys)
    assert code == 3
    assert _found(doc) == {("missing_rate", F.UF_COUNT): True, ("missing_column", F.UF_COUNT): True}


def test_jsonl_gives_the_same_figures_as_predictionlog(world, tmp_path, capsys):
    _, reference, rows = world
    shifted = [dict(r, item_price=None if r["item_price"] is None else r["item_price"] * 3) for r in rows[::2]]
    # JSON carries the float32 values the tf.Examples carry, so both logs hold the same numbers
    shifted = [dict(r, item_price=None if r["item_price"] is None else float(np.float32(r["item_price"])))
               for r in shifted]
    code, doc, _ = _run(world, _jsonl(tmp_path / "req.jsonl", shifted), tmp_path, capsys)
    assert code == 0 and doc["requests"]["format"] == "jsonl"
    assert doc["requests"]["read"] == doc["requests"]["rows"] == 5000
    assert _found(doc) == {("drift", "item_price"): False}
    assert doc["anomalies"][0]["value"] == pytest.approx(
        _numpy_linf(reference, "item_price", [r["item_price"] for r in shifted]), abs=1e-9)
    # auto-detection by content too (no .jsonl suffix), and a clean JSONL log passes
    code, doc, _ = _run(world, _jsonl(tmp_path / "requests.log", rows[::2]), tmp_path, capsys)
    assert code == 0 and doc["anomalies"] == [] and doc["requests"]["format"] == "jsonl"


def test_unparseable_records_are_counted_with_their_reason(world, tmp_path, capsys):
    from tensorflow_serving.apis import prediction_log_pb2

    _, _, rows = world
    bad_example = build_records("ranker", [b"\xff\xff\xff\xff"], batch_sizes=(1,))[0].SerializeToString()
    not_predict = prediction_log_pb2.PredictionLog(
        classify_log=prediction_log_pb2.ClassifyLog()).SerializeToString()
    requests = _predictionlog(tmp_path / "req", rows[::5],
                              extra=[b"\xff\xff\xff\xff not a proto", bad_example, not_predict])
    code, doc, printed = _run(world, requests, tmp_path, capsys)
    assert code == 0 and doc["anomalies"] == []  # 3 of 2003 is far under the 5% reject-rate increase
    assert doc["requests"]["read"] == 20 + 3 and doc["requests"]["rows"] == 2000
    assert doc["requests"]["unparseable"] == 3
    assert doc["requests"]["reasons"] == {"not a PredictionLog (DecodeError)": 1, "not a tf.Example (DecodeError)": 1,
                                          "a classify_log record (only predict_log requests are read)": 1}
    assert "skew: 23 requests read, 2000 rows, 3 unparseable" in printed.out
    # JSONL: a line that is not JSON, one that is not an object, a wrong-typed value; then a log where 1 row in 4
    # does not parse: the reject rate 25% is a blocking anomaly
    lines = ["{not json", "[1, 2]", json.dumps(dict(rows[0], item_price="cheap"))]
    code, doc, _ = _run(world, _jsonl(tmp_path / "req.jsonl", rows[::10], lines), tmp_path, capsys)
    assert code == 0 and doc["requests"]["unparseable"] == 3 and doc["requests"]["rows"] == 1000
    assert doc["requests"]["reasons"] == {"not JSON (JSONDecodeError)": 1, "not a JSON object (list)": 1,
                                          "field item_price: expected a number, got 'cheap'": 1}
    code, doc, _ = _run(world, _jsonl(tmp_path / "req.jsonl", rows[::10], ["{oops"] * 300), tmp_path, capsys)
    assert code == 3 and _found(doc) == {("reject_rate", "(rows)"): True}
    assert doc["anomalies"][0]["value"] == pytest.approx(300 / 1300)


def test_usage_errors_name_the_file(world, tmp_path, capsys):
    stats_path = world[0]
    junk = tmp_path / "requests.bin"
    junk.write_bytes(b"\x00\x01\x02 definitely not a TFRecord frame" * 4)
    for argv, named in [
        (["--statistics", stats_path, "--schema", SCHEMA, "--requests", str(tmp_path / "nope.tfrecord")],
         "requests file not found: " + str(tmp_path / "nope.tfrecord")),
        (["--statistics", str(tmp_path / "none.pb"), "--schema", SCHEMA, "--requests", str(junk)],
         "statistics file not found: " + str(tmp_path / "none.pb")),
        (["--statistics", stats_path, "--schema", SCHEMA, "--requests", str(junk)],
         f"{junk}: unknown request log format"),
        (["--base", str(tmp_path), "--requests", str(junk)], f"{tmp_path} holds no finished pipeline.run"),
    ]:
        assert skew.main(argv + ["--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1
    # the module's entry point
    proc = subprocess.run([sys.executable, "-m", "pipeline.skew", "--statistics", stats_path, "--schema", SCHEMA,
                           "--requests", str(tmp_path / "nope.jsonl")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "requests file not found" in proc.stderr
