"""Per-user features a chunk of users at a time, and each user's events a slice at a time (preprocessing's
bounded-memory path), equal one pass over all rows, recomputed here with a literal loop over the raw files; and the
chunk plan keeps every user bucket whole."""
import glob
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import datagen
from pipeline.beam import sources
from pipeline.beam.preprocess import READ_COUNTS_FILE, USER_STATE_DIR, PreprocessConfig, user_feature_chunks
from pipeline.beam import user_features as U
from pipeline.beam.user_features import plan_chunks
from transforms.schema import builtin_schema_path, load_schema

HISTORY = 20  # the built-in schema's user_features.history_length


def _reference(raw: pd.DataFrame):
    """Literal loop: for each row, the features of its user's strictly earlier events in (timestamp, order)."""
    out = {}
    states = {}
    for r in raw.sort_values(["user_id", "timestamp", "order"]).itertuples(index=False):
        s = states.setdefault(r.user_id, {"n": 0, "click": 0, "daction": 0, "purchase": 0, "clicked": [],
                                          "repeats": 0})
        n, clicks = s["n"], len(s["clicked"])
        out[r.order] = {
            "uf_count": float(n),
            "uf_rate_click": s["click"] / n if n else 0.0,
            "uf_rate_daction": s["daction"] / n if n else 0.0,
            "uf_rate_purchase": s["purchase"] / n if n else 0.0,
            "uf_item_in_history": int(r.item_id in s["clicked"]),
            "uf_repeat_ratio": s["repeats"] / clicks if clicks else 0.0,
            "uf_history": s["clicked"][-HISTORY:],
        }
        s["n"] += 1
        s["click"] += r.click
        s["daction"] += max(r.cart, r.wish)
        s["purchase"] += r.purchase
        if r.click:
            s["repeats"] += r.item_id in s["clicked"]
            s["clicked"].append(r.item_id)
    return out, states


def test_chunked_user_features_equal_one_pass_over_all_rows(tmp_path, monkeypatch):
    # a user's events are computed a slice at a time with the state carried between slices: slices of 7 rows
    monkeypatch.setattr(U, "SLICE_ROWS", 7)
    # 400 users with ~15 events each over 3 days, in 8 time-ordered files
    cfg = datagen.GeneratorConfig(rows=6_000, seed=4, days=3, users=400, items=80, rows_per_file=750)
    datagen.write_parquet(cfg, str(tmp_path / "data"), progress=False)
    schema = load_schema(builtin_schema_path("builtin"), input_path=str(tmp_path / "data" / "part-*.parquet"))
    files = sources.plan_files(schema)
    out = str(tmp_path / "pp")
    featured, work = user_feature_chunks(schema, PreprocessConfig(output_dir=out, user_chunk_rows=1_500), files,
                                         ["--runner=DirectRunner"])
    # the order column: (file index << 32) | record number counted from 1
    raw = pd.concat([pd.read_parquet(f.path).assign(order=lambda d, i=f.index: (i << 32) + 1 + np.arange(len(d)))
                     for f in files])
    spans = raw.groupby("user_id").order.apply(lambda o: len({v >> 32 for v in o}))
    assert (spans >= 2).mean() > 0.5  # most users have events in several files
    expected, states = _reference(raw)

    # several chunks ran (one state file each), every user's state in exactly one of them
    state_files = sorted(glob.glob(os.path.join(out, USER_STATE_DIR, "part-*.jsonl")))
    assert len({os.path.basename(f).split("-")[1] for f in state_files}) >= 4
    lines = [json.loads(line) for f in state_files for line in open(f)]
    assert sorted(d["user"] for d in lines) == sorted(str(u) for u in states)
    for d in lines:
        s = states[int(d["user"])]
        assert (d["state"]["n"], d["state"]["clicks"], d["state"]["repeats"]) == (
            s["n"], len(s["clicked"]), s["repeats"])
        assert d["state"]["history"] == [str(i) for i in s["clicked"][-HISTORY:]]

    # every row once, with the features of one pass over all rows
    got = pa.concat_tables([pa.ipc.open_stream(open(p, "rb")).read_all() for p in featured]).to_pylist()
    assert sorted(r[sources.ORDER_COL] for r in got) == sorted(expected)
    for r in got:
        e = expected[r[sources.ORDER_COL]]
        for name in ("uf_count", "uf_rate_click", "uf_rate_daction", "uf_rate_purchase", "uf_repeat_ratio"):
            assert abs(r[name] - e[name]) < 1e-6, (name, r, e)
        assert r["uf_item_in_history"] == e["uf_item_in_history"]
        assert r["uf_history"] == [str(i) for i in e["uf_history"]]
    # the reporting read happened there: the readers' counts
    with open(os.path.join(out, READ_COUNTS_FILE)) as fh:
        assert json.load(fh)["rows_in"] == 6_000
    # the spill of each chunk is gone once it is done; only the rows with their features remain
    assert not glob.glob(os.path.join(work, "spill", "*"))


def test_chunk_plan_keeps_user_buckets_whole():
    files = [(3, "c", 400), (0, "a", 500), (1, "b1", 300), (1, "b2", 300), (2, "x", 0), (5, "d", 2_000),
             (6, "e", 100)]
    assert plan_chunks(files, 1_000) == [["a"], ["b1", "b2", "x", "c"], ["d"], ["e"]]
    assert plan_chunks(files, 10**9) == [["a", "b1", "b2", "x", "c", "d", "e"]]
    assert plan_chunks([], 1_000) == [[]]  # nothing read: one empty chunk (its run writes no rows)
