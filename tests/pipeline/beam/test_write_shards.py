"""Batch-at-a-time TFRecord output of the preprocessing stage (one columnar record per batch): every row
written once, shards published under final names only from committed bundles (a committed file that is not
there is an error, never a name), their row counts recorded beside them, temporary files cleaned up."""
import glob
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf

from pipeline.beam.runner import make_pipeline
from pipeline.beam.preprocess import SHARDS_FILE, PreprocessConfig, WriteExampleShards, _publish_shards


def _batches():
    out = []
    for b in range(3):
        ids = [b * 100 + i for i in range(7 + b)]
        out.append((pa.RecordBatch.from_arrays([pa.array([[i] for i in ids], pa.list_(pa.int64())),
                                                 pa.array([[float(i) / 2] for i in ids], pa.list_(pa.float32()))],
                                                ["id", "z"]), None))
    out.append((out[0][0].slice(0, 0), None))   # an empty batch writes no file
    return out


def _records(paths):
    return [r.numpy() for r in tf.data.TFRecordDataset(list(paths), compression_type="GZIP")]


def _columnar_rows(path):
    """The rows of one columnar shard, decoded literally: {feature: [n, k] values} from its one record."""
    (record,) = _records([path])
    feature = tf.train.Example.FromString(record).features.feature
    assert feature["__format__"].bytes_list.value == [b"rankline.columnar.v1"]
    n = feature["__rows__"].int64_list.value[0]
    return n, {"id": np.reshape(feature["id"].int64_list.value, (n, -1)),
               "z": np.reshape(feature["z"].float_list.value, (n, -1))}


def test_writes_every_row_once_into_published_shards(tmp_path):
    out_dir = str(tmp_path / "data" / "train")
    with make_pipeline() as p:
        _ = p | beam.Create(_batches(), reshuffle=False) | WriteExampleShards(out_dir, compression_level=1)
    files = sorted(glob.glob(os.path.join(out_dir, "part-*")))
    assert [os.path.basename(f) for f in files] == [f"part-{i:05d}-of-00003.tfrecord.gz" for i in range(3)]
    shards = [_columnar_rows(f) for f in files]   # one record per batch, holding its rows
    assert sorted(n for n, _ in shards) == [7, 8, 9]
    ids = np.concatenate([cols["id"] for _, cols in shards])
    z = np.concatenate([cols["z"] for _, cols in shards])
    assert ids.shape == z.shape == (24, 1)
    assert sorted(ids[:, 0]) == sorted(b * 100 + i for b in range(3) for i in range(7 + b))
    assert (z == ids / 2).all()
    # the recorded count is the number of rows on disk: 7 + 8 + 9
    with open(os.path.join(out_dir, SHARDS_FILE)) as fh:
        assert json.load(fh)["rows"] == len(ids) == 24
    assert sorted(os.listdir(out_dir)) == [SHARDS_FILE] + [os.path.basename(f) for f in files]
    # nothing but the data directory is left beside it (the temporary directory is gone)
    assert os.listdir(tmp_path / "data") == ["train"]


def _temp_files(temp, names):
    temp.mkdir()
    paths = {}
    for name in names:
        paths[name] = str(temp / f"{name}.tfrecord.gz")
        with tf.io.TFRecordWriter(paths[name], "GZIP") as w:
            for _ in range(len(name)):
                w.write(name.encode())
    return paths


def test_publish_ignores_files_of_failed_attempts(tmp_path):
    temp = tmp_path / ".tmp-x"
    paths = _temp_files(temp, ("bb", "a", "orphan"))
    final = _publish_shards([(paths["bb"], 2), (paths["a"], 1)], str(tmp_path / "out"), str(temp))
    assert [os.path.basename(f) for f in final] == ["part-00000-of-00002.tfrecord.gz",
                                                    "part-00001-of-00002.tfrecord.gz"]
    assert _records(final) == [b"a", b"bb", b"bb"]   # sorted temp names, the orphan's record nowhere
    assert not temp.exists()
    with open(tmp_path / "out" / SHARDS_FILE) as fh:
        assert json.load(fh)["rows"] == 3


def test_a_missing_committed_shard_is_an_error_naming_it(tmp_path):
    """A committed file that the publishing step cannot see (e.g. written to another worker's local disk)
    must fail the run; the old code returned its final name and published the other shards only."""
    temp = tmp_path / ".tmp-z"
    paths = _temp_files(temp, ("a",))
    lost = str(temp / "written-elsewhere.tfrecord.gz")
    with pytest.raises(FileNotFoundError, match="written-elsewhere.tfrecord.gz"):
        _publish_shards([(paths["a"], 1), (lost, 5)], str(tmp_path / "out"), str(temp))
    assert glob.glob(str(tmp_path / "out" / "part-*")) == []   # nothing published under a final name


def test_compression_level_is_validated():
    with pytest.raises(ValueError, match="compression_level"):
        PreprocessConfig(output_dir="x", compression_level=10)


def test_publish_replaces_an_earlier_runs_shards_and_can_be_retried(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(5):   # an earlier, larger run
        (out / f"part-{i:05d}-of-00005.tfrecord.gz").write_bytes(b"stale")
    temp = tmp_path / ".tmp-y"
    paths = _temp_files(temp, ("n", "w"))
    written = [(paths["n"], 1), (paths["w"], 1)]
    # an attempt that died after renaming the first shard: the retry accepts it and publishes the second
    final = [str(out / f"part-{i:05d}-of-00002.tfrecord.gz") for i in range(2)]
    with open(out / SHARDS_FILE, "w") as fh:
        json.dump({"temp_dir": str(temp), "shards": [[p, d, 1] for (p, _), d in zip(written, final)], "rows": 2}, fh)
    os.rename(paths["n"], final[0])
    assert _publish_shards(written, str(out), str(temp)) == final
    assert sorted(os.listdir(out)) == [SHARDS_FILE, "part-00000-of-00002.tfrecord.gz",
                                       "part-00001-of-00002.tfrecord.gz"]
    # a retry after the whole step (temp files and directory gone) publishes the same shards again
    assert _publish_shards(written, str(out), str(temp)) == final
    assert _records(final) == [b"n", b"w"]
    # but the same missing files with no record of this attempt (another run's temp dir) are an error
    with pytest.raises(FileNotFoundError, match="n.tfrecord.gz"):
        _publish_shards(written, str(out), str(tmp_path / ".tmp-other"))
