"""Subprocess side of tests/pipeline/training/test_train.py (a real process to kill, or one with 2 logical CPUs).

    python -m tests.pipeline.training.train_worker MODE DATA_DIR OUT_JSON [options as JSON]

MODE: ``fit`` (train ESM² on DATA_DIR, optionally SIGKILL-ing itself after a step), ``mirrored``
(ESM² and STAN under MirroredStrategy on 2 logical CPUs against the default strategy, and MUSENET's
k-means++ seeding under it), ``multiworker``.
"""
from __future__ import annotations

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

CATEGORICAL = {"a_id": 7, "b_id": 3, "user_id_id": 6}
DENSE = ("x_z",)
LABELS = ("click", "daction", "purchase")


def feature_spec():
    spec = {k: tf.io.FixedLenFeature([1], tf.int64) for k in CATEGORICAL}
    spec["x_z"] = tf.io.FixedLenFeature([1], tf.float32)
    for k in LABELS:
        spec[k] = tf.io.FixedLenFeature([1], tf.int64)
    for k in LABELS:
        spec[f"pl_{k}"] = tf.io.FixedLenFeature([1], tf.float32)
    return spec


def arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    cols = {k: rng.integers(0, c, n) for k, c in CATEGORICAL.items()}
    cols["x_z"] = rng.normal(size=n).astype(np.float32)
    click = rng.random(n) < np.where(cols["a_id"] < 3, 0.6, 0.1)
    daction = click & (rng.random(n) < 0.4)
    purchase = click & (rng.random(n) < np.where(daction, 0.5, 0.1))
    cols.update(click=click.astype(np.int64), daction=daction.astype(np.int64), purchase=purchase.astype(np.int64))
    for k in LABELS:
        cols[f"pl_{k}"] = rng.random(n).astype(np.float32)
    users = cols["user_id_id"]  # STAN's event positions: each row's number of earlier rows of its user
    cols["uf_count_raw"] = np.array([np.sum(users[:i] == u) for i, u in enumerate(users)], np.float32)
    return cols


def write_data(data_dir: str, n_train: int = 600, n_eval: int = 200, shards: int = 3) -> None:
    """Tiny transformed-like gzip TFRecords: data_dir/{train,eval}/part-*.tfrecord.gz."""
    for split, n, seed in (("train", n_train, 1), ("eval", n_eval, 2)):
        cols = arrays(n, seed)
        os.makedirs(os.path.join(data_dir, split), exist_ok=True)
        for s in range(shards):
            path = os.path.join(data_dir, split, f"part-{s:05d}.tfrecord.gz")
            with tf.io.TFRecordWriter(path, options="GZIP") as w:
                for i in range(s, n, shards):
                    feats = {}
                    for k, v in cols.items():
                        x = v[i]
                        if np.issubdtype(type(x), np.floating):
                            feats[k] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(x)]))
                        else:
                            feats[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x)]))
                    w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())


def train_data(data_dir: str, batch_size: int, labels=LABELS):
    from pipeline.training.train import TrainData

    return TrainData(os.path.join(data_dir, "train", "*.gz"), os.path.join(data_dir, "eval", "*.gz"),
                     feature_spec(), tuple(CATEGORICAL) + DENSE, tuple(labels), batch_size)


def esm2(dropout=0.0):
    from models.esm2 import ESM2, ESM2Config

    return ESM2(CATEGORICAL, DENSE, ESM2Config(hidden_units=(8, 4), embedding_dim=4, dropout=dropout), name="esm2")


def stan():
    from models.stan import STAN, STANConfig

    cfg = STANConfig(hidden_units=(4,), expert_units=(8,), embedding_dim=4, dropout=0.0,
                     user_fields=("user_id_id", "b_id"))
    return STAN(CATEGORICAL, DENSE, cfg, name="stan")


def weights(model):
    return [v.numpy().tolist() for v in model.weights]


def kill_callback(kill_at):
    """A Keras callback class that SIGKILLs this process once ``kill_at`` optimizer steps (counted from the start
    of the stream) are done, i.e. after that step's callbacks before it (backups) ran; ``None``: never."""
    from models.keras import keras

    class Kill(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if kill_at is not None and int(self.model.optimizer.iterations.numpy()) >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    return Kill


def mode_fit(data_dir, out, opts):
    from pipeline.training.train import TrainConfig, fit_model

    kill_at = opts.pop("kill_after_steps", None)
    batch_size = opts.pop("batch_size", 64)
    Kill = kill_callback(kill_at)

    cfg = TrainConfig(**opts)
    model, history, info = fit_model(esm2, train_data(data_dir, batch_size), cfg, 1e-2, callbacks=[Kill()],
                                     verbose=0)
    info.update(iterations=int(model.optimizer.iterations.numpy()), history=history, weights=weights(model))
    with open(out, "w") as fh:
        json.dump(info, fh)


def mode_mirrored(data_dir, out, opts):
    """Same batches, same initial weights: one training run per strategy; the mirrored one on 2 replicas."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from models.keras import keras
    from pipeline.training.train import TrainConfig, fit_model, make_strategy

    mirrored = make_strategy("mirrored")
    result = {"replicas": mirrored.num_replicas_in_sync}
    # Full loop (fit_model) under MirroredStrategy: eval AUC reported, early stopping metric present.
    cfg = TrainConfig(epochs=1, strategy="mirrored", shuffle=False)
    _, history, info = fit_model(esm2, train_data(data_dir, 64), cfg, 1e-2, strategy=mirrored, verbose=0)
    result["fit"] = {"history": history, "info": info}

    # Equivalence: default vs mirrored, identical start and batches. ESM²: 3 steps of 64 rows (32 per replica:
    # with an uneven split each replica's mean has its own denominator, in Keras too). STAN: one step of 63
    # rows (uneven all-gather); its loss weights are random draws, so only the first update is comparable.
    for name, build, batch in (("esm2", esm2, 64), ("stan", stan, 63)):
        cols = arrays(batch * 3, 5)
        feats = {k: cols[k].reshape(-1, 1) for k in tuple(CATEGORICAL) + DENSE}
        labels = {k: cols[k].reshape(-1, 1) for k in cols if k not in feats}
        runs = {}
        init = None
        for strategy_name, strategy in (("default", tf.distribute.get_strategy()), ("mirrored", mirrored)):
            keras.utils.set_random_seed(0)
            with strategy.scope():
                model = build()
                model({k: v[:2] for k, v in feats.items()})
                model.compile(optimizer=keras.optimizers.SGD(0.1))
            if init is None:
                init = model.get_weights()
            model.set_weights(init)
            ds = tf.data.Dataset.from_tensor_slices((feats, labels)).batch(batch)
            steps = 1 if name == "stan" else 3
            model.fit(ds.take(steps), epochs=1, verbose=0)
            metric_vars = {id(v) for m in model.metrics for v in m.variables}
            runs[strategy_name] = {v.name: v.numpy().tolist() for v in model.weights if id(v) not in metric_vars}
        result[name] = runs
    result["musenet"] = musenet_kmeans_pp_under(mirrored)
    with open(out, "w") as fh:
        json.dump(result, fh)


def musenet_kmeans_pp_under(strategy):
    """MUSENET with k-means++ prototype seeding, one step of 64 rows under ``strategy``; Eq. 14's alpha = 0, so
    the prototypes after the step are the seeds. Returns them with f_omega(x) of the 64 rows at the start."""
    from models.keras import keras
    from models.musenet import MUSENET, MUSENETConfig
    from transforms.features import REPEAT_RATIO_LABEL, UF_IN_HISTORY, flag

    cols = arrays(64, 6)
    feats = {k: cols[k].reshape(-1, 1) for k in tuple(CATEGORICAL) + DENSE}
    feats[flag(UF_IN_HISTORY)] = (cols["a_id"] % 2).astype(np.float32).reshape(-1, 1)
    labels = {"click": cols["click"].reshape(-1, 1), REPEAT_RATIO_LABEL: cols["pl_click"].reshape(-1, 1)}
    cfg = MUSENETConfig(hidden_units=(4,), embedding_dim=4, projection_dim=3, dropout=0.0, prototype_init="kmeans++",
                        prototype_momentum=0.0, intention_inputs=("user_id_id", "b_id", "x_z"))
    with strategy.scope():
        model = MUSENET(CATEGORICAL, DENSE, cfg, name="musenet")
        model({k: v[:2] for k, v in feats.items()})
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    projected = model.scenarios.project(model.embedding(feats)).numpy()
    model.fit(tf.data.Dataset.from_tensor_slices((feats, labels)).batch(64), epochs=1, verbose=0)
    return {"seeded": bool(model.scenarios.seeded.numpy()), "prototypes": model.scenarios.prototypes.numpy().tolist(),
            "projected": projected.tolist()}


def mode_multiworker(data_dir, out, opts):
    from pipeline.training.train import TrainConfig, fit_model, make_strategy

    strategy = make_strategy("multiworker")
    cfg = TrainConfig(epochs=1, strategy="multiworker", shuffle=False)
    _, history, info = fit_model(esm2, train_data(data_dir, 64), cfg, 1e-2, strategy=strategy, verbose=0)
    with open(out, "w") as fh:
        json.dump({"history": history, "info": info,
                   "is_multiworker": isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy),
                   "workers": strategy.extended._num_workers}, fh)  # noqa: SLF001


if __name__ == "__main__":
    mode, data_dir, out = sys.argv[1:4]
    opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    {"fit": mode_fit, "mirrored": mode_mirrored, "multiworker": mode_multiworker}[mode](data_dir, out, opts)
