"""Drafts a dataset schema (the YAML that ``transforms.schema`` parses) from a sample of the data.

    python -m pipeline.infer_schema DATA [--out schema.yaml] [--rows N]

DATA is a file, a glob or a directory of CSV (with or without a header; the files of one dataset may differ,
e.g. a train file with a header and a test file without), Parquet or TFRecord (``tf.Example``) files. The
first ``--rows`` records (spread over the files) are read, and every column gets one decision, explained in a
YAML comment above its line:

* a column holding only 0 and 1 is a *label candidate* when at most half of it is ones or its name looks like
  a label (click, clk, label, purchase, conversion, is_...); which one is the click (and the purchase) the data
  cannot say, so the draft says ``click: "CHOOSE_ONE_OF [a, b]"``, which fails validation with a clear message
  until one name replaces it (a lone candidate named like a label is filled in); candidates are listed,
  commented out, under ``features``, so no label leaks into the inputs;
* the user and item ids likewise (``roles.user_id: "CHOOSE_ONE_OF [...]"``, from column names);
* a timestamp (date-time text in a known format; an integer Unix time / ``YYMMDDHH``-like number when the
  name says time, date, hour, day or ts) becomes ``roles.timestamp`` with its format;
* text with a separator (``^ | ; ,`` other than the CSV delimiter) in at least 5% of its values, or a list
  (Parquet / TFRecord), is a ``sequence``;
* a number that is not integer-like is ``numeric`` (``type: float``); an integer column is a category
  (``vocabulary``) when its name ends in ``id``, when it has at most 20 distinct values, or when its values
  fill a contiguous range (re-indexed ids: distinct >= 90% of max - min + 1), else ``numeric`` (``type: int``);
* ``log1p`` when the sample skewness ``g1 = m3 / m2^1.5`` exceeds 2 (a heavy right tail) and negative values
  are at most 5% (log1p clips them to 0); ``buckets`` ~ sqrt(distinct values), 2..10;
* a category whose values are mostly distinct in the sample (distinct / non-missing >= 0.5) is ``hash``ed
  (the id space is larger than any vocabulary learned from it) into ``HASH_FACTOR`` x distinct buckets (a
  power of two, 2^10..2^22); otherwise a ``vocabulary``: all values below 100 distinct, else ``top_k`` =
  10 x distinct (one significant digit); ``min_frequency: 2`` when most values are seen once;
* a numeric column where at most 1% of the values are not finite numbers (``NA``, ``\\N``, ``inf``) gets
  ``on_invalid: missing``;
* skipped (commented out, with the reason): constant or empty columns and row ids (named ``...id`` with every
  sampled value distinct);
* a *run* of at least ``MIN_RUN`` adjacent columns of one value kind (int / float / text) whose neighbours'
  value sets overlap (Jaccard and the share of each column's values seen in its neighbour both >= ``RUN_OVERLAP``)
  is one history stored a value per column: one ``sequence`` feature with ``columns_prefix`` and ``max_length``
  = its width (columns ``seqK_0..`` without a header, or the header's ``x_1..x_n`` / ``x1..xn`` prefix). A value
  (one of ``PAD_VALUES``: 0, -1, null, pad, ...) found in every row only as a block at the same end of the run (in >= 2 rows not filling it) is its
  ``pad_token``; where that block restarts mid-run, two histories meet and the run is split there. A run of
  columns all holding one and the same value is skipped as one.

The split is ``files`` when the file names say train / valid (val, eval) / test, else ``time`` when a timestamp
spans at least 10 distinct values, else ``hash``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import glob as globlib
import io
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

DATA_EXTENSIONS = (".csv", ".tsv", ".txt", ".gz", ".parquet", ".tfrecord", ".tfrecords")
SEPARATORS = ("^", "|", ";", ",")
TIME_NAME = re.compile(r"(time|date|hour|day|(^|_)ts$|^ts_)", re.I)
ID_NAME = re.compile(r"(id|_id|Id|ID)$")
USER_NAME = re.compile(r"^(user|uid|member|visitor)(_?id)?$|(user|member|visitor)_?id$", re.I)
ITEM_NAME = re.compile(r"^(item|iid)$|(item|video|adgroup|ad|product|goods|sku|photo|movie|article|song|news)_?id$", re.I)
CLICK_NAME = re.compile(r"(click|clk|label|target)", re.I)
PURCHASE_NAME = re.compile(r"(purchase|buy|conv|pay|order)", re.I)
LABEL_NAME = re.compile(r"(click|clk|label|target|purchase|buy|conv|pay|order|cart|like|follow|share|^is_)", re.I)
TEXT_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y/%m/%d %H:%M:%S", "%Y-%m-%d %H:%M",
                     "%Y-%m-%d", "%Y/%m/%d")
NUMBER_TIME_FORMATS = {8: ("%Y%m%d", "%y%m%d%H"), 10: ("%Y%m%d%H",), 12: ("%Y%m%d%H%M",), 14: ("%Y%m%d%H%M%S",)}
UNIX_S = (978_307_200, 4_102_444_800)  # 2001-01-01 .. 2100-01-01
FEW_VALUES = 20  # integer columns with at most this many distinct values are categories
SMALL_VOCABULARY = 100
HEAVY_TAIL_SKEW = 2.0
MAX_NEGATIVE_SHARE = 0.05
HASH_UNIQUE_RATIO = 0.5
HASH_FACTOR = 10
SEQUENCE_SHARE = 0.05
MAX_INVALID_SHARE = 0.01
MIN_TIME_VALUES = 10
MIN_RUN = 8  # adjacent columns holding one history stored a value per column
RUN_OVERLAP = 0.2  # neighbours in a run: Jaccard and value coverage (both directions) at least this
PAD_VALUES = ("0", "-1", "0.0", "-1.0", "null", "none", "nan", "pad", "<pad>", "[pad]")  # values that can mean "none"
MAX_LABEL_RATE = 0.5  # a 0/1 column with more ones is a label candidate only when named like a label
SPLIT_NAMES = (("train", re.compile(r"train", re.I)), ("eval", re.compile(r"(valid|val\b|val[_.-]|eval|dev)", re.I)),
               ("test", re.compile(r"test", re.I)))
CHOOSE = "CHOOSE_ONE_OF"
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.I)  # no '_' (float() takes it)


class InferError(ValueError):
    """The data cannot be drafted (no files, unreadable, inconsistent columns): the message names the file."""


# ------------------------------------------------------------------------------------------------ reading

@dataclass
class Sample:
    """The first rows of the data: column -> raw values (str for CSV; numbers, bytes-decoded strings or lists
    for Parquet / TFRecord; None = absent), plus how the files are read."""
    path: str  # the glob written into the schema
    files: List[str]
    format: str
    columns: Dict[str, List] = field(default_factory=dict)
    csv: Dict = field(default_factory=dict)  # delimiter, header (True/False/"auto"), columns when no header
    notes: List[str] = field(default_factory=list)  # comments about the input section


def _list_files(data: str) -> Tuple[str, List[str]]:
    if os.path.isdir(data):
        files = sorted(f for f in globlib.glob(os.path.join(data, "*"))
                       if os.path.isfile(f) and f.lower().endswith(DATA_EXTENSIONS))
        exts = {os.path.splitext(f)[1] for f in files}
        pattern = os.path.join(os.path.abspath(data), "*" + (exts.pop() if len(exts) == 1 else ""))
        files = sorted(globlib.glob(pattern)) if files else files
    else:
        pattern = os.path.abspath(data)
        files = sorted(globlib.glob(pattern))
    if not files:
        raise InferError(f"{data}: no data files found")
    return pattern, files


def _format(files: Sequence[str]) -> str:
    name = files[0].lower()
    if name.endswith(".parquet"):
        return "parquet"
    if ".tfrecord" in name:
        return "tfrecord"
    with open(files[0], "rb") as fh:
        if fh.read(4) == b"PAR1":
            return "parquet"
    return "csv"


def _open_text(path: str):
    import gzip

    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def _is_number(text) -> bool:
    return isinstance(text, (int, float)) or (isinstance(text, str) and NUMBER.fullmatch(text.strip()) is not None)


def _has_header(first: List[str], rows: List[List[str]], delimiter: str, text: str) -> bool:
    """A first line is a header when, in some column, it is not a number while (nearly) all other values are;
    for all-text data, ``csv.Sniffer``'s test decides."""
    if not rows:
        return not any(_is_number(v) for v in first)
    numeric_cols = 0
    for j, head in enumerate(first):
        values = [r[j] for r in rows if j < len(r) and r[j].strip()]
        if values and sum(_is_number(v) for v in values) >= 0.9 * len(values):
            numeric_cols += 1
            if head.strip() and not _is_number(head):
                return True
    if numeric_cols:
        return False
    try:
        return csv.Sniffer().has_header(text)
    except csv.Error:
        return False


def read_sample(data: str, rows: int = 10_000, verbose: bool = False) -> Sample:
    """Reads up to ``rows`` records, spread evenly over the files (``verbose``: TensorFlow's start-up log lines
    when it is loaded for TFRecords)."""
    pattern, files = _list_files(data)
    fmt = _format(files)
    sample = Sample(path=pattern, files=files, format=fmt)
    per_file = max(1, math.ceil(rows / len(files)))
    if fmt == "csv":
        _read_csv(sample, per_file)
    elif fmt == "parquet":
        _read_parquet(sample, per_file)
    else:
        from serving.tf_quiet import quiet_tensorflow

        quiet_tensorflow(["--verbose"] if verbose else [])
        _read_tfrecord(sample, per_file)
    return sample


def _read_csv(sample: Sample, per_file: int) -> None:
    heads = []
    for path in sample.files:
        with _open_text(path) as fh:
            lines = [line for line in (fh.readline() for _ in range(per_file + 1)) if line]
        if not lines:
            continue
        text = "".join(lines[:50])
        if "delimiter" not in sample.csv:
            try:
                sample.csv["delimiter"] = csv.Sniffer().sniff(text, delimiters=",\t;|").delimiter
            except csv.Error:
                sample.csv["delimiter"] = ","
        parsed = list(csv.reader(lines, delimiter=sample.csv["delimiter"]))
        parsed = [r for r in parsed if r]
        heads.append((path, _has_header(parsed[0], parsed[1:], sample.csv["delimiter"], text), parsed))
    if not heads:
        raise InferError(f"{sample.path}: every file is empty")
    with_header = [h for h in heads if h[1]]
    widths = {len(p[0]) for _, _, p in heads}
    if len(widths) != 1:
        raise InferError(f"{sample.path}: the files' first lines have different field counts {sorted(widths)}")
    width = widths.pop()
    if with_header:
        names = with_header[0][2][0]
        for path, _, parsed in with_header:
            if parsed[0] != names:
                raise InferError(f"{path}: header differs from {with_header[0][0]}'s")
    else:
        names = [f"col_{k}" for k in range(width)]
    if len(set(names)) != len(names):
        raise InferError(f"{with_header[0][0]}: duplicate column names in the header")
    d = sample.csv["delimiter"]
    sample.notes.append(f"CSV, delimiter {d!r} (csv.Sniffer over the first lines)")
    if len(with_header) == len(heads):
        sample.csv["header"] = True
        sample.notes.append("every file starts with a header line (a text value above a numeric column)")
    elif not with_header:
        sample.csv["header"] = False
        sample.csv["columns"] = [{"prefix": "col_", "count": width}]
        sample.notes.append(f"no header line: the {width} columns are named col_0 .. col_{width - 1} (rename them "
                            "here and below if you know the names)")
    else:
        sample.csv["header"] = "auto"
        sample.csv["columns"] = list(names)
        plain = ", ".join(os.path.basename(p) for p, h, _ in heads if not h)
        sample.notes.append(f"header: auto: {plain} start(s) without the header line the other files have")
    sample.columns = {n: [] for n in names}
    for _, has_header, parsed in heads:
        for r in parsed[1:] if has_header else parsed:
            if len(r) != width:
                continue  # a malformed line: the reader's dead letter counts it
            for n, v in zip(names, r):
                sample.columns[n].append(v.strip() if v.strip() else None)


def _read_parquet(sample: Sample, per_file: int) -> None:
    import pyarrow.parquet as pq

    sample.notes.append("Parquet")
    for path in sample.files:
        pf = pq.ParquetFile(path)
        got = 0
        for batch in pf.iter_batches(batch_size=min(per_file, 65_536)):
            table = batch.slice(0, per_file - got)
            for name in table.schema.names:
                sample.columns.setdefault(name, []).extend(table.column(name).to_pylist())
            got += table.num_rows
            if got >= per_file:
                break
        longest = max(len(v) for v in sample.columns.values())
        for v in sample.columns.values():  # a column absent from a file is missing there
            v.extend([None] * (longest - len(v)))


def _read_tfrecord(sample: Sample, per_file: int) -> None:
    import tensorflow as tf

    sample.notes.append("TFRecord of tf.Example")
    n = 0
    for path in sample.files:
        ctype = "GZIP" if path.endswith(".gz") else ""
        for raw in tf.data.TFRecordDataset(path, compression_type=ctype).take(per_file).as_numpy_iterator():
            ex = tf.train.Example.FromString(raw)
            for key, feat in ex.features.feature.items():
                kind = feat.WhichOneof("kind")
                values = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                          for v in (getattr(feat, kind).value if kind else [])]
                col = sample.columns.setdefault(key, [None] * n)
                col.append(values[0] if len(values) == 1 else (values or None))
            n += 1
            for col in sample.columns.values():
                col.extend([None] * (n - len(col)))
    for col in sample.columns.values():  # a key first seen in a later record: a list per row if any row had one
        if any(isinstance(v, list) for v in col):
            col[:] = [v if isinstance(v, list) or v is None else [v] for v in col]


# ------------------------------------------------------------------------------------------------ deciding

@dataclass
class Decision:
    """One column's role: ``label`` (0/1 candidate), ``timestamp``, ``feature`` or ``skip``; ``entry`` is the
    feature mapping (also for label candidates and skipped columns, written commented out); ``why``: the
    comment."""
    kind: str
    entry: Dict
    why: str
    time_format: Optional[str] = None
    distinct: int = 0
    positive_rate: float = 0.0


def _skewness(x: Sequence[float]) -> float:
    """Sample skewness g1 = m3 / m2^1.5 (m_k: central moments); 0 for a constant."""
    n = len(x)
    mean = sum(x) / n
    m2 = sum((v - mean) ** 2 for v in x) / n
    m3 = sum((v - mean) ** 3 for v in x) / n
    return m3 / m2 ** 1.5 if m2 > 0 else 0.0


def _round_1sig(x: float) -> int:
    """Rounds up to one significant digit: 1530 -> 2000."""
    p = 10 ** int(math.floor(math.log10(x)))
    return int(math.ceil(x / p) * p)


def _numbers(values: Sequence) -> Tuple[List[float], List]:
    """(finite numbers, values that are not finite numbers)."""
    good, bad = [], []
    for v in values:
        if isinstance(v, bool):
            good.append(float(v))
            continue
        if not _is_number(v):
            bad.append(v)
            continue
        x = float(v)
        (good if math.isfinite(x) else bad).append(x if math.isfinite(x) else v)
    return good, bad


def _parses(values: Sequence[str], fmt: str) -> bool:
    try:
        for v in values:
            t = dt.datetime.strptime(str(v), fmt)
            if not 1990 <= t.year <= 2100:
                return False
        return True
    except ValueError:
        return False


def _time_format(name: str, values: Sequence, numbers: Optional[List[float]]) -> Optional[str]:
    """The timestamp format of a column, or None: any date-time text; numbers only under a time-like name."""
    texts = [str(v) for v in values]
    if numbers is None:
        for fmt in TEXT_TIME_FORMATS:
            if _parses(texts, fmt):
                return fmt
        return None
    if not TIME_NAME.search(name) or any(x != int(x) for x in numbers):
        return None
    ints = [int(x) for x in numbers]
    if all(UNIX_S[0] <= x < UNIX_S[1] for x in ints):
        return "unix"
    if all(UNIX_S[0] * 1000 <= x < UNIX_S[1] * 1000 for x in ints):
        return "unix_ms"
    widths = {len(str(x)) for x in ints}
    if len(widths) == 1:
        for fmt in NUMBER_TIME_FORMATS.get(widths.pop(), ()):
            if _parses([str(x) for x in ints], fmt):
                return fmt
    return None


def _categorical(name: str, values: Sequence, dtype: str, present: int, why: List[str]) -> Decision:
    """``hash`` or ``vocabulary`` (with top_k / min_frequency) from the sample's cardinality."""
    counts = Counter(values)
    d = len(counts)
    ratio = d / present
    singletons = sum(1 for c in counts.values() if c == 1)
    if ratio >= HASH_UNIQUE_RATIO and d >= FEW_VALUES:
        buckets = min(2 ** 22, max(2 ** 10, 2 ** math.ceil(math.log2(HASH_FACTOR * d))))
        why.append(f"{d} distinct of {present} ({ratio:.0%} >= {HASH_UNIQUE_RATIO:.0%}: mostly unseen ids, a large "
                   f"id space): hash into {buckets} buckets (~{HASH_FACTOR}x distinct, a power of two)")
        return Decision("feature", {"name": name, "type": dtype, "transform": "hash", "hash_buckets": buckets},
                        "; ".join(why), distinct=d)
    entry = {"name": name, "type": dtype, "transform": "vocabulary"}
    if d < SMALL_VOCABULARY:
        why.append(f"{d} distinct values: a vocabulary of all of them")
    else:
        entry["top_k"] = _round_1sig(10 * d)
        why.append(f"{d} distinct values: vocabulary, top_k {entry['top_k']} (room for 10x the sample's)")
    if singletons > d / 2:
        entry["min_frequency"] = 2
        why.append(f"{singletons / d:.0%} of the values seen once: min_frequency 2 (rare values share the OOV bucket)")
    return Decision("feature", entry, "; ".join(why), distinct=d)


def decide(name: str, raw: Sequence, delimiter: Optional[str] = None) -> Decision:
    """The decision for one column from its sampled raw values (None = missing)."""
    def missing(v):
        return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))

    values = [v.strip() if isinstance(v, str) else v for v in raw if not missing(v)]
    n = len(raw)
    why: List[str] = []
    if n and len(values) < n:
        why.append(f"{1 - len(values) / n:.0%} missing")
    if not values:
        return Decision("skip", {"name": name, "transform": "vocabulary"}, "empty in the sample: skipped")

    if any(isinstance(v, list) for v in values):  # Parquet / TFRecord lists
        tokens = [str(t) for v in values for t in (v if isinstance(v, list) else [v])]
        longest = max(len(v) if isinstance(v, list) else 1 for v in values)
        return _sequence(name, tokens, longest, None, why + ["list-valued: a sequence"])

    numbers, bad = _numbers(values)
    is_numeric = len(numbers) >= (1 - MAX_INVALID_SHARE) * len(values) and len(numbers) > 0
    if is_numeric and bad:
        why.append(f"{len(bad)} value(s) not finite numbers (e.g. {str(bad[0])[:20]!r}): on_invalid: missing")
    distinct = len(set(numbers)) if is_numeric else len(set(values))
    fmt = _time_format(name, values, numbers if is_numeric else None)
    if fmt:
        return Decision("timestamp", {"name": name}, f"timestamp, format {fmt!r} (every sampled value parses); "
                        f"{distinct} distinct value(s)", time_format=fmt, distinct=distinct)
    if distinct == 1 and not (is_numeric and bad):
        return Decision("skip", {"name": name, "transform": "vocabulary"},
                        f"constant in the sample ({str(values[0])[:30]!r}): skipped", distinct=1)
    integer = is_numeric and all(x == int(x) for x in numbers)
    if ID_NAME.search(name) and distinct == len(values) and len(values) >= FEW_VALUES:
        return Decision("skip", {"name": name, "transform": "vocabulary"},
                        f"every sampled value distinct ({distinct}): a row id? skipped", distinct=distinct)

    if not is_numeric:
        texts = [str(v) for v in values]
        for sep in SEPARATORS:
            if sep == delimiter:
                continue
            share = sum(sep in t for t in texts) / len(texts)
            if share >= SEQUENCE_SHARE:
                tokens = [t for v in texts for t in v.split(sep) if t]
                longest = max(len([t for t in v.split(sep) if t]) for v in texts)
                return _sequence(name, tokens, longest, sep,
                                 why + [f"{share:.0%} of the values hold {sep!r}: a {sep!r}-separated sequence"])
        return _categorical(name, texts, "string", len(values), why + ["text"])

    extra = {"on_invalid": "missing"} if bad else {}
    rate = sum(numbers) / len(numbers)
    if integer and set(numbers) <= {0.0, 1.0} and (rate <= MAX_LABEL_RATE or LABEL_NAME.search(name)):
        return Decision("label", dict({"name": name, "type": "int", "transform": "vocabulary"}, **extra),
                        f"0/1 column ({rate:.1%} ones): a label candidate", distinct=2, positive_rate=rate)
    if integer:
        texts = [str(v) for v in values if isinstance(v, str)]
        if any(abs(x) >= 2 ** 53 for x in numbers) or any(len(t) > 1 and t[0] == "0" and t[1] != "." for t in texts):
            why.append("integers beyond 2^53 or with leading zeros: read as text")
            return _categorical(name, texts or [str(int(x)) for x in numbers], "string", len(values), why)
        lo, hi = min(numbers), max(numbers)
        reason = ("the name says id" if ID_NAME.search(name) else
                  f"0/1 with {rate:.0%} ones (> {MAX_LABEL_RATE:.0%}, not named like a label): a feature, not a "
                  "label candidate" if set(numbers) <= {0.0, 1.0} else
                  f"integers, only {distinct} distinct (<= {FEW_VALUES}): a category" if distinct <= FEW_VALUES else
                  f"integers filling {distinct / (hi - lo + 1):.0%} of [{lo:g}, {hi:g}] (>= 90%): re-indexed ids"
                  if distinct >= 0.9 * (hi - lo + 1) else None)
        if reason:
            dec = _categorical(name, [int(x) for x in numbers], "int", len(values), why + [reason])
            dec.entry.update(extra)
            return dec
        why.append(f"integers, {distinct} distinct over [{lo:g}, {hi:g}]: numeric")
    else:
        why.append(f"real numbers, {distinct} distinct: numeric")
    entry = {"name": name, "type": "int" if integer else "float", "transform": "numeric"}
    skew = _skewness(numbers)
    negative = sum(x < 0 for x in numbers) / len(numbers)
    if skew > HEAVY_TAIL_SKEW and negative <= MAX_NEGATIVE_SHARE:
        entry["log1p"] = True
        why.append(f"heavy right tail (skewness {skew:.1f} > {HEAVY_TAIL_SKEW:g}): log1p"
                   + (f" ({negative:.1%} negative values, clipped to 0)" if negative else ""))
    else:
        entry["log1p"] = False
        why.append(f"skewness {skew:.1f}" + (f", {negative:.0%} negative" if negative > MAX_NEGATIVE_SHARE else "")
                   + ": no log1p")
    entry["buckets"] = min(10, max(2, round(math.sqrt(distinct))))
    why.append(f"buckets {entry['buckets']} (~sqrt(distinct), 2..10)")
    entry.update(extra)
    return Decision("feature", entry, "; ".join(why), distinct=distinct)


def _sequence(name: str, tokens: List[str], longest: int, sep: Optional[str], why: List[str]) -> Decision:
    counts = Counter(tokens)
    d = len(counts)
    entry = {"name": name, "type": "string", "transform": "sequence", "separator": sep or "^",
             "max_length": min(100, max(20, longest))}
    why.append(f"longest {longest} tokens: max_length {entry['max_length']} (20, or the longest up to 100)")
    if sep is None:
        why.append("(lists are read as tokens; the separator is unused)")
    return _token_vocabulary(entry, counts, why)


def _token_vocabulary(entry: Dict, counts: Counter, why: List[str]) -> Decision:
    d = len(counts)
    if d >= SMALL_VOCABULARY:
        entry["top_k"] = _round_1sig(10 * d)
        why.append(f"{d} distinct tokens: top_k {entry['top_k']}")
    else:
        why.append(f"{d} distinct tokens: all kept")
    if sum(1 for c in counts.values() if c == 1) > d / 2:
        entry["min_frequency"] = 2
        why.append("most tokens seen once: min_frequency 2")
    return Decision("feature", entry, "; ".join(why), distinct=d)


# ------------------------------------------------------------------------------------------------ runs of columns

@dataclass
class Run:
    """Columns ``start .. start + width - 1`` (positions) holding one history a value per column."""
    start: int
    width: int
    pad: Optional[str] = None
    why: List[str] = field(default_factory=list)


def _value_kind(values: Sequence) -> Optional[str]:
    """int / float / text of a CSV column's present values; None when empty or list-valued."""
    vals = [v for v in values if v is not None]
    if not vals or not all(isinstance(v, str) for v in vals):
        return None
    if not all(_is_number(v) for v in vals):
        return "text"
    nums = [float(v) for v in vals]
    return "int" if all(math.isfinite(x) and x == int(x) for x in nums) else "float"


def _overlap(a: Sequence, b: Sequence) -> float:
    """min(Jaccard of the two value sets, share of a's values found in b's set, share of b's found in a's)."""
    a = [v for v in a if v is not None]
    b = [v for v in b if v is not None]
    sa, sb = set(a), set(b)
    if not sa or not sb:
        return 0.0
    return min(len(sa & sb) / len(sa | sb), sum(v in sb for v in a) / len(a), sum(v in sa for v in b) / len(b))


def _padding(cols: List[List]) -> Optional[Tuple[str, str, List[int], int]]:
    """(token, "head" / "tail", cut offsets, rows partly padded) when one of PAD_VALUES appears in each row only as
    blocks at the same end of the run's pieces: a block may restart only at a cut (>= 2 rows restart there),
    each piece is >= MIN_RUN wide and >= 2 rows are partly padded; the candidate with most such rows."""
    w, n = len(cols), len(cols[0])
    best = None
    for end, edge, other in (("head", 0, w - 1), ("tail", w - 1, 0)):
        at_edge, at_other = Counter(cols[edge]), Counter(cols[other])
        for v in [v for v in at_edge if v is not None and at_edge[v] > at_other.get(v, 0)
                  and v.strip().lower() in PAD_VALUES]:
            restarts: Counter = Counter()
            masks = []
            for i in range(n):
                m = [cols[j][i] == v for j in range(w)]
                m = m if end == "head" else m[::-1]
                restarts.update(j for j in range(1, w) if m[j] and not m[j - 1])
                masks.append(m)
            cuts = sorted(restarts)
            bounds = [0] + cuts + [w]
            if any(restarts[c] < 2 for c in cuts) or any(b - a < MIN_RUN for a, b in zip(bounds, bounds[1:])):
                continue
            partial = sum(any(0 < sum(m[a:b]) < b - a for a, b in zip(bounds, bounds[1:])) for m in masks)
            if partial >= 2 and (best is None or partial > best[3]):
                best = (v, end, cuts if end == "head" else sorted(w - c for c in cuts), partial)
    return best


def find_runs(columns: List[List]) -> List[Run]:
    """Runs of >= MIN_RUN adjacent columns (positions) of one value kind whose neighbours overlap
    (``_overlap`` >= RUN_OVERLAP), split where their padding restarts (``_padding``)."""
    kinds = [_value_kind(c) for c in columns]
    runs: List[Run] = []
    start = 0
    for j in range(1, len(columns) + 1):
        drop = None if j == len(columns) or kinds[j] is None or kinds[j] != kinds[j - 1] else \
            _overlap(columns[j - 1], columns[j])
        if drop is not None and drop >= RUN_OVERLAP:
            continue
        if j - start >= MIN_RUN and kinds[start] is not None:
            end = ("up to the last column" if j == len(columns) else
                   f"until the value kind changes at column {j}" if drop is None else
                   f"until the overlap drops to {drop:.2f} at column {j}")
            why = [f"columns {start}..{j - 1}: {j - start} adjacent {kinds[start]} columns whose neighbours share "
                   f"values (overlap >= {RUN_OVERLAP:g}) {end}: one history stored a value per column"]
            pad = _padding(columns[start:j])
            cuts = []
            if pad:
                token, side, cuts, partial = pad
                why.append(f"{token!r} appears only as a block at the {side} ({partial} rows partly filled by it): "
                           f"pad_token {token!r}")
                if cuts:
                    why.append("that block restarts at column(s) " + ", ".join(str(start + c) for c in cuts) +
                               ": histories meet there, split")
            bounds = [0] + cuts + [j - start]
            for a, b in zip(bounds, bounds[1:]):
                part = [f"this one: columns {start + a}..{start + b - 1}"] if len(bounds) > 2 else []
                runs.append(Run(start + a, b - a, pad[0] if pad else None, why + part))
        start = j
    return runs


def _header_prefix(names: Sequence[str], others: Sequence[str]) -> Optional[str]:
    """The common prefix of header names x_1..x_n / x1..xn (consecutive numbers) when no other column starts
    with it (the reader collects a sequence's columns by prefix), else None."""
    parts = [re.fullmatch(r"(.*?\D)(\d+)", n) or re.fullmatch(r"()(\d+)", n) for n in names]
    if not all(parts) or len({p.group(1) for p in parts}) != 1 or not parts[0].group(1):
        return None
    nums = [int(p.group(2)) for p in parts]
    prefix = parts[0].group(1)
    if nums != list(range(nums[0], nums[0] + len(nums))) or any(o.startswith(prefix) for o in others):
        return None
    return prefix


def _apply_runs(sample: Sample) -> List[Tuple[str, str, Run]]:
    """Finds the runs of a CSV sample; without a header renames their columns seqK_0.. (the others keep
    col_<position>). Returns (sequence name, columns_prefix, run) in column order."""
    names = list(sample.columns)
    runs = find_runs([sample.columns[n] for n in names]) if sample.format == "csv" else []
    named = []
    if sample.csv.get("header") is False:
        if not runs:
            return []
        new = list(names)
        groups: List = []
        pos = 0
        for k, r in enumerate(runs):
            if r.start > pos:
                groups.append(names[pos] if r.start - pos == 1 else f"col_{{{pos}..{r.start - 1}}}")
            groups.append({"prefix": f"seq{k}_", "count": r.width})
            new[r.start:r.start + r.width] = [f"seq{k}_{i}" for i in range(r.width)]
            named.append((f"seq{k}", f"seq{k}_", r))
            pos = r.start + r.width
        if pos < len(names):
            groups.append(names[pos] if len(names) - pos == 1 else f"col_{{{pos}..{len(names) - 1}}}")
        sample.columns = dict(zip(new, sample.columns.values()))
        sample.csv["columns"] = groups
        sample.notes[-1] = (f"no header line: the {len(names)} columns are named col_<position>, except {len(runs)} "
                            "run(s) of columns holding one history each (see the sequence features below), named "
                            "seqK_0 .. seqK_<n-1> (rename them here and below if you know the names)")
        return named
    for r in runs:
        cols = names[r.start:r.start + r.width]
        prefix = _header_prefix(cols, names[:r.start] + names[r.start + r.width:])
        if prefix:
            r.why.append(f"header names {cols[0]}..{cols[-1]}: columns_prefix {prefix!r}")
            named.append((prefix.rstrip("_") or "seq", prefix, r))
    return named


def _run_decision(name: str, prefix: str, run: Run, cols: List[List]) -> Decision:
    """One ``sequence`` over the run's columns (or one skip when they all hold one and the same value)."""
    values = [v for c in cols for v in c if v is not None]
    why = list(run.why)
    if len(set(values)) == 1:
        return Decision("skip", {"name": name, "transform": "sequence"},
                        "; ".join(why + [f"every value {values[0][:30]!r}: constant, skipped"]), distinct=1)
    entry = {"name": name, "type": "string", "transform": "sequence", "columns_prefix": prefix,
             "max_length": run.width}
    if run.pad is not None:
        entry["pad_token"] = run.pad
    why.append(f"one sequence over {prefix}* (max_length {run.width}, the run's width)")
    return _token_vocabulary(entry, Counter(v for v in values if v != run.pad), why)


# ------------------------------------------------------------------------------------------------ writing

def _flow(value) -> str:
    """One-line YAML of a mapping, list or scalar."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10 ** 6).strip()
    return text[:-3].strip() if text.endswith("\n...") else text


def _choice(candidates: Sequence[str]) -> str:
    return '"' + CHOOSE + " [" + ", ".join(candidates) + ']"'


def _split(sample: Sample, ts: Optional[Tuple[str, Decision]]) -> Tuple[Dict, str]:
    by_split: Dict[str, List[str]] = {}
    for path in sample.files:
        base = os.path.basename(path)
        for split, pattern in SPLIT_NAMES:
            if pattern.search(base):
                by_split.setdefault(split, []).append(base)
                break
    if "train" in by_split and ("eval" in by_split or "test" in by_split) and len(sample.files) > 1:
        files = {s: (by_split[s][0] if len(by_split[s]) == 1 else "*" + s + "*") for s in ("train", "eval", "test")
                 if s in by_split}
        note = "files named train / eval / test: a files split"
        if "eval" not in files:
            files["eval"] = files.pop("test")
            note += " (no validation file: the test file is the eval split)"
        return {"kind": "files", "files": files}, note
    if ts and ts[1].distinct >= MIN_TIME_VALUES:
        return {"kind": "time", "eval_fraction": 0.2}, f"{ts[0]} spans {ts[1].distinct} distinct times: a time split"
    why = (f"{ts[0]} has only {ts[1].distinct} distinct time(s) in the sample (< {MIN_TIME_VALUES}): "
           if ts else "no timestamp: ")
    return {"kind": "hash", "eval_fraction": 0.2}, why + "a hash split (by user id when roles.user_id is set)"


def _portable(path: str) -> str:
    from transforms.schema import default_shared_dir

    shared = os.path.abspath(default_shared_dir())
    return "{shared}" + path[len(shared):] if path.startswith(shared + os.sep) else path


def draft(data: str, rows: int = 10_000, name: Optional[str] = None, verbose: bool = False) -> str:
    """The drafted schema's YAML text, comments included."""
    sample = read_sample(data, rows, verbose)
    delimiter = sample.csv.get("delimiter")
    runs = _apply_runs(sample)
    names = list(sample.columns)
    in_run = {names[r.start + i]: (seq, prefix, r) for seq, prefix, r in runs for i in range(r.width)}
    decisions: Dict[str, Decision] = {}
    for c, v in sample.columns.items():
        if c not in in_run:
            decisions[c] = decide(c, v, delimiter)
        elif names.index(c) == in_run[c][2].start:
            seq, prefix, r = in_run[c]
            decisions[seq] = _run_decision(seq, prefix, r, [sample.columns[n] for n in names[r.start:r.start + r.width]])
    name = name or re.sub(r"[^\w.-]", "-", os.path.basename(os.path.normpath(data)).split(".")[0]) or "dataset"
    n_rows = max((len(v) for v in sample.columns.values()), default=0)

    labels = [c for c, d in decisions.items() if d.kind == "label"]
    stamps = [(c, d) for c, d in decisions.items() if d.kind == "timestamp"]
    feats = [(c, d) for c, d in decisions.items() if d.kind == "feature"]
    cats = [c for c, d in feats if d.entry["transform"] in ("vocabulary", "hash")]

    out = [f"# Drafted by `python -m pipeline.infer_schema` from {n_rows} sampled rows of {len(sample.files)} file(s).",
           "# Every decision is explained in the comment above it. Lines with CHOOSE_ONE_OF are choices the data",
           "# cannot make (which 0/1 column is the click, which column is the user id): replace each with one of",
           "# the listed names, or delete the line where it is optional; until then the schema fails validation.",
           f"name: {name}", "input:"]
    out += [f"  # {note}" for note in sample.notes]
    out += [f"  path: {_flow(_portable(sample.path))}", f"  format: {sample.format}"]
    if sample.format == "csv":
        csv_doc = {"delimiter": delimiter, "header": sample.csv["header"]}
        if "columns" in sample.csv:
            csv_doc["columns"] = sample.csv["columns"]
        out.append(f"  csv: {_flow(csv_doc)}")

    def order(cands, pattern):
        return sorted(cands, key=lambda c: (not pattern.search(c), list(decisions).index(c)))

    out.append("roles:")
    users = order([c for c in cats if USER_NAME.search(c)], USER_NAME)
    items = [c for c in cats if ITEM_NAME.search(c) and c not in users]
    for role, cands in (("user_id", users), ("item_id", items)):
        if cands:
            out += [f"  # CHOOSE the {role.replace('_', ' ')} column (named like one: {', '.join(cands)}); "
                    "optional: delete the line if none is", f"  {role}: {_choice(cands)}"]
        else:
            out.append(f"  # {role}: <column>   # optional; no column is named like a {role.replace('_', ' ')}")
    ts = stamps[0] if stamps else None
    if ts:
        out += [f"  # {ts[0]}: {ts[1].why}", f"  timestamp: {_flow({'column': ts[0], 'format': ts[1].time_format})}"]
        for c, d in stamps[1:]:
            out.append(f"  # also a timestamp, unused: {c} ({d.time_format})")
    else:
        out.append("  # timestamp: {column: <column>, format: unix}   # no column parsed as a timestamp")
    out.append("  # scenario: <column> / segment: <column>   # optional explicit scenario / business segment "
               "columns (must be features)")

    out.append("labels:")
    if not labels:
        out += ["  # no 0/1 column in the sample: name the click column (values 0/1)", f"  click: {_choice([])}"]
    else:
        desc = ", ".join(f"{c} ({decisions[c].positive_rate:.1%} ones)" for c in order(labels, LABEL_NAME))
        out.append(f"  # 0/1 columns, label candidates: {desc}")
        clicks = order(labels, CLICK_NAME)
        if len(labels) == 1 and LABEL_NAME.search(labels[0]):
            out += [f"  # the only 0/1 column, named like a label", f"  click: {_flow(labels[0])}"]
        else:
            out += ["  # CHOOSE the click (the first task's label)", f"  click: {_choice(clicks)}"]
        if len(labels) > 1:
            out += ["  # CHOOSE the purchase / conversion label; optional: delete the line if there is none",
                    f"  purchase: {_choice(order(labels, PURCHASE_NAME))}"]
        out.append("  # daction: [<0/1 columns>]   # optional post-click actions (cart, wish, ...); continuous: "
                   "[<column>] optional (e.g. stay time)")

    out.append("features:")
    for c, d in decisions.items():
        if d.kind == "feature":
            out += [f"  # {c}: {d.why}", f"  - {_flow(d.entry)}"]
        elif d.kind == "label":
            out += [f"  # {c}: {d.why}; not a feature unless you uncomment it (and do not choose it as a label)",
                    f"  # - {_flow(d.entry)}"]
        elif d.kind == "skip":
            out.append(f"  # {c}: {d.why}")
    if not feats:
        raise InferError(f"{data}: no column could be a feature (all skipped, labels or timestamps)")

    split, note = _split(sample, ts)
    out += [f"# {note}", f"split: {_flow(split)}", ""]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.infer_schema", description=__doc__.splitlines()[0])
    p.add_argument("data", help="a data file, a glob or a directory (CSV, Parquet, TFRecord of tf.Example)")
    p.add_argument("--out", default=None, help="write the draft here (default: print it)")
    p.add_argument("--rows", type=int, default=10_000, help="rows sampled, spread over the files (default 10000)")
    p.add_argument("--name", default=None, help="dataset name (default: from DATA)")
    p.add_argument("--verbose", action="store_true", help="show TensorFlow's C++ start-up log lines")
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error(f"--rows must be >= 1, got {args.rows}")
    try:
        text = draft(args.data, args.rows, args.name, args.verbose)
    except (InferError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"drafted {args.out}: fill in every CHOOSE_ONE_OF, then python -m pipeline.run --schema {args.out}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
