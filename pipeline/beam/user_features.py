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

Across log partitions (``pipeline.retrain``) the per-user state at the end of one partition (event count, label
sums, clicked items, click history, clicks and repeats) is saved and the next partition starts from it
(``add_user_features_with_state``), so a row's features equal what one run over the concatenated partitions
gives (tested), with no look-ahead: a partition only ever starts from the state of the partitions before it.

Memory (``pipeline.beam.preprocess``): the group by user is a shuffle, which an in-process runner (the
DirectRunner's FnApiRunner) holds in memory whole. So preprocessing does it in chunks of users: one streaming pass
spills the rows to Arrow files by user bucket (``SpillByUser``, ``SPILL_BUCKETS`` buckets), ``plan_chunks`` groups
whole buckets into chunks of at most ``max_rows`` rows, and each chunk is its own pipeline run
(``add_user_features_with_state`` from no state; its rows to Arrow files, its users' states to ``write_states``).
All events of a user are in one bucket, hence in one chunk, so the features equal one pass over all rows (tested)
and a run never holds more than one chunk.
"""
from __future__ import annotations

from collections import deque
from typing import Dict, Iterator, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa

from pipeline.beam.sources import ORDER_COL
from transforms import features as F
from transforms.features import FeatureContract


def new_state(contract: FeatureContract) -> Dict:
    """The state of a user without earlier events (JSON-serialisable)."""
    return {"n": 0, "sums": {F.uf_rate(name): 0.0 for name in contract.labels.transformed}, "clicked": [],
            "history": [], "clicks": 0, "repeats": 0}


def compute_user_features(rows: Dict[str, np.ndarray], contract: FeatureContract) -> Dict[str, list]:
    """One user's events (columns as arrays, already sorted by time then order) -> derived columns."""
    return compute_user_features_and_state(rows, contract)[0]


def compute_user_features_and_state(rows: Dict[str, np.ndarray], contract: FeatureContract,
                                    state: Dict | None = None) -> Tuple[Dict[str, list], Dict]:
    """As ``compute_user_features``, starting from ``state`` (the user's state after earlier partitions;
    None = no earlier events); returns (derived columns, the state after these events)."""
    n = len(rows[contract.timestamp])
    spec = contract.user_features
    labels = contract.labels
    state = state or new_state(contract)
    out: Dict[str, list] = {F.UF_COUNT: [], F.UF_IN_HISTORY: [], F.UF_REPEAT_RATIO: [], F.UF_HISTORY: []}
    label_cols = {F.uf_rate(name): _label_values(rows, contract, name) for name in labels.transformed}
    for k in label_cols:
        out[k] = []
    sums = {k: float(state["sums"].get(k, 0.0)) for k in label_cols}
    clicked = set(state["clicked"])
    history: deque = deque(state["history"], maxlen=spec.history_length)
    clicks, repeats, before = int(state["clicks"]), int(state["repeats"]), int(state["n"])
    items = rows[contract.item_id]
    click = label_cols[F.uf_rate(F.CLICK)]
    for j in range(n):
        i = before + j  # earlier events of this user, earlier partitions included
        out[F.UF_COUNT].append(float(i))
        for k, values in label_cols.items():
            out[k].append(sums[k] / i if i else 0.0)
        item = items[j]
        out[F.UF_IN_HISTORY].append(int(item is not None and str(item) in clicked))
        out[F.UF_REPEAT_RATIO].append(repeats / clicks if clicks else 0.0)
        out[F.UF_HISTORY].append(list(history))
        # Only now does event j become part of the past.
        for k, values in label_cols.items():
            sums[k] += values[j]
        if click[j] and item is not None:
            key = str(item)
            repeats += key in clicked
            clicks += 1
            clicked.add(key)
            history.append(key)
    after = {"n": before + n, "sums": sums, "clicked": sorted(clicked), "history": list(history),
             "clicks": clicks, "repeats": repeats}
    return out, after


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


def split_by_user(batch: pa.RecordBatch, user_col: str, buckets: int = 64,
                  salt: bytes = b"") -> Iterator[Tuple[int, pa.RecordBatch]]:
    """(bucket, the batch's rows whose user hashes to it). All events of a user share a bucket: CRC-32 of
    ``salt`` + the user id's text, mod ``buckets``; a missing user goes to bucket 0.

    Grouping by a bucket of users instead of by user keeps the number of shuffled elements small (one
    slice per bucket and input batch), which is what the runner pays for.
    """
    import zlib

    users = batch.column(batch.schema.get_field_index(user_col)).to_pylist()
    keys = np.fromiter((zlib.crc32(salt + str(u).encode()) % buckets if u is not None else 0 for u in users),
                       dtype=np.int64, count=len(users))
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_keys)) + 1]
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends):
        yield int(sorted_keys[start]), batch.take(pa.array(order[start:end]))


SLICE_ROWS = 10_000  # AddUserFeatures computes and emits rows this many at a time
STATE = "state"  # the tagged output of AddUserFeatures(with_state=True): (user key, state) pairs


def user_key(user) -> str:
    return str(user)


class AddUserFeatures(beam.DoFn):
    """(bucket, [batches]) -> the same rows with the derived ``uf_*`` columns filled in, user by user.

    ``with_state``: elements are (bucket, {"rows": [batches], "state": [(user key, state)]}) from a CoGroupByKey;
    each user starts from its saved state, and every user's state after this partition (users without events in
    it unchanged) goes to the ``STATE`` output."""

    def __init__(self, contract: FeatureContract, with_state: bool = False):
        self._contract = contract
        self._with_state = with_state

    def process(self, element):
        c = self._contract
        if self._with_state:
            _, grouped = element
            batches = list(grouped["rows"])
            states = dict(grouped["state"])
        else:
            _, batches = element
            states = None
        if not batches:
            for key, state in (states or {}).items():
                yield beam.pvalue.TaggedOutput(STATE, (key, state))
            return
        import pyarrow.compute as pc

        table = pa.Table.from_batches(list(batches))
        # The order (no sorted copy of the whole bucket: rows are taken in this order a slice at a time)
        order = pc.sort_indices(table, sort_keys=[(c.user_id, "ascending"), (c.timestamp, "ascending"),
                                                  (ORDER_COL, "ascending")])
        needed = [c.timestamp] + list(c.labels.binary_columns)
        keys = table.select(needed + [c.item_id, c.user_id]).take(order)
        cols = {name: keys.column(name).to_numpy(zero_copy_only=False) for name in needed}
        items = keys.column(c.item_id).to_pylist()
        users = keys.column(c.user_id).to_pylist()
        del keys
        # A user's events are computed a slice at a time (its state carried from slice to slice) and rows go out
        # every SLICE_ROWS rows, so that beyond the sorted bucket only O(SLICE_ROWS) rows of derived values are
        # held, however many events one user has.
        derived: Dict[str, list] = {}
        start = done = 0
        n = table.num_rows
        while start < n:
            end = start + 1
            if users[start] is not None:  # a user without an id has no history: one row at a time
                while end < n and users[end] == users[start]:
                    end += 1
            key = user_key(users[start]) if users[start] is not None else None
            state = states.get(key) if states is not None and key is not None else None
            for lo in range(start, end, SLICE_ROWS):
                hi = min(end, lo + SLICE_ROWS)
                rows = {name: values[lo:hi] for name, values in cols.items()}
                rows[c.item_id] = items[lo:hi]
                columns, state = compute_user_features_and_state(rows, c, state)
                for name, values in columns.items():
                    derived.setdefault(name, []).extend(values)
                if hi - done >= SLICE_ROWS:
                    yield from self._with_columns(table.take(order[done:hi]), derived)
                    derived, done = {}, hi
            if states is not None and key is not None:
                states[key] = state
            start = end
        if n > done:
            yield from self._with_columns(table.take(order[done:n]), derived)
        beam.metrics.Metrics.counter("rankline", "rows_with_user_features").inc(n)
        for key, state in (states or {}).items():
            yield beam.pvalue.TaggedOutput(STATE, (key, state))

    @staticmethod
    def _with_columns(table: pa.Table, derived: Dict[str, list]):
        for name, values in derived.items():
            idx = table.schema.get_field_index(name)
            table = table.set_column(idx, name, pa.array(values, type=table.schema.field(name).type))
        yield from table.combine_chunks().to_batches(max_chunksize=SLICE_ROWS)


def add_user_features(rows, contract: FeatureContract, label: str = "UserFeatures"):
    """PCollection of canonical batches -> the same rows with ``uf_*`` columns, leakage-safe."""
    return (rows
            | f"{label}/KeyByUser" >> beam.FlatMap(split_by_user, contract.user_id)
            | f"{label}/GroupByUser" >> beam.GroupByKey()
            | f"{label}/Compute" >> beam.ParDo(AddUserFeatures(contract)))


def _bucket_of_user(key: str, buckets: int = 64) -> int:
    import zlib

    return zlib.crc32(key.encode()) % buckets


def add_user_features_with_state(rows, states, contract: FeatureContract, label: str = "UserFeatures"):
    """As ``add_user_features``, each user starting from ``states`` (a PCollection of (user key, state), e.g.
    ``read_states`` of the previous partition; empty for the first). Returns (rows, states after these rows)."""
    keyed_rows = rows | f"{label}/KeyByUser" >> beam.FlatMap(split_by_user, contract.user_id)
    keyed_states = states | f"{label}/KeyStates" >> beam.Map(lambda kv: (_bucket_of_user(kv[0]), kv))
    out = ({"rows": keyed_rows, "state": keyed_states} | f"{label}/GroupByUser" >> beam.CoGroupByKey()
           | f"{label}/Compute" >> beam.ParDo(AddUserFeatures(contract, with_state=True))
           .with_outputs(STATE, main="rows"))
    return out.rows, out[STATE]


def write_states(states, path_prefix: str, label: str = "WriteUserState"):
    """Writes (user key, state) pairs as JSON lines ``path_prefix-*.jsonl``."""
    import json

    return (states | f"{label}/ToJson" >> beam.Map(lambda kv: json.dumps({"user": kv[0], "state": kv[1]},
                                                                          sort_keys=True))
            | f"{label}/Write" >> beam.io.WriteToText(path_prefix, file_name_suffix=".jsonl"))


def read_states(pipeline, pattern: str, label: str = "ReadUserState"):
    """(user key, state) pairs from ``write_states`` files (``pattern`` a glob); none when nothing matches."""
    import json

    import tensorflow as tf

    if not tf.io.gfile.glob(pattern):
        return pipeline | f"{label}/None" >> beam.Create([])
    return (pipeline | f"{label}/Read" >> beam.io.ReadFromText(pattern)
            | f"{label}/Parse" >> beam.Map(lambda line: (lambda d: (d["user"], d["state"]))(json.loads(line))))


SPILL_BUCKETS = 64      # user buckets of the spill; chunks are runs of whole buckets
_SPILL_SALT = b"spill/"  # another hash than the shuffle's buckets, so a chunk's users still spread over those
_IPC = {"compression": "lz4"}


class WriteArrowFiles(beam.DoFn):
    """Canonical batches -> Arrow IPC stream files (lz4) in ``out_dir``: with ``user_col``, one file per user
    bucket (``split_by_user(.., SPILL_BUCKETS, salt)``) and bundle, else one per bundle. Emits
    (bucket, path, rows) per file (bucket 0 without ``user_col``), only for files of committed bundles.
    Rows are buffered per file up to ``flush_rows`` so that files hold batches of a useful size."""

    def __init__(self, out_dir: str, user_col: str | None = None, flush_rows: int = 4096):
        self._out_dir, self._user_col, self._flush_rows = out_dir, user_col, flush_rows

    def start_bundle(self):
        self._files: Dict[int, list] = {}  # bucket -> [path, channel, writer, rows, buffered parts, buffered rows]

    def process(self, batch: pa.RecordBatch):
        parts = (split_by_user(batch, self._user_col, SPILL_BUCKETS, _SPILL_SALT) if self._user_col
                 else [(0, batch)])
        for bucket, part in parts:
            f = self._files.get(bucket)
            if f is None:
                f = self._files[bucket] = self._open(bucket, part.schema)
            f[4].append(part)
            f[5] += part.num_rows
            if f[5] >= self._flush_rows:
                self._flush(f)

    def _open(self, bucket: int, schema: pa.Schema) -> list:
        import uuid

        from apache_beam.io.filesystems import FileSystems

        path = FileSystems.join(self._out_dir, f"b{bucket:03d}-{uuid.uuid4().hex}.arrow")
        channel = FileSystems.create(path)
        return [path, channel, pa.ipc.new_stream(channel, schema, options=pa.ipc.IpcWriteOptions(**_IPC)), 0, [], 0]

    @staticmethod
    def _flush(f: list) -> None:
        if f[4]:
            f[2].write_table(pa.Table.from_batches(f[4]).combine_chunks())
            f[3] += f[5]
            f[4], f[5] = [], 0

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        for bucket, f in sorted(self._files.items()):
            self._flush(f)
            f[2].close()
            f[1].close()
            yield WindowedValue((bucket, f[0], f[3]), -1, [GlobalWindow()])
        self._files = {}


class ReadArrowFile(beam.DoFn):
    """Path of a ``WriteArrowFiles`` file -> its rows as batches of up to ``batch_rows`` rows, streamed."""

    def __init__(self, batch_rows: int = 10_000):
        self._batch_rows = batch_rows

    def process(self, path: str):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(path, compression_type="uncompressed") as fh:
            buf, n = [], 0
            for batch in pa.ipc.open_stream(fh):
                buf.append(batch)
                n += batch.num_rows
                if n >= self._batch_rows:
                    yield from pa.Table.from_batches(buf).combine_chunks().to_batches(max_chunksize=self._batch_rows)
                    buf, n = [], 0
            if n:
                yield from pa.Table.from_batches(buf).combine_chunks().to_batches(max_chunksize=self._batch_rows)


def write_arrow_files(rows, out_dir: str, manifest_path: str, user_col: str | None = None,
                      label: str = "Spill"):
    """Writes ``rows`` with ``WriteArrowFiles`` and the list of committed files, [[bucket, path, rows], ...]
    sorted, as JSON to ``manifest_path`` (what the driver reads back)."""
    import json

    def write_manifest(files):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(manifest_path) as fh:
            fh.write(json.dumps(sorted([list(f) for f in files])).encode())

    return (rows | f"{label}/Write" >> beam.ParDo(WriteArrowFiles(out_dir, user_col))
            | f"{label}/Collect" >> beam.combiners.ToList()
            | f"{label}/Manifest" >> beam.Map(write_manifest))


def read_manifest(manifest_path: str) -> list:
    import json

    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(manifest_path, compression_type="uncompressed") as fh:
        return [tuple(f) for f in json.loads(fh.read().decode())]


def read_arrow_files(pipeline, paths, batch_rows: int, label: str = "ReadArrow"):
    """Canonical batches from ``WriteArrowFiles`` files (``paths`` listed on the driver)."""
    return (pipeline | f"{label}/List" >> beam.Create(sorted(paths))
            | f"{label}/Spread" >> beam.Reshuffle()
            | f"{label}/Read" >> beam.ParDo(ReadArrowFile(batch_rows)))


def plan_chunks(files, max_rows: int) -> list:
    """Spilled files [(bucket, path, rows)] -> chunks, each a list of paths: consecutive whole buckets, as many as
    fit in ``max_rows`` rows (at least one bucket per chunk). Every bucket is in exactly one chunk, so all events of
    a user are; there is always at least one chunk (empty when nothing was spilled)."""
    by_bucket: Dict[int, list] = {}
    for bucket, path, rows in files:
        by_bucket.setdefault(int(bucket), []).append((path, int(rows)))
    chunks, paths, n = [], [], 0
    for bucket in sorted(by_bucket):
        rows = sum(r for _, r in by_bucket[bucket])
        if paths and n + rows > max_rows:
            chunks.append(paths)
            paths, n = [], 0
        paths = paths + [p for p, _ in by_bucket[bucket]]
        n += rows
    return chunks + [paths] if paths or not chunks else chunks


__all__ = ["ORDER_COL", "SPILL_BUCKETS", "STATE", "ReadArrowFile", "WriteArrowFiles", "add_user_features",
           "add_user_features_with_state", "compute_user_features", "compute_user_features_and_state", "new_state",
           "plan_chunks", "read_arrow_files", "read_manifest", "read_states", "split_by_user", "write_arrow_files",
           "write_states"]
