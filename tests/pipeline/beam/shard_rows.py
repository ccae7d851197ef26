"""Rows in published transformed shards, counted on disk independently of the readers under test: each record
of the columnar format (pipeline.training.data) holds ``__rows__`` rows."""
import tensorflow as tf


def rows_on_disk(files) -> int:
    n = 0
    for record in tf.data.TFRecordDataset(sorted(files), compression_type="GZIP").as_numpy_iterator():
        feature = tf.train.Example.FromString(record).features.feature
        assert feature["__format__"].bytes_list.value == [b"rankline.columnar.v1"], "not a columnar record"
        n += feature["__rows__"].int64_list.value[0]
    return n
