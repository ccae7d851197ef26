"""Beam + tensorflow-transform preprocessing stage, driven by a dataset schema.

    files (listed once, on the driver) ──ReadFile──► canonical Arrow batches ──split (time / hash / files)──►
                 │                                  │                                train / eval / test
                 │                                  └──► spill: Arrow IPC files (lz4) in tmp/
                 ├────► dead letter (rejected/*.jsonl: source, reason, record)
                 └────► per-file counts ──sum──► _READ_COUNTS.json
    train ──Analyze──► transform graph
    spill ──► train, eval, test ──Transform (the graph, once for all splits)──► one gzip TFRecord file per batch
                                                                   ──publish──► part-*, _SHARDS.json (rows)

The input files are read once; the transform pass (and, for a time split, the analysis pass, which needs the
cutoffs of the whole read) stream the spilled rows back, so memory does not grow with the data. Per-user
features need a group by user, which an in-process runner holds in memory: with them, earlier pipeline runs read
the files, spill the rows by user bucket and add the features a chunk of users at a time (``user_chunk_rows``),
and the passes read those rows instead. Analyzers (vocabularies, quantiles, means) see the training split only.
Output in ``output_dir``:
``data/<split>/part-*.tfrecord.gz`` (gzip, one columnar ``tf.Example`` per transformed batch, read by
``pipeline.training.data``), ``transform_fn_output/`` (the transform graph
and the transformed schema), ``statistics.pb`` (the training split's statistics), ``user_state/`` (each user's
per-user-feature state after the data), ``rejected/`` and ``summary.json`` (rows in / out / rejected per split and
reason, truncations, vocabulary sizes, OOV rates on eval/test). Runs on any Beam runner; every path may be on
any filesystem Beam and TensorFlow read (local, ``gs://``, ``hdfs://``, ``s3://``), shared by the workers.

The counts in the summary come from the pipeline's own committed outputs, never from runner metrics (which
may count retried bundles twice, or not at all): rows per split are the records in the published shards
(``_SHARDS.json``), rows in / rejected / truncated are the readers' per-file counts summed by a combine
(``_READ_COUNTS.json``). A run whose rows in differ from train + eval + test + rejected fails.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.beam import sources
from pipeline.beam.runner import make_pipeline
from pipeline.beam.data_checks import StatisticsFn, write_statistics
from pipeline.files import write_json_atomically
from pipeline.beam.split import time_cutoffs
from transforms import features as F
from transforms.features import FeatureContract
from transforms.schema import DatasetSchema

logger = logging.getLogger(__name__)

TRAIN, EVAL, TEST = "train", "eval", "test"
SPLITS = (TRAIN, EVAL, TEST)
TRANSFORM_DIR = "transform_fn_output"
DATA_DIR = "data"
REJECTED_DIR = "rejected"
SHARDS_FILE = "_SHARDS.json"         # in data/<split>/: the published shards and their record counts
READ_COUNTS_FILE = "_READ_COUNTS.json"  # the readers' counts (rows in, rejected by reason...), summed
# Written last by a successful run (the summary plus the fingerprint of what produced it): its presence with a
# matching fingerprint is what lets a restarted job skip preprocessing (``reusable_summary``).
DONE_FILE = "_PREPROCESSED.json"
STATISTICS_FILE = "statistics.pb"  # tensorflow_metadata statistics of the training split (pipeline.beam.data_checks)
USER_STATE_DIR = "user_state"      # every user's per-user-feature state after the data (pipeline.beam.user_features)
# The code whose behaviour decides the transformed output; its source is part of the fingerprint.
_OUTPUT_CODE = ("transforms.schema", "transforms.features", "transforms.preprocessing", "pipeline.beam.preprocess",
                "pipeline.beam.sources", "pipeline.beam.user_features", "pipeline.beam.data_checks")


class TooManyRejected(RuntimeError):
    """More rows were rejected than ``max_reject_fraction`` allows."""


class RowsLost(RuntimeError):
    """The published outputs do not hold every row read: rows in != train + eval + test + rejected."""


@dataclass(frozen=True)
class PreprocessConfig:
    output_dir: str
    max_reject_fraction: Optional[float] = None
    batch_rows: int = 10_000
    # gzip level of the output TFRecords: 1 writes ~5x faster than zlib's default 6 for ~40% larger files
    # (decompression speed is about the same), and compression was the largest per-row cost of the stage.
    compression_level: int = 1
    # Per-user features are computed a chunk of users at a time, at most this many rows each (plus one user
    # bucket): one chunk is what a run holds in memory on an in-process runner.
    user_chunk_rows: int = 1_000_000

    def __post_init__(self):
        if not 0 <= self.compression_level <= 9:
            raise ValueError(f"compression_level must be in 0..9, got {self.compression_level}")
        if self.max_reject_fraction is not None and not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(f"max_reject_fraction must be in [0, 1], got {self.max_reject_fraction}")
        if self.batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        if self.user_chunk_rows < 1:
            raise ValueError(f"user_chunk_rows must be >= 1, got {self.user_chunk_rows}")


def _tft_type(t: pa.DataType) -> pa.DataType:
    return pa.large_binary() if pa.types.is_string(t) else t


def to_tft_batch(batch: pa.RecordBatch, columns: Dict[str, pa.DataType]) -> pa.RecordBatch:
    """Canonical batch -> the list-typed batch tensorflow-transform's TFXIO reads (one list per cell)."""
    arrays = []
    for name, t in columns.items():
        arr = batch.column(batch.schema.get_field_index(name))
        if pa.types.is_list(t):
            arrays.append(arr.cast(pa.list_(pa.large_binary())))
            continue
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=np.int32)
        offsets = np.zeros(len(arr) + 1, dtype=np.int32)
        np.cumsum(valid, out=offsets[1:])
        values = pc.drop_null(arr).cast(_tft_type(t))
        arrays.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values))
    return pa.RecordBatch.from_arrays(arrays, list(columns))


# tensorflow-transform in TF1 graph mode: the same analyzers and transform ops, but its TF2 mode traces the
# preprocessing_fn into ~700 tf.functions per run, a fixed ~13 s on 2 cores that dominated small runs (50k rows:
# 35 s -> 21 s; pipeline.bench.preprocess). The graph is a TF1 SavedModel (``transform_signature``), which
# TFTransformOutput.transform_features_layer() (training, export, serving) applies as it does a TF2 one;
# applying it in Beam needs the same mode (pipeline.retrain asks tf1_mode_for).
TFT_COMPAT_V1 = True


def tf1_mode_for(tft_dir: Optional[str] = None) -> bool:
    """``force_tf_compat_v1`` for a Beam stage: applying the transform graph in ``tft_dir``, the mode it was written
    in (graphs of earlier rankline versions are TF2 ones); analyzing anew (``tft_dir`` None), ``TFT_COMPAT_V1``."""
    from transforms.preprocessing import is_tf1_transform_graph

    return TFT_COMPAT_V1 if tft_dir is None else is_tf1_transform_graph(tft_dir)


class _ExpectedTF1Warnings(logging.Filter):
    """Drops the warnings that TF1-mode tensorflow-transform logs on every run, all expected here: the mode itself,
    the deprecation of the TF1 signature builder it uses, and TensorFlow's SavedModel builder failing to serialize
    TFT's usage counters and printing each vocabulary's asset proto ("probably safe to ignore", as it says; the
    graph and its assets are written whole)."""

    EXPECTED = ("Tensorflow Transform is running in tf.compat.v1 mode",
                "Issue encountered when serializing tft_",
                "Expected binary or unicode string, got type_url",
                "build_tensor_info (from tensorflow.python.saved_model.utils_impl) is deprecated")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


def quiet_expected_tf1_warnings() -> None:
    """Installs ``_ExpectedTF1Warnings`` on the loggers those warnings go to (once)."""
    for name in ("tensorflow", "absl"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedTF1Warnings) for f in target.filters):
            target.addFilter(_ExpectedTF1Warnings())


def with_split_column(batch: pa.RecordBatch, split: str) -> pa.RecordBatch:
    """A TFT input batch [n rows] plus ``__split`` = [split] per row (list<large_binary>), the column that
    ``TransformDataset`` passes through untransformed (``tft_beam.Context(passthrough_keys=...)``) so that one
    transform of every split can be routed to each split's shards afterwards."""
    n = batch.num_rows
    values = pa.array(np.full(n, split.encode(), dtype=object), pa.large_binary())
    column = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), values)
    return pa.RecordBatch.from_arrays(list(batch.columns) + [column], list(batch.schema.names) + [sources.SPLIT_COL])


class _RouteTransformed(beam.DoFn):
    """(transformed RecordBatch with the passed-through ``__split``, unary passthrough) -> the batch without
    ``__split``, tagged with its split (every input batch holds one split, and TFT maps one input batch to one
    output batch; a batch of several splits is an error, not silently mixed)."""

    def process(self, batch_and_passthrough):
        batch = batch_and_passthrough[0]
        index = batch.schema.get_field_index(sources.SPLIT_COL)
        splits = pc.unique(batch.column(index).flatten()).to_pylist() if batch.num_rows else []
        if len(splits) > 1:
            raise ValueError(f"a transformed batch holds rows of several splits: {splits}")
        if splits:
            yield beam.pvalue.TaggedOutput(splits[0].decode(), (batch.remove_column(index), {}))


def tensor_adapter_config(contract: FeatureContract, passthrough: Tuple[str, ...] = ()):
    """TFT's view of the canonical columns (plus ``passthrough`` columns of list<large_binary>, not transformed)."""
    from tensorflow_transform.tf_metadata import schema_utils
    from tfx_bsl.tfxio import tensor_adapter, tensor_representation_util

    from transforms.preprocessing import raw_feature_spec

    columns = sources.canonical_columns(contract)
    schema = schema_utils.schema_from_feature_spec(raw_feature_spec(contract))
    arrow_schema = pa.schema([(c, pa.list_(pa.large_binary() if pa.types.is_list(t) else _tft_type(t)))
                              for c, t in columns.items()] + [(c, pa.list_(pa.large_binary())) for c in passthrough])
    reps = tensor_representation_util.InferTensorRepresentationsFromSchema(schema)
    return tensor_adapter.TensorAdapterConfig(arrow_schema, reps)


class _SplitBatches(beam.DoFn):
    """Canonical batch -> (split, batch without ``__split``), by time cutoffs or by the reader's decision."""

    def __init__(self, timestamp: Optional[str]):
        self._timestamp = timestamp

    def process(self, batch: pa.RecordBatch, cutoffs=None):
        hint = batch.column(batch.schema.get_field_index(sources.SPLIT_COL))
        if cutoffs is not None:
            parts = sources.split_batch_by_time(batch, self._timestamp, cutoffs)
        else:
            parts = {s: batch.filter(pc.equal(hint, s)) for s in SPLITS}
        for split, part in parts.items():
            if part.num_rows:
                yield split, part


class _TimeRange(beam.CombineFn):
    def create_accumulator(self):
        return (float("inf"), float("-inf"), 0)

    def add_input(self, acc, item):
        return (min(acc[0], item[0]), max(acc[1], item[1]), acc[2] + item[2])

    def merge_accumulators(self, accs):
        return sources.time_range(list(accs))

    def extract_output(self, acc):
        return acc


def _time_cutoffs(rows, contract: FeatureContract, split):
    """Rows -> singleton PCollection of the (eval, test) timestamp cutoffs of the time split."""
    time_range = (rows | "BatchTimeRange" >> beam.Map(sources.batch_time_range, contract.timestamp)
                  | "TimeRange" >> beam.CombineGlobally(_TimeRange()))
    return time_range | "Cutoffs" >> beam.Map(time_cutoffs, split.eval_fraction, split.test_fraction)


def columnar_record(batch: pa.RecordBatch) -> bytes:
    """A transformed RecordBatch of n rows -> one serialized ``tf.Example`` in the columnar format
    (``pipeline.training.data.COLUMNAR_FORMAT``): ``__format__`` = [the format], ``__rows__`` = [n], and each
    column, whose every row holds the same number k of values, as its n·k values row-major. Encoded by tfx_bsl
    as the one row of a RecordBatch of the flattened columns. A column with nulls or rows of unequal lengths
    (which a reshape could not undo) is an error naming it."""
    from tfx_bsl.coders import example_coder

    from pipeline.training.data import COLUMNAR_FORMAT, FORMAT_KEY, ROWS_KEY

    n = batch.num_rows
    names = [FORMAT_KEY, ROWS_KEY]
    arrays = [pa.array([[COLUMNAR_FORMAT.encode()]], pa.list_(pa.binary())), pa.array([[n]], pa.list_(pa.int64()))]
    for name, column in zip(batch.schema.names, batch.columns):
        if name in names:
            raise ValueError(f"transformed feature {name!r} clashes with the columnar format's own keys")
        lengths = pc.list_value_length(column)
        bounds = pc.min_max(lengths).as_py() if n else {"min": 0, "max": 0}
        if column.null_count or bounds["min"] != bounds["max"]:
            raise ValueError(f"transformed feature {name!r}: rows hold {bounds['min']}..{bounds['max']} values "
                             f"({column.null_count} null); the columnar format needs the same number in every row")
        values = column.flatten()
        names.append(name)
        arrays.append(pa.LargeListArray.from_arrays(pa.array([0, len(values)], pa.int64()), values))
    return example_coder.RecordBatchToExamples(pa.RecordBatch.from_arrays(arrays, names))[0]


class _WriteBatchFile(beam.DoFn):
    """(transformed RecordBatch, passthrough) -> one gzip TFRecord file in ``temp_dir`` holding the batch as
    one columnar record (``columnar_record``); emits (its path, its number of rows).

    A whole batch is encoded (tfx_bsl, C++) and written (TF's record writer, C++) per element, and as one
    record: one ``tf.Example`` per row cost ~16 µs a row to encode and ~9x the bytes to compress. The file
    gets a unique temporary name; only the names this DoFn emits (i.e. from committed bundles) are published.
    """

    def __init__(self, temp_dir: str, compression_level: int):
        self._temp_dir = temp_dir
        self._level = compression_level

    def process(self, batch_and_passthrough):
        import uuid

        import tensorflow as tf

        batch = batch_and_passthrough[0]
        if batch.num_rows == 0:
            return
        tf.io.gfile.makedirs(self._temp_dir)
        path = os.path.join(self._temp_dir, f"{uuid.uuid4().hex}.tfrecord.gz")
        options = tf.io.TFRecordOptions(compression_type="GZIP", compression_level=self._level)
        with tf.io.TFRecordWriter(path, options) as writer:
            writer.write(columnar_record(batch))
        yield path, batch.num_rows


def _publish_shards(written: List[Tuple[str, int]], out_dir: str, temp_dir: str) -> List[str]:
    """Renames the committed temporary files (``written``: (path, records) from ``_WriteBatchFile``) to
    ``out_dir/part-NNNNN-of-MMMMM.tfrecord.gz`` and records them with their record counts in
    ``out_dir/_SHARDS.json``; returns the final names. Files of failed bundles (not in ``written``) are dropped.

    A committed file that is not there is an error naming it (e.g. workers that wrote to their own local
    disk): a shard is never published by name without its rows. Shards of an earlier run in ``out_dir`` are
    deleted, so the directory holds exactly this run's rows. Safe to retry: ``_SHARDS.json`` is written
    before the first rename, so a retry of this step (same ``temp_dir``) accepts a file it already renamed.
    """
    import tensorflow as tf

    from pipeline.files import read_json

    tf.io.gfile.makedirs(out_dir)
    total = len(written)
    plan = [[temp, os.path.join(out_dir, f"part-{i:05d}-of-{total:05d}.tfrecord.gz"), int(rows)]
            for i, (temp, rows) in enumerate(sorted(written))]
    record = {"temp_dir": temp_dir, "shards": plan, "rows": sum(rows for _, _, rows in plan)}
    state_path = os.path.join(out_dir, SHARDS_FILE)
    if read_json(state_path) != record:  # a first attempt: every committed file must be there
        missing = [temp for temp, _, _ in plan if not tf.io.gfile.exists(temp)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {total} committed shard(s) for {out_dir} missing, e.g. {missing[0]} (the "
                f"workers must write to a filesystem the publishing step reads, e.g. gs://)")
        write_json_atomically(state_path, record)
    keep = {dest for _, dest, _ in plan}
    for old in tf.io.gfile.glob(os.path.join(out_dir, "part-*")):
        if old not in keep:
            tf.io.gfile.remove(old)
    for temp, dest, _ in plan:
        if tf.io.gfile.exists(temp):
            tf.io.gfile.rename(temp, dest, overwrite=True)
        elif not tf.io.gfile.exists(dest):
            raise FileNotFoundError(f"committed shard {temp} is missing and was not published as {dest}")
    if tf.io.gfile.exists(temp_dir):   # files of failed (retried) bundles are left only here
        tf.io.gfile.rmtree(temp_dir)
    return [dest for _, dest, _ in plan]


class WriteExampleShards(beam.PTransform):
    """Transformed RecordBatches -> ``out_dir/part-*.tfrecord.gz``: write to a temp dir, then publish."""

    def __init__(self, out_dir: str, compression_level: int = 1):
        super().__init__()
        self._out_dir = out_dir
        self._level = compression_level

    def expand(self, batches):
        import uuid

        temp_dir = os.path.join(os.path.dirname(self._out_dir.rstrip("/")), f".tmp-{uuid.uuid4().hex}")
        return (batches | "WriteFiles" >> beam.ParDo(_WriteBatchFile(temp_dir, self._level))
                | "Collect" >> beam.combiners.ToList()
                | "Publish" >> beam.Map(_publish_shards, self._out_dir, temp_dir))


def _add_counts(counts) -> Dict[str, int]:
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    return dict(total)


def _write_json(obj, path: str) -> None:
    write_json_atomically(path, obj, indent=2)


def read_files(p, schema: DatasetSchema, files, batch_rows: int, label: str = "Read", report: bool = True):
    """``files`` (planned on the driver) -> ReadFile's outputs: canonical rows (``.rows``), the dead letter
    (``[sources.REJECTED]``) and per-file counts (``[sources.STATS]``)."""
    return (p | f"{label}/ListFiles" >> beam.Create([tuple(f) for f in files])
            | f"{label}/SpreadFiles" >> beam.Reshuffle()
            | f"{label}/ReadFiles" >> beam.ParDo(sources.ReadFile(schema, batch_rows, report=report))
            .with_outputs(sources.REJECTED, sources.STATS, main="rows"))


def read_reporting(p, schema: DatasetSchema, files, output_dir: str, batch_rows: int):
    """The reporting read of ``files``: writes the dead letter to ``output_dir/rejected/`` and the readers' summed
    counts to ``output_dir/_READ_COUNTS.json``; returns the canonical rows."""
    read = read_files(p, schema, files, batch_rows, "Read", report=True)
    _ = (read[sources.REJECTED] | "RejectedToJson" >> beam.Map(json.dumps, sort_keys=True)
         | "WriteRejected" >> beam.io.WriteToText(os.path.join(output_dir, REJECTED_DIR, "part"),
                                                  file_name_suffix=".jsonl"))
    _ = (read[sources.STATS] | "SumCounts" >> beam.CombineGlobally(_add_counts)
         | "WriteCounts" >> beam.Map(_write_json, os.path.join(output_dir, READ_COUNTS_FILE)))
    return read.rows


def user_feature_chunks(schema: DatasetSchema, cfg: PreprocessConfig, files,
                         beam_args: Optional[List[str]]) -> Tuple[List[str], str]:
    """Per-user features a chunk of users at a time (``pipeline.beam.user_features``), in pipeline runs of their
    own: one does the reporting read (dead letter, counts) and spills the rows to files by user bucket; then one
    per chunk of whole buckets (at most ``cfg.user_chunk_rows`` rows, all events of each of its users) adds the
    features and writes its users' states to ``user_state/``. Returns (the files of the rows with their features,
    the temporary directory holding them)."""
    import uuid

    import tensorflow as tf

    from pipeline.beam import user_features as U

    contract = schema.contract
    work = os.path.join(cfg.output_dir, "tmp", f"user-features-{uuid.uuid4().hex}")
    state_dir = os.path.join(cfg.output_dir, USER_STATE_DIR)
    if tf.io.gfile.exists(state_dir):
        tf.io.gfile.rmtree(state_dir)  # only this run's states (the chunks' files replace one earlier set)

    def run(name: str, build) -> None:
        logger.info("preprocess: stage %s started", name)
        start = time.time()
        p = make_pipeline(beam_args)
        build(p)
        p.run().wait_until_finish()
        logger.info("preprocess: stage %s done in %.1fs", name, time.time() - start)

    spill = os.path.join(work, "spill.json")
    run("read, spill by user", lambda p: U.write_arrow_files(
        read_reporting(p, schema, files, cfg.output_dir, cfg.batch_rows), os.path.join(work, "spill"), spill,
        contract.user_id))
    chunks = U.plan_chunks(U.read_manifest(spill), cfg.user_chunk_rows)
    featured: List[str] = []
    for k, paths in enumerate(chunks):
        manifest = os.path.join(work, f"chunk-{k}.json")

        def build(p, paths=paths, k=k, manifest=manifest):
            # Every user's state after its last event is kept, so pipeline.retrain continues from it.
            rows, states = U.add_user_features_with_state(U.read_arrow_files(p, paths, cfg.batch_rows, "ReadChunk"),
                                                          p | "NoEarlierState" >> beam.Create([]), contract)
            _ = U.write_states(states, os.path.join(state_dir, f"part-c{k:04d}"))
            U.write_arrow_files(rows, os.path.join(work, f"chunk-{k}"), manifest)

        run(f"user features, chunk {k + 1}/{len(chunks)}", build)
        featured += [path for _, path, _ in U.read_manifest(manifest)]
        for path in paths:
            tf.io.gfile.remove(path)  # this chunk's spill is no longer needed
    return featured, work


def run_preprocess(schema: DatasetSchema, cfg: PreprocessConfig, preprocessing_fn,
                   beam_args: Optional[List[str]] = None) -> Dict:
    """Runs the Beam pipeline; returns the summary (also written to ``summary.json``). The fingerprint of what
    produced the output (``preprocess_fingerprint``) is recorded in ``DONE_FILE`` only once the run succeeded."""
    import tensorflow as tf
    import tensorflow_transform.beam as tft_beam

    files = sources.plan_files(schema)  # listed and numbered once, here; the workers get the list as elements
    if not files:
        raise FileNotFoundError(f"schema {schema.name!r}: no input files match {schema.input.path}")
    started = time.time()
    contract = schema.contract
    tf.io.gfile.makedirs(cfg.output_dir)
    fingerprint = preprocess_fingerprint(schema, cfg)  # of the inputs as they are now, before they are read
    done_path = os.path.join(cfg.output_dir, DONE_FILE)
    counts_path = os.path.join(cfg.output_dir, READ_COUNTS_FILE)
    for stale in (done_path, counts_path):  # the outputs are about to change: not reusable until this run succeeds
        if tf.io.gfile.exists(stale):
            tf.io.gfile.remove(stale)
    columns = sources.canonical_columns(contract)
    tac = tensor_adapter_config(contract)
    split = schema.split
    # Per-user features need a group by user, which an in-process runner holds in memory: earlier pipeline runs
    # compute them a chunk of users at a time (and do the reporting read); this pipeline then reads their output.
    featured = user_feature_chunks(schema, cfg, files, beam_args) if contract.user_features else None
    p = make_pipeline(beam_args)

    from pipeline.beam import user_features as U

    spill_dir = os.path.join(cfg.output_dir, "tmp", f"spill-{uuid.uuid4().hex}")

    quiet_expected_tf1_warnings()
    with tft_beam.Context(temp_dir=os.path.join(cfg.output_dir, "tmp"), force_tf_compat_v1=TFT_COMPAT_V1):
        # No shuffle, so no pass holds the dataset and memory stays flat in its size. The input is read once
        # (with the dead letter and counts), its canonical rows spilled to Arrow files (lz4) as they are read;
        # the transform pass (and, for a time split, whose cutoffs need the whole read first, the analysis
        # pass) stream those files back. With per-user features the passes read the featured rows instead.
        if featured is not None:
            def read_rows(label: str):
                return U.read_arrow_files(p, featured[0], cfg.batch_rows, label)

            rows = read_rows("ReadFeatured")
            cutoffs = _time_cutoffs(read_rows("ReadForTimeRange"), contract, split) if split.kind == "time" else None
            analysis_rows = read_rows("ReadForAnalysis")
        else:
            read_once = read_reporting(p, schema, files, cfg.output_dir, cfg.batch_rows)
            spilled = (read_once | "Spill" >> beam.ParDo(U.WriteArrowFiles(spill_dir))
                       | "SpillPaths" >> beam.Map(lambda f: f[1]))

            def read_spill(label: str):
                return (spilled | f"{label}/Spread" >> beam.Reshuffle()
                        | f"{label}/Read" >> beam.ParDo(U.ReadArrowFile(cfg.batch_rows)))

            rows = read_spill("ReadSpill")
            cutoffs = _time_cutoffs(read_once, contract, split) if split.kind == "time" else None
            analysis_rows = read_spill("ReadSpillForAnalysis") if cutoffs is not None else read_once
        side = beam.pvalue.AsSingleton(cutoffs) if cutoffs is not None else None
        keyed = rows | "Split" >> beam.ParDo(_SplitBatches(contract.timestamp), cutoffs=side)
        analysis_keyed = (analysis_rows
                          | "SplitForAnalysis" >> beam.ParDo(_SplitBatches(contract.timestamp), cutoffs=side))
        # The training split's statistics: what pipeline.retrain checks new partitions against.
        _ = (analysis_keyed | "TrainBatches" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == TRAIN else [])
             | "Statistics" >> beam.CombineGlobally(StatisticsFn(contract, TRAIN))
             | "WriteStatistics" >> beam.Map(write_statistics, os.path.join(cfg.output_dir, STATISTICS_FILE)))
        analysis_in = (analysis_keyed | "TrainForAnalysis" >> beam.Filter(lambda kv: kv[0] == TRAIN)
                       | "ToTFT[analysis]" >> beam.Map(lambda kv: to_tft_batch(kv[1], columns)))
        transform_fn = (analysis_in, tac) | "Analyze" >> tft_beam.AnalyzeDataset(preprocessing_fn)
        # One TransformDataset for every split (each one loads the transform graph, a large fixed cost), the
        # split passed through and routed to its shards afterwards.
        tft_in = keyed | "ToTFT" >> beam.Map(lambda kv: with_split_column(to_tft_batch(kv[1], columns), kv[0]))
        with tft_beam.Context(passthrough_keys={sources.SPLIT_COL}):
            transformed, _ = (((tft_in, tensor_adapter_config(contract, (sources.SPLIT_COL,))), transform_fn)
                              | "Transform" >> tft_beam.TransformDataset(output_record_batches=True))
        outs = transformed | "RouteSplits" >> beam.ParDo(_RouteTransformed()).with_outputs(*SPLITS)
        for s in SPLITS:
            _ = outs[s] | f"Write[{s}]" >> WriteExampleShards(os.path.join(cfg.output_dir, DATA_DIR, s),
                                                              cfg.compression_level)
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(
            os.path.join(cfg.output_dir, TRANSFORM_DIR))
    logger.info("preprocess %s: pipeline built in %.1fs; running", schema.name, time.time() - started)
    logger.info("preprocess: stage analyze, transform, write started")
    pass_started = time.time()
    result = p.run()
    result.wait_until_finish()
    logger.info("preprocess: stage analyze, transform, write done in %.1fs", time.time() - pass_started)
    if featured is not None and tf.io.gfile.exists(featured[1]):
        tf.io.gfile.rmtree(featured[1])  # the rows with their per-user features, spilled
    if tf.io.gfile.exists(spill_dir):
        tf.io.gfile.rmtree(spill_dir)  # the canonical rows, spilled by the read
    summary = _summary(schema, cfg, _pipeline_counts(cfg.output_dir), files, time.time() - started)
    with tf.io.gfile.GFile(os.path.join(cfg.output_dir, "summary.json"), "w") as fh:
        fh.write(json.dumps(summary, indent=2))
    _log_counts(summary)
    written = sum(summary[f"rows_{s}"] for s in SPLITS) + summary["rows_rejected"]
    if written != summary["rows_in"]:
        raise RowsLost(f"{summary['rows_in']} rows read but {written} published (train + eval + test + "
                       f"rejected) in {cfg.output_dir}")
    frac = summary["rows_rejected"] / max(1, summary["rows_in"])
    if cfg.max_reject_fraction is not None and frac > cfg.max_reject_fraction:
        raise TooManyRejected(
            f"{summary['rows_rejected']} of {summary['rows_in']} rows rejected ({frac:.1%}) > --max-reject-fraction "
            f"{cfg.max_reject_fraction:.1%}; reasons in {os.path.join(cfg.output_dir, REJECTED_DIR)}")
    write_json_atomically(done_path, {"fingerprint": fingerprint, "summary": summary}, indent=2)
    return summary


def preprocess_fingerprint(schema: DatasetSchema, cfg: PreprocessConfig) -> str:
    """What the transformed output depends on, hashed: the parsed schema (input path and format, roles, labels,
    features and transforms, split; not where the YAML lives); every input file's path, size and modification
    time; the preprocessing options (not the output directory); the source of the modules that compute the
    output; the TFT / Beam versions."""
    import hashlib
    import importlib
    import inspect
    from dataclasses import asdict

    import tensorflow as tf
    import tensorflow_transform as tft

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    files = []
    for path in sources.match_files(schema.input.path):
        st = tf.io.gfile.stat(path)
        files.append([path, int(st.length), int(st.mtime_nsec)])
    doc = {
        "schema": {k: v for k, v in asdict(schema).items() if k != "source"},
        "files": files,
        "config": {k: v for k, v in asdict(cfg).items() if k != "output_dir"},
        "code": {m: digest(inspect.getsource(importlib.import_module(m)).encode()) for m in _OUTPUT_CODE},
        "versions": {"tensorflow_transform": tft.__version__, "apache_beam": beam.__version__},
    }
    return digest(json.dumps(doc, sort_keys=True, default=str).encode())[:16]


def preprocess_or_reuse(schema: DatasetSchema, cfg: PreprocessConfig, beam_args: Optional[List[str]] = None,
                        reuse: bool = True) -> Dict:
    """The summary of the completed run in ``cfg.output_dir`` when ``reuse`` and it was made from exactly these
    inputs, schema, options and code (with ``reused: True``); otherwise runs the pipeline with the contract's
    ``preprocessing_fn`` and returns the new summary. Says which, and why, in the log."""
    from transforms.preprocessing import build_preprocessing_fn

    if reuse:
        summary = reusable_summary(schema, cfg)
        if summary is not None:
            logger.info("preprocess: reusing the completed run in %s (same inputs, schema, options and code)",
                        cfg.output_dir)
            return dict(summary, reused=True)
        logger.info("preprocess: %s holds no completed run of these inputs, schema, options and code; "
                    "preprocessing", cfg.output_dir)
    return run_preprocess(schema, cfg, build_preprocessing_fn(schema.contract), beam_args)


def reusable_summary(schema: DatasetSchema, cfg: PreprocessConfig) -> Optional[Dict]:
    """The summary of a completed run in ``cfg.output_dir`` made from exactly these inputs, schema, options and
    code (its fingerprint matches and its outputs are there), else None: the run must be (re)done."""
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(os.path.join(cfg.output_dir, DONE_FILE)) as fh:
            done = json.loads(fh.read())
    except (OSError, ValueError, tf.errors.OpError):
        return None
    if not isinstance(done, dict) or done.get("fingerprint") != preprocess_fingerprint(schema, cfg):
        return None
    if (not tf.io.gfile.isdir(os.path.join(cfg.output_dir, TRANSFORM_DIR))
            or not tf.io.gfile.glob(transformed_pattern(cfg.output_dir, TRAIN))):
        return None
    return done.get("summary")


def _pipeline_counts(output_dir: str) -> Dict[str, int]:
    """The finished pipeline's counts, from its committed outputs: the readers' summed per-file counts and,
    as ``rows_<split>``, the records in each split's published shards. Fails when an output is missing."""
    from pipeline.files import read_json

    counts = read_json(os.path.join(output_dir, READ_COUNTS_FILE))
    if counts is None:
        raise FileNotFoundError(f"the pipeline wrote no {READ_COUNTS_FILE} in {output_dir}")
    for s in SPLITS:
        shards = read_json(os.path.join(output_dir, DATA_DIR, s, SHARDS_FILE))
        if shards is None:
            raise FileNotFoundError(f"the pipeline published no shards for split {s!r} "
                                    f"({os.path.join(output_dir, DATA_DIR, s, SHARDS_FILE)} missing)")
        counts[f"rows_{s}"] = int(shards["rows"])
    return counts


def _summary(schema: DatasetSchema, cfg: PreprocessConfig, counters: Dict[str, int], files, seconds) -> Dict:
    import tensorflow_transform as tft

    tft_output = tft.TFTransformOutput(os.path.join(cfg.output_dir, TRANSFORM_DIR))
    contract = schema.contract
    summary = {
        "dataset": schema.name,
        "seconds": round(seconds, 2),
        "input_files": len(files),
        "empty_files": counters.get("empty_files", 0),
        "rows_in": counters.get("rows_in", 0),
        "rows_rejected": counters.get("rows_rejected", 0),
        "rejected_by_reason": {k.split(": ", 1)[1]: v for k, v in counters.items() if k.startswith("rejected: ")},
        "sequences_truncated": {k.split(": ", 1)[1]: v for k, v in counters.items()
                                if k.startswith("sequence_truncated: ")},
        "vocabulary_sizes": {f.name: int(tft_output.vocabulary_size_by_name(f.vocab_name))
                             for f in list(contract.vocab_features) + list(contract.sequences)},
    }
    summary["log1p_negatives_clipped"] = {k.split(": ", 1)[1]: v for k, v in counters.items()
                                          if k.startswith("log1p_clipped: ")}
    summary["values_invalid_as_missing"] = {k.split(": ", 1)[1]: v for k, v in counters.items()
                                            if k.startswith("invalid_as_missing: ")}  # on_invalid: missing
    for s in SPLITS:
        summary[f"rows_{s}"] = counters.get(f"rows_{s}", 0)
    summary["oov_rate"] = {s: oov_rates(contract, tft_output, transformed_pattern(cfg.output_dir, s))
                           for s in (EVAL, TEST) if summary[f"rows_{s}"]}
    return summary


def oov_rates(contract: FeatureContract, tft_output, pattern: str, max_rows: int = 200_000) -> Dict[str, float]:
    """Share of (non-missing) values per vocabulary feature that fell into an OOV bucket (first ``max_rows`` rows
    of the transformed data, either format ``pipeline.training.data`` reads)."""
    import tensorflow as tf

    from pipeline.training.data import make_dataset

    files = sorted(tf.io.gfile.glob(pattern))
    feats = list(contract.vocab_features)
    if not files or not feats:
        return {}
    spec = {F.categorical_id(f.name): tf.io.FixedLenFeature([1], tf.int64) for f in feats}
    sizes = {f.name: tft_output.vocabulary_size_by_name(f.vocab_name) for f in feats}
    oov = {f.name: 0 for f in feats}
    n = 0
    for batch, _ in make_dataset(pattern, spec, list(spec), (), 4096).take(-(-max_rows // 4096)):
        for f in feats:
            oov[f.name] += int(np.sum(batch[F.categorical_id(f.name)].numpy() >= sizes[f.name]))
        n += int(next(iter(batch.values())).shape[0])
    return {k: round(v / max(1, n), 4) for k, v in oov.items()}


def _log_counts(summary: Dict) -> None:
    logger.info("preprocess %s: %d rows in, %d rejected, train %d / eval %d / test %d, %.1fs",
                summary["dataset"], summary["rows_in"], summary["rows_rejected"], summary["rows_train"],
                summary["rows_eval"], summary["rows_test"], summary["seconds"])
    for reason, n in sorted(summary["rejected_by_reason"].items()):
        logger.info("  rejected (%s): %d", reason, n)
    for name, n in sorted(summary["sequences_truncated"].items()):
        logger.info("  sequence %s truncated in %d rows", name, n)


def transformed_pattern(output_dir: str, split: str) -> str:
    return os.path.join(output_dir, DATA_DIR, split, "part-*")


def read_rejected(output_dir: str) -> List[Dict]:
    import tensorflow as tf

    rows = []
    for path in sorted(tf.io.gfile.glob(os.path.join(output_dir, REJECTED_DIR, "part*"))):
        with tf.io.gfile.GFile(path) as fh:
            rows.extend(json.loads(line) for line in fh.read().splitlines() if line.strip())
    return rows
