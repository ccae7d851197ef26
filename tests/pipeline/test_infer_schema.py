"""pipeline.infer_schema: each decision on small synthetic columns with hand-known answers, the input sniffing
(CSV header or not, Parquet, TFRecord), the draft's unfilled choices failing validation, and every shared
dataset's draft, with only its label (and user/item) choices filled in, running end to end: the one training,
export and scoring run of each shared dataset (tests/pipeline/test_shared_datasets.py preprocesses the
hand-written schemas)."""
import glob
import math
import os
import random
import subprocess
import sys

import pytest
import yaml

from pipeline.infer_schema import decide, draft, find_runs
from transforms.schema import SCHEMA_DIR, SchemaError, expand_names, load_schema, parse_schema
from tests.pipeline.test_shared_datasets import EXPECTED_MODEL, check_records_on_disk, data_lines

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(SCHEMA_DIR, "*.yaml"))
                if not p.endswith("builtin.yaml"))


# ------------------------------------------------------------------------------ decisions, column by column

def test_integer_like_vs_float_numbers():
    ints = [str(v) for v in range(0, 3000, 7)]  # 429 distinct, spread (1 in 7 of the range): numeric int
    d = decide("count", ints)
    assert (d.kind, d.entry["transform"], d.entry["type"]) == ("feature", "numeric", "int")
    d = decide("price", [f"{v / 4:.2f}" for v in range(1, 400)])
    assert (d.entry["transform"], d.entry["type"]) == ("numeric", "float")
    d = decide("x", ["260.0", "3.0", "17.0"] * 20 + [str(v) + ".0" for v in range(100, 400, 9)])
    assert d.entry["type"] == "int"  # "260.0" is integer-like


def test_binary_columns_are_label_candidates():
    d = decide("clk", ["0"] * 90 + ["1"] * 10)
    assert d.kind == "label" and math.isclose(d.positive_rate, 0.1)
    # mostly ones and not named like a label: a feature; named like one: still a candidate
    assert decide("flag_a", ["1"] * 90 + ["0"] * 10).kind == "feature"
    assert decide("is_click", ["1"] * 90 + ["0"] * 10).kind == "label"


def test_heavy_tail_gets_log1p():
    # two-point distribution, share p at the high value: skewness (1 - 2p) / sqrt(p (1 - p))
    # p = 0.1: 0.8 / 0.3 = 2.67 > 2 -> log1p; p = 0.3: 0.4 / 0.458 = 0.87 -> none
    tail = [str(v) for v in range(1, 91)] + [str(100_000 + v) for v in range(10)]
    d = decide("n", tail)
    assert d.entry["transform"] == "numeric" and d.entry["log1p"] is True
    # the same values, 30% high: spread integers, no heavy tail
    body = [str(v) for v in range(1, 71)] + [str(100_000 + v) for v in range(30)]
    d = decide("n", body)
    assert d.entry["transform"] == "numeric" and d.entry["log1p"] is False
    # a heavy tail with 10% negative values (> 5%): log1p would clip them all: none
    neg = [str(-v) for v in range(1, 11)] + [str(v) for v in range(1, 81)] + [str(100_000 + v) for v in range(10)]
    assert decide("n", neg).entry["log1p"] is False


def test_cardinality_decides_vocabulary_top_k_min_frequency_or_hash():
    # 5 values: a full vocabulary, no top_k, no min_frequency
    d = decide("color", ["red", "green", "blue", "cyan", "gray"] * 20)
    assert d.entry == {"name": "color", "type": "string", "transform": "vocabulary"}
    # 150 distinct of 1000 values, each seen at least twice: vocabulary, top_k 10 x 150 = 1500 -> 2000
    vals = [f"v{k % 150}" for k in range(1000)]
    d = decide("shop", vals)
    assert d.entry == {"name": "shop", "type": "string", "transform": "vocabulary", "top_k": 2000}
    # 60 distinct of 200 values, 40 of them seen once (> half): min_frequency 2
    vals = [f"u{k}" for k in range(40)] + [f"w{k % 20}" for k in range(160)]
    d = decide("city", vals)
    assert d.entry.get("min_frequency") == 2 and "top_k" not in d.entry
    # 190 distinct of 200 (95% >= 50%): hash, 2^ceil(log2(10 x 190)) = 2048 buckets
    vals = [f"ip{k}" for k in range(190)] + [f"ip{k}" for k in range(10)]
    d = decide("device_ip", vals)
    assert d.entry == {"name": "device_ip", "type": "string", "transform": "hash", "hash_buckets": 2048}


def test_integer_categories_by_name_few_values_or_dense_codes():
    spread = [str(v * 37) for v in range(50)] * 4  # 50 distinct over [0, 1813], 25% distinct: numeric
    assert decide("score", spread).entry["transform"] == "numeric"
    assert decide("shop_id", spread).entry["transform"] == "vocabulary"  # the name says id
    assert decide("level", [str(v % 7) for v in range(100)]).entry["transform"] == "vocabulary"  # 7 values
    dense = [str(v % 60) for v in range(200)]  # 60 distinct filling [0, 59]: re-indexed ids
    d = decide("f205", dense)
    assert (d.entry["transform"], d.entry["type"]) == ("vocabulary", "int")
    zeros = ["0123", "0456", "0789"] * 10  # leading zeros would be lost as ints: text
    assert decide("zip", zeros).entry["type"] == "string"


def test_sequences_with_their_separator():
    vals = ["a^b^c", "d", "e^f", "", "g"] * 10
    d = decide("hist", vals)
    assert (d.entry["transform"], d.entry["separator"], d.entry["max_length"]) == ("sequence", "^", 20)
    assert decide("tags", ["x|y", "z"] * 30).entry["separator"] == "|"
    # the CSV delimiter is never the sequence separator; 2% of values with a separator: not a sequence
    assert decide("t", ["a;b", "c"] * 30, delimiter=";").entry["transform"] == "vocabulary"
    assert decide("t", ["a^b"] + [f"c{k % 10}" for k in range(60)]).entry["transform"] == "vocabulary"


def test_timestamps_and_their_format():
    d = decide("event_time", ["2024-01-02 03:04:05", "2024-01-03 00:00:00", "2024-02-01 23:59:59"] * 5)
    assert (d.kind, d.time_format) == ("timestamp", "%Y-%m-%d %H:%M:%S")
    d = decide("ts", [str(1_700_000_000 + 3600 * k) for k in range(30)])
    assert (d.kind, d.time_format) == ("timestamp", "unix")
    d = decide("ts", [str(1_700_000_000_000 + 3600 * k) for k in range(30)])
    assert (d.kind, d.time_format) == ("timestamp", "unix_ms")
    d = decide("hour", ["14102100", "14102101", "14102223"] * 5)
    assert (d.kind, d.time_format) == ("timestamp", "%y%m%d%H")
    # the same numbers under a name that does not say time: not a timestamp
    assert decide("amount", [str(1_700_000_000 + 3600 * k) for k in range(30)]).kind != "timestamp"


def test_skipped_columns_and_invalid_values():
    assert decide("c", ["7"] * 50).kind == "skip"              # constant
    assert decide("c", [None, ""] * 10).kind == "skip"          # empty
    assert decide("row_id", [str(10 ** 12 + k) for k in range(100)]).kind == "skip"  # all distinct ids: row id
    assert decide("row_id", [str(10 ** 12 + k // 2) for k in range(100)]).kind == "feature"
    # 1 'NA' in 200 numbers (0.5% <= 1%): numeric, NA read as missing
    d = decide("I5", [str(v * 13) for v in range(199)] + ["NA"])
    assert d.entry["transform"] == "numeric" and d.entry["on_invalid"] == "missing"
    # half text: a text category, no on_invalid
    d = decide("mix", [str(v % 10) for v in range(50)] + [f"t{v % 10}" for v in range(50)])
    assert d.entry["type"] == "string" and "on_invalid" not in d.entry


# ------------------------------------------------------------------------------ runs of columns = one history

def _history(rng, n_rows, width, lo, hi, pad=None, side="head"):
    """width columns of one history per row: items lo..hi, rows of random length padded with pad (the rest)."""
    rows = []
    for _ in range(n_rows):
        k = rng.randrange(width + 1) if pad is not None else width
        items = [str(rng.randrange(lo, hi + 1)) for _ in range(k)]
        rows.append(([pad] * (width - k) + items) if side == "head" else (items + [pad] * (width - k)))
    return [[r[j] for r in rows] for j in range(width)]  # column-major


def _unrelated(rng, n_rows, count, base):
    """count integer columns with disjoint value ranges (column k: base + 1000 k + 0..49)."""
    return [[str(base + 1000 * k + rng.randrange(50)) for _ in range(n_rows)] for k in range(count)]


def _spans(runs):
    return [(r.start, r.width, r.pad) for r in runs]


def test_a_history_run_is_found_with_its_boundaries_and_padding(tmp_path):
    rng = random.Random(0)
    cols = _unrelated(rng, 200, 2, 10 ** 6) + _history(rng, 200, 12, 1, 30, pad="0") + _unrelated(rng, 200, 3, 10 ** 7)
    assert _spans(find_runs(cols)) == [(2, 12, "0")]
    # the same history padded at the tail with -1
    cols = _history(rng, 200, 9, 1, 30, pad="-1", side="tail") + _unrelated(rng, 200, 2, 10 ** 6)
    assert _spans(find_runs(cols)) == [(0, 9, "-1")]

    # headerless CSV: the draft names the run seq0_*, declares one sequence over it and still validates
    data = _history(rng, 200, 12, 1, 30, pad="0") + [[str(int(rng.random() < 0.3)) for _ in range(200)]]
    _write(tmp_path / "h.csv", "\n".join(",".join(r) for r in zip(*data)) + "\n")
    doc = yaml.safe_load(draft(str(tmp_path / "h.csv")))
    assert doc["input"]["csv"]["columns"] == [{"prefix": "seq0_", "count": 12}, "col_12"]
    assert [f for f in doc["features"] if f["name"] == "seq0"] == [
        {"name": "seq0", "type": "string", "transform": "sequence", "columns_prefix": "seq0_", "max_length": 12,
         "pad_token": "0"}]
    doc["labels"] = {"click": "col_12"}
    schema = parse_schema(doc, str(tmp_path / "s.yaml"))
    assert list(schema.input.csv.columns) == [f"seq0_{k}" for k in range(12)] + ["col_12"]

    # with a header h_1..h_12 the header's prefix names the sequence
    _write(tmp_path / "named.csv", ",".join([f"h_{k}" for k in range(1, 13)] + ["click"]) + "\n" +
           "\n".join(",".join(r) for r in zip(*data)) + "\n")
    doc = yaml.safe_load(draft(str(tmp_path / "named.csv")))
    assert [f for f in doc["features"] if f.get("columns_prefix")] == [
        {"name": "h", "type": "string", "transform": "sequence", "columns_prefix": "h_", "max_length": 12,
         "pad_token": "0"}]


def test_adjacent_runs_with_disjoint_values_or_restarting_padding_split():
    rng = random.Random(1)
    cols = _history(rng, 200, 10, 1, 30) + _history(rng, 200, 9, 101, 130)
    assert _spans(find_runs(cols)) == [(0, 10, None), (10, 9, None)]
    # two histories over the same values, each padded at the head: the padding block restarts at column 10
    both = [a + b for a, b in zip(*[list(zip(*_history(rng, 200, 10, 1, 5, pad="0"))) for _ in range(2)])]
    cols = [list(c) for c in zip(*both)]
    assert _spans(find_runs(cols)) == [(0, 10, "0"), (10, 10, "0")]


def test_no_run_below_the_minimum_width_or_over_unrelated_columns(tmp_path):
    rng = random.Random(2)
    hist = _history(rng, 200, 8, 1, 30)
    assert _spans(find_runs(hist)) == [(0, 8, None)]  # the minimum width
    assert find_runs(hist[:7]) == []
    # 10 integer columns with disjoint values (all one kind, no overlap) beside an 8-wide run: only the run
    cols = _unrelated(rng, 200, 10, 0) + hist
    assert _spans(find_runs(cols)) == [(10, 8, None)]
    # 9 columns holding one and the same value: one run, skipped as one in the draft
    data = [["5"] * 100 for _ in range(9)] + [[str(k % 2) for k in range(100)], [str(k % 7) for k in range(100)]]
    assert _spans(find_runs(data)) == [(0, 9, None)]
    _write(tmp_path / "c.csv", "\n".join(",".join(r) for r in zip(*data)) + "\n")
    text = draft(str(tmp_path / "c.csv"))
    assert "# seq0: columns 0..8" in text and "every value '5': constant, skipped" in text
    assert "col_0" not in text and yaml.safe_load(text)["input"]["csv"]["columns"][0] == {"prefix": "seq0_", "count": 9}


# ------------------------------------------------------------------------------ input sniffing, validation

def _write(path, text):
    with open(path, "w") as fh:
        fh.write(text)


def _rows(n, seed=0):
    rng = random.Random(seed)
    return [f"{int(rng.random() < 0.2)},{rng.randrange(30)},{rng.random() * 10:.3f},c{rng.randrange(5)}"
            for _ in range(n)]


def test_csv_header_detection_and_choices_fail_validation(tmp_path):
    d = tmp_path / "withhead"
    d.mkdir()
    _write(d / "train.csv", "click,user_id,price,cat\n" + "\n".join(_rows(60)) + "\n")
    _write(d / "test.csv", "\n".join(_rows(30, 1)) + "\n")  # no header line
    doc = yaml.safe_load(draft(str(d)))
    assert doc["input"]["csv"] == {"delimiter": ",", "header": "auto", "columns": ["click", "user_id", "price", "cat"]}
    assert doc["split"] == {"kind": "files", "files": {"train": "train.csv", "eval": "test.csv"}}
    assert doc["labels"] == {"click": "click"}  # the only 0/1 column, named like a label
    assert doc["roles"]["user_id"] == "CHOOSE_ONE_OF [user_id]"
    with pytest.raises(SchemaError, match=r"roles.user_id: still a draft choice \(CHOOSE_ONE_OF \[user_id\]\)"):
        parse_schema(doc, str(d / "s.yaml"))
    doc["roles"]["user_id"] = "user_id"
    schema = parse_schema(doc, str(d / "s.yaml"))
    assert schema.contract.user_id == "user_id" and len(schema.input.files()) == 2

    n = tmp_path / "nohead"
    n.mkdir()
    _write(n / "part.txt", "\n".join(_rows(80)) + "\n")
    doc = yaml.safe_load(draft(str(n)))
    assert doc["input"]["csv"]["header"] is False
    assert expand_names("x") == ["x"] and doc["input"]["csv"]["columns"] == [{"prefix": "col_", "count": 4}]
    assert doc["labels"]["click"] == "CHOOSE_ONE_OF [col_0]"  # 0/1, not named like a label
    with pytest.raises(SchemaError, match=r"labels.click: still a draft choice"):
        parse_schema(doc, str(n / "s.yaml"))


def test_parquet_and_tfrecord_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    rng = random.Random(0)
    n = 80
    clicks = [int(rng.random() < 0.3) for _ in range(n)]
    hist = [[f"i{rng.randrange(9)}" for _ in range(rng.randrange(1, 4))] for _ in range(n)]
    price = [rng.random() * 5 for _ in range(n)]
    pq.write_table(pa.table({"click": clicks, "hist": hist, "price": price}), str(tmp_path / "a.parquet"))
    doc = yaml.safe_load(draft(str(tmp_path / "a.parquet")))
    assert doc["input"]["format"] == "parquet"
    feats = {f["name"]: f for f in doc["features"]}
    assert feats["hist"]["transform"] == "sequence" and feats["price"]["type"] == "float"
    assert doc["labels"] == {"click": "click"}

    path = str(tmp_path / "b.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for c, h, p in zip(clicks, hist, price):
            ex = tf.train.Example(features=tf.train.Features(feature={
                "click": tf.train.Feature(int64_list=tf.train.Int64List(value=[c])),
                "hist": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode() for t in h])),
                "price": tf.train.Feature(float_list=tf.train.FloatList(value=[p]))}))
            w.write(ex.SerializeToString())
    doc = yaml.safe_load(draft(path))
    assert doc["input"]["format"] == "tfrecord"
    feats = {f["name"]: f for f in doc["features"]}
    assert feats["hist"]["transform"] == "sequence" and feats["price"]["transform"] == "numeric"


def test_cli_writes_the_draft(tmp_path):
    _write(tmp_path / "d.csv", "click,cat\n" + "\n".join(f"{k % 2},c{k % 4}" for k in range(40)) + "\n")
    out = tmp_path / "s.yaml"
    proc = subprocess.run([sys.executable, "-m", "pipeline.infer_schema", str(tmp_path / "d.csv"), "--out", str(out),
                           "--rows", "10"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "from 10 sampled rows" in text and "# cat: text; 4 distinct values" in text
    assert load_schema(str(out)).contract.labels.click == "click"


# ------------------------------------------------------------------------------ every shared dataset, end to end

def _fill(doc, truth_path):
    """Fills the draft's label choices (and user / item choices) from the hand-written schema of the dataset."""
    with open(truth_path) as fh:
        truth = yaml.safe_load(fh)
    csv_doc = doc["input"].get("csv", {})
    true_cols = parse_schema(truth, truth_path).input.csv.columns
    rename = {}
    if csv_doc.get("header") is False and true_cols:  # no header: the draft's col_k is the truth's k-th column
        rename = {name: f"col_{k}" for k, name in enumerate(true_cols)}
    for key in ("click", "purchase"):
        want = truth["labels"].get(key)
        have = doc["labels"].get(key)
        if want is None:
            doc["labels"].pop(key, None)
            continue
        want = rename.get(str(want), str(want))
        assert have == want or (isinstance(have, str) and want in have[have.index("[") + 1:-1].split(", ")), \
            (key, want, have)  # the true label is among the candidates
        doc["labels"][key] = want
    for role in ("user_id", "item_id"):
        have = (doc.get("roles") or {}).get(role)
        if isinstance(have, str) and have.startswith("CHOOSE_ONE_OF"):
            want = (truth.get("roles") or {}).get(role)
            if want is None:
                del doc["roles"][role]
            else:
                doc["roles"][role] = rename.get(str(want), str(want))
    return doc


@pytest.mark.parametrize("name", SHARED)
def test_drafted_schema_of_each_shared_dataset_runs_end_to_end(name, tmp_path):
    from pipeline import run as run_mod
    from transforms.schema import default_shared_dir

    text = draft(os.path.join(default_shared_dir(), "data", name))
    draft_doc = yaml.safe_load(text)
    unfilled = any("CHOOSE_ONE_OF" in line.split("#")[0] for line in text.splitlines())  # not the comments
    with pytest.raises(SchemaError, match="still a draft choice") if unfilled else _nothing():
        parse_schema(yaml.safe_load(text), str(tmp_path / "draft.yaml"))
    doc = _fill(draft_doc, os.path.join(SCHEMA_DIR, f"{name}.yaml"))
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    schema = load_schema(str(path))
    labels = load_schema(os.path.join(SCHEMA_DIR, f"{name}.yaml")).contract.labels.transformed
    assert schema.contract.labels.transformed == labels  # the hand-written schema's tasks
    summary = run_mod.run(["--schema", str(path), "--epochs", "1", "--batch-size", "64", "--score-rows", "2",
                           "--no-tensorboard", "--early-stopping-patience", "0", "--work-dir", str(tmp_path / "w")])
    pp = summary["preprocess"]
    assert pp["rows_in"] == data_lines(schema)
    # the only rows a drafted schema may reject are the data's own funnel violations (purchase without click)
    assert set(pp["rejected_by_reason"]) <= {"funnel violation"}, pp["rejected_by_reason"]
    assert pp["rows_train"] + pp["rows_eval"] + pp["rows_test"] + pp["rows_rejected"] == pp["rows_in"]
    check_records_on_disk(pp, str(tmp_path / "w" / "preprocessed"), data_lines(schema))  # rows_train, rows_eval > 0
    assert summary["model"] == EXPECTED_MODEL[labels]
    assert os.path.exists(os.path.join(summary["export"], "saved_model.pb"))
    assert summary["scored"]["ctr"] and all(0.0 <= v <= 1.0 and math.isfinite(v) for v in summary["scored"]["ctr"])
    for key, values in summary["history"].items():
        assert all(math.isfinite(v) for v in values), key


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
