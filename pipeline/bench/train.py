"""Training throughput: ESM² at the paper's size from gzip TFRecords vs a plain Keras model fed from memory.

    python -m pipeline.bench.train                  # prints examples/s of both, their ratio, peak RSS

ESM² at the paper's size (§4.1.3): 26 categorical fields x 16-dim embeddings + 13 numeric inputs, four
512-256-128-32 towers, dropout 0.5, Adam, batch 1000. "ours" is the project's training path: ESM² with its
custom ``train_step``, fed by ``pipeline.training.data`` from gzip TFRecords this command writes (synthetic
transformed-like data: 26 int64 ids, 13 floats, 3 labels): by default parsed once into memory
(``make_in_memory_dataset``, ``--in-memory`` of pipeline.run); ``--input stream`` re-reads them every epoch.
"reference" is a plain Keras functional model of the same shape (26 Embedding layers, four Dense towers,
the same composition and three entire-space log losses) fed by ``model.fit(x=dict_of_numpy, y=...)``.

Both run in this process, interleaved (reference, ours, reference, ours, ...) so that load from other
processes hits both alike; each segment's rate is timed between its ``--warmup-steps``-th and last step and
the median over rounds is reported, beside examples per CPU-second of the process (steadier when other
processes compete for the cores). Measured on 2 shared cores, both models are bound by the towers' matmuls
(~55 ms of fp32 GEMM per 1000-example step, near the cores' peak); fusing the four towers into batched
matmuls, XLA (jit_compile) and bfloat16 were each measured slower on this CPU and are not used.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Dict, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from models.keras import keras  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import tensorflow as tf  # noqa: E402

NUM_CATEGORICAL, NUM_DENSE, EMBEDDING_DIM = 26, 13, 16
HIDDEN = (512, 256, 128, 32)
LABELS = ("click", "daction", "purchase")
# Vocabulary sizes of the 26 fields (ids + OOV): a Criteo-like spread from tens to tens of thousands.
CARDINALITIES = tuple([10, 100, 1_000, 10_000, 50_000, 300, 3_000, 30] * 4)[:NUM_CATEGORICAL]


def categorical_names() -> List[str]:
    return [f"c{i:02d}_id" for i in range(NUM_CATEGORICAL)]


def dense_names() -> List[str]:
    return [f"i{i:02d}_z" for i in range(NUM_DENSE)]


def synthetic_columns(rows: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """Transformed-like columns: Zipf-ish ids, z-scored numerics, funnel labels with some signal."""
    rng = np.random.default_rng(seed)
    cols: Dict[str, np.ndarray] = {}
    for name, card in zip(categorical_names(), CARDINALITIES):
        cols[name] = np.minimum(rng.zipf(1.3, rows) - 1, card - 1).astype(np.int64)
    for name in dense_names():
        cols[name] = rng.normal(size=rows).astype(np.float32)
    logit = -2.0 + 0.8 * cols["i00_z"] + 0.5 * (cols["c00_id"] % 3 == 0)
    click = rng.random(rows) < 1 / (1 + np.exp(-logit))
    daction = click & (rng.random(rows) < 0.3)
    purchase = click & (rng.random(rows) < np.where(daction, 0.3, 0.05))
    cols.update(click=click.astype(np.int64), daction=daction.astype(np.int64), purchase=purchase.astype(np.int64))
    return cols


def feature_spec() -> Dict:
    spec = {n: tf.io.FixedLenFeature([1], tf.int64) for n in categorical_names() + list(LABELS)}
    spec.update({n: tf.io.FixedLenFeature([1], tf.float32) for n in dense_names()})
    return spec


def write_tfrecords(out_dir: str, rows: int, shards: int = 4, seed: int = 0) -> str:
    """gzip TFRecords of ``synthetic_columns`` (reused when already written with the same size/seed)."""
    marker = os.path.join(out_dir, f"done-rows{rows}-seed{seed}-shards{shards}")
    pattern = os.path.join(out_dir, "part-*.tfrecord.gz")
    if os.path.exists(marker):
        return pattern
    os.makedirs(out_dir, exist_ok=True)
    for old in tf.io.gfile.glob(os.path.join(out_dir, "*")):
        tf.io.gfile.remove(old)
    cols = synthetic_columns(rows, seed)
    ints = [n for n in cols if cols[n].dtype == np.int64]
    floats = [n for n in cols if cols[n].dtype == np.float32]
    int_rows = np.stack([cols[n] for n in ints], axis=1).tolist()
    float_rows = np.stack([cols[n] for n in floats], axis=1).tolist()
    Feature, Int64List, FloatList = tf.train.Feature, tf.train.Int64List, tf.train.FloatList
    writers = [tf.io.TFRecordWriter(os.path.join(out_dir, f"part-{s:05d}.tfrecord.gz"), options="GZIP")
               for s in range(shards)]
    for i in range(rows):
        feats = {n: Feature(int64_list=Int64List(value=[v])) for n, v in zip(ints, int_rows[i])}
        feats.update({n: Feature(float_list=FloatList(value=[v])) for n, v in zip(floats, float_rows[i])})
        writers[i % shards].write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    for w in writers:
        w.close()
    open(marker, "w").close()
    return pattern


def reference_model(dropout: float, learning_rate: float) -> keras.Model:
    """Plain Keras functional ESM²: same embeddings, towers, composition and losses, Keras' own train step."""
    inputs, parts = {}, []
    for name, card in zip(categorical_names(), CARDINALITIES):
        inputs[name] = keras.Input(shape=(1,), dtype="int64", name=name)
        parts.append(keras.layers.Flatten()(keras.layers.Embedding(card, EMBEDDING_DIM)(inputs[name])))
    for name in dense_names():
        inputs[name] = keras.Input(shape=(1,), dtype="float32", name=name)
    parts.append(keras.layers.Activation("tanh")(keras.layers.Concatenate()([inputs[n] for n in dense_names()])))
    g = keras.layers.Concatenate()(parts)
    ys = []
    for _ in range(4):
        x = g
        for units in HIDDEN:
            x = keras.layers.Dropout(dropout)(keras.layers.Dense(units, activation="relu")(x))
        ys.append(keras.layers.Dense(1, activation="sigmoid")(x))
    y1, y2, y3, y4 = ys
    ctavr = keras.layers.Multiply(name="ctavr")([y1, y2])
    cvr = keras.layers.Lambda(lambda t: (1 - t[1]) * t[3] + t[1] * t[2])([y1, y2, y3, y4])
    ctcvr = keras.layers.Multiply(name="ctcvr")([y1, cvr])
    ctr = keras.layers.Activation("linear", name="ctr")(y1)
    model = keras.Model(inputs, {"ctr": ctr, "ctavr": ctavr, "ctcvr": ctcvr})
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss={k: keras.losses.BinaryCrossentropy() for k in ("ctr", "ctavr", "ctcvr")})
    return model


def our_model(dropout: float, learning_rate: float, jit: bool, steps_per_execution: int):
    from models.esm2 import ESM2, ESM2Config

    cfg = ESM2Config(hidden_units=HIDDEN, dropout=dropout, embedding_dim=EMBEDDING_DIM, learning_rate=learning_rate,
                     batch_size=1000)
    model = ESM2(dict(zip(categorical_names(), CARDINALITIES)), dense_names(), cfg, name="esm2")
    model({n: tf.zeros([2, 1], tf.int64) for n in categorical_names()}
          | {n: tf.zeros([2, 1], tf.float32) for n in dense_names()})
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=jit,
                  steps_per_execution=steps_per_execution)
    return model


class _Clock(keras.callbacks.Callback):
    """Wall time between the end of step ``warmup`` and the end of the last step."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup, self.t0, self.t1, self.step0, self.step1 = warmup, None, None, 0, 0
        self.cpu0 = self.cpu1 = None

    def on_train_batch_end(self, batch, logs=None):
        now, cpu = time.perf_counter(), time.process_time()
        if self.t0 is None and batch + 1 >= self.warmup:
            self.t0, self.cpu0, self.step0 = now, cpu, batch + 1
        self.t1, self.cpu1, self.step1 = now, cpu, batch + 1

    def rate(self, batch_size: int) -> float:
        """Examples per wall-clock second."""
        return (self.step1 - self.step0) * batch_size / (self.t1 - self.t0)

    def cpu_rate(self, batch_size: int) -> float:
        """Examples per CPU-second of this process (all threads): steadier than wall time on a busy machine."""
        return (self.step1 - self.step0) * batch_size / (self.cpu1 - self.cpu0)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=60_000, help="rows of synthetic data (in memory and as TFRecords)")
    p.add_argument("--steps", type=int, default=40, help="steps per timed segment")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps of each segment left out of its timing")
    p.add_argument("--rounds", type=int, default=3, help="interleaved (reference, ours) rounds")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=False,
                   help="XLA-compile our step (on CPU: several times slower, measured)")
    p.add_argument("--steps-per-execution", type=int, default=1)
    p.add_argument("--input", choices=("memory", "stream", "stream-cache"), default="memory",
                   help="ours: parse the TFRecords once into memory (default); stream them every epoch; stream "
                        "with the decompressed records cached")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--data-dir", default="artifacts/bench-train", help="where the TFRecords are written")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from pipeline.training.data import make_dataset, make_in_memory_dataset

    keras.utils.set_random_seed(0)
    started = time.time()
    pattern = write_tfrecords(os.path.abspath(args.data_dir), args.rows)
    write_s = time.time() - started
    cols = synthetic_columns(args.rows)
    x = {n: cols[n].reshape(-1, 1) for n in categorical_names() + dense_names()}
    y_ref = {"ctr": cols["click"].reshape(-1, 1).astype(np.float32),
             "ctavr": cols["daction"].reshape(-1, 1).astype(np.float32),
             "ctcvr": cols["purchase"].reshape(-1, 1).astype(np.float32)}

    ours = our_model(args.dropout, args.learning_rate, args.jit, args.steps_per_execution)
    if args.input == "memory":
        ds = make_in_memory_dataset(pattern, feature_spec(), categorical_names() + dense_names(), LABELS,
                                    args.batch_size, shuffle=True, seed=0, epochs=None)
    else:
        ds = make_dataset(pattern, feature_spec(), categorical_names() + dense_names(), LABELS, args.batch_size,
                          shuffle=True, seed=0, epochs=None, cache=args.input == "stream-cache")
    ref = None if args.skip_reference else reference_model(args.dropout, args.learning_rate)
    rates: Dict[str, List[float]] = {"reference": [], "ours": []}
    cpu_rates: Dict[str, List[float]] = {"reference": [], "ours": []}

    def run_ref():
        clock = _Clock(args.warmup_steps)
        n = args.steps * args.batch_size
        ref.fit(x={k: v[:n] for k, v in x.items()}, y={k: v[:n] for k, v in y_ref.items()}, batch_size=args.batch_size,
                epochs=1, shuffle=True, verbose=0, callbacks=[clock])
        rates["reference"].append(clock.rate(args.batch_size))
        cpu_rates["reference"].append(clock.cpu_rate(args.batch_size))

    def run_ours():
        clock = _Clock(args.warmup_steps)
        ours.fit(ds, epochs=1, steps_per_epoch=args.steps, verbose=0, callbacks=[clock])
        rates["ours"].append(clock.rate(args.batch_size))
        cpu_rates["ours"].append(clock.cpu_rate(args.batch_size))

    for r in range(args.rounds + 1):  # round 0 traces and warms both up; not reported
        for name, fn in (("reference", run_ref), ("ours", run_ours)):
            if name == "reference" and ref is None:
                continue
            fn()
            if r == 0:
                rates[name].pop()
                cpu_rates[name].pop()
            else:
                print(f"round {r} {name:>9}: {rates[name][-1]:8.0f} examples/s  {cpu_rates[name][-1]:8.0f} "
                      "examples/CPU-s", file=sys.stderr, flush=True)
    out = {"ours_examples_per_s": round(statistics.median(rates["ours"])),
           "ours_rounds": [round(v) for v in rates["ours"]],
           "ours_examples_per_cpu_s": round(statistics.median(cpu_rates["ours"])),
           "peak_rss_mib": round(peak_rss_mib()), "rows": args.rows, "batch_size": args.batch_size,
           "steps_per_segment": args.steps, "jit": args.jit,
           "steps_per_execution": args.steps_per_execution, "input": args.input, "data_write_s": round(write_s, 1),
           "cpus": os.cpu_count(), "tensorflow": tf.__version__}
    if ref is not None:
        out["reference_examples_per_s"] = round(statistics.median(rates["reference"]))
        out["reference_rounds"] = [round(v) for v in rates["reference"]]
        out["ratio"] = round(statistics.median(rates["ours"]) / statistics.median(rates["reference"]), 2)
        out["reference_examples_per_cpu_s"] = round(statistics.median(cpu_rates["reference"]))
        out["ratio_per_round"] = [round(a / b, 2) for a, b in zip(rates["ours"], rates["reference"])]
        out["cpu_ratio"] = round(out["ours_examples_per_cpu_s"] / out["reference_examples_per_cpu_s"], 2)
    print(f"ours (ESM², custom train_step, gzip TFRecords, input={args.input}): "
          f"{out['ours_examples_per_s']:>7} examples/s")
    if ref is not None:
        print(f"reference (Keras functional, in-memory numpy):   {out['reference_examples_per_s']:>7} examples/s")
        print(f"ratio ours / reference: {out['ratio']:.2f}x wall-clock (median of {args.rounds} interleaved rounds; "
              f"per round {out['ratio_per_round']})")
        print(f"per CPU-second: ours {out['ours_examples_per_cpu_s']}, reference "
              f"{out['reference_examples_per_cpu_s']}, ratio {out['cpu_ratio']:.2f}x")
    print(f"peak RSS: {out['peak_rss_mib']} MiB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
