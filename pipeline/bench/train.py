"""Training throughput: ESM² / ESMM on the project's training path vs plain Keras models fed from memory.

    python -m pipeline.bench.train                      # default shape: ESM² and ESMM, built-in schema
    python -m pipeline.bench.train --shape paper        # ESM² at the paper's size
    python -m pipeline.bench.train --profile            # also: where a step's time goes (timed isolated parts)

Shapes. ``default``: the ``default`` preset (models/config.py: towers 128-64-32, dropout 0.1, 16-dim embeddings,
batch 1000) of ESM² and ESMM on data with the built-in schema's transformed fields (transforms.features.BUILTIN:
12 vocabulary ids with the vocabulary sizes of the default 200k-row run, 9 bucket/hour ids, 8 z-scored numerics,
the [B, 20] ``uf_history_seq`` sequence, and the labels, oracle and pass-through columns the records also
carry). ``paper``: ESM² at the paper's size (§4.1.3): 26 categorical fields x 16-dim embeddings + 13 numerics,
four 512-256-128-32 towers, dropout 0.5, batch 1000.

"ours" is the project's training path: ``models.registry.build`` + ``compile`` as ``pipeline.training.train``
does (its ``TrainConfig`` defaults for ``steps_per_execution`` and ``train_metrics`` unless given), fed by
``pipeline.training.data.make_dataset`` from gzip TFRecords this command writes (``--format``: ``columnar``
blocks as ``pipeline.beam.preprocess`` writes them, or one ``tf.Example`` per row), read and parsed every epoch
(``--input stream``, default) or parsed once (``memory``, ``--in-memory`` of pipeline.run). "reference" is a
plain Keras functional model of the same shape (an Embedding per field, the sequence's masked mean, tanh
numerics, Dense towers with Dropout, the same composition and losses) trained the way most users' scripts do:
``model.fit(x=dict_of_numpy, y=..., batch_size=1000)``, Keras' own train step.

Every (reference, ours) pair runs in this process, interleaved per round so that load from other processes
hits both alike; each segment's rate is timed between its ``--warmup-steps``-th and last step and the median
over rounds is reported, beside examples per CPU-second of the process (the steadier figure when other
processes compete for the cores: wall-clock rates then depend on the scheduler more than on the code).

``--profile`` times isolated parts per step, [wall, CPU] ms, on the same model and batch: ``input alone`` (the
tf.data pipeline, nothing else); ``forward+backward+Adam`` (one tf.function, no metrics); ``train_step`` with
``train_metrics`` ``loss`` and ``auc`` (their difference: the training AUCs); ``fit, fixed batch`` at
steps_per_execution 1 and k (minus train_step: Keras' per-call Python; 1 vs k: what steps_per_execution saves);
``fit, real input`` (minus the fixed batch: the input pipeline's share when it competes for the cores); and for
the reference its fit on numpy vs on a fixed batch. Measured on 2 shared cores: both models spend their step in
the same layers (the towers' matmuls, dropout's random draws, Adam's updates); XLA (jit_compile) took 2x the CPU
per step at the default shape (and was slower at the paper's), so it is not used. Ours computes its T towers as
one fused network (``models.layers.mlp.run_towers``) with ``FastDropout``'s 16-bit draws (half the random bits
of Keras' Dropout, same rate); ours trains with ``models.optimizers.FusedAdam`` (Adam's update as one kernel
per variable), as ``pipeline.training`` does; ``--optimizer adam`` gives ours Keras' Adam, the reference's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from models.keras import keras  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import tensorflow as tf  # noqa: E402

LABELS = ("click", "daction", "purchase")

# ---- the paper's shape ---------------------------------------------------------------------------------
NUM_CATEGORICAL, NUM_DENSE, EMBEDDING_DIM = 26, 13, 16
HIDDEN = (512, 256, 128, 32)
# Vocabulary sizes of the 26 fields (ids + OOV): a Criteo-like spread from tens to tens of thousands.
CARDINALITIES = tuple([10, 100, 1_000, 10_000, 50_000, 300, 3_000, 30] * 4)[:NUM_CATEGORICAL]

# ---- the default shape: vocabulary sizes of the built-in data's default run (200k rows, pipeline.run,
# preprocessed/summary.json); the model adds each feature's OOV buckets as pipeline.training.train does.
BUILTIN_VOCABULARY = {"user_id": 10486, "item_id": 4923, "user_gender": 3, "user_age": 6, "user_city": 301,
                      "user_power": 5, "item_category": 40, "item_brand": 373, "device": 4, "page": 4,
                      "segment": 4, "uf_item_in_history": 2, "uf_history": 1562}


@dataclass
class Shape:
    """The model inputs (name -> cardinality; sequences name -> (cardinality, length)) and the records' columns."""

    name: str
    categorical: Dict[str, int]
    dense: Tuple[str, ...]
    sequences: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    feature_keys: Tuple[str, ...] = ()          # what the model is fed (may hold unused pass-through inputs)
    extra_float: Tuple[str, ...] = ()           # other columns the records carry (never parsed for training)
    extra_int: Dict[str, int] = field(default_factory=dict)
    models: Tuple[str, ...] = ("esm2",)
    overrides: Dict = field(default_factory=dict)  # config overrides of the preset
    preset: str = "default"


def paper_shape() -> Shape:
    cats = {f"c{i:02d}_id": c for i, c in enumerate(CARDINALITIES)}
    dense = tuple(f"i{i:02d}_z" for i in range(NUM_DENSE))
    return Shape("paper", cats, dense, feature_keys=tuple(cats) + dense, preset="paper",
                 overrides={"embedding_dim": EMBEDDING_DIM})


def default_shape() -> Shape:
    from transforms import features as F

    c = F.BUILTIN
    cats = {F.categorical_id(f.name): BUILTIN_VOCABULARY[f.name] + f.num_oov_buckets for f in c.vocab_features}
    cats.update(c.model_categorical)
    seqs = {F.sequence_ids(f.name): (BUILTIN_VOCABULARY[f.name] + f.num_oov_buckets, f.max_length)
            for f in c.sequences}
    flags = tuple(F.flag(n) for n in c.flags)
    extra_float = (tuple(c.labels.continuous) + c.pseudo_labels + (F.UF_COUNT_RAW,)
                   + tuple(o for o in c.oracle if c.raw_dtype(o) == "float32"))
    extra_int = {o: 8 for o in c.oracle if c.raw_dtype(o) == "int64"}
    return Shape("default", cats, tuple(c.model_dense) + flags, seqs, feature_keys=c.model_feature_names(),
                 extra_float=extra_float, extra_int=extra_int, models=("esm2", "esmm"))


def synthetic_columns(shape: Shape, rows: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """Transformed-like columns: Zipf-ish ids, z-scored numerics, padded id sequences, funnel labels."""
    rng = np.random.default_rng(seed)
    cols: Dict[str, np.ndarray] = {}
    for name, card in shape.categorical.items():
        cols[name] = np.minimum(rng.zipf(1.3, rows) - 1, card - 1).astype(np.int64)
    for name in shape.dense:
        cols[name] = rng.normal(size=rows).astype(np.float32)
    for name, (card, length) in shape.sequences.items():
        ids = np.minimum(rng.zipf(1.3, (rows, length)), card).astype(np.int64)
        cols[name] = np.where(np.arange(length) < rng.integers(0, length + 1, (rows, 1)), ids, 0)
    for name in shape.extra_float:
        cols[name] = rng.random(rows).astype(np.float32)
    for name, card in shape.extra_int.items():
        cols[name] = rng.integers(0, card, rows).astype(np.int64)
    first_cat, first_dense = next(iter(shape.categorical)), shape.dense[0]
    logit = -2.0 + 0.8 * cols[first_dense] + 0.5 * (cols[first_cat] % 3 == 0)
    click = rng.random(rows) < 1 / (1 + np.exp(-logit))
    daction = click & (rng.random(rows) < 0.3)
    purchase = click & (rng.random(rows) < np.where(daction, 0.3, 0.05))
    cols.update(click=click.astype(np.int64), daction=daction.astype(np.int64), purchase=purchase.astype(np.int64))
    return cols


def feature_spec(cols: Dict[str, np.ndarray]) -> Dict:
    return {n: tf.io.FixedLenFeature(list(v.shape[1:]) or [1], tf.int64 if v.dtype == np.int64 else tf.float32)
            for n, v in cols.items()}


def write_tfrecords(out_dir: str, cols: Dict[str, np.ndarray], tag: str, fmt: str = "columnar",
                    block_rows: int = 2500) -> str:
    """gzip TFRecords of ``cols`` in ``out_dir`` (reused when already written with the same ``tag``/format).

    ``columnar``: what ``pipeline.beam.preprocess`` writes, one file per block of ``block_rows`` rows holding
    one columnar record (``pipeline.beam.preprocess.columnar_record``); ``examples``: one ``tf.Example`` per row
    in 4 shards (earlier preprocessing outputs)."""
    marker = os.path.join(out_dir, f"done-{tag}-{fmt}-{block_rows}")
    pattern = os.path.join(out_dir, "part-*.tfrecord.gz")
    if os.path.exists(marker):
        return pattern
    os.makedirs(out_dir, exist_ok=True)
    for old in tf.io.gfile.glob(os.path.join(out_dir, "*")):
        tf.io.gfile.remove(old)
    rows = len(next(iter(cols.values())))
    if fmt == "columnar":
        import pyarrow as pa

        from pipeline.beam.preprocess import columnar_record

        for b, start in enumerate(range(0, rows, block_rows)):
            arrays = []
            for v in cols.values():
                block = v[start:start + block_rows].reshape(-1, int(np.prod(v.shape[1:], dtype=int)))
                offsets = pa.array(np.arange(len(block) + 1) * block.shape[1], pa.int32())
                arrays.append(pa.ListArray.from_arrays(offsets, pa.array(block.reshape(-1))))
            with tf.io.TFRecordWriter(os.path.join(out_dir, f"part-{b:05d}.tfrecord.gz"), options="GZIP") as w:
                w.write(columnar_record(pa.RecordBatch.from_arrays(arrays, list(cols))))
    else:
        Feature, Int64List, FloatList = tf.train.Feature, tf.train.Int64List, tf.train.FloatList
        lists = {n: v.reshape(rows, -1).tolist() for n, v in cols.items()}
        kinds = {n: v.dtype == np.int64 for n, v in cols.items()}
        writers = [tf.io.TFRecordWriter(os.path.join(out_dir, f"part-{s:05d}.tfrecord.gz"), options="GZIP")
                   for s in range(4)]
        for i in range(rows):
            feats = {n: Feature(int64_list=Int64List(value=lists[n][i])) if kinds[n]
                     else Feature(float_list=FloatList(value=lists[n][i])) for n in cols}
            writers[i % 4].write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
        for w in writers:
            w.close()
    open(marker, "w").close()
    return pattern


def reference_model(model: str, shape: Shape, cfg) -> keras.Model:
    """Plain Keras functional ESM²/ESMM of ``cfg``'s shape: Keras' own layers, train step and losses."""
    inputs, parts = {}, []
    for name, card in shape.categorical.items():
        inputs[name] = keras.Input(shape=(1,), dtype="int64", name=name)
        parts.append(keras.layers.Flatten()(keras.layers.Embedding(card, cfg.embedding_dim)(inputs[name])))
    for name, (card, length) in shape.sequences.items():
        inputs[name] = keras.Input(shape=(length,), dtype="int64", name=name)
        emb = keras.layers.Embedding(card + 1, cfg.embedding_dim)(inputs[name])
        parts.append(keras.layers.Lambda(
            lambda t: tf.reduce_sum(t[0] * tf.cast(t[1] > 0, tf.float32)[..., None], 1)
            / tf.maximum(tf.reduce_sum(tf.cast(t[1] > 0, tf.float32), 1, keepdims=True), 1.0))([emb, inputs[name]]))
    dense = [n for n in shape.dense if n.endswith("_z")]
    for name in dense:
        inputs[name] = keras.Input(shape=(1,), dtype="float32", name=name)
    parts.append(keras.layers.Activation("tanh")(keras.layers.Concatenate()([inputs[n] for n in dense])))
    g = keras.layers.Concatenate()(parts)

    def tower():
        x = g
        for units in cfg.hidden_units:
            x = keras.layers.Dense(units, activation="relu")(x)
            x = keras.layers.Dropout(cfg.dropout)(x) if cfg.dropout else x
        return keras.layers.Dense(1, activation="sigmoid")(x)

    if model == "esm2":
        y1, y2, y3, y4 = (tower() for _ in range(4))
        cvr = keras.layers.Lambda(lambda t: (1 - t[1]) * t[3] + t[1] * t[2])([y1, y2, y3, y4])
        outputs = {"ctr": keras.layers.Activation("linear", name="ctr")(y1),
                   "ctavr": keras.layers.Multiply(name="ctavr")([y1, y2]),
                   "ctcvr": keras.layers.Multiply(name="ctcvr")([y1, cvr])}
    else:
        pctr, pcvr = tower(), tower()
        outputs = {"ctr": keras.layers.Activation("linear", name="ctr")(pctr),
                   "ctcvr": keras.layers.Multiply(name="ctcvr")([pctr, pcvr])}
    ref = keras.Model(inputs, outputs)
    ref.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate, epsilon=cfg.adam_epsilon),
                loss={k: keras.losses.BinaryCrossentropy() for k in outputs})
    return ref


REFERENCE_LABELS = {"ctr": "click", "ctavr": "daction", "ctcvr": "purchase"}


class _Clock(keras.callbacks.Callback):
    """Wall time between the end of step ``warmup`` and the end of the last step."""

    def __init__(self, warmup: int):
        super().__init__()
        self._supports_tf_logs = True  # reads no logs: Keras need not convert them to numpy every step
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


def _ms_per_call(fn: Callable, n: int) -> Tuple[float, float]:
    """(wall, CPU of this process) ms per call of ``fn`` after one untimed call."""
    fn()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3, (time.process_time() - c0) / n * 1e3


def _fit_ms(model, ds, steps: int, warmup: int) -> Tuple[float, float]:
    """(wall, CPU) ms per step of ``model.fit`` on ``ds`` after a fit that traces it."""
    model.fit(ds, epochs=1, steps_per_epoch=max(warmup, 2), verbose=0)
    clock = _Clock(warmup)
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[clock])
    return 1e3 / clock.rate(1), 1e3 / clock.cpu_rate(1)


def profile(model, ds, steps: int, warmup: int, k: int) -> Dict[str, List[float]]:
    """[wall, CPU] ms per step of ours' isolated parts (module docstring); ``model`` compiled, ``ds`` its input."""
    it = iter(ds)
    out = {"input alone": _ms_per_call(lambda: next(it), steps)}
    batch = next(it)
    features, labels = batch
    tasks = model._tasks

    @tf.function
    def compute(features, labels):
        with tf.GradientTape() as tape:
            predictions = model(features, training=True)
            loss = tf.add_n([t.weight * t.log_loss(labels[t.label], predictions[t.output]) for t in tasks])
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    out["forward+backward+Adam"] = _ms_per_call(lambda: compute(features, labels), steps)
    train_auc = model._train_auc
    for auc in (False, True):
        model._train_auc = auc
        out[f"train_step, metrics {'auc' if auc else 'loss'}"] = _ms_per_call(
            lambda step=tf.function(model.train_step): step(batch), steps)
    model._train_auc = train_auc
    spe = int(model._steps_per_execution.numpy().item())
    fixed = tf.data.Dataset.from_tensors(batch).repeat()
    for s in dict.fromkeys((1, k, spe)):
        model._configure_steps_per_execution(s)
        model.train_function = None
        out[f"fit, fixed batch, spe {s}"] = _fit_ms(model, fixed, steps, warmup)
    model._configure_steps_per_execution(spe)
    model.train_function = None
    out[f"fit, real input, spe {spe}"] = _fit_ms(model, ds, steps, warmup)
    return {name: [round(v, 1) for v in ms] for name, ms in out.items()}


def reference_profile(ref, x, y, batch_size: int, steps: int, warmup: int) -> Dict[str, List[float]]:
    """[wall, CPU] ms per step of the reference: fit on its numpy arrays vs fit on one fixed batch."""
    n = steps * batch_size
    clock = _Clock(warmup)
    ref.fit(x={k: v[:n] for k, v in x.items()}, y={k: v[:n] for k, v in y.items()}, batch_size=batch_size,
            epochs=1, shuffle=True, verbose=0, callbacks=[clock])
    fixed = tf.data.Dataset.from_tensors(({k: v[:batch_size] for k, v in x.items()},
                                          {k: v[:batch_size] for k, v in y.items()})).repeat()
    out = {"fit, numpy": (1e3 / clock.rate(1), 1e3 / clock.cpu_rate(1)),
           "fit, fixed batch": _fit_ms(ref, fixed, steps, warmup)}
    return {name: [round(v, 1) for v in ms] for name, ms in out.items()}


def main(argv=None) -> Dict:
    from pipeline.training.train import AUTO_STEPS_PER_EXECUTION, TrainConfig

    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("default", "paper"), default="default",
                   help="default: ESM² and ESMM default presets on the built-in schema; paper: ESM² at the paper's size")
    p.add_argument("--rows", type=int, default=60_000, help="rows of synthetic data (in memory and as TFRecords)")
    p.add_argument("--steps", type=int, default=40, help="steps per timed segment")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps of each segment left out of its timing")
    p.add_argument("--rounds", type=int, default=3, help="interleaved (reference, ours) rounds")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=defaults.jit_compile,
                   help="XLA-compile our step")
    p.add_argument("--steps-per-execution", type=int,
                   default=defaults.steps_per_execution or AUTO_STEPS_PER_EXECUTION,
                   help="steps per Keras call (default: pipeline.training's on one device)")
    p.add_argument("--train-metrics", choices=("auc", "loss"), default=defaults.train_metrics,
                   help="ours' training-time metrics (evaluation always computes AUC)")
    p.add_argument("--input", choices=("stream", "memory"), default="stream",
                   help="ours: stream the gzip TFRecords every epoch (default) or parse them once into memory")
    p.add_argument("--format", choices=("columnar", "examples"), default="columnar",
                   help="the TFRecords' layout: columnar blocks (what pipeline.beam.preprocess writes) or one "
                        "tf.Example per row (earlier preprocessing outputs)")
    p.add_argument("--optimizer", choices=("adam", "fused"), default="fused",
                   help="ours' optimizer: models.optimizers.FusedAdam (what pipeline.training.train builds: "
                        "Adam's update, one fused kernel per variable) or Keras' Adam (the reference's)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--profile", action="store_true", help="also time ours' isolated parts (module docstring)")
    p.add_argument("--data-dir", default=None, help="where the TFRecords are written (artifacts/bench-train-SHAPE)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from models import registry
    from pipeline.training.data import make_dataset, make_in_memory_dataset

    keras.utils.set_random_seed(0)
    shape = paper_shape() if args.shape == "paper" else default_shape()
    started = time.time()
    cols = synthetic_columns(shape, args.rows)
    pattern = write_tfrecords(os.path.abspath(args.data_dir or f"artifacts/bench-train-{shape.name}-{args.format}"),
                              cols, f"rows{args.rows}-seed0", args.format)
    write_s = time.time() - started
    spec = feature_spec(cols)
    inputs = {n: c for n, c in shape.categorical.items()}
    seqs = {n: c for n, (c, _) in shape.sequences.items()}
    dense = tuple(n for n in shape.dense if n.endswith("_z"))
    x = {n: cols[n].reshape(args.rows, -1) for n in list(inputs) + list(seqs) + list(dense)}

    runs: Dict[str, Dict] = {}
    for name in shape.models:
        cfg = registry.resolve_config(name, shape.preset, dict(shape.overrides, batch_size=args.batch_size))
        labels = tuple(registry.required_labels(name))
        ours = registry.build(name, inputs, dense, cfg, seqs)
        kw = dict(shuffle=True, seed=0, epochs=None)
        if args.input == "memory":
            ds = make_in_memory_dataset(pattern, spec, shape.feature_keys, labels, args.batch_size, **kw)
        else:
            ds = make_dataset(pattern, spec, shape.feature_keys, labels, args.batch_size, **kw)
        ours(next(iter(ds))[0])
        from models.optimizers import FusedAdam

        adam = FusedAdam if args.optimizer == "fused" else keras.optimizers.Adam
        ours.compile(optimizer=adam(cfg.learning_rate, epsilon=cfg.adam_epsilon),
                     jit_compile=args.jit, steps_per_execution=args.steps_per_execution,
                     train_metrics=args.train_metrics)
        ref = None if args.skip_reference else reference_model(name, shape, cfg)
        y_ref = None if ref is None else {o: cols[REFERENCE_LABELS[o]].reshape(-1, 1).astype(np.float32)
                                          for o in ref.output_names}
        runs[name] = {"ours": ours, "ds": ds, "ref": ref, "y": y_ref, "cfg": cfg,
                      "rates": {"reference": [], "ours": []}, "cpu": {"reference": [], "ours": []}}

    def run_ref(r):
        clock = _Clock(args.warmup_steps)
        n = args.steps * args.batch_size
        r["ref"].fit(x={k: v[:n] for k, v in x.items()}, y={k: v[:n] for k, v in r["y"].items()},
                     batch_size=args.batch_size, epochs=1, shuffle=True, verbose=0, callbacks=[clock])
        return clock

    def run_ours(r):
        clock = _Clock(args.warmup_steps)
        r["ours"].fit(r["ds"], epochs=1, steps_per_epoch=args.steps, verbose=0, callbacks=[clock])
        return clock

    for rnd in range(args.rounds + 1):  # round 0 traces and warms everything up; not reported
        for name, r in runs.items():
            for who, fn in (("reference", run_ref), ("ours", run_ours)):
                if who == "reference" and r["ref"] is None:
                    continue
                clock = fn(r)
                if rnd:
                    r["rates"][who].append(clock.rate(args.batch_size))
                    r["cpu"][who].append(clock.cpu_rate(args.batch_size))
                    print(f"round {rnd} {name} {who:>9}: {r['rates'][who][-1]:8.0f} examples/s  "
                          f"{r['cpu'][who][-1]:8.0f} examples/CPU-s", file=sys.stderr, flush=True)

    out = {"shape": shape.name, "rows": args.rows, "batch_size": args.batch_size, "steps_per_segment": args.steps,
           "jit": args.jit, "steps_per_execution": args.steps_per_execution, "train_metrics": args.train_metrics,
           "input": args.input, "format": args.format, "optimizer": args.optimizer, "data_write_s": round(write_s, 1),
           "cpus": os.cpu_count(), "tensorflow": tf.__version__, "models": {}}
    for name, r in runs.items():
        med = {w: statistics.median(v) for w, v in r["rates"].items() if v}
        cpu = {w: statistics.median(v) for w, v in r["cpu"].items() if v}
        m = {"ours_examples_per_s": round(med["ours"]), "ours_rounds": [round(v) for v in r["rates"]["ours"]],
             "ours_examples_per_cpu_s": round(cpu["ours"])}
        if "reference" in med:
            m.update(reference_examples_per_s=round(med["reference"]),
                     reference_rounds=[round(v) for v in r["rates"]["reference"]],
                     reference_examples_per_cpu_s=round(cpu["reference"]),
                     ratio=round(med["ours"] / med["reference"], 2),
                     ratio_per_round=[round(a / b, 2) for a, b in zip(r["rates"]["ours"], r["rates"]["reference"])],
                     cpu_ratio=round(cpu["ours"] / cpu["reference"], 2))
        if args.profile:
            m["profile_ms_per_step"] = profile(r["ours"], r["ds"], args.steps, args.warmup_steps,
                                               max(args.steps_per_execution, 10))
            if r["ref"] is not None:
                m["reference_profile_ms_per_step"] = reference_profile(r["ref"], x, r["y"], args.batch_size,
                                                                       args.steps, args.warmup_steps)
        out["models"][name] = m
        print(f"{name} ours (custom train_step, gzip TFRecords, {args.format}, input={args.input}): "
              f"{m['ours_examples_per_s']:>7} examples/s")
        if "ratio" in m:
            print(f"{name} reference (Keras functional, in-memory numpy):   {m['reference_examples_per_s']:>7} examples/s")
            print(f"{name} ratio ours / reference: {m['ratio']:.2f}x wall-clock (median of {args.rounds} interleaved "
                  f"rounds; per round {m['ratio_per_round']}); per CPU-second {m['cpu_ratio']:.2f}x")
        for key in ("profile_ms_per_step", "reference_profile_ms_per_step"):
            if key in m:
                print(f"{name} {key.replace('_', ' ')} [wall, CPU]: "
                      + "; ".join(f"{k} {v}" for k, v in m[key].items()))
    out["peak_rss_mib"] = round(peak_rss_mib())
    print(f"peak RSS: {out['peak_rss_mib']} MiB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
