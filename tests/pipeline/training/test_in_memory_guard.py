"""``--in-memory`` refuses, with the figures, a training split that would not fit in the available memory."""
import numpy as np
import pytest
import tensorflow as tf

from pipeline.training import data as D

SPEC = {"a": tf.io.FixedLenFeature([3], tf.float32), "b": tf.io.FixedLenFeature([], tf.int64),
        "y": tf.io.FixedLenFeature([], tf.float32)}


def _write(path, rows):
    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for _ in range(rows):
            ex = tf.train.Example(features=tf.train.Features(feature={
                "a": tf.train.Feature(float_list=tf.train.FloatList(value=rng.random(3).tolist())),
                "b": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(rng.integers(9))])),
                "y": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))}))
            w.write(ex.SerializeToString())


def test_the_estimate_is_rows_times_row_width_twice_and_the_limit_is_exact(tmp_path):
    for i in range(2):
        _write(str(tmp_path / f"part-{i}.tfrecord.gz"), 50)
    pattern = str(tmp_path / "part-*.tfrecord.gz")
    need = 2 * 100 * (3 * 4 + 8 + 4)  # worked out by hand: a [3] float32, b int64, y float32; loading holds it twice
    assert D.check_fits_in_memory(pattern, SPEC, ["a", "b", "y"], available=need) == need
    with pytest.raises(MemoryError) as err:
        D.check_fits_in_memory(pattern, SPEC, ["a", "b", "y"], available=need - 1)
    assert pattern in str(err.value) and "100 training rows" in str(err.value) and "without --in-memory" in str(err.value)
    # a row count the caller knows is taken as it is (no counting pass): ten times the rows, ten times the bytes
    assert D.check_fits_in_memory(pattern, SPEC, ["a", "b", "y"], available=10 * need, rows=1000) == 10 * need
    with pytest.raises(MemoryError, match="1,000 training rows"):
        D.check_fits_in_memory(pattern, SPEC, ["a", "b", "y"], available=need, rows=1000)


def test_in_memory_dataset_refuses_before_loading_when_memory_is_short(tmp_path, monkeypatch):
    _write(str(tmp_path / "part-0.tfrecord.gz"), 20)
    pattern = str(tmp_path / "part-*.tfrecord.gz")
    monkeypatch.setattr(D, "available_memory_bytes", lambda: 100)
    loaded = []
    monkeypatch.setattr(D.tf, "concat", lambda *a, **k: loaded.append(1))
    with pytest.raises(MemoryError):
        D.make_in_memory_dataset(pattern, SPEC, ["a", "b"], ["y"], batch_size=4)
    assert not loaded  # refused before any column was assembled
    monkeypatch.undo()
    batches = list(D.make_in_memory_dataset(pattern, SPEC, ["a", "b"], ["y"], batch_size=8))
    assert sum(int(x["a"].shape[0]) for x, _ in batches) == 20


def test_available_memory_is_read_from_the_system():
    avail = D.available_memory_bytes()
    assert avail is None or 0 < avail < 1 << 50
