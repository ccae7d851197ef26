"""Dataset schema files (YAML): where the data is, how to read it, what each column is, how to transform it.

A schema is validated up front; every error names the schema file, the key path and the problem, e.g.
``criteo.yaml: features[3].transform: unknown transform 'log2' (expected one of: hash, numeric, ...)``.

    name: criteo-sample
    input:
      path: "{shared}/data/criteo-sample/criteo_sample.txt"   # glob; {shared} = ../shared beside the repo
      format: csv                    # csv | parquet | tfrecord
      compression: auto              # auto (by extension) | none | gzip
      csv: {delimiter: ",", header: true}          # or header: false + columns: [...]
    roles:
      user_id: userid                # optional
      item_id: adgroup_id            # optional
      timestamp: {column: time_stamp, format: "%Y-%m-%d %H:%M:%S"}   # or unix | unix_ms; optional
      segment: cms_segid             # optional explicit segment / scenario columns
      scenario: pid
    labels:
      click: clk
      daction: [cart, wish]          # optional post-click actions (DAction = OR)
      purchase: purchase             # optional
      continuous: [staytime]         # optional
    features:
      - {name: I1, type: float, transform: numeric, log1p: true, buckets: 10, on_invalid: missing}
      - {name: C1, type: string, transform: vocabulary, top_k: 1000, min_frequency: 2, oov_buckets: 1}
      - {name: device_ip, type: string, transform: hash, hash_buckets: 1000}
      - {name: click_sequence, type: string, transform: sequence, separator: "^", max_length: 20}
    split: {kind: time, eval_fraction: 0.1, test_fraction: 0.1}   # time | hash (key: ...) | files
    validation:                      # optional: data checks of new partitions (pipeline.retrain), defaults shown
      missing_rate_increase: 0.1     # a column's share of missing values rises by more than this
      reject_rate_increase: 0.05     # the dead letter's share of rows rises by more than this
      oov_rate_increase: 0.1         # a vocabulary feature's out-of-vocabulary share rises by more than this
      drift_linf: 0.1                # numeric: L-infinity distance of bucket histograms (TFDV's drift comparator)
      drift_psi: 0.25                # numeric: population stability index over the same buckets
      label_rate_change: 0.8         # a label's positive rate falls below (1 - x) times, or rises above 1 / (1 - x)
      label_rate_z: 4.0              #   times, the reference rate, and the change is significant (two-proportion z)
      blocking: [missing_column, missing_rate, reject_rate, label_rate]   # the rest only warn

``on_invalid`` (int/float features; default ``reject``): what a value that is not a finite number of the
feature's type does (``"abc"``, ``nan``, ``inf``, ``1.5`` for an int): ``reject`` sends the row to the dead
letter, ``missing`` reads the value as missing (the feature's missing handling applies) and counts it in the
summary's ``values_invalid_as_missing``.

A drafted schema (``python -m pipeline.infer_schema``) leaves the roles it cannot know as strings
``"CHOOSE_ONE_OF [a, b, ...]"``; such a value fails validation, naming the key and the candidates, until it is
replaced by one column name (or the optional key is deleted).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from transforms.features import (CategoricalFeature, FeatureContract, LabelSpec, NumericFeature,
                                 SequenceFeature, UserFeatureSpec, with_user_features)

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")
FORMATS = ("csv", "parquet", "tfrecord")
COMPRESSIONS = ("auto", "none", "gzip")
TRANSFORMS = ("hash", "numeric", "sequence", "vocabulary")
TYPES = {"string": "string", "int": "int64", "int64": "int64", "float": "float32", "float32": "float32"}
SPLITS = ("time", "hash", "files")
ON_INVALID = ("reject", "missing")
CHOOSE = "CHOOSE_ONE_OF"  # prefix of a draft's unfilled choice
CHECKS = ("missing_column", "new_column", "missing_rate", "reject_rate", "oov_rate", "drift", "label_rate")


class SchemaError(ValueError):
    """A schema file problem; the message names the file and the key."""


@dataclass(frozen=True)
class CsvOptions:
    delimiter: str = ","
    header: object = True  # True, False or "auto" (skip a first line equal to ``columns``)
    columns: Optional[Tuple[str, ...]] = None  # required when header is false or auto


@dataclass(frozen=True)
class InputSpec:
    path: str  # glob, placeholders resolved
    format: str
    compression: str = "auto"
    csv: CsvOptions = field(default_factory=CsvOptions)

    def files(self) -> List[str]:
        """The sorted paths matching ``path`` on any Beam filesystem (local, gs://, hdfs://, s3://): the files
        the Beam stage reads (``pipeline.beam.sources.match_files``), listed the same way."""
        from apache_beam.io.filesystems import FileSystems

        return sorted(m.path for m in FileSystems.match([self.path])[0].metadata_list)


@dataclass(frozen=True)
class SplitSpec:
    kind: str = "time"
    eval_fraction: float = 0.2
    test_fraction: float = 0.0
    key: Optional[str] = None  # hash split key column (default: user id, else the record's source position)
    files: Mapping[str, str] = field(default_factory=dict)  # files split: split -> glob (relative to input dir)


@dataclass(frozen=True)
class ValidationSpec:
    """Thresholds of the data checks a new partition goes through before it is trained on (``validation:``).

    Each check compares the partition with the training statistics; a check named in ``blocking`` stops the
    run, the others are reported as warnings. See ``pipeline.beam.data_checks`` for how each figure is computed.
    """

    missing_rate_increase: float = 0.1
    reject_rate_increase: float = 0.05
    oov_rate_increase: float = 0.1
    drift_linf: float = 0.1
    drift_psi: float = 0.25
    label_rate_change: float = 0.8
    label_rate_z: float = 4.0
    blocking: Tuple[str, ...] = ("missing_column", "missing_rate", "reject_rate", "label_rate")


@dataclass(frozen=True)
class DatasetSchema:
    name: str
    source: str  # the schema file
    input: InputSpec
    contract: FeatureContract
    timestamp_format: str = "unix"
    split: SplitSpec = field(default_factory=SplitSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    on_invalid: Mapping[str, str] = field(default_factory=dict)  # feature -> "missing" (absent: "reject")


def expand_names(pattern: str) -> List[str]:
    """'I{1..13}' -> ['I1', ..., 'I13']; a name without a range is returned as is."""
    import re

    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = int(m.group(1)), int(m.group(2))
    return [n for k in range(lo, hi + 1) for n in expand_names(pattern[:m.start()] + str(k) + pattern[m.end():])]


def default_shared_dir() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("RANKLINE_SHARED_DIR", os.path.join(os.path.dirname(repo), "shared"))


def builtin_schema_path(name: str) -> str:
    return os.path.join(SCHEMA_DIR, f"{name}.yaml")


def load_schema(path: str, input_path: Optional[str] = None) -> DatasetSchema:
    """Loads and validates ``path``. ``input_path`` overrides ``input.path`` (e.g. generated data)."""
    if not os.path.exists(path):
        raise SchemaError(f"schema file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            doc = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise SchemaError(f"{path}: not valid YAML ({exc})") from None
    return parse_schema(doc, path, input_path)


class _Ctx:
    def __init__(self, source: str):
        self.source = os.path.basename(source)

    def fail(self, key: str, problem: str):
        raise SchemaError(f"{self.source}: {key}: {problem}")

    def mapping(self, value, key: str, required: bool = True) -> Dict:
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping, got {type(value).__name__}")
        return value

    def string(self, value, key: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def integer(self, value, key: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def fraction(self, value, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            self.fail(key, f"expected a number in [0, 1), got {value!r}")
        return float(value)

    def unknown_keys(self, mapping: Mapping, allowed, key: str):
        extra = sorted(set(mapping) - set(allowed))
        if extra:
            self.fail(key, f"unknown key(s) {extra} (allowed: {', '.join(sorted(allowed))})")


def _unfilled_choices(c: "_Ctx", value, key: str) -> None:
    """Fails on the first draft choice (a string starting with ``CHOOSE_ONE_OF``) left in ``value``."""
    if isinstance(value, str) and value.strip().startswith(CHOOSE):
        c.fail(key, f"still a draft choice ({value.strip()}): replace it with one of these column names, "
                    "or delete the key if it is optional")
    elif isinstance(value, dict):
        for k, v in value.items():
            _unfilled_choices(c, v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _unfilled_choices(c, v, f"{key}[{i}]")


def parse_schema(doc: Any, source: str, input_path: Optional[str] = None) -> DatasetSchema:
    c = _Ctx(source)
    doc = c.mapping(doc, "<top level>")
    for section in ("roles", "labels", "features", "split"):
        _unfilled_choices(c, doc.get(section), section)
    c.unknown_keys(doc, ("name", "input", "roles", "labels", "features", "split", "oracle", "user_features",
                         "validation"),
                   "<top level>")
    name = c.string(doc.get("name"), "name")

    inp = c.mapping(doc.get("input"), "input")
    c.unknown_keys(inp, ("path", "format", "compression", "csv"), "input")
    raw_path = input_path or c.string(inp.get("path"), "input.path")
    path = raw_path.replace("{shared}", default_shared_dir())
    if not os.path.isabs(path) and not input_path and "://" not in path:  # gs://, s3://, hdfs:// stay as they are
        path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(source)), path))
    fmt = inp.get("format", "parquet")
    if fmt not in FORMATS:
        c.fail("input.format", f"unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    compression = inp.get("compression", "auto")
    if compression not in COMPRESSIONS:
        c.fail("input.compression", f"unknown compression {compression!r} (expected one of: {', '.join(COMPRESSIONS)})")
    csv_doc = c.mapping(inp.get("csv"), "input.csv", required=False)
    c.unknown_keys(csv_doc, ("delimiter", "header", "columns"), "input.csv")
    header = csv_doc.get("header", True)
    if header not in (True, False, "auto"):
        c.fail("input.csv.header", f"expected true, false or auto, got {header!r}")
    columns = csv_doc.get("columns")
    if columns is not None:
        if not isinstance(columns, list):
            c.fail("input.csv.columns", "expected a list of column names")
        expanded = []
        for i, col in enumerate(columns):
            if isinstance(col, dict):
                c.unknown_keys(col, ("prefix", "count"), f"input.csv.columns[{i}]")
                prefix = c.string(col.get("prefix"), f"input.csv.columns[{i}].prefix")
                count = c.integer(col.get("count"), f"input.csv.columns[{i}].count", 1)
                expanded.extend(f"{prefix}{k}" for k in range(count))
            elif isinstance(col, (str, int)):
                expanded.extend(expand_names(str(col)))
            else:
                c.fail(f"input.csv.columns[{i}]", f"expected a name or {{prefix, count}}, got {col!r}")
        columns = tuple(expanded)
    if fmt == "csv" and header is not True and not columns:
        c.fail("input.csv.columns", "required when input.csv.header is false or auto")
    delimiter = csv_doc.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        c.fail("input.csv.delimiter", f"expected one character, got {delimiter!r}")
    input_spec = InputSpec(path=path, format=fmt, compression=compression,
                           csv=CsvOptions(delimiter=delimiter, header=header, columns=columns))

    roles = c.mapping(doc.get("roles"), "roles", required=False)
    c.unknown_keys(roles, ("user_id", "item_id", "timestamp", "segment", "scenario", "user_columns"), "roles")
    user_columns = roles.get("user_columns") or []
    if not isinstance(user_columns, list) or not all(isinstance(x, str) for x in user_columns):
        c.fail("roles.user_columns", "expected a list of column names")
    ts_column, ts_format = None, "unix"
    ts = roles.get("timestamp")
    if isinstance(ts, str):
        ts_column = ts
    elif ts is not None:
        ts = c.mapping(ts, "roles.timestamp")
        c.unknown_keys(ts, ("column", "format"), "roles.timestamp")
        ts_column = c.string(ts.get("column"), "roles.timestamp.column")
        ts_format = c.string(ts.get("format", "unix"), "roles.timestamp.format")

    labels_doc = c.mapping(doc.get("labels"), "labels")
    c.unknown_keys(labels_doc, ("click", "daction", "purchase", "continuous"), "labels")
    click = c.string(labels_doc.get("click"), "labels.click")
    daction = labels_doc.get("daction") or []
    if isinstance(daction, str):
        daction = [daction]
    if not isinstance(daction, list) or not all(isinstance(x, str) for x in daction):
        c.fail("labels.daction", "expected a column name or a list of column names")
    purchase = labels_doc.get("purchase")
    if purchase is not None:
        c.string(purchase, "labels.purchase")
    continuous = labels_doc.get("continuous") or []
    if isinstance(continuous, str):
        continuous = [continuous]
    labels = LabelSpec(click=click, daction=tuple(daction), purchase=purchase, continuous=tuple(continuous))

    feats = doc.get("features")
    if not isinstance(feats, list) or not feats:
        c.fail("features", "expected a non-empty list of features")
    categorical, numeric, sequences = [], [], []
    on_invalid: Dict[str, str] = {}
    entries = []
    for i, f in enumerate(feats):
        f = c.mapping(f, f"features[{i}]")
        if "names" in f:  # one entry, many columns with the same transform
            names = f["names"]
            names = expand_names(names) if isinstance(names, str) else names
            if isinstance(names, list):
                names = [x for n in names for x in expand_names(str(n))]
            if not isinstance(names, list) or not names:
                c.fail(f"features[{i}].names", "expected a list of names or a 'prefix_{1..N}' pattern")
            rest = {k: v for k, v in f.items() if k != "names"}
            entries.extend((i, dict(rest, name=str(n))) for n in names)
        else:
            entries.append((i, f))
    for i, f in entries:
        key = f"features[{i}]"
        fname = c.string(f.get("name"), f"{key}.name")
        if not all(ch.isalnum() or ch in "_-." for ch in fname):
            c.fail(f"{key}.name", f"{fname!r}: use letters, digits, '_', '-' or '.' only")
        key = f"features[{i}] ({fname})"
        transform = f.get("transform")
        if transform not in TRANSFORMS:
            c.fail(f"{key}.transform", f"unknown transform {transform!r} (expected one of: {', '.join(TRANSFORMS)})")
        ftype = f.get("type", "string" if transform in ("vocabulary", "hash", "sequence") else "float")
        if ftype not in TYPES:
            c.fail(f"{key}.type", f"unknown type {ftype!r} (expected one of: {', '.join(TYPES)})")
        dtype = TYPES[ftype]
        if "on_invalid" in f:
            if f["on_invalid"] not in ON_INVALID:
                c.fail(f"{key}.on_invalid", f"expected one of: {', '.join(ON_INVALID)}, got {f['on_invalid']!r}")
            if dtype == "string":
                c.fail(f"{key}.on_invalid", "only int and float features have invalid values (type is string)")
            if f["on_invalid"] == "missing":
                on_invalid[fname] = "missing"
        try:
            if transform == "numeric":
                c.unknown_keys(f, ("name", "type", "transform", "log1p", "buckets", "on_invalid"), key)
                if dtype == "string":
                    c.fail(f"{key}.type", "a numeric transform needs type int or float")
                numeric.append(NumericFeature(fname, dtype=dtype, log1p=bool(f.get("log1p", True)),
                                              num_buckets=c.integer(f.get("buckets", 10), f"{key}.buckets", 2)))
            elif transform == "vocabulary":
                c.unknown_keys(f, ("name", "type", "transform", "top_k", "min_frequency", "oov_buckets",
                                   "approximate", "on_invalid"), key)
                if dtype == "float32":
                    c.fail(f"{key}.type", "a vocabulary needs type string or int")
                top_k = f.get("top_k")
                categorical.append(CategoricalFeature(
                    fname, dtype=dtype, top_k=None if top_k is None else c.integer(top_k, f"{key}.top_k", 1),
                    frequency_threshold=c.integer(f.get("min_frequency", 1), f"{key}.min_frequency", 1),
                    num_oov_buckets=c.integer(f.get("oov_buckets", 1), f"{key}.oov_buckets", 1),
                    approximate=bool(f.get("approximate", False))))
            elif transform == "hash":
                c.unknown_keys(f, ("name", "type", "transform", "hash_buckets", "on_invalid"), key)
                if dtype == "float32":
                    c.fail(f"{key}.type", "hashing needs type string or int")
                categorical.append(CategoricalFeature(
                    fname, dtype=dtype, hash_buckets=c.integer(f.get("hash_buckets"), f"{key}.hash_buckets", 1)))
            else:
                c.unknown_keys(f, ("name", "type", "transform", "separator", "max_length", "top_k",
                                   "min_frequency", "oov_buckets", "columns_prefix", "pad_token"), key)
                if dtype != "string":
                    c.fail(f"{key}.type", "a sequence is read as a string with separators: type must be string")
                top_k = f.get("top_k")
                sequences.append(SequenceFeature(
                    fname, separator=c.string(f.get("separator", "^"), f"{key}.separator"),
                    max_length=c.integer(f.get("max_length", 20), f"{key}.max_length", 1),
                    top_k=None if top_k is None else c.integer(top_k, f"{key}.top_k", 1),
                    frequency_threshold=c.integer(f.get("min_frequency", 1), f"{key}.min_frequency", 1),
                    num_oov_buckets=c.integer(f.get("oov_buckets", 1), f"{key}.oov_buckets", 1),
                    columns_prefix=f.get("columns_prefix"), pad_token=f.get("pad_token")))
        except ValueError as exc:
            if isinstance(exc, SchemaError):
                raise
            c.fail(key, str(exc))

    oracle = doc.get("oracle") or []
    if not isinstance(oracle, list):
        c.fail("oracle", "expected a list of column names")

    split_doc = c.mapping(doc.get("split"), "split", required=False)
    c.unknown_keys(split_doc, ("kind", "eval_fraction", "test_fraction", "key", "files"), "split")
    kind = split_doc.get("kind", "time" if ts_column else "hash")
    if kind not in SPLITS:
        c.fail("split.kind", f"unknown split {kind!r} (expected one of: {', '.join(SPLITS)})")
    if kind == "time" and not ts_column:
        c.fail("split.kind", "a time split needs roles.timestamp")
    eval_fraction = c.fraction(split_doc.get("eval_fraction", 0.2), "split.eval_fraction")
    test_fraction = c.fraction(split_doc.get("test_fraction", 0.0), "split.test_fraction")
    if kind != "files" and (eval_fraction <= 0 or eval_fraction + test_fraction >= 1.0):
        c.fail("split", "need eval_fraction > 0 and eval_fraction + test_fraction < 1")
    files = c.mapping(split_doc.get("files"), "split.files", required=False)
    if kind == "files":
        c.unknown_keys(files, ("train", "eval", "test"), "split.files")
        if "train" not in files or "eval" not in files:
            c.fail("split.files", "needs at least train and eval globs")
    split = SplitSpec(kind=kind, eval_fraction=eval_fraction, test_fraction=test_fraction,
                      key=split_doc.get("key"), files=dict(files))

    try:
        contract = FeatureContract(
            name=name, user_id=roles.get("user_id"), item_id=roles.get("item_id"), timestamp=ts_column,
            categorical=tuple(categorical), numeric=tuple(numeric), sequences=tuple(sequences), labels=labels,
            oracle=tuple(oracle), segment=roles.get("segment"), scenario=roles.get("scenario"),
            user_columns=tuple(user_columns))
    except ValueError as exc:
        c.fail("features", str(exc))
    uf = doc.get("user_features")
    if uf is not None:
        uf = c.mapping(uf, "user_features")
        c.unknown_keys(uf, ("history_length",), "user_features")
        try:
            contract = with_user_features(contract, UserFeatureSpec(
                history_length=c.integer(uf.get("history_length", 20), "user_features.history_length", 1)))
        except ValueError as exc:
            c.fail("user_features", str(exc))
    feature_names = {f.name for f in categorical + numeric + sequences}
    for role in ("segment", "scenario"):
        if roles.get(role) and roles[role] not in feature_names:
            c.fail(f"roles.{role}", f"column {roles[role]!r} must also be declared under features")
    unknown_user = [x for x in user_columns if x not in feature_names]
    if unknown_user:
        c.fail("roles.user_columns", f"column(s) {unknown_user} must also be declared under features")
    return DatasetSchema(name=name, source=os.path.abspath(source), input=input_spec, contract=contract,
                         timestamp_format=ts_format, split=split, validation=_parse_validation(c, doc.get("validation")),
                         on_invalid=on_invalid)


def _parse_validation(c: "_Ctx", doc) -> ValidationSpec:
    doc = c.mapping(doc, "validation", required=False)
    numbers = [f for f in ValidationSpec.__dataclass_fields__ if f != "blocking"]
    c.unknown_keys(doc, numbers + ["blocking"], "validation")
    values = {}
    if "label_rate_change" in doc and not (isinstance(doc["label_rate_change"], (int, float))
                                           and 0 <= doc["label_rate_change"] < 1):
        c.fail("validation.label_rate_change", f"expected a number in [0, 1), got {doc['label_rate_change']!r}")
    for name in numbers:
        if name in doc:
            v = doc[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                c.fail(f"validation.{name}", f"expected a number >= 0, got {v!r}")
            values[name] = float(v)
    if "blocking" in doc:
        blocking = doc["blocking"]
        if not isinstance(blocking, list) or any(b not in CHECKS for b in blocking):
            c.fail("validation.blocking", f"expected a list of checks from: {', '.join(CHECKS)}; got {blocking!r}")
        values["blocking"] = tuple(blocking)
    return ValidationSpec(**values)
