"""tf.data input from the transformed gzip TFRecords."""
from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple

import tensorflow as tf


def make_dataset(file_pattern: str, feature_spec: Dict, feature_keys: Sequence[str], label_keys: Sequence[str],
                 batch_size: int, shuffle: bool = False, seed: int = 0, epochs: int = 1,
                 extra_keys: Iterable[str] = ()) -> tf.data.Dataset:
    """(features, labels) batches; ``extra_keys`` (e.g. oracle columns) are carried inside ``labels``.

    Files are interleaved in parallel, records batched *before* parsing (one vectorised parse per batch)
    and the pipeline prefetches so input work overlaps training.
    """
    files = tf.io.gfile.glob(file_pattern)
    if not files:
        raise FileNotFoundError(f"no transformed TFRecords match {file_pattern}")
    wanted = set(feature_keys) | set(label_keys) | set(extra_keys)
    missing = sorted(wanted - set(feature_spec))
    if missing:
        raise KeyError(f"transformed data lacks feature(s) {missing} (files {file_pattern})")
    spec = {k: feature_spec[k] for k in wanted}
    ds = tf.data.Dataset.from_tensor_slices(sorted(files))
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
                       cycle_length=min(4, len(files)), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=not shuffle)
    if shuffle:
        ds = ds.shuffle(50_000, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat(epochs) if epochs != 1 else ds
    ds = ds.batch(batch_size)
    labels_and_extra = list(dict.fromkeys(list(label_keys) + list(extra_keys)))

    def parse(serialized) -> Tuple[Dict, Dict]:
        parsed = tf.io.parse_example(serialized, spec)
        return ({k: parsed[k] for k in feature_keys}, {k: parsed[k] for k in labels_and_extra})

    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
