"""The Beam stage reads each input file once, and still writes the per-row dead letter, the counts and every
split's rows (checked against numpy / a literal loop over the input, not against the stage's own helpers)."""
import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.beam import sources
from pipeline.beam.preprocess import PreprocessConfig, read_rejected, run_preprocess
from transforms.preprocessing import build_preprocessing_fn
from transforms.schema import parse_schema


def _literal_split(key: str) -> str:
    u = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2.0 ** 64
    return "eval" if u < 0.3 else "train"


def test_each_file_is_read_once_with_dead_letter_counts_and_splits(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):
        n = 1500
        click = (rng.random(n) < 0.3).astype(np.int64)
        click[:3] = 2                                # 3 rows per file rejected: label not 0/1
        table = pa.table({"user": pa.array(rng.integers(0, 200, n)), "cat": pa.array([f"c{i % 17}" for i in range(n)]),
                          "price": pa.array(rng.random(n) * 10), "ts": pa.array(np.arange(n), pa.int64()),
                          "click": pa.array(click)})
        paths.append(str(tmp_path / f"part-{k}.parquet"))
        pq.write_table(table, paths[-1], row_group_size=400)
    doc = {"name": "once", "input": {"path": str(tmp_path / "part-*.parquet"), "format": "parquet"},
           "roles": {"user_id": "user", "timestamp": "ts"}, "labels": {"click": "click"},
           "features": [{"name": "user", "type": "int", "transform": "vocabulary"},
                        {"name": "cat", "transform": "vocabulary"},
                        {"name": "price", "type": "float", "transform": "numeric", "buckets": 4}],
           "split": {"kind": "hash", "eval_fraction": 0.3}}
    schema = parse_schema(doc, str(tmp_path / "once.yaml"))
    reads = []
    original = sources.ReadFile._process

    def counting(self, planned):
        reads.append(os.path.basename(planned.path))
        return (yield from original(self, planned))

    monkeypatch.setattr(sources.ReadFile, "_process", counting)   # the in-process runner runs this class
    out = str(tmp_path / "out")
    summary = run_preprocess(schema, PreprocessConfig(output_dir=out, batch_rows=500),
                             build_preprocessing_fn(schema.contract), ["--runner=DirectRunner"])
    assert sorted(reads) == ["part-0.parquet", "part-1.parquet"]          # once each, not once per pass
    rejected = read_rejected(out)
    assert sorted(r["source"] for r in rejected) == sorted(f"part-{k}.parquet:row {i}" for k in range(2)
                                                           for i in range(3))
    assert {r["category"] for r in rejected} == {sources.LABEL_NOT_BINARY}
    want = {"train": 0, "eval": 0}
    for path in paths:
        t = pq.read_table(path)
        for user, click in zip(t.column("user").to_pylist(), t.column("click").to_pylist()):
            if click in (0, 1):
                want[_literal_split(str(user))] += 1
    assert (summary["rows_in"], summary["rows_rejected"]) == (3000, 6)
    assert (summary["rows_train"], summary["rows_eval"], summary["rows_test"]) == (want["train"], want["eval"], 0)
    leftovers = [d for d in os.listdir(os.path.join(out, "tmp")) if d.startswith("spill")] \
        if os.path.isdir(os.path.join(out, "tmp")) else []
    assert leftovers == []                                                   # the spilled rows are removed
