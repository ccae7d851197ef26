"""tf.data input from the transformed gzip TFRecords.

Two formats are read, told apart by each split's first record:

* ``columnar`` (``COLUMNAR_FORMAT``, what ``pipeline.beam.preprocess`` writes): one ``tf.Example`` per batch of
  n transformed rows. Feature ``__format__`` = [``COLUMNAR_FORMAT``], ``__rows__`` = [n], and every transformed
  feature of spec shape [k] holds the batch's n·k values row-major (row i is values[i·k:(i+1)·k]).
* ``examples``: one ``tf.Example`` per row (earlier preprocessing outputs, hand-written test data).

A record whose ``__format__`` names another format is an error naming the file.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import tensorflow as tf

COLUMNAR_FORMAT = "rankline.columnar.v1"
EXAMPLES_FORMAT = "examples"
FORMAT_KEY = "__format__"
ROWS_KEY = "__rows__"
SHUFFLE_ROWS = 50_000  # rows mixed by a shuffle: the buffer of one tf.Example per row, the window of columnar


def _files(file_pattern: str):
    files = tf.io.gfile.glob(file_pattern)
    if not files:
        raise FileNotFoundError(f"no transformed TFRecords match {file_pattern}")
    return sorted(files)


def transformed_format(files: Sequence[str]) -> Tuple[str, int]:
    """(format, rows in its first record) of transformed TFRecords, from the first record of the first
    non-empty file: ``COLUMNAR_FORMAT`` or ``EXAMPLES_FORMAT`` (1 row a record). Unknown formats raise."""
    for path in files:
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP").take(1).as_numpy_iterator():
            feature = tf.train.Example.FromString(record).features.feature
            if FORMAT_KEY not in feature:
                return EXAMPLES_FORMAT, 1
            tag = b"".join(feature[FORMAT_KEY].bytes_list.value[:1]).decode(errors="replace")
            if tag != COLUMNAR_FORMAT:
                raise ValueError(f"{path}: transformed-data format {tag!r} is unknown to this reader (it reads "
                                 f"{COLUMNAR_FORMAT!r} and one tf.Example per row); preprocess the data again")
            return COLUMNAR_FORMAT, int(feature[ROWS_KEY].int64_list.value[0])
    return EXAMPLES_FORMAT, 1


def _columnar_parser(spec: Dict):
    """One columnar record -> {key: [n] + spec[key].shape} (n = its ``__rows__``)."""
    for key, f in spec.items():
        if not isinstance(f, tf.io.FixedLenFeature):
            raise TypeError(f"transformed feature {key!r}: the columnar format holds FixedLenFeatures only, got {f}")
    values = {k: tf.io.FixedLenSequenceFeature([], f.dtype, allow_missing=True) for k, f in spec.items()}
    values[FORMAT_KEY] = tf.io.FixedLenFeature([], tf.string)
    values[ROWS_KEY] = tf.io.FixedLenFeature([], tf.int64)

    def parse(record) -> Dict:
        p = tf.io.parse_single_example(record, values)
        check = tf.debugging.assert_equal(p[FORMAT_KEY], COLUMNAR_FORMAT,
                                          message="transformed record of another format than its split's first")
        with tf.control_dependencies([check]):
            return {k: tf.reshape(p[k], [p[ROWS_KEY]] + list(f.shape)) for k, f in spec.items()}

    return parse


def count_records(file_pattern: str) -> int:
    """Number of rows in the transformed TFRecords matching ``file_pattern`` (one pass; columnar records are
    counted by their ``__rows__``, one tf.Example per row by records)."""
    files = _files(file_pattern)
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP", num_parallel_reads=tf.data.AUTOTUNE)
    if transformed_format(files)[0] == COLUMNAR_FORMAT:
        rows = {ROWS_KEY: tf.io.FixedLenFeature([], tf.int64)}
        ds = ds.map(lambda r: tf.io.parse_single_example(r, rows)[ROWS_KEY], num_parallel_calls=tf.data.AUTOTUNE)
        return int(ds.reduce(tf.constant(0, tf.int64), lambda n, k: n + k).numpy())
    return int(ds.batch(4096).reduce(tf.constant(0, tf.int64),
                                     lambda n, b: n + tf.shape(b, out_type=tf.int64)[0]).numpy())


def _columnar_batches(files, spec: Dict, batch_size: int, shuffle: bool, seed: int, ordered: bool,
                      cache: bool, block_rows: int) -> tf.data.Dataset:
    """One epoch of {key: [<=batch_size] + shape} batches from columnar records. Shuffling permutes windows of
    max(SHUFFLE_ROWS, 4 blocks) consecutive rows (blocks interleaved from 4 files), anew every epoch."""
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    cycle = min(4, len(files))
    ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"), cycle_length=cycle,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    if cache:
        ds = ds.cache()
    ds = ds.map(_columnar_parser(spec), num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    if shuffle:
        key = next(iter(spec))
        windows = ds.rebatch(max(SHUFFLE_ROWS, cycle * block_rows))

        def permute(window, r):
            order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(window[key])[0]),
                                                             seed=tf.stack([r, tf.constant(seed, tf.int64)]))
            return {k: tf.gather(v, order) for k, v in window.items()}

        ds = tf.data.Dataset.zip((windows, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)))
        ds = ds.map(permute, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    return ds.rebatch(batch_size)


EXAMPLE_BLOCK_ROWS = 256  # shuffled one-tf.Example-per-row input: records read a block at a time per file


def _example_batches(files, batch_size: int, shuffle: bool, seed: int, ordered: bool, cache: bool) -> tf.data.Dataset:
    """One epoch of [<=batch_size] serialized tf.Examples (one per row), 4 files interleaved. Shuffled: the
    files are read ``EXAMPLE_BLOCK_ROWS`` records at a time (one tf.data element per block, not per record)
    and windows of ``SHUFFLE_ROWS`` records are permuted anew every epoch (as columnar blocks are), then cut
    into batches; a parallel interleave of single records and a shuffle buffer cost about half the input's
    CPU (``python -m pipeline.bench.train --format examples --profile``). Unshuffled: records in the order of
    a record-by-record interleave."""
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    block = EXAMPLE_BLOCK_ROWS if shuffle else 0
    ds = ds.interleave(lambda f: (tf.data.TFRecordDataset(f, compression_type="GZIP").batch(block) if block
                                  else tf.data.TFRecordDataset(f, compression_type="GZIP")),
                       cycle_length=min(4, len(files)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    if cache:
        ds = ds.cache()
    if not shuffle:
        return ds.batch(batch_size)

    def permute(window, r):
        return tf.random.experimental.stateless_shuffle(window, seed=tf.stack([r, tf.constant(seed, tf.int64)]))

    windows = tf.data.Dataset.zip((ds.rebatch(SHUFFLE_ROWS),
                                   tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)))
    return windows.map(permute, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered).rebatch(batch_size)


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
    Columnar records are parsed a record (a block of rows) at a time and cut into batches (``rebatch``);
    shuffling permutes windows of ``SHUFFLE_ROWS`` rows or more instead of a buffer of rows (one tf.Example
    per row: windows of ``SHUFFLE_ROWS`` serialized records, see ``_example_batches``).
    """
    files = _files(file_pattern)
    wanted = set(feature_keys) | set(label_keys) | set(extra_keys)
    missing = sorted(wanted - set(feature_spec))
    if missing:
        raise KeyError(f"transformed data lacks feature(s) {missing} (files {file_pattern})")
    ordered = (not shuffle) if deterministic is None else bool(deterministic)
    spec = {k: feature_spec[k] for k in sorted(wanted)}
    labels_and_extra = list(dict.fromkeys(list(label_keys) + list(extra_keys)))
    fmt, block_rows = transformed_format(files)
    if fmt == COLUMNAR_FORMAT:
        ds = _columnar_batches(files, spec, batch_size, shuffle, seed, ordered, cache, block_rows)
        parse = lambda cols: cols  # noqa: E731 (parsed a block at a time)
    else:
        ds = _example_batches(files, batch_size, shuffle, seed, ordered, cache)
        parse = lambda serialized: tf.io.parse_example(serialized, spec)  # noqa: E731
    if epochs is None or epochs != 1:
        ds = ds.repeat(epochs)
    if skip_batches:
        ds = ds.skip(skip_batches)

    def split(batch) -> Tuple[Dict, Dict]:
        parsed = parse(batch)
        return ({k: parsed[k] for k in feature_keys}, {k: parsed[k] for k in labels_and_extra})

    ds = ds.map(split, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = ordered
    return ds.with_options(options)


def in_memory_bytes(rows: int, feature_spec: Dict, keys: Sequence[str]) -> int:
    """Bytes of the in-memory columns of ``rows`` rows (each key: rows x prod(shape) x dtype size)."""
    total = 0
    for k in dict.fromkeys(keys):
        f = feature_spec[k]
        width = 1
        for d in getattr(f, "shape", None) or []:
            width *= int(d)
        total += rows * width * tf.as_dtype(f.dtype).size
    return total


def available_memory_bytes() -> Optional[int]:
    """``MemAvailable`` of /proc/meminfo, lowered to the cgroup's free limit when one is set; None if unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if limit != "max" and avail is not None:
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def check_fits_in_memory(file_pattern: str, feature_spec: Dict, keys: Sequence[str],
                         available: Optional[int] = None, rows: Optional[int] = None) -> int:
    """Raises MemoryError, naming the figures, when loading the split needs more than the available memory
    (the columns twice: the parsed parts and their concatenation coexist while loading). Returns the bytes.
    ``rows``: the split's row count when the caller knows it (else the files are counted)."""
    rows = count_records(file_pattern) if rows is None else rows
    need = 2 * in_memory_bytes(rows, feature_spec, keys)
    avail = available_memory_bytes() if available is None else available
    if avail is not None and need > avail:
        raise MemoryError(
            f"--in-memory: the {rows:,} training rows of {file_pattern} need ~{need / 2**30:.2f} GiB while "
            f"loading, {avail / 2**30:.2f} GiB is available; train without --in-memory (the default streams "
            f"the TFRecords every epoch)")
    return need


def load_columns(file_pattern: str, feature_spec: Dict, keys: Sequence[str], batch_size: int = 8192,
                 rows: Optional[int] = None) -> Dict:
    """Every row of the transformed TFRecords, parsed once into one in-memory tensor per key (file order);
    refused first when they would not fit (``check_fits_in_memory``; ``rows`` as there)."""
    spec = {k: feature_spec[k] for k in dict.fromkeys(keys)}
    check_fits_in_memory(file_pattern, spec, list(spec), rows=rows)
    files = _files(file_pattern)
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP", num_parallel_reads=tf.data.AUTOTUNE)
    if transformed_format(files)[0] == COLUMNAR_FORMAT:
        ds = ds.map(_columnar_parser(spec), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.batch(batch_size).map(lambda s: tf.io.parse_example(s, spec), num_parallel_calls=tf.data.AUTOTUNE)
    parts: Dict[str, list] = {k: [] for k in spec}
    for batch in ds:
        for k, v in batch.items():
            parts[k].append(v)
    return {k: tf.concat(v, axis=0) for k, v in parts.items()}


def make_in_memory_dataset(file_pattern: str, feature_spec: Dict, feature_keys: Sequence[str],
                           label_keys: Sequence[str], batch_size: int, shuffle: bool = False, seed: int = 0,
                           epochs: Optional[int] = 1, skip_batches: int = 0,
                           rows: Optional[int] = None) -> tf.data.Dataset:
    """``make_dataset``'s batches from data that fits in memory: the records are read and parsed once, then
    every batch is a gather of row indices (every epoch reshuffled from ``seed`` over the whole split,
    batches never straddle epochs, ``skip_batches`` as in ``make_dataset``). Always deterministic. ``rows``: the
    split's row count when known (spares the memory check a counting pass)."""
    missing = sorted((set(feature_keys) | set(label_keys)) - set(feature_spec))
    if missing:
        raise KeyError(f"transformed data lacks feature(s) {missing} (files {file_pattern})")
    cols = load_columns(file_pattern, feature_spec, list(feature_keys) + list(label_keys), rows=rows)
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
