"""Reading raw logs into canonical Arrow record batches, with every bad record sent to a dead letter.

The driver lists the input once (``plan_files``: every file's path, its index in the sorted input and, for a
``files`` split, its split), on any Beam filesystem (local, ``gs://``, ``hdfs://``, ``s3://``); each planned
file is read by one ``ReadFile`` DoFn call (CSV, optionally gzip; Parquet; TFRecord of ``tf.Example``), which
opens it through Beam's ``FileSystems``. Records become canonical columns typed by the feature contract:

* features: nullable flat columns (string / int64 / float32); sequences: ``list<string>``, truncated to
  their ``max_length`` most recent tokens (counted, not rejected);
* the timestamp as int64 Unix seconds; labels int64 0/1 (continuous labels float32); oracle columns;
* ``__split``: the split where the reader can decide it (``files`` and ``hash`` splits), else ``""``.

A record that cannot be used goes to the dead-letter output as ``{"source": "file:line", "category": ...,
"reason": ..., "record": ...}``; every reason belongs to one of the ``CATEGORIES`` (the summary's
``rejected_by_reason`` counts them): a CSV line with the wrong number of fields (truncated or malformed),
undecodable bytes, a TFRecord that is not a ``tf.Example``, a missing required field, a bad timestamp, a
label outside {0, 1}, a funnel violation (post-click action or purchase without a click), a non-finite
number, a value of the wrong type. A feature with ``on_invalid: missing`` in the schema reads its non-finite
or unparsable values as missing instead (counted per feature, ``invalid_as_missing: <feature>``).
Each file's counts (rows in, rejected by reason, truncations...) leave the DoFn as one ``stats`` output, so
they are counted from committed outputs only, like the rows themselves.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as dt
import gzip
import hashlib
import itertools
import logging
import math
import os
from collections import Counter
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.features import FeatureContract
from transforms.schema import DatasetSchema

logger = logging.getLogger(__name__)

REJECTED = "rejected"
STATS = "stats"  # tag of ReadFile's per-file counts (one dict per file read)
SPLIT_COL = "__split"
ORDER_COL = "__order"  # (file index << 32) | record index: the deterministic tie-break after the timestamp
NAMESPACE = "rankline"
_ARROW = {"string": pa.string(), "int64": pa.int64(), "float32": pa.float32()}


# Dead-letter categories: every rejection names one (``Rejected.category``); the summary counts by category.
WRONG_FIELD_COUNT = "wrong field count"
INVALID_UTF8 = "invalid UTF-8"
NOT_A_TF_EXAMPLE = "not a tf.Example"
MISSING_FIELD = "missing required field"
BAD_TIMESTAMP = "bad timestamp"
LABEL_NOT_BINARY = "label not 0/1"
FUNNEL_VIOLATION = "funnel violation"
NON_FINITE = "non-finite value"
WRONG_TYPE = "wrong type"
CATEGORIES = (WRONG_FIELD_COUNT, INVALID_UTF8, NOT_A_TF_EXAMPLE, MISSING_FIELD, BAD_TIMESTAMP, LABEL_NOT_BINARY,
              FUNNEL_VIOLATION, NON_FINITE, WRONG_TYPE)


class Rejected(Exception):
    """A record-level problem: ``category`` (one of ``CATEGORIES``) and the message, the dead-letter reason."""

    def __init__(self, category: str, reason: str):
        super().__init__(reason)
        self.category = category


def canonical_columns(contract: FeatureContract) -> Dict[str, pa.DataType]:
    """Column -> Arrow type of the canonical batches (without ``__split``)."""
    cols: Dict[str, pa.DataType] = {}
    for f in contract.categorical:
        cols[f.name] = _ARROW[f.dtype]
    for f in contract.numeric:
        cols[f.name] = _ARROW[f.dtype]
    for f in contract.sequences:
        cols[f.name] = pa.list_(pa.string())
    if contract.timestamp:
        cols[contract.timestamp] = pa.int64()
    for c in contract.labels.binary_columns:
        cols[c] = pa.int64()
    for c in contract.labels.continuous:
        cols[c] = pa.float32()
    for c in contract.oracle:
        cols[c] = _ARROW[contract.raw_dtype(c)]
    return cols


class InputFile(NamedTuple):
    """One input file as the driver planned it: its path, its position in the sorted input (the high 32 bits
    of ``__order``) and, for a ``files`` split, its split (``""`` when no ``split.files`` pattern matches)."""
    path: str
    index: int
    split: str = ""


def match_files(pattern: str) -> List[str]:
    """Sorted paths matching a glob on any Beam filesystem (locally the same list as ``glob.glob``)."""
    from apache_beam.io.filesystems import FileSystems

    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _path_key(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def plan_files(schema: DatasetSchema) -> List[InputFile]:
    """The input files, numbered and (``files`` split) assigned to a split, computed once on the driver and
    handed to the readers as elements: no worker lists the input itself."""
    split_of: Dict[str, str] = {}
    if schema.split.kind == "files":
        base = os.path.dirname(schema.input.path)
        for name, pattern in schema.split.files.items():
            for path in match_files(os.path.join(base, pattern)):
                split_of[_path_key(path)] = name
    return [InputFile(path, i, split_of.get(_path_key(path), ""))
            for i, path in enumerate(match_files(schema.input.path))]


def parse_timestamp(value, fmt: str) -> int:
    """Raw timestamp -> Unix seconds. ``fmt``: 'unix', 'unix_ms' or a strftime pattern (UTC)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Rejected(MISSING_FIELD, "missing required field timestamp")
    try:
        if fmt == "unix":
            return int(float(value))
        if fmt == "unix_ms":
            return int(float(value)) // 1000
        text = value.decode() if isinstance(value, bytes) else str(value)
        return int(dt.datetime.strptime(text.strip(), fmt).replace(tzinfo=dt.timezone.utc).timestamp())
    except (ValueError, OverflowError):
        raise Rejected(BAD_TIMESTAMP, f"bad timestamp {value!r} (format {fmt!r})") from None


class RowConverter:
    """One raw record (column -> str/bytes/number/None) -> canonical typed values, or ``Rejected``."""

    def __init__(self, schema: DatasetSchema):
        self.schema = schema
        c = schema.contract
        self.contract = c
        self.types = {f.name: f.dtype for f in c.categorical}
        self.types.update({f.name: f.dtype for f in c.numeric})
        self.sequences = {f.name: f for f in c.sequences}
        self.required_labels = list(c.labels.binary_columns)
        self.continuous = list(c.labels.continuous)
        self.oracle = list(c.oracle)
        self.invalid_as_missing = {n for n, how in schema.on_invalid.items() if how == "missing"}

    @staticmethod
    def _missing(v) -> bool:
        return v is None or (isinstance(v, str) and v.strip() == "") or (isinstance(v, float) and math.isnan(v))

    def _number(self, name: str, v, dtype: str):
        if isinstance(v, (bytes, str)):
            text = v.decode() if isinstance(v, bytes) else v
            text = text.strip()
            try:
                x = float(text)
            except ValueError:
                raise Rejected(WRONG_TYPE, f"field {name}: expected {'int' if dtype == 'int64' else 'float'}, "
                                           f"got {text[:40]!r}") from None
        else:
            x = float(v)
        if not math.isfinite(x):
            raise Rejected(NON_FINITE, f"field {name}: non-finite value {x}")
        if dtype == "int64":
            if x != int(x):
                raise Rejected(WRONG_TYPE, f"field {name}: expected int, got {x}")
            return int(x)
        return x

    def _label(self, name: str, v) -> int:
        if self._missing(v):
            raise Rejected(MISSING_FIELD, f"missing required field {name}")
        x = self._number(name, v, "float32")
        if x not in (0.0, 1.0):
            raise Rejected(LABEL_NOT_BINARY, f"label {name}: expected 0 or 1, got {x}")
        return int(x)

    def convert(self, record: Dict, invalid: Optional[List[str]] = None) -> Tuple[Dict, List[str]]:
        """Returns (canonical values, names of truncated sequences); raises ``Rejected``. A feature with
        ``on_invalid: missing`` whose value is not a finite number of its type becomes None, and its name is
        appended to ``invalid`` (when given)."""
        out: Dict = {}
        truncated: List[str] = []
        for name, dtype in self.types.items():
            v = record.get(name)
            if self._missing(v):
                out[name] = None
                if isinstance(v, float) and name in self.invalid_as_missing and invalid is not None:
                    invalid.append(name)  # a NaN number (Parquet, TFRecord): counted like the vectorised path
            elif dtype == "string":
                out[name] = (v.decode() if isinstance(v, bytes) else str(v)).strip()
            elif name in self.invalid_as_missing:
                try:
                    out[name] = self._number(name, v, dtype)
                except Rejected:
                    out[name] = None
                    if invalid is not None:
                        invalid.append(name)
            else:
                out[name] = self._number(name, v, dtype)
        for name, f in self.sequences.items():
            if f.columns_prefix:
                v = [record[k] for k in record if k.startswith(f.columns_prefix) and not self._missing(record[k])]
            else:
                v = record.get(name)
            if self._missing(v):
                tokens: List[str] = []
            elif isinstance(v, (list, tuple)):
                tokens = [t.decode() if isinstance(t, bytes) else str(t) for t in v]
            else:
                text = v.decode() if isinstance(v, bytes) else str(v)
                tokens = [t for t in text.split(f.separator) if t != ""]
            if f.pad_token is not None:
                tokens = [t for t in tokens if t != f.pad_token]
            if len(tokens) > f.max_length:
                tokens = tokens[-f.max_length:]
                truncated.append(name)
            out[name] = tokens
        c = self.contract
        if c.timestamp:
            out[c.timestamp] = parse_timestamp(record.get(c.timestamp), self.schema.timestamp_format)
        for name in self.required_labels:
            out[name] = self._label(name, record.get(name))
        click = out[c.labels.click]
        if not click:
            bad = [n for n in list(c.labels.daction) + ([c.labels.purchase] if c.labels.purchase else []) if out[n]]
            if bad:
                raise Rejected(FUNNEL_VIOLATION, f"funnel violation: {', '.join(bad)} without click")
        for name in self.continuous:
            v = record.get(name)
            if self._missing(v):
                raise Rejected(MISSING_FIELD, f"missing required field {name}")
            out[name] = self._number(name, v, "float32")
        for name in self.oracle:
            v = record.get(name)
            if self._missing(v):
                raise Rejected(MISSING_FIELD, f"missing required field {name}")
            out[name] = self._number(name, v, c.raw_dtype(name))
        return out, truncated


def _hash_fraction(key: str) -> float:
    """u in [0, 1): BLAKE2b of the key's UTF-8 bytes with an 8-byte digest, read as a big-endian unsigned
    integer, divided by 2**64. Stable across processes, machines and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def hash_split(key: str, eval_fraction: float, test_fraction: float) -> str:
    """``test`` when u < test_fraction, ``eval`` when u < test_fraction + eval_fraction, else ``train``
    (u from ``_hash_fraction``)."""
    u = _hash_fraction(key)
    if u < test_fraction:
        return "test"
    if u < test_fraction + eval_fraction:
        return "eval"
    return "train"


def _hash_fractions(keys: List[str]) -> np.ndarray:
    """``_hash_fraction`` of each key, as float64 [len(keys)]."""
    return np.fromiter((_hash_fraction(k) for k in keys), dtype=np.float64, count=len(keys))


def hash_splits(keys: pa.Array, sources, eval_fraction: float, test_fraction: float) -> pa.Array:
    """``hash_split`` of n rows at once: ``keys`` [n] (any Arrow type) -> string array [n] of ``train`` /
    ``eval`` / ``test``. A row whose key is null is hashed by its source instead, as in ``ReadFile``'s row-wise
    path: ``sources(indices)`` gives the source strings of the rows at those indices (an int64 array).

    The same assignment as ``hash_split(str(key) if key is not None else source)`` row by row, but each distinct
    key is hashed once (``dictionary_encode``, then a take by index): a user with many rows costs one BLAKE2b."""
    n = len(keys)
    u = np.empty(n, dtype=np.float64)
    valid = np.asarray(keys.is_valid()) if keys.null_count else np.ones(n, dtype=bool)
    if keys.null_count < n:
        encoded = pc.dictionary_encode(keys.filter(pa.array(valid)) if keys.null_count else keys)
        u_uniq = _hash_fractions([str(k) for k in encoded.dictionary.to_pylist()])
        u[valid] = u_uniq[encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)]
    if keys.null_count:
        missing = np.flatnonzero(~valid)
        u[missing] = _hash_fractions(sources(missing))
    names = np.array(["test", "eval", "train"], dtype=object)
    which = np.where(u < test_fraction, 0, np.where(u < test_fraction + eval_fraction, 1, 2))
    return pa.array(names[which], pa.string())


class ReadFile(beam.DoFn):
    """``InputFile`` (or ``(path, index, split)``) -> canonical ``pa.RecordBatch``es (main), dead-letter dicts
    (tag ``rejected``) and one dict of the file's counts (tag ``stats``).

    ``report=False`` makes a silent reader for a second pass over the same files (no counts, no
    dead-letter output, no log lines): the pipeline reads the input once per pass instead of holding it.
    A bare path (outside a pipeline, e.g. sampling rows to score) is looked up in ``plan_files``.
    """

    def __init__(self, schema: DatasetSchema, batch_rows: int = 10_000, report: bool = True):
        self.schema = schema
        self.batch_rows = batch_rows
        self.report = report

    def setup(self):
        self.converter = RowConverter(self.schema)
        self.columns = canonical_columns(self.schema.contract)
        self.log1p = [f.name for f in self.schema.contract.numeric if f.log1p]
        self.split = self.schema.split
        self.split_key = self.split.key or self.schema.contract.user_id  # hash split key column (may be None)
        self._plan: Optional[Dict[str, InputFile]] = None

    def _planned(self, element) -> InputFile:
        if not isinstance(element, str):
            return InputFile(*element)
        if self._plan is None:
            self._plan = {_path_key(f.path): f for f in plan_files(self.schema)}
        return self._plan.get(_path_key(element), InputFile(element, len(self._plan)))

    def _counter(self, name: str, n: int = 1):
        if self.report:
            self._stats[name] += n
            beam.metrics.Metrics.counter(NAMESPACE, name).inc(n)  # for the runner's UI; the summary uses stats

    def process(self, element):
        self._stats: Counter = Counter()
        for out in self._process(self._planned(element)):
            if self.report or not isinstance(out, beam.pvalue.TaggedOutput):
                yield out
        if self.report:
            yield beam.pvalue.TaggedOutput(STATS, dict(self._stats))

    def _process(self, planned: InputFile):
        path = planned.path
        fmt = self.schema.input.format
        split_of_file = ""
        if self.split.kind == "files":
            split_of_file = planned.split
            if not split_of_file:
                if self.report:
                    logger.warning("input file %s matches no split.files pattern: skipped", path)
                self._counter("files_unassigned")
                return
        base = planned.index << 32
        read = self._process_parquet if fmt == "parquet" and self._vectorisable() else self._process_rows
        rows = yield from read(path, split_of_file, base)
        if rows == 0 and self.report:
            logger.warning("empty input file: %s", path)
            self._counter("empty_files")

    def _process_rows(self, path: str, split_of_file: str, base: int):
        """Record by record (CSV, TFRecord, Parquet with sequences): ``RowConverter``; returns the count."""
        rows = 0
        buf: List[Tuple[Dict, str, int]] = []
        for source, record, problem in self._records(path, self.schema.input.format):
            rows += 1
            self._counter("rows_in")
            invalid: List[str] = []
            try:
                if problem:
                    raise problem
                values, truncated = self.converter.convert(record, invalid)
            except Rejected as exc:
                self._counter("rows_rejected")
                self._counter("rejected: " + exc.category)
                yield beam.pvalue.TaggedOutput(REJECTED, {"source": source, "category": exc.category,
                                                          "reason": str(exc), "record": _printable(record)})
                continue
            for name in invalid:
                self._counter(f"invalid_as_missing: {name}")
            for name in truncated:
                self._counter(f"sequence_truncated: {name}")
            for name in self.log1p:
                if values.get(name) is not None and values[name] < 0:
                    self._counter(f"log1p_clipped: {name}")
            split = (self._hash_split(values.get(self.split_key), source) if self.split.kind == "hash"
                     else split_of_file)
            buf.append((values, split, base + rows))
            if len(buf) >= self.batch_rows:
                yield self._batch(buf)
                buf = []
        if buf:
            yield self._batch(buf)
        return rows

    # ---- vectorised Parquet path ------------------------------------------------------------------
    def _vectorisable(self) -> bool:
        """Arrow compute handles everything but sequences and strftime timestamps (row-wise path)."""
        return (not any(not f.name.startswith("uf_") for f in self.schema.contract.sequences)
                and self.schema.timestamp_format in ("unix", "unix_ms"))

    def _process_parquet(self, path: str, split_of_file: str, base: int):
        """Row groups -> canonical batches with the row-wise path's rules, applied as Arrow compute kernels;
        returns the count."""
        name = os.path.basename(path)
        offset = 0
        for table in _row_groups(path, self.columns):
            n = table.num_rows
            self._counter("rows_in", n)
            cols, reasons, categories = self._validate_table(table, n)
            bad = np.flatnonzero(reasons != None)  # noqa: E711  (object array)
            if len(bad):
                self._counter("rows_rejected", len(bad))
                records = table.take(pa.array(bad)).to_pylist()
                for i, rec in zip(bad, records):
                    self._counter("rejected: " + categories[i])
                    yield beam.pvalue.TaggedOutput(REJECTED, {"source": f"{name}:row {offset + i}",
                                                              "category": categories[i], "reason": reasons[i],
                                                              "record": _printable(rec)})
            good = np.flatnonzero(reasons == None)  # noqa: E711
            for col in self.log1p:
                values = cols[col].to_numpy(zero_copy_only=False)
                negatives = int(np.sum(np.nan_to_num(np.asarray(values, dtype=np.float64)[good], nan=0.0) < 0))
                if negatives:
                    self._counter(f"log1p_clipped: {col}", negatives)
            order = base + offset + 1 + np.arange(n, dtype=np.int64)
            arrays = [cols[c] for c in self.columns]
            batch = pa.RecordBatch.from_arrays(arrays, list(self.columns))
            if len(good) < n:
                batch = batch.take(pa.array(good))
                order = order[good]
            if self.split.kind == "hash":
                keys = (batch.column(batch.schema.get_field_index(self.split_key)) if self.split_key
                        else pa.nulls(batch.num_rows))
                row_sources = lambda idx: [f"{name}:row {i}" for i in (order[idx] - base - 1).tolist()]  # noqa
                splits = hash_splits(keys, row_sources, self.split.eval_fraction, self.split.test_fraction)
            else:
                splits = pa.array(np.full(batch.num_rows, split_of_file, dtype=object), pa.string())
            for start in range(0, batch.num_rows, self.batch_rows):
                part = batch.slice(start, self.batch_rows)
                extra = [splits.slice(start, self.batch_rows),
                         pa.array(order[start:start + self.batch_rows], pa.int64())]
                yield pa.RecordBatch.from_arrays(list(part.columns) + extra,
                                                 list(self.columns) + [SPLIT_COL, ORDER_COL])
            offset += n
            if self.report:
                logger.info("read %s: %d rows so far", name, offset)
        return offset

    def _validate_table(self, table: pa.Table, n: int):
        """Canonical column arrays, a per-row reason (None = good) and its category, like ``RowConverter``.

        A feature with ``on_invalid: missing`` gets a null where its value is not a finite number of its type
        (counted, ``invalid_as_missing: <feature>``) instead of a reason."""
        c = self.schema.contract
        reasons = np.full(n, None, dtype=object)
        categories = np.full(n, None, dtype=object)
        invalid_as_missing = self.converter.invalid_as_missing

        def flag(mask, category, reason_fn, col=None):
            mask = np.asarray(mask, dtype=bool) & (reasons == None)  # noqa: E711  (first reason wins)
            if col in invalid_as_missing:  # no reason: the caller nulls these values
                return
            for i in np.flatnonzero(mask):
                reasons[i] = reason_fn(i)
                categories[i] = category

        cols: Dict[str, pa.Array] = {}
        for col, t in self.columns.items():
            if col not in table.column_names:
                cols[col] = pa.nulls(n, type=t)
                continue
            arr = table.column(col).combine_chunks()
            if pa.types.is_string(t):
                if not pa.types.is_string(arr.type):
                    arr = pc.cast(arr, pa.string())
                arr = pc.utf8_trim_whitespace(arr)
                arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)
            elif pa.types.is_list(t):
                arr = pa.array([[] for _ in range(n)], type=t)  # derived later (uf_history)
            else:
                if pa.types.is_floating(arr.type):
                    values = arr.to_numpy(zero_copy_only=False)
                    valid = np.asarray(arr.is_valid())
                    finite = np.isfinite(np.where(valid, values, 0.0))
                    bad = valid & ~finite
                    flag(bad, NON_FINITE, lambda i, col=col, v=values: f"field {col}: non-finite value {v[i]}", col)
                    if pa.types.is_integer(t):
                        frac = valid & finite & (np.where(valid, values, 0) % 1 != 0)
                        flag(frac, WRONG_TYPE, lambda i, col=col, v=values: f"field {col}: expected int, got {v[i]}",
                             col)
                        bad |= frac
                        values = np.where(valid & finite & (np.where(valid, values, 0) % 1 == 0), values, 0)
                        arr = pa.array(values.astype(np.int64), mask=~valid)
                    if col in invalid_as_missing and bad.any():
                        self._counter(f"invalid_as_missing: {col}", int(bad.sum()))
                        arr = pc.if_else(pa.array(bad), pa.scalar(None, arr.type), arr)
                if col in invalid_as_missing and (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
                    arr = self._parse_or_null(col, arr, t)
                try:
                    arr = pc.cast(arr, t, safe=False)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    text = arr.to_pylist()
                    flag(np.ones(n, bool), WRONG_TYPE, lambda i, col=col: f"field {col}: expected "
                         f"{'int' if pa.types.is_integer(t) else 'float'}, got {str(text[i])[:40]!r}")
                    arr = pa.nulls(n, type=t)
            cols[col] = arr
        required = ([c.timestamp] if c.timestamp else []) + list(c.labels.binary_columns) \
            + list(c.labels.continuous) + list(c.oracle)
        for col in required:
            valid = np.asarray(cols[col].is_valid())
            what = "timestamp" if col == c.timestamp else col
            flag(~valid, MISSING_FIELD, lambda i, what=what: f"missing required field {what}")
        if c.timestamp and self.schema.timestamp_format == "unix_ms":
            cols[c.timestamp] = pc.divide(cols[c.timestamp], 1000)
        for col in c.labels.binary_columns:
            v = cols[col].to_numpy(zero_copy_only=False)
            ok = np.isin(np.nan_to_num(v.astype(np.float64), nan=0.0), (0.0, 1.0))
            flag(~ok, LABEL_NOT_BINARY, lambda i, col=col, v=v: f"label {col}: expected 0 or 1, got {float(v[i])}")
        click = np.nan_to_num(cols[c.labels.click].to_numpy(zero_copy_only=False).astype(np.float64)) == 1
        later = list(c.labels.daction) + ([c.labels.purchase] if c.labels.purchase else [])
        if later:
            pos = {col: np.nan_to_num(cols[col].to_numpy(zero_copy_only=False).astype(np.float64)) == 1
                   for col in later}
            any_later = np.logical_or.reduce([pos[col] for col in later])
            flag(~click & any_later, FUNNEL_VIOLATION,
                 lambda i: "funnel violation: " + ", ".join(col for col in later if pos[col][i]) + " without click")
        return cols, reasons, categories

    def _parse_or_null(self, col: str, arr: pa.Array, t: pa.DataType) -> pa.Array:
        """Text values of an ``on_invalid: missing`` column -> float64 with null where the text is not a finite
        number of type ``t`` (counted); the caller casts to ``t``."""
        parsed, bad = [], 0
        for v in arr.to_pylist():
            x = None
            if v is not None and v.strip():
                try:
                    x = float(v)
                except ValueError:
                    x = None
                if x is None or not math.isfinite(x) or (pa.types.is_integer(t) and x != int(x)):
                    x, bad = None, bad + 1
            parsed.append(x)
        if bad:
            self._counter(f"invalid_as_missing: {col}", bad)
        return pa.array(parsed, pa.float64())

    def _hash_split(self, key_value, source: str) -> str:
        """Split of a record by its key column's value, or by its source position when it has none."""
        key = str(key_value) if key_value is not None else source
        return hash_split(key, self.split.eval_fraction, self.split.test_fraction)

    def _batch(self, buf: Sequence[Tuple[Dict, str, int]]) -> pa.RecordBatch:
        arrays = [pa.array([v[name] for v, _, _ in buf], type=t) for name, t in self.columns.items()]
        arrays.append(pa.array([s for _, s, _ in buf], type=pa.string()))
        arrays.append(pa.array([o for _, _, o in buf], type=pa.int64()))
        return pa.RecordBatch.from_arrays(arrays, list(self.columns) + [SPLIT_COL, ORDER_COL])

    # ---- formats ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _open(self, path: str):
        comp = self.schema.input.compression
        with _open_raw(path) as raw:
            if comp == "gzip" or (comp == "auto" and path.endswith(".gz")):
                with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                    yield fh
            else:
                yield raw

    def _records(self, path: str, fmt: str) -> Iterator[Tuple[str, Optional[Dict], Optional[str]]]:
        name = os.path.basename(path)
        if fmt == "csv":
            yield from self._csv_records(path, name)
        elif fmt == "parquet":
            yield from self._parquet_records(path, name)
        else:
            yield from self._tfrecord_records(path, name)

    def _csv_records(self, path: str, name: str):
        opts = self.schema.input.csv
        with self._open(path) as fh:
            lines = iter(fh)
            header = list(opts.columns) if opts.columns else None
            lineno = 0
            if opts.header:
                first = next(lines, None)
                lineno += 1
                if first is None:
                    return
                file_header = next(csv.reader([first.decode("utf-8-sig", errors="replace").rstrip("\r\n")],
                                              delimiter=opts.delimiter))
                if opts.header == "auto" and file_header != header:
                    lines = itertools.chain([first], lines)  # no header line in this file: it is a record
                    lineno -= 1
                header = header or file_header
            for raw in lines:
                lineno += 1
                source = f"{name}:{lineno}"
                try:
                    text = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    yield source, None, Rejected(INVALID_UTF8, f"invalid UTF-8 at byte {exc.start}")
                    continue
                if not text.strip():
                    continue
                fields = next(csv.reader([text], delimiter=opts.delimiter))
                if len(fields) != len(header):
                    yield source, {"line": text[:200]}, Rejected(
                        WRONG_FIELD_COUNT, f"expected {len(header)} fields, got {len(fields)} (truncated or malformed line)")
                    continue
                yield source, dict(zip(header, fields)), None

    def _parquet_records(self, path: str, name: str):
        offset = 0
        for table in _row_groups(path, self.columns):
            for i, record in enumerate(table.to_pylist()):
                yield f"{name}:row {offset + i}", record, None
            offset += table.num_rows

    def _tfrecord_records(self, path: str, name: str):
        import tensorflow as tf

        comp = self.schema.input.compression
        ctype = "GZIP" if comp == "gzip" or (comp == "auto" and path.endswith(".gz")) else ""
        for i, raw in enumerate(tf.data.TFRecordDataset(path, compression_type=ctype).as_numpy_iterator()):
            source = f"{name}:record {i}"
            try:
                ex = tf.train.Example.FromString(raw)
            except Exception as exc:  # noqa: BLE001  (any decode failure is a bad record)
                yield source, None, Rejected(NOT_A_TF_EXAMPLE, f"not a tf.Example ({type(exc).__name__})")
                continue
            record = {}
            for key, feat in ex.features.feature.items():
                kind = feat.WhichOneof("kind")
                values = list(getattr(feat, kind).value) if kind else []
                if key in self.converter.sequences:
                    record[key] = values
                else:
                    record[key] = values[0] if len(values) == 1 else (None if not values else values)
            yield source, record, None


def _open_raw(path: str):
    """A binary, seekable reader of ``path`` on any Beam filesystem (local, gs://, hdfs://, s3://)."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _row_groups(path: str, columns) -> Iterator[pa.Table]:
    """The row groups of a Parquet file on any Beam filesystem, as tables of those ``columns`` it has."""
    import pyarrow.parquet as pq

    with _open_raw(path) as fh:
        pf = pq.ParquetFile(fh)
        wanted = [c for c in columns if c in pf.schema_arrow.names]
        for rg in range(pf.num_row_groups):
            yield pf.read_row_group(rg, columns=wanted)


def _printable(record) -> str:
    if record is None:
        return ""
    text = repr(record)
    return text if len(text) <= 1000 else text[:1000] + "..."


def split_batch_by_time(batch: pa.RecordBatch, timestamp: str, cutoffs: Tuple[float, float]) -> Dict[str, pa.RecordBatch]:
    """Assigns ``train`` / ``eval`` / ``test`` by timestamp: [.., eval_cut) / [eval_cut, test_cut) / [test_cut, ..]."""
    ts = batch.column(batch.schema.get_field_index(timestamp))
    eval_cut, test_cut = cutoffs
    out = {}
    masks = {"train": pc.less(ts, eval_cut),
             "eval": pc.and_(pc.greater_equal(ts, eval_cut), pc.less(ts, test_cut)),
             "test": pc.greater_equal(ts, test_cut)}
    for split, mask in masks.items():
        part = batch.filter(mask)
        if part.num_rows:
            out[split] = part
    return out


def time_range(batches) -> Tuple[float, float, int]:
    lo, hi, n = float("inf"), float("-inf"), 0
    for b in batches:
        lo, hi, n = min(lo, b[0]), max(hi, b[1]), n + b[2]
    return lo, hi, n


def batch_time_range(batch: pa.RecordBatch, timestamp: str) -> Tuple[float, float, int]:
    if batch.num_rows == 0:
        return float("inf"), float("-inf"), 0
    mm = pc.min_max(batch.column(batch.schema.get_field_index(timestamp)))
    return float(mm["min"].as_py()), float(mm["max"].as_py()), batch.num_rows


__all__ = ["CATEGORIES", "InputFile", "ReadFile", "RowConverter", "Rejected", "canonical_columns", "hash_split", "hash_splits", "match_files",
           "plan_files", "split_batch_by_time", "REJECTED", "SPLIT_COL", "ORDER_COL", "STATS"]
