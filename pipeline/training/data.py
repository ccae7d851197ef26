"""tf.data input from the transformed gzip TFRecords."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import tensorflow as tf


def _files(file_pattern: str):
    files = tf.io.gfile.glob(file_pattern)
    if not files:
        raise FileNotFoundError(f"no transformed TFRecords match {file_pattern}")
    return sorted(files)


def count_records(file_pattern: str) -> int:
    """Number of records in the gzip TFRecords matching ``file_pattern`` (one pass, no parsing)."""
    ds = tf.data.TFRecordDataset(_files(file_pattern), compression_type="GZIP", num_parallel_reads=tf.data.AUTOTUNE)
    return int(ds.batch(4096).reduce(tf.constant(0, tf.int64),
                                     lambda n, b: n + tf.shape(b, out_type=tf.int64)[0]).numpy())


def make_dataset(file_pattern: str, feature_spec: Dict, feature_keys: Sequence[str], label_keys: Sequence[str],
                 batch_size: int, shuffle: bool = False, seed: int = 0, epochs: Optional[int] = 1,
                 extra_keys: Iterable[str] = (), skip_batches: int = 0,
                 deterministic: Optional[bool] = None, cache: bool = False) -> tf.data.Dataset:
    """(features, labels) batches; ``extra_keys`` (e.g. oracle columns) are carried inside ``labels``.

    Files are interleaved in parallel, records batched *before* parsing (one vectorised parse per batch)
    and the pipeline prefetches so input work overlaps training. Batches never straddle epochs
    (``epochs=None`` repeats forever; every epoch is reshuffled, reproducibly from ``seed``).
    ``skip_batches`` drops that many leading batches before they are parsed (a resumed run).
    ``deterministic``: True keeps the element order fixed for a seed (parallel reads and parses included);
    False lets parallel stages emit out of order; None (default) = ordered unless shuffling.
    ``cache`` keeps the decompressed serialized records in memory after the first pass (later epochs skip
    file reads and gzip; records are still reshuffled and parsed every epoch).
    """
    files = _files(file_pattern)
    wanted = set(feature_keys) | set(label_keys) | set(extra_keys)
    missing = sorted(wanted - set(feature_spec))
    if missing:
        raise KeyError(f"transformed data lacks feature(s) {missing} (files {file_pattern})")
    ordered = (not shuffle) if deterministic is None else bool(deterministic)
    spec = {k: feature_spec[k] for k in wanted}
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
                       cycle_length=min(4, len(files)), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=ordered)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(50_000, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if epochs is None or epochs != 1:
        ds = ds.repeat(epochs)
    if skip_batches:
        ds = ds.skip(skip_batches)
    labels_and_extra = list(dict.fromkeys(list(label_keys) + list(extra_keys)))

    def parse(serialized) -> Tuple[Dict, Dict]:
        parsed = tf.io.parse_example(serialized, spec)
        return ({k: parsed[k] for k in feature_keys}, {k: parsed[k] for k in labels_and_extra})

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = ordered
    return ds.with_options(options)


def load_columns(file_pattern: str, feature_spec: Dict, keys: Sequence[str], batch_size: int = 8192) -> Dict:
    """Every record of the gzip TFRecords, parsed once into one in-memory tensor per key (file order)."""
    spec = {k: feature_spec[k] for k in dict.fromkeys(keys)}
    ds = tf.data.TFRecordDataset(_files(file_pattern), compression_type="GZIP", num_parallel_reads=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size).map(lambda s: tf.io.parse_example(s, spec), num_parallel_calls=tf.data.AUTOTUNE)
    parts: Dict[str, list] = {k: [] for k in spec}
    for batch in ds:
        for k, v in batch.items():
            parts[k].append(v)
    return {k: tf.concat(v, axis=0) for k, v in parts.items()}


def make_in_memory_dataset(file_pattern: str, feature_spec: Dict, feature_keys: Sequence[str],
                           label_keys: Sequence[str], batch_size: int, shuffle: bool = False, seed: int = 0,
                           epochs: Optional[int] = 1, skip_batches: int = 0) -> tf.data.Dataset:
    """``make_dataset``'s batches from data that fits in memory: the records are read and parsed once, then
    every batch is a gather of row indices (every epoch reshuffled from ``seed`` over the whole split,
    batches never straddle epochs, ``skip_batches`` as in ``make_dataset``). Always deterministic."""
    missing = sorted((set(feature_keys) | set(label_keys)) - set(feature_spec))
    if missing:
        raise KeyError(f"transformed data lacks feature(s) {missing} (files {file_pattern})")
    cols = load_columns(file_pattern, feature_spec, list(feature_keys) + list(label_keys))
    n = int(next(iter(cols.values())).shape[0])
    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if epochs is None or epochs != 1:
        ds = ds.repeat(epochs)
    if skip_batches:
        ds = ds.skip(skip_batches)

    def take(idx) -> Tuple[Dict, Dict]:
        return ({k: tf.gather(cols[k], idx) for k in feature_keys}, {k: tf.gather(cols[k], idx) for k in label_keys})

    return ds.map(take, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
