"""Data checks (the role of TFX's StatisticsGen + ExampleValidator): statistics of a split, and the anomalies of a
new log partition against the statistics the model was trained on.

Statistics are ``tensorflow_metadata`` ``DatasetFeatureStatisticsList`` protos (the format TFDV and Facets
read), computed in Beam by ``StatisticsFn`` over the canonical Arrow batches (the rows that passed the dead
letter), with tfx_bsl's sketches: a ``QuantilesSketch`` per numeric column, ``MisraGriesSketch`` (top values)
and ``KmvSketch`` (distinct count) per categorical column. Memory is constant in the number of rows.

* Numeric columns carry a histogram over quantile boundaries. For the training split the boundaries are the
  sketch's deciles and the counts its cumulative weights (buckets (-inf, b1], (b1, b2], ..., (bk, inf)); a new
  partition is counted exactly over the *training* boundaries, so both histograms share buckets.
* Label columns are numeric; their mean is the positive rate.

``compare`` turns two statistics protos (plus the raw files' column lists, the dead-letter share and the OOV
rates of the transformed partition) into ``Anomaly`` records, one per check and column. The reference is the
data the served model was last trained on (the base run's training split, then each accepted partition: the
"previous span" of TFDV's drift comparator):

==================  ==========================================================================================
missing_column      a column the schema reads is absent from the partition's files
new_column          the files have a column the training files did not have
missing_rate        a column's share of missing values rose by more than ``missing_rate_increase``
reject_rate         the dead letter's share of rows rose by more than ``reject_rate_increase``
oov_rate            a vocabulary feature's out-of-vocabulary share rose by more than ``oov_rate_increase``
drift               numeric: L-infinity distance between the normalised histograms (TFDV's drift comparator
                    uses L-infinity for categorical and Jensen-Shannon for numeric features) > ``drift_linf``,
                    or PSI = sum (q - p) ln(q / p) > ``drift_psi``
label_rate          a label's positive rate fell below (1 - c) times or rose above 1 / (1 - c) times the reference
                    rate (c = ``label_rate_change``) and the change is significant: two-proportion
                    z = |p1 - p0| / sqrt(p (1 - p) (1/n0 + 1/n1)) > ``label_rate_z`` (p the pooled rate), so a
                    feed that stops is caught and the noise of a rare label in a small partition is not
==================  ==========================================================================================

Which checks block is the schema's ``validation.blocking`` (``transforms.schema.ValidationSpec``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa

from transforms.features import FeatureContract
from transforms.schema import ValidationSpec

NUMERIC_BUCKETS = 10
TOP_VALUES = 20
_EPS = 1e-4  # PSI smoothing of empty buckets


def column_kinds(contract: FeatureContract) -> Dict[str, str]:
    """Canonical column -> "numeric", "categorical" or "label" (the columns the statistics describe)."""
    kinds = {f.name: "categorical" for f in contract.categorical}
    kinds.update({f.name: "numeric" for f in contract.numeric})
    kinds.update({c: "label" for c in contract.labels.binary_columns})
    kinds.update({c: "numeric" for c in contract.labels.continuous})
    return kinds


class _Column:
    """Accumulator of one column: counts, moments and a sketch."""

    def __init__(self, kind: str):
        from tfx_bsl import sketches

        self.kind = kind
        self.present = self.missing = 0
        self.total = self.total_sq = 0.0
        self.low, self.high = math.inf, -math.inf
        self.quantiles = sketches.QuantilesSketch(0.005, 2 ** 32, 1) if kind != "categorical" else None
        self.top = sketches.MisraGriesSketch(1000) if kind == "categorical" else None
        self.distinct = sketches.KmvSketch(1024) if kind == "categorical" else None
        self.bucket_counts: Optional[np.ndarray] = None

    def add(self, values: pa.Array, boundaries: Optional[Sequence[float]]) -> None:
        self.missing += values.null_count
        values = values.drop_null()
        self.present += len(values)
        if not len(values):
            return
        if self.kind == "categorical":
            values = values.cast(pa.string()) if not pa.types.is_string(values.type) else values
            self.top.AddValues(values)
            self.distinct.AddValues(values)
            return
        x = values.to_numpy(zero_copy_only=False).astype(np.float64)
        self.total += float(x.sum())
        self.total_sq += float(np.square(x).sum())
        self.low, self.high = min(self.low, float(x.min())), max(self.high, float(x.max()))
        self.quantiles.AddValues(pa.array(x))
        if boundaries is not None:
            counts = np.bincount(np.searchsorted(np.asarray(boundaries), x, side="left"),
                                 minlength=len(boundaries) + 1)
            self.bucket_counts = counts if self.bucket_counts is None else self.bucket_counts + counts

    def merge(self, other: "_Column") -> None:
        self.present += other.present
        self.missing += other.missing
        self.total += other.total
        self.total_sq += other.total_sq
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        for name in ("quantiles", "top", "distinct"):
            if getattr(self, name) is not None:
                getattr(self, name).Merge(getattr(other, name))
        if other.bucket_counts is not None:
            self.bucket_counts = other.bucket_counts if self.bucket_counts is None else \
                self.bucket_counts + other.bucket_counts


class StatisticsFn(beam.CombineFn):
    """Canonical ``pa.RecordBatch``es -> ``DatasetFeatureStatisticsList`` (one dataset named ``name``).

    ``boundaries``: {numeric column: training bucket boundaries}; given, the histogram is counted exactly over
    them (for comparing a new partition with training), else taken from the column's own quantile sketch.
    """

    def __init__(self, contract: FeatureContract, name: str = "train",
                 boundaries: Optional[Mapping[str, Sequence[float]]] = None):
        self._kinds = column_kinds(contract)
        self._name = name
        self._boundaries = {k: list(v) for k, v in (boundaries or {}).items()}

    def create_accumulator(self):
        return {"rows": 0, "columns": {c: _Column(k) for c, k in self._kinds.items()}}

    def add_input(self, acc, batch: pa.RecordBatch):
        acc["rows"] += batch.num_rows
        names = set(batch.schema.names)
        for column, col in acc["columns"].items():
            if column in names:
                col.add(batch.column(column), self._boundaries.get(column))
            else:
                col.missing += batch.num_rows
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        out = next(accs)
        for acc in accs:
            out["rows"] += acc["rows"]
            for column, col in acc["columns"].items():
                out["columns"][column].merge(col)
        return out

    def extract_output(self, acc):
        return statistics_proto(acc, self._name, self._boundaries)


def statistics_proto(acc, name: str, boundaries: Mapping[str, Sequence[float]]):
    from tensorflow_metadata.proto.v0 import statistics_pb2

    out = statistics_pb2.DatasetFeatureStatisticsList()
    ds = out.datasets.add(name=name, num_examples=acc["rows"])
    for column, col in sorted(acc["columns"].items()):
        f = ds.features.add()
        f.path.step.append(column)
        if col.kind == "categorical":
            f.type = statistics_pb2.FeatureNameStatistics.STRING
            s = f.string_stats
            s.common_stats.num_non_missing, s.common_stats.num_missing = col.present, col.missing
            s.unique = int(col.distinct.Estimate())
            for entry in col.top.Estimate().to_pylist()[:TOP_VALUES]:
                s.top_values.add(value=entry["values"].decode("utf-8", "replace"), frequency=entry["counts"])
            continue
        f.type = statistics_pb2.FeatureNameStatistics.FLOAT
        s = f.num_stats
        s.common_stats.num_non_missing, s.common_stats.num_missing = col.present, col.missing
        if col.kind == "label":
            f.custom_stats.add(name="label", str="binary")
        if not col.present:
            continue
        mean = col.total / col.present
        s.mean, s.min, s.max = mean, col.low, col.high
        s.std_dev = math.sqrt(max(col.total_sq / col.present - mean * mean, 0.0))
        if col.kind == "label":
            continue
        if column in boundaries:
            edges, counts = list(boundaries[column]), col.bucket_counts
        else:
            edges, counts = _sketch_histogram(col.quantiles, col.present)
        hist = s.histograms.add(type=statistics_pb2.Histogram.STANDARD)
        lows = [-math.inf] + list(edges)
        highs = list(edges) + [math.inf]
        for lo, hi, n in zip(lows, highs, counts if counts is not None else [0] * (len(edges) + 1)):
            hist.buckets.add(low_value=lo, high_value=hi, sample_count=float(n))
    return out


def _sketch_histogram(sketch, total: int):
    """(inner boundaries b1 < ... < bk, counts of (-inf, b1], ..., (bk, inf)) from a quantile sketch."""
    qs, cum = sketch.GetQuantilesAndCumulativeWeights(NUMERIC_BUCKETS)
    qs = np.asarray(qs.flatten().to_pylist()[1:-1], dtype=np.float64)
    cum = np.asarray(cum.flatten().to_pylist()[1:-1], dtype=np.float64)
    edges, at = np.unique(qs, return_index=True)
    below = cum[at]  # weight <= each distinct boundary
    counts = np.diff(np.concatenate([[0.0], below, [float(total)]]))
    return edges.tolist(), counts.tolist()


# ---- reading the protos back ----------------------------------------------------------------------------
def features_by_name(stats) -> Dict[str, object]:
    return {f.path.step[0]: f for f in stats.datasets[0].features}


def _common(f):
    return f.string_stats.common_stats if f.HasField("string_stats") else f.num_stats.common_stats


def missing_rate(f) -> float:
    c = _common(f)
    total = c.num_missing + c.num_non_missing
    return c.num_missing / total if total else 0.0


def histogram(f):
    """(inner boundaries, normalised bucket masses) of a numeric feature; None without a histogram."""
    if not f.HasField("num_stats") or not f.num_stats.histograms:
        return None
    buckets = f.num_stats.histograms[0].buckets
    counts = np.array([b.sample_count for b in buckets], dtype=np.float64)
    edges = [b.high_value for b in buckets][:-1]
    return edges, counts / counts.sum() if counts.sum() else counts


def boundaries(stats) -> Dict[str, List[float]]:
    """{numeric column: histogram boundaries} of a statistics proto (to count a new partition over them)."""
    out = {}
    for name, f in features_by_name(stats).items():
        h = histogram(f)
        if h is not None and not any(c.name == "label" for c in f.custom_stats):
            out[name] = list(h[0])
    return out


def linf(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(p) - np.asarray(q))))


def psi(p: np.ndarray, q: np.ndarray) -> float:
    """Population stability index of ``q`` (new) against ``p`` (reference), empty buckets smoothed by 1e-4."""
    p = np.maximum(np.asarray(p, dtype=np.float64), _EPS)
    q = np.maximum(np.asarray(q, dtype=np.float64), _EPS)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


@dataclass(frozen=True)
class Anomaly:
    check: str
    column: str
    value: float          # the figure measured on the partition
    reference: float      # the training figure (or 0 where there is none)
    threshold: float
    blocking: bool
    detail: str

    def line(self) -> str:
        kind = "BLOCKING" if self.blocking else "warning"
        return f"{kind}: {self.check} {self.column}: {self.detail}"


def compare(reference, current, spec: ValidationSpec, contract: FeatureContract,
            reference_columns: Iterable[str] = (), current_columns: Optional[Iterable[str]] = None,
            reference_reject_rate: float = 0.0, current_reject_rate: float = 0.0,
            reference_oov: Optional[Mapping[str, float]] = None,
            current_oov: Optional[Mapping[str, float]] = None) -> List[Anomaly]:
    """Anomalies of ``current`` (statistics of the new partition) against ``reference`` (training statistics).

    ``reference_columns`` / ``current_columns``: the raw files' column names (``None`` skips the column checks);
    ``*_reject_rate``: dead-letter rows / rows read; ``*_oov``: {feature: OOV share} of the transformed data.
    """
    blocking = set(spec.blocking)
    out: List[Anomaly] = []

    def add(check, column, value, ref, threshold, detail):
        out.append(Anomaly(check, column, float(value), float(ref), float(threshold), check in blocking, detail))

    if current_columns is not None:
        have, had = set(current_columns), set(reference_columns)
        for column in sorted(set(contract.serving_columns) | set(contract.labels.binary_columns)):
            if column in had and column not in have:
                add("missing_column", column, 1, 0, 0, "column absent from the new data")
        for column in sorted(have - had):
            add("new_column", column, 1, 0, 0, "column not in the reference data (ignored by the schema)")
    if current_reject_rate - reference_reject_rate > spec.reject_rate_increase:
        add("reject_rate", "(rows)", current_reject_rate, reference_reject_rate, spec.reject_rate_increase,
            f"dead letter {current_reject_rate:.1%} of rows vs {reference_reject_rate:.1%} in training "
            f"(max increase {spec.reject_rate_increase:.1%})")
    ref, cur = features_by_name(reference), features_by_name(current)
    kinds = column_kinds(contract)
    for column in sorted(set(ref) & set(cur)):
        r, c = ref[column], cur[column]
        m_ref, m_cur = missing_rate(r), missing_rate(c)
        if m_cur - m_ref > spec.missing_rate_increase:
            add("missing_rate", column, m_cur, m_ref, spec.missing_rate_increase,
                f"missing {m_cur:.1%} vs {m_ref:.1%} in training (max increase {spec.missing_rate_increase:.1%})")
        if kinds.get(column) == "label":
            anomaly = _label_rate_shift(r, c, spec)
            if anomaly:
                add("label_rate", column, c.num_stats.mean, r.num_stats.mean, spec.label_rate_change, anomaly)
            continue
        hr, hc = histogram(r), histogram(c)
        if hr is None or hc is None or len(hr[1]) != len(hc[1]) or not hc[1].sum():
            continue
        d, s = linf(hr[1], hc[1]), psi(hr[1], hc[1])
        if d > spec.drift_linf or s > spec.drift_psi:
            add("drift", column, d, 0.0, spec.drift_linf,
                f"L-inf distance {d:.3f} (max {spec.drift_linf}), PSI {s:.3f} (max {spec.drift_psi}) over the "
                f"training quantile buckets")
    for column, rate in sorted((current_oov or {}).items()):
        base = (reference_oov or {}).get(column, 0.0)
        if rate - base > spec.oov_rate_increase:
            add("oov_rate", column, rate, base, spec.oov_rate_increase,
                f"out-of-vocabulary {rate:.1%} vs {base:.1%} in training (max increase {spec.oov_rate_increase:.1%})")
    return out


def _label_rate_shift(ref, cur, spec: ValidationSpec) -> Optional[str]:
    """The label_rate anomaly's detail, or None: a shift by more than the factor and significant."""
    n0, n1 = ref.num_stats.common_stats.num_non_missing, cur.num_stats.common_stats.num_non_missing
    p0, p1 = ref.num_stats.mean, cur.num_stats.mean
    if not n0 or not n1:
        return None
    low, high = p0 * (1.0 - spec.label_rate_change), p0 / (1.0 - spec.label_rate_change)
    if low <= p1 <= high:
        return None
    pooled = (p0 * n0 + p1 * n1) / (n0 + n1)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n0 + 1.0 / n1))
    z = abs(p1 - p0) / se if se > 0 else math.inf
    if z <= spec.label_rate_z:
        return None
    return (f"positive rate {p1:.4f} vs {p0:.4f} in the reference (outside [{low:.4f}, {high:.4f}], "
            f"z = {z:.1f} > {spec.label_rate_z:g})")


def format_anomalies(anomalies: Sequence[Anomaly]) -> str:
    """A readable table: one line per anomaly, blocking ones first."""
    if not anomalies:
        return "data checks: no anomalies"
    rows = sorted(anomalies, key=lambda a: (not a.blocking, a.check, a.column))
    width = max(len(a.column) for a in rows)
    lines = [f"data checks: {sum(a.blocking for a in rows)} blocking, {sum(not a.blocking for a in rows)} warnings"]
    lines += [f"  {'BLOCK' if a.blocking else 'warn ':5}  {a.check:14} {a.column:{width}}  {a.detail}" for a in rows]
    return "\n".join(lines)


def anomalies_json(anomalies: Sequence[Anomaly], spec: ValidationSpec) -> Dict:
    return {"blocking": any(a.blocking for a in anomalies), "thresholds": asdict(spec),
            "anomalies": [asdict(a) for a in anomalies]}


class DataCheckFailed(RuntimeError):
    """A blocking anomaly: the message is one line naming the feature, the figure and the threshold."""

    def __init__(self, anomalies: Sequence[Anomaly]):
        first = next(a for a in anomalies if a.blocking)
        more = sum(a.blocking for a in anomalies) - 1
        super().__init__(f"data check failed: {first.check} {first.column}: {first.detail}"
                         + (f" (and {more} more blocking anomalies)" if more else ""))
        self.anomalies = list(anomalies)


def raw_columns(paths: Sequence[str], fmt: str) -> Optional[List[str]]:
    """The column names of raw input files (the union over up to 8 files): Parquet schemas; None for other
    formats (a CSV's columns are fixed by the schema, a tf.Example has no fixed columns)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    if fmt != "parquet" or not paths:
        return None
    names: set = set()
    for path in list(paths)[:8]:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            names.update(pq.ParquetFile(fh).schema_arrow.names)
    return sorted(names)


def write_statistics(stats, path: str) -> None:
    import tensorflow as tf

    tmp = f"{path}.tmp"
    with tf.io.gfile.GFile(tmp, "wb") as fh:
        fh.write(stats.SerializeToString())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def read_statistics(path: str):
    import tensorflow as tf
    from tensorflow_metadata.proto.v0 import statistics_pb2

    stats = statistics_pb2.DatasetFeatureStatisticsList()
    with tf.io.gfile.GFile(path, "rb") as fh:
        stats.ParseFromString(fh.read())
    return stats


def dumps(anomalies: Sequence[Anomaly], spec: ValidationSpec) -> str:
    return json.dumps(anomalies_json(anomalies, spec), indent=2, sort_keys=True)
