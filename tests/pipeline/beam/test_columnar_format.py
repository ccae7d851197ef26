"""The columnar transformed-data format (one tf.Example per transformed batch): written by the Beam stage's
``WriteExampleShards``, read back by every reader of pipeline.training.data with each row's values exactly those
of the batch (the numpy arrays it was built from) and exactly those the per-row tf.Example format gives; readers
reject a format they do not know, naming the file."""
import glob
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
from tfx_bsl.coders import example_coder

from pipeline.beam.preprocess import WriteExampleShards, columnar_record
from pipeline.beam.runner import make_pipeline
from pipeline.training import data

SPEC = {"id": tf.io.FixedLenFeature([1], tf.int64), "z": tf.io.FixedLenFeature([1], tf.float32),
        "seq": tf.io.FixedLenFeature([3], tf.int64), "tok": tf.io.FixedLenFeature([1], tf.string)}
SIZES = (5, 300, 1, 77)   # rows per transformed batch: 383 rows


def _truth():
    """{column: numpy [383, k]} with awkward floats (signed zero, subnormal, inf, nan, extremes)."""
    rng = np.random.default_rng(7)
    n = sum(SIZES)
    z = rng.normal(size=n).astype(np.float32)
    z[:7] = [-0.0, 1e-45, np.inf, -np.inf, np.nan, 3.4028235e38, -1.1754944e-38]
    return {"id": np.arange(n, dtype=np.int64).reshape(n, 1) * 1_000_003 - 2**40,
            "z": z.reshape(n, 1),
            "seq": rng.integers(-2**62, 2**62, size=(n, 3)),
            "tok": np.array([f"t{i}-\u00e9".encode() for i in range(n)], dtype=object).reshape(n, 1)}


def _batches(truth):
    """The truth cut into RecordBatches shaped like TensorFlow Transform's output (a list per cell)."""
    types = {"id": pa.large_list(pa.int64()), "z": pa.list_(pa.float32()), "seq": pa.large_list(pa.int64()),
             "tok": pa.large_list(pa.large_binary())}
    out, start = [], 0
    for size in SIZES:
        cols = [pa.array([list(row) for row in truth[k][start:start + size]], types[k]) for k in SPEC]
        out.append(pa.RecordBatch.from_arrays(cols, list(SPEC)))
        start += size
    return out


def _key(row):
    """A row as a hashable tuple, floats by their bits (so -0.0 != 0.0 and nan == nan)."""
    return (tuple(row["id"]), tuple(np.asarray(row["z"], np.float32).view(np.int32)), tuple(row["seq"]),
            tuple(row["tok"]))


def _rows(cols):
    """{key: [n, k]} -> one _key per row."""
    cols = {k: np.asarray(v) for k, v in cols.items()}
    return [_key({k: v[i] for k, v in cols.items()}) for i in range(len(cols["id"]))]


def _stream(ds):
    """(features, labels) batches -> ([rows per batch], [row keys in order])."""
    sizes, rows = [], []
    for feats, labels in ds:
        cols = {**{k: v.numpy() for k, v in feats.items()}, **{k: v.numpy() for k, v in labels.items()}}
        sizes.append(len(cols["id"]))
        rows += _rows(cols)
    return sizes, rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The batches written by the Beam stage's writer (columnar) and, for reference, one tf.Example per row."""
    tmp = tmp_path_factory.mktemp("columnar")
    truth = _truth()
    batches = _batches(truth)
    columnar = str(tmp / "data" / "train")
    with make_pipeline() as p:
        _ = (p | beam.Create([(b, None) for b in batches], reshuffle=False)
             | WriteExampleShards(columnar, compression_level=1))
    per_row = tmp / "per_row"
    per_row.mkdir()
    for i, b in enumerate(batches):
        with tf.io.TFRecordWriter(str(per_row / f"part-{i:05d}.tfrecord.gz"), "GZIP") as w:
            for record in example_coder.RecordBatchToExamples(b):
                w.write(record)
    return {"truth": sorted(_rows(truth)), "columnar": os.path.join(columnar, "part-*"),
            "per_row": str(per_row / "part-*")}


def test_every_reader_gives_each_row_exactly_as_written_and_as_the_per_row_format(shards):
    columnar, per_row, truth = shards["columnar"], shards["per_row"], shards["truth"]
    files = sorted(glob.glob(columnar))
    assert len(files) == len(SIZES)   # one file per batch, holding one record: the batch
    assert [sum(1 for _ in tf.data.TFRecordDataset(f, compression_type="GZIP")) for f in files] == [1] * len(SIZES)
    assert data.transformed_format(files)[0] == data.COLUMNAR_FORMAT
    assert data.transformed_format(sorted(glob.glob(per_row)))[0] == data.EXAMPLES_FORMAT
    for pattern in (columnar, per_row):
        assert data.count_records(pattern) == len(truth) == 383
        sizes, rows = _stream(data.make_dataset(pattern, SPEC, ["id", "z", "seq"], ["tok"], 64))
        assert sizes == [64] * 5 + [63]
        assert sorted(rows) == truth
        assert sorted(_rows(data.load_columns(pattern, SPEC, list(SPEC)))) == truth
        sizes, rows = _stream(data.make_in_memory_dataset(pattern, SPEC, ["id", "z"], ["seq", "tok"], 100,
                                                          shuffle=True, seed=1))
        assert sizes == [100, 100, 100, 83] and sorted(rows) == truth


def test_shuffled_epochs_hold_every_row_once_reshuffled_and_reproducible(shards):
    pattern = shards["columnar"]

    def run(seed, **kw):
        return _stream(data.make_dataset(pattern, SPEC, ["id", "z", "seq"], ["tok"], 64, shuffle=True, seed=seed,
                                         epochs=2, deterministic=True, **kw))

    sizes, rows = run(3)
    assert sizes == ([64] * 5 + [63]) * 2   # batches never straddle epochs
    first, second = rows[:383], rows[383:]
    assert sorted(first) == sorted(second) == shards["truth"]
    assert first != second and first != sorted(first)   # shuffled, and anew each epoch
    assert run(3) == (sizes, rows)                        # reproducible from the seed
    assert run(4)[1] != rows
    cached_sizes, cached = run(3, cache=True)   # epoch 2 replays the cached records of epoch 1's file order
    assert cached_sizes == sizes and cached[:383] == first
    assert sorted(cached[383:]) == shards["truth"] and cached[383:] != first
    assert run(3, skip_batches=7)[1] == rows[383 + 64:]   # a resumed run: epoch 2 from its 2nd batch


def _write_records(path, examples):
    with tf.io.TFRecordWriter(path, "GZIP") as w:
        for feats in examples:
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())


def test_readers_reject_an_unknown_format_naming_it_and_the_file(tmp_path):
    path = str(tmp_path / "part-00000.tfrecord.gz")
    tag = tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"rankline.columnar.v9"]))
    _write_records(path, [{"__format__": tag, "__rows__": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
                           "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))}])
    spec = {"id": SPEC["id"]}
    for read in (lambda: data.count_records(path), lambda: data.load_columns(path, spec, ["id"]),
                 lambda: data.make_dataset(path, spec, ["id"], [], 8),
                 lambda: data.make_in_memory_dataset(path, spec, ["id"], [], 8)):
        with pytest.raises(ValueError, match=r"part-00000\.tfrecord\.gz.*'rankline\.columnar\.v9'.*unknown"):
            read()


def test_a_record_of_another_format_after_a_columnar_one_fails(tmp_path):
    """Only the first record decides the format: a later per-row record in a columnar split is an error, not
    rows read wrongly."""
    path = str(tmp_path / "part-00000.tfrecord.gz")
    one = {"id": tf.train.Feature(int64_list=tf.train.Int64List(value=[5]))}
    tag = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data.COLUMNAR_FORMAT.encode()]))
    rows = tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))
    _write_records(path, [{**one, "__format__": tag, "__rows__": rows}, one])
    with pytest.raises(tf.errors.InvalidArgumentError, match="__format__|__rows__"):  # either key it lacks
        data.load_columns(path, {"id": SPEC["id"]}, ["id"])


@pytest.mark.parametrize("column", [pa.array([[1], [2, 3]], pa.list_(pa.int64())),
                                    pa.array([[1], None], pa.list_(pa.int64()))])
def test_the_writer_rejects_rows_of_unequal_lengths_naming_the_feature(column):
    """A flattened column whose rows hold different numbers of values could not be cut back into rows."""
    batch = pa.RecordBatch.from_arrays([pa.array([[1], [2]], pa.list_(pa.int64())), column], ["ok", "ragged"])
    with pytest.raises(ValueError, match="'ragged'"):
        columnar_record(batch)
