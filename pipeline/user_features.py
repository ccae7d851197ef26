"""Leakage-safe per-user features, computed in Beam before tensorflow-transform.

For every event of a user, in (timestamp, source order) order, only the user's *strictly earlier* events
are used:

* ``uf_count``            number of earlier events (impressions);
* ``uf_rate_<label>``     mean of each binary label over earlier events, 0 when there are none
                          (STAN's pseudo-label l_i^k, Eq. 10);
* ``uf_item_in_history``  1 if the target item was clicked by the user before (MUSENET's I[t in B_u], Eq. 9);
* ``uf_repeat_ratio``     share of the user's earlier clicks that re-clicked an item already clicked before
                          them (MUSENET's auxiliary label r_i, Eq. 10), 0 when there are none;
* ``uf_history``          the last N items clicked before the event, oldest first.

Changing or deleting a later event can therefore never change an earlier row's features (tested).
"""
from __future__ import annotations

from collections import deque
from typing import Dict, Iterator, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa

from pipeline.sources import ORDER_COL
from transforms import features as F
from transforms.features import FeatureContract


def compute_user_features(rows: Dict[str, np.ndarray], contract: FeatureContract) -> Dict[str, list]:
    """One user's events (columns as arrays, already sorted by time then order) -> derived columns."""
    n = len(rows[contract.timestamp])
    spec = contract.user_features
    labels = contract.labels
    out: Dict[str, list] = {F.UF_COUNT: [], F.UF_IN_HISTORY: [], F.UF_REPEAT_RATIO: [], F.UF_HISTORY: []}
    label_cols = {F.uf_rate(name): _label_values(rows, contract, name) for name in labels.transformed}
    for k in label_cols:
        out[k] = []
    sums = {k: 0.0 for k in label_cols}
    clicked = set()
    history: deque = deque(maxlen=spec.history_length)
    clicks = repeats = 0
    items = rows[contract.item_id]
    click = label_cols[F.uf_rate(F.CLICK)]
    for i in range(n):
        out[F.UF_COUNT].append(float(i))
        for k, values in label_cols.items():
            out[k].append(sums[k] / i if i else 0.0)
        item = items[i]
        out[F.UF_IN_HISTORY].append(int(item is not None and str(item) in clicked))
        out[F.UF_REPEAT_RATIO].append(repeats / clicks if clicks else 0.0)
        out[F.UF_HISTORY].append(list(history))
        # Only now does event i become part of the past.
        for k, values in label_cols.items():
            sums[k] += values[i]
        if click[i] and item is not None:
            key = str(item)
            repeats += key in clicked
            clicks += 1
            clicked.add(key)
            history.append(key)
    return out


def _label_values(rows, contract: FeatureContract, name: str) -> np.ndarray:
    labels = contract.labels
    if name == F.CLICK:
        return np.asarray(rows[labels.click], dtype=np.float64)
    if name == F.PURCHASE:
        return np.asarray(rows[labels.purchase], dtype=np.float64)
    values = np.zeros(len(rows[contract.timestamp]))
    for col in labels.daction:
        values = np.maximum(values, np.asarray(rows[col], dtype=np.float64))
    return values


def split_by_user(batch: pa.RecordBatch, user_col: str, buckets: int = 64) -> Iterator[Tuple[int, pa.RecordBatch]]:
    """(bucket, the batch's rows whose user hashes to it). All events of a user share a bucket.

    Grouping by a bucket of users instead of by user keeps the number of shuffled elements small (one
    slice per bucket and input batch), which is what the runner pays for.
    """
    import zlib

    users = batch.column(batch.schema.get_field_index(user_col)).to_pylist()
    keys = np.fromiter((zlib.crc32(str(u).encode()) % buckets if u is not None else 0 for u in users),
                       dtype=np.int64, count=len(users))
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_keys)) + 1]
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends):
        yield int(sorted_keys[start]), batch.take(pa.array(order[start:end]))


class AddUserFeatures(beam.DoFn):
    """(bucket, [batches]) -> the same rows with the derived ``uf_*`` columns filled in, user by user."""

    def __init__(self, contract: FeatureContract):
        self._contract = contract

    def process(self, element):
        _, batches = element
        c = self._contract
        table = pa.Table.from_batches(list(batches))
        table = table.sort_by([(c.user_id, "ascending"), (c.timestamp, "ascending"), (ORDER_COL, "ascending")])
        needed = [c.timestamp] + list(c.labels.binary_columns)
        cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in needed}
        items = table.column(c.item_id).to_pylist()
        users = table.column(c.user_id).to_pylist()
        derived: Dict[str, list] = {}
        start = 0
        n = table.num_rows
        while start < n:
            end = start + 1
            if users[start] is not None:  # a user without an id has no history: one row at a time
                while end < n and users[end] == users[start]:
                    end += 1
            rows = {name: values[start:end] for name, values in cols.items()}
            rows[c.item_id] = items[start:end]
            for name, values in compute_user_features(rows, c).items():
                derived.setdefault(name, []).extend(values)
            start = end
        for name, values in derived.items():
            idx = table.schema.get_field_index(name)
            table = table.set_column(idx, name, pa.array(values, type=table.schema.field(name).type))
        beam.metrics.Metrics.counter("rankline", "rows_with_user_features").inc(n)
        yield from table.combine_chunks().to_batches(max_chunksize=10_000)


def add_user_features(rows, contract: FeatureContract, label: str = "UserFeatures"):
    """PCollection of canonical batches -> the same rows with ``uf_*`` columns, leakage-safe."""
    return (rows
            | f"{label}/KeyByUser" >> beam.FlatMap(split_by_user, contract.user_id)
            | f"{label}/GroupByUser" >> beam.GroupByKey()
            | f"{label}/Compute" >> beam.ParDo(AddUserFeatures(contract)))


__all__ = ["ORDER_COL", "add_user_features", "compute_user_features", "split_by_user"]
