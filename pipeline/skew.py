"""Training/serving skew: the data checks of ``pipeline.beam.data_checks`` run on logged serving requests.

    python -m pipeline.skew --base WORK_DIR --requests FILE [--out DIR] [--format auto|predictionlog|jsonl]
    python -m pipeline.skew --statistics statistics.pb --schema SCHEMA.yaml --requests FILE [--out DIR]

(The issue asked for ``serving.skew``; it lives in ``pipeline/`` because ``serving/`` must not import
``pipeline/``.) ``--base`` is a ``pipeline.run`` work dir (the reference is the statistics the served model was
last trained on: ``pipeline.retrain.load_state``); ``--statistics``/``--schema`` name them directly.

Request logs:

* ``predictionlog``: a TFRecord file of ``tensorflow_serving.apis.PredictionLog`` (TF Serving's request logs, the
  format of ``serving/warmup.py``'s warmup file): each ``predict_log.request.inputs["examples"]`` is a tf.string
  [B] tensor of serialized raw ``tf.Example``s, one row each;
* ``jsonl``: one JSON object per line, raw column -> value (a request's row as the client built it).

Each row becomes canonical values of the contract's serving columns, typed by the raw dtypes (``string`` values
are not stripped: a padded value is a skew the serving graph sees); a missing feature is null; labels are never
in requests, so the label columns are left out of both statistics. ``uf_*`` columns are serving inputs and are
compared like the others. The statistics (``StatisticsFn`` over the *training* histogram boundaries, so both
histograms share buckets) are compared with ``data_checks.compare``: missing/new columns (columns of the
requests vs the serving columns training saw), missing rates and numeric drift. A record or row that does not
parse (not a PredictionLog / tf.Example / JSON object, a value of the wrong type, several values for a scalar
feature) is counted as rejected with its reason, and the rejected share (rejected / (rows + rejected)) is checked
as ``reject_rate``. Writes ``OUT/skew.json`` (``data_checks.anomalies_json`` plus the request counts) and
``OUT/statistics.pb`` (the requests' statistics). Exit code 0 without blocking anomalies, 3 with, 2 on usage
errors (a missing file, an unknown format).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa

from pipeline.beam import data_checks as dc
from pipeline.beam.sources import Rejected, canonical_columns, parse_timestamp
from transforms.features import FeatureContract

EXIT_OK, EXIT_USAGE, EXIT_DATA = 0, 2, 3
FORMATS = ("predictionlog", "jsonl")
BATCH_ROWS = 4096
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class UsageError(Exception):
    """A usage problem (exit 2); the message is one line naming the file."""


class BadRow(Exception):
    """A record or row that cannot be used; the message is its reason."""


# ---- reading the logs ----------------------------------------------------------------------------------------
def detect_format(path: str) -> str:
    """``jsonl`` by suffix or when the first non-blank byte is ``{``; ``predictionlog`` when the file's first
    TFRecord frame reads (length and CRCs checked); else ``UsageError``."""
    if not os.path.isfile(path):
        raise UsageError(f"requests file not found: {path}")
    if path.lower().endswith(_JSONL_SUFFIXES):
        return "jsonl"
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()  # (a .gz file is read as a gzipped TFRecord file)
    if not head:
        raise UsageError(f"{path}: the requests file is empty")
    if head[:1] == b"{":
        return "jsonl"
    import tensorflow as tf

    try:
        ctype = "GZIP" if path.endswith(".gz") else ""
        next(iter(tf.data.TFRecordDataset(path, compression_type=ctype).take(1).as_numpy_iterator()), None)
    except tf.errors.OpError:
        raise UsageError(f"{path}: unknown request log format (neither JSONL nor a TFRecord file of PredictionLog); "
                         f"pass --format") from None
    return "predictionlog"


def _feature_values(feat) -> list:
    kind = feat.WhichOneof("kind")
    return list(getattr(feat, kind).value) if kind else []


def predictionlog_records(path: str) -> Iterator[Tuple[str, Optional[List[Dict]], Optional[str]]]:
    """(source, rows or None, reason): one item per PredictionLog record; a row is {feature: [values]} of one
    raw ``tf.Example`` (or a ``BadRow`` reason string in place of a row that does not parse)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    name = os.path.basename(path)
    ctype = "GZIP" if path.endswith(".gz") else ""
    it = tf.data.TFRecordDataset(path, compression_type=ctype).as_numpy_iterator()
    i = 0
    while True:
        source = f"{name}:record {i}"
        try:
            raw = next(it)
        except StopIteration:
            return
        except tf.errors.OpError as exc:  # a corrupt frame: nothing after it can be read
            if i == 0:
                raise UsageError(f"{path}: not a TFRecord file ({type(exc).__name__} at the first record)") from None
            yield source, None, f"corrupt TFRecord frame, the rest of the file is unreadable ({type(exc).__name__})"
            return
        i += 1
        log = prediction_log_pb2.PredictionLog()
        try:
            log.ParseFromString(raw)
        except Exception as exc:  # noqa: BLE001  (protobuf raises DecodeError)
            yield source, None, f"not a PredictionLog ({type(exc).__name__})"
            continue
        kind = log.WhichOneof("log_type")
        if kind != "predict_log":
            yield source, None, f"a {kind or 'empty'} record (only predict_log requests are read)"
            continue
        tensor = log.predict_log.request.inputs.get("examples")
        if tensor is None or tensor.dtype != tf.string.as_datatype_enum:
            yield source, None, 'request has no tf.string input "examples"'
            continue
        rows: List = []
        for data in tensor.string_val:
            try:
                ex = tf.train.Example.FromString(data)
            except Exception as exc:  # noqa: BLE001
                rows.append(f"not a tf.Example ({type(exc).__name__})")
                continue
            rows.append({k: _feature_values(f) for k, f in ex.features.feature.items()})
        yield source, rows, None


def jsonl_records(path: str) -> Iterator[Tuple[str, Optional[List[Dict]], Optional[str]]]:
    """(source, [row] or None, reason): one item per non-blank line."""
    name = os.path.basename(path)
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            source = f"{name}:{lineno}"
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, ValueError) as exc:
                yield source, None, f"not JSON ({type(exc).__name__})"
                continue
            if not isinstance(row, dict):
                yield source, None, f"not a JSON object ({type(row).__name__})"
                continue
            yield source, [row], None


# ---- rows -> canonical values -------------------------------------------------------------------------------
class RequestRows:
    """Raw request rows (column -> value or [values]) -> canonical values of the serving columns.

    Scalar columns take one value (string / int64 / float32 as the contract's raw dtype, missing -> None);
    sequences take a list or a ``separator``-joined string, keeping the last ``max_length`` tokens; the
    timestamp is Unix seconds (a string is read with the schema's ``timestamp_format``).
    """

    def __init__(self, contract: FeatureContract, timestamp_format: str = "unix"):
        self.contract = contract
        self.timestamp_format = timestamp_format
        self.sequences = {f.name: f for f in contract.sequences}
        self.types = {c: t for c, t in canonical_columns(contract).items() if c in contract.serving_columns}

    @staticmethod
    def _scalar(name: str, v):
        if isinstance(v, (list, tuple)):
            if len(v) > 1:
                raise BadRow(f"field {name}: {len(v)} values, expected one")
            return v[0] if v else None
        return v

    def _number(self, name: str, v, dtype: str):
        if isinstance(v, (bytes, str)):
            try:
                v = float(v.decode() if isinstance(v, bytes) else v)
            except (UnicodeDecodeError, ValueError):
                raise BadRow(f"field {name}: expected a number, got {v[:40]!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadRow(f"field {name}: expected a number, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise BadRow(f"field {name}: non-finite value {v}")
        if dtype == "int64":
            if v != int(v) or not -2 ** 63 <= int(v) < 2 ** 63:
                raise BadRow(f"field {name}: expected an int64, got {v}")
            return int(v)
        return float(v)

    def convert(self, row: Dict) -> Dict:
        """One request row -> {serving column: canonical value}; raises ``BadRow``."""
        out: Dict = {}
        for name, atype in self.types.items():
            v = row.get(name)
            if name in self.sequences:
                f = self.sequences[name]
                if v is None:
                    tokens = []
                elif isinstance(v, (list, tuple)):
                    tokens = [self._text(name, t) for t in v]
                else:
                    tokens = [t for t in self._text(name, v).split(f.separator) if t]
                if f.pad_token is not None:
                    tokens = [t for t in tokens if t != f.pad_token]
                out[name] = tokens[-f.max_length:]
                continue
            v = self._scalar(name, v)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                out[name] = None
            elif name == self.contract.timestamp:
                out[name] = self._timestamp(v)
            elif pa.types.is_string(atype):
                out[name] = self._text(name, v)
            else:
                out[name] = self._number(name, v, "int64" if pa.types.is_integer(atype) else "float32")
        return out

    @staticmethod
    def _text(name: str, v) -> str:
        if isinstance(v, bytes):
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRow(f"field {name}: invalid UTF-8 at byte {exc.start}") from None
        return v if isinstance(v, str) else str(v)

    def _timestamp(self, v) -> int:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return int(self._number(self.contract.timestamp, v, "float32"))
        try:
            return parse_timestamp(self._text(self.contract.timestamp, v), self.timestamp_format)
        except Rejected as exc:
            raise BadRow(str(exc)) from None

    def batch(self, rows: Sequence[Dict]) -> pa.RecordBatch:
        names = list(self.types)
        return pa.RecordBatch.from_arrays([pa.array([r[n] for r in rows], type=self.types[n]) for n in names], names)


@dataclass
class RequestStats:
    """What ``read_requests`` found: request records read, rows used, rejected records/rows by reason, the
    columns the rows carried, and the requests' statistics."""

    requests: int = 0
    rows: int = 0
    rejected: Counter = field(default_factory=Counter)
    columns: set = field(default_factory=set)
    statistics: object = None

    @property
    def unparseable(self) -> int:
        return sum(self.rejected.values())

    @property
    def reject_rate(self) -> float:
        return self.unparseable / max(1, self.rows + self.unparseable)


def read_requests(path: str, fmt: str, contract: FeatureContract, reference, timestamp_format: str = "unix",
                  batch_rows: int = BATCH_ROWS) -> RequestStats:
    """Reads a request log and computes its statistics over the reference's histogram boundaries (``StatisticsFn``
    without Beam: one accumulator, ``batch_rows`` rows per canonical RecordBatch)."""
    records = predictionlog_records(path) if fmt == "predictionlog" else jsonl_records(path)
    conv = RequestRows(contract, timestamp_format)
    fn = dc.StatisticsFn(contract, "serving", dc.boundaries(reference))
    acc = fn.create_accumulator()
    out = RequestStats()
    buf: List[Dict] = []
    for _source, rows, reason in records:
        out.requests += 1
        if rows is None:
            out.rejected[reason] += 1
            continue
        for row in rows:
            if isinstance(row, str):
                out.rejected[row] += 1
                continue
            try:
                buf.append(conv.convert(row))
            except BadRow as exc:
                out.rejected[str(exc)] += 1
                continue
            out.columns.update(row)
            if len(buf) >= batch_rows:
                acc = fn.add_input(acc, conv.batch(buf))
                out.rows, buf = out.rows + len(buf), []
    if buf:
        acc = fn.add_input(acc, conv.batch(buf))
        out.rows += len(buf)
    out.statistics = fn.extract_output(acc)
    return out


# ---- the comparison --------------------------------------------------------------------------------------------
def without_columns(stats, columns: Sequence[str]):
    """A copy of a statistics proto without the features named in ``columns``."""
    out = type(stats)()
    out.CopyFrom(stats)
    ds = out.datasets[0]
    keep = [f for f in ds.features if f.path.step[0] not in set(columns)]
    del ds.features[:]
    ds.features.extend(keep)
    return out


def skew_anomalies(reference, found: RequestStats, contract: FeatureContract, spec,
                   reference_reject_rate: float = 0.0) -> List[dc.Anomaly]:
    """``data_checks.compare`` of the requests against the training statistics, labels left out. The columns
    check compares the requests' columns with the serving columns training saw (a statistics column with no
    value in training is not expected in requests)."""
    labels = contract.label_columns
    ref, cur = without_columns(reference, labels), without_columns(found.statistics, labels)
    empty = {n for n, f in dc.features_by_name(ref).items() if dc.missing_rate(f) == 1.0}
    expected = [c for c in contract.serving_columns if c not in empty]
    return dc.compare(ref, cur, spec, contract, reference_columns=expected, current_columns=sorted(found.columns),
                      reference_reject_rate=reference_reject_rate if found.unparseable else 0.0,
                      current_reject_rate=found.reject_rate)


# ---- the command ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.skew", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--base", help="work dir of a finished pipeline.run (its last accepted training statistics)")
    ref.add_argument("--statistics", help="training statistics.pb (with --schema) instead of --base")
    p.add_argument("--schema", help="the dataset schema YAML (with --statistics)")
    p.add_argument("--requests", required=True, help="logged requests: PredictionLog TFRecord file or JSONL")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    p.add_argument("--out", default=None, help="where skew.json goes (default BASE/skew, or . with --statistics)")
    return p


def _reference(args) -> Tuple[object, object, float, str]:
    """(training statistics, schema, reference reject rate, output dir) from --base or --statistics/--schema."""
    from transforms.schema import load_schema

    if args.base:
        if not os.path.isdir(args.base):
            raise UsageError(f"work dir not found: {args.base}")
        from pipeline.retrain import load_state

        try:
            state = load_state(args.base)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
        stats_path, schema_path = state["reference_statistics"], state["schema"]
        reject_rate, out = float(state.get("reference_reject_rate", 0.0)), os.path.join(args.base, "skew")
    else:
        if not args.schema:
            raise UsageError("--statistics needs --schema (the dataset schema YAML)")
        stats_path, schema_path, reject_rate, out = args.statistics, args.schema, 0.0, "."
    if not os.path.isfile(stats_path):
        raise UsageError(f"statistics file not found: {stats_path}")
    if not os.path.isfile(schema_path):
        raise UsageError(f"schema file not found: {schema_path}")
    try:
        reference = dc.read_statistics(stats_path)
    except Exception as exc:  # noqa: BLE001  (DecodeError)
        raise UsageError(f"{stats_path}: not a DatasetFeatureStatisticsList ({type(exc).__name__})") from None
    if not reference.datasets:
        raise UsageError(f"{stats_path}: holds no dataset statistics")
    return reference, load_schema(schema_path), reject_rate, args.out or out


def run(argv: Optional[Sequence[str]] = None) -> Tuple[int, Dict]:
    """Runs the check; returns (exit code, the skew.json document)."""
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.requests):
        raise UsageError(f"requests file not found: {args.requests}")
    reference, schema, reference_reject_rate, out_dir = _reference(args)
    fmt = detect_format(args.requests) if args.format == "auto" else args.format
    found = read_requests(args.requests, fmt, schema.contract, reference, schema.timestamp_format)
    if not found.requests:
        raise UsageError(f"{args.requests}: holds no requests")
    anomalies = skew_anomalies(reference, found, schema.contract, schema.validation, reference_reject_rate)
    doc = dc.anomalies_json(anomalies, schema.validation)
    doc["requests"] = {"file": args.requests, "format": fmt, "read": found.requests, "rows": found.rows,
                       "unparseable": found.unparseable, "reasons": dict(found.rejected.most_common())}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "skew.json"), "w") as fh:
        fh.write(json.dumps(doc, indent=2, sort_keys=True))
    dc.write_statistics(found.statistics, os.path.join(out_dir, "statistics.pb"))
    print(dc.format_anomalies(anomalies))
    reasons = "; ".join(f"{n} x {r}" for r, n in found.rejected.most_common(3))
    print(f"skew: {found.requests} requests read, {found.rows} rows, {found.unparseable} unparseable"
          + (f" ({reasons})" if reasons else "") + f" -> {os.path.join(out_dir, 'skew.json')}")
    if any(a.blocking for a in anomalies):
        print(str(dc.DataCheckFailed(anomalies)))
        return EXIT_DATA, doc
    return EXIT_OK, doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    from transforms.schema import SchemaError

    try:
        return run(argv)[0]
    except (UsageError, SchemaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
