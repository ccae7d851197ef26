"""Beam + tensorflow-transform preprocessing stage: Parquet logs -> transform graph + gzip TFRecords.

Input is read as Arrow record batches (one per Parquet row group, never one Python object per row), split
by time into train/eval (the last ``eval_fraction`` of the time range is eval), analysed on the training
split only, and both splits are written through the same transform graph as sharded gzip TFRecords of
``tf.Example``. Runs on any Beam runner: all runner choice lives in the pipeline options.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.beam_runner import make_pipeline
from transforms.features import FeatureContract

logger = logging.getLogger(__name__)

TRAIN, EVAL = "train", "eval"
TRANSFORM_DIR = "transform_fn_output"
DATA_DIR = "data"


@dataclass(frozen=True)
class PreprocessConfig:
    input_pattern: str
    output_dir: str
    eval_fraction: float = 0.2
    num_shards: int = 0  # 0: let the runner decide
    batch_rows: int = 10_000

    def __post_init__(self):
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")


def _arrow_type(dtype: str):
    return {"string": pa.large_binary(), "int64": pa.int64(), "float32": pa.float32()}[dtype]


def raw_columns(contract: FeatureContract, include_labels: bool = True) -> Dict[str, str]:
    """Raw column -> dtype read from the input files."""
    cols = {f.name: f.dtype for f in contract.categorical}
    cols.update({f.name: f.dtype for f in contract.numeric})
    cols[contract.timestamp] = "int64"
    if include_labels:
        cols.update({c: "int64" for c in contract.labels.binary_columns})
        cols.update({c: "float32" for c in contract.labels.continuous})
        for c in contract.oracle:
            cols[c] = "int64" if c in ("true_scenario", "true_group", "true_stage") else "float32"
    return cols


def to_list_array(arr: pa.Array, dtype: str) -> pa.Array:
    """A flat (nullable) column -> list<value> column: one value per present row, [] for null."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=np.int32)
    offsets = np.zeros(len(arr) + 1, dtype=np.int32)
    np.cumsum(valid, out=offsets[1:])
    values = pc.drop_null(arr).cast(_arrow_type(dtype))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


class _TableToRecordBatches(beam.DoFn):
    """pyarrow.Table (a Parquet row group) -> list-typed RecordBatches of one split, by timestamp."""

    def __init__(self, columns: Dict[str, str], timestamp: str, split: str, batch_rows: int):
        self._columns = columns
        self._timestamp = timestamp
        self._split = split
        self._batch_rows = batch_rows

    def process(self, table: pa.Table, cutoff: float):
        ts = table.column(self._timestamp)
        mask = pc.less(ts, cutoff) if self._split == TRAIN else pc.greater_equal(ts, cutoff)
        table = table.filter(mask)
        n = table.num_rows
        beam.metrics.Metrics.counter("rankline", f"rows_{self._split}").inc(n)
        self._seen = getattr(self, "_seen", 0) + n
        if self._seen >= getattr(self, "_next_log", 0):  # progress, about every 50k rows per worker
            logger.info("preprocess: %d %s rows read so far (this worker)", self._seen, self._split)
            self._next_log = self._seen + 50_000
        for start in range(0, n, self._batch_rows):
            part = table.slice(start, self._batch_rows)
            arrays = [to_list_array(part.column(c), d) for c, d in self._columns.items()]
            yield pa.RecordBatch.from_arrays(arrays, list(self._columns))


class _MinMax(beam.CombineFn):
    def create_accumulator(self):
        return (float("inf"), float("-inf"), 0)

    def add_input(self, acc, table):
        if table.num_rows == 0:
            return acc
        mm = pc.min_max(table.column(0))
        return (min(acc[0], mm["min"].as_py()), max(acc[1], mm["max"].as_py()), acc[2] + table.num_rows)

    def merge_accumulators(self, accs):
        accs = list(accs)
        return (min(a[0] for a in accs), max(a[1] for a in accs), sum(a[2] for a in accs))

    def extract_output(self, acc):
        return acc


def _cutoff(minmax, eval_fraction: float) -> float:
    lo, hi, n = minmax
    if n == 0:
        raise ValueError("the input has no rows")
    return lo + (hi - lo) * (1.0 - eval_fraction)


def _encode_examples(batch_and_passthrough):
    from tfx_bsl.coders import example_coder

    record_batch = batch_and_passthrough[0]
    return example_coder.RecordBatchToExamples(record_batch)


def tensor_adapter_config(contract: FeatureContract):
    """Arrow schema + tensor representations matching ``raw_feature_spec(contract)``."""
    from tensorflow_transform.tf_metadata import schema_utils
    from tfx_bsl.tfxio import tensor_adapter, tensor_representation_util

    from transforms.preprocessing import raw_feature_spec

    cols = raw_columns(contract)
    schema = schema_utils.schema_from_feature_spec(raw_feature_spec(contract))
    arrow_schema = pa.schema([(c, pa.list_(_arrow_type(d))) for c, d in cols.items()])
    reps = tensor_representation_util.InferTensorRepresentationsFromSchema(schema)
    return tensor_adapter.TensorAdapterConfig(arrow_schema, reps), schema


def run_preprocess(contract: FeatureContract, cfg: PreprocessConfig, preprocessing_fn,
                   beam_args: Optional[List[str]] = None) -> Dict:
    """Runs the Beam pipeline and returns a summary dict (also written as ``summary.json``)."""
    import tensorflow_transform.beam as tft_beam

    started = time.time()
    os.makedirs(cfg.output_dir, exist_ok=True)
    tac, _ = tensor_adapter_config(contract)
    columns = raw_columns(contract)
    temp_dir = os.path.join(cfg.output_dir, "tmp")
    data_dir = os.path.join(cfg.output_dir, DATA_DIR)
    shards = cfg.num_shards
    p = make_pipeline(beam_args)
    with tft_beam.Context(temp_dir=temp_dir):
        tables = p | "ReadParquet" >> beam.io.ReadFromParquetBatched(cfg.input_pattern, columns=list(columns))
        # A separate read of the timestamp column alone feeds the split point (a side input must not come
        # from the stage it feeds, and reading one column is cheap).
        minmax = (p | "ReadTimestamps" >> beam.io.ReadFromParquetBatched(cfg.input_pattern,
                                                                         columns=[contract.timestamp])
                  | "TimeRange" >> beam.CombineGlobally(_MinMax()))
        cutoff = minmax | "Cutoff" >> beam.Map(_cutoff, cfg.eval_fraction)
        splits = {}
        for split in (TRAIN, EVAL):
            splits[split] = tables | f"ToRecordBatches[{split}]" >> beam.ParDo(
                _TableToRecordBatches(columns, contract.timestamp, split, cfg.batch_rows),
                cutoff=beam.pvalue.AsSingleton(cutoff))
        (train_out, transformed_metadata), transform_fn = (
            (splits[TRAIN], tac) | "AnalyzeAndTransform" >> tft_beam.AnalyzeAndTransformDataset(
                preprocessing_fn, output_record_batches=True))
        eval_out, _ = (((splits[EVAL], tac), transform_fn)
                    | "TransformEval" >> tft_beam.TransformDataset(output_record_batches=True))
        del transformed_metadata
        for split, pcoll in ((TRAIN, train_out), (EVAL, eval_out)):
            _ = (pcoll
                 | f"Encode[{split}]" >> beam.FlatMap(_encode_examples)
                 | f"Write[{split}]" >> beam.io.WriteToTFRecord(
                     os.path.join(data_dir, split, "part"), file_name_suffix=".tfrecord.gz",
                     compression_type=beam.io.filesystem.CompressionTypes.GZIP, num_shards=shards))
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(
            os.path.join(cfg.output_dir, TRANSFORM_DIR))
    result = p.run()
    result.wait_until_finish()
    summary = {"seconds": round(time.time() - started, 2)}
    summary.update(_counters(result))
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def _counters(result) -> Dict:
    """Row counts per split from the pipeline's metrics (committed values where the runner has them)."""
    from apache_beam.metrics.metric import MetricsFilter

    out = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace("rankline"))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        out[counter.key.metric.name] = out.get(counter.key.metric.name, 0) + int(value)
    return out


def transformed_pattern(output_dir: str, split: str) -> str:
    return os.path.join(output_dir, DATA_DIR, split, "part-*")
