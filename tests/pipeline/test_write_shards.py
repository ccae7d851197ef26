"""Batch-at-a-time TFRecord output of the preprocessing stage: every row written once, shards published
under final names only from committed bundles, temporary files cleaned up."""
import glob
import os

import apache_beam as beam
import pyarrow as pa
import pytest
import tensorflow as tf

from pipeline.beam_runner import make_pipeline
from pipeline.preprocess import PreprocessConfig, WriteExampleShards, _publish_shards


def _batches():
    out = []
    for b in range(3):
        ids = [b * 100 + i for i in range(7 + b)]
        out.append((pa.RecordBatch.from_arrays([pa.array([[i] for i in ids], pa.list_(pa.int64())),
                                                 pa.array([[float(i) / 2] for i in ids], pa.list_(pa.float32()))],
                                                ["id", "z"]), None))
    out.append((out[0][0].slice(0, 0), None))   # an empty batch writes no file
    return out


def test_writes_every_row_once_into_published_shards(tmp_path):
    out_dir = str(tmp_path / "data" / "train")
    with make_pipeline() as p:
        _ = p | beam.Create(_batches(), reshuffle=False) | WriteExampleShards(out_dir, compression_level=1)
    files = sorted(glob.glob(os.path.join(out_dir, "*")))
    assert [os.path.basename(f) for f in files] == [f"part-{i:05d}-of-00003.tfrecord.gz" for i in range(3)]
    spec = {"id": tf.io.FixedLenFeature([1], tf.int64), "z": tf.io.FixedLenFeature([1], tf.float32)}
    rows = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    ids = sorted(int(r["id"][0]) for r in rows)
    assert ids == sorted(b * 100 + i for b in range(3) for i in range(7 + b))
    assert all(float(r["z"][0]) == int(r["id"][0]) / 2 for r in rows)
    # nothing but the data directory is left beside it (the temporary directory is gone)
    assert os.listdir(tmp_path / "data") == ["train"]


def test_publish_ignores_files_of_failed_attempts(tmp_path):
    temp = tmp_path / ".tmp-x"
    temp.mkdir()
    committed = []
    for name in ("b", "a", "orphan"):
        path = str(temp / f"{name}.tfrecord.gz")
        with tf.io.TFRecordWriter(path, "GZIP") as w:
            w.write(name.encode())
        if name != "orphan":
            committed.append(path)
    final = _publish_shards(committed, str(tmp_path / "out"))
    assert [os.path.basename(f) for f in final] == ["part-00000-of-00002.tfrecord.gz",
                                                    "part-00001-of-00002.tfrecord.gz"]
    got = [r.numpy() for r in tf.data.TFRecordDataset(final, compression_type="GZIP")]
    assert got == [b"a", b"b"]   # sorted temp names, the orphan's record nowhere
    assert not temp.exists()


def test_compression_level_is_validated():
    with pytest.raises(ValueError, match="compression_level"):
        PreprocessConfig(output_dir="x", compression_level=10)


def test_publish_replaces_an_earlier_runs_shards_and_can_be_retried(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(5):   # an earlier, larger run
        (out / f"part-{i:05d}-of-00005.tfrecord.gz").write_bytes(b"stale")
    temp = tmp_path / ".tmp-y"
    temp.mkdir()
    path = str(temp / "only.tfrecord.gz")
    with tf.io.TFRecordWriter(path, "GZIP") as w:
        w.write(b"new")
    final = _publish_shards([path], str(out))
    assert sorted(os.listdir(out)) == ["part-00000-of-00001.tfrecord.gz"]
    # a retry after the rename (temp file and directory gone) publishes the same shard again
    assert _publish_shards([path], str(out)) == final
    assert [r.numpy() for r in tf.data.TFRecordDataset(final, compression_type="GZIP")] == [b"new"]
