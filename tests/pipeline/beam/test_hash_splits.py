"""The batched hash split assigns every row exactly as a literal per-row BLAKE2b loop does.

The reference here is written out independently of ``pipeline.beam.sources``: u = BLAKE2b-64 of the key's UTF-8
bytes as a big-endian integer / 2**64; test when u < test, eval when u < test + eval, else train; a row without a
key is keyed by its source ``"<file name>:row <i>"``.
"""
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.beam.sources import SPLIT_COL, ReadFile, hash_splits
from transforms.schema import parse_schema


def _literal_split(key: str, eval_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2.0 ** 64
    return "test" if u < test_fraction else "eval" if u < test_fraction + eval_fraction else "train"


def _sources(indices):
    return [f"f.parquet:row {i}" for i in indices.tolist()]


@pytest.mark.parametrize("keys", [
    pa.array(np.random.default_rng(0).integers(0, 300, 5000)),                       # int user ids, repeated
    pa.array([None if i % 7 == 0 else f"u{i % 211}" for i in range(5000)]),        # strings with nulls
    pa.array([None if i % 5 == 0 else float(i % 13) / 3 for i in range(3000)], pa.float32()),
    pa.nulls(4000, pa.string()),                                                     # no key: by source
    pa.array([], pa.int64()),
], ids=["int", "string-with-nulls", "float32", "all-null", "empty"])
def test_hash_splits_equal_a_per_row_blake2b_loop(keys):
    got = hash_splits(keys, _sources, 0.3, 0.1).to_pylist()
    want = [_literal_split(str(k) if k is not None else f"f.parquet:row {i}", 0.3, 0.1)
            for i, k in enumerate(keys.to_pylist())]
    assert got == want
    if len(keys) > 1000:
        assert {"train", "eval", "test"} <= set(got)   # the thresholds are exercised on both sides


def test_reader_hash_split_equals_the_literal_loop(tmp_path):
    """ReadFile's vectorised Parquet path, with a key column (some keys missing) and without one: each row's
    ``__split`` equals the literal loop on its key, or on its source when it has no key."""
    n = 3000
    rng = np.random.default_rng(1)
    users = [None if i % 11 == 0 else int(u) for i, u in enumerate(rng.integers(0, 400, n))]
    table = pa.table({"user": pa.array(users, pa.int64()), "cat": pa.array([f"c{i % 9}" for i in range(n)]),
                      "ts": pa.array(np.arange(n), pa.int64()), "click": pa.array(np.arange(n) % 2, pa.int64())})
    path = str(tmp_path / "f.parquet")
    pq.write_table(table, path, row_group_size=700)   # several row groups: row numbers continue across them
    for key in ("user", None):
        doc = {"name": "unit", "input": {"path": path, "format": "parquet"},
               "roles": {"timestamp": "ts"}, "labels": {"click": "click"},
               "features": [{"name": "user", "type": "int", "transform": "vocabulary"},
                            {"name": "cat", "transform": "vocabulary"}],
               "split": {"kind": "hash", "eval_fraction": 0.25, "test_fraction": 0.15, **({"key": key} if key else {})}}
        reader = ReadFile(parse_schema(doc, "/x/unit.yaml"), batch_rows=1000)
        reader.setup()
        got = []
        for out in reader.process(path):
            if not hasattr(out, "tag"):
                got.extend(out.column(out.schema.get_field_index(SPLIT_COL)).to_pylist())
        want = [_literal_split(str(u) if key and u is not None else f"f.parquet:row {i}", 0.25, 0.15)
                for i, u in enumerate(users)]
        assert got == want, key
