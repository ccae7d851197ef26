"""Subprocess side of tests/pipeline/training/test_multiworker.py: one process of a training run, either a
single-process reference (``"strategy": "default"``) or one worker of a MultiWorkerMirroredStrategy cluster
(``"strategy": "multiworker"``, cluster and task from ``TF_CONFIG``).

    python -m tests.pipeline.training.multiworker_worker OUT_JSON OPTIONS_JSON

OPTIONS: ``models`` ([name, data dir] pairs, name "esm2" or "stan", trained one after the other with
``fit_model``);
``checkpoint_root`` (each model checkpoints in checkpoint_root/<model>); ``kill_after_steps`` (this process
SIGKILLs itself once that many steps of the stream are done, after that step's backup); ``batch_size``; every
other key is a ``TrainConfig`` field. Writes {model: {"weights": {name: value}, "info", "history"}} to OUT_JSON.

STAN's loss weights gamma are Beta *draws* (``BetaStageState.sample``): unseeded random numbers drawn per
replica for that replica's rows, which no split of the global batch over other replicas reproduces. Here they
are replaced by the Beta mean alpha / (alpha + beta) (the same state, updated by the same all-gathered
Algorithm 1 step), so one process and two workers must reach the same weights.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402

from tests.pipeline.training import train_worker  # noqa: E402

STAN_LABELS = ("click", "daction", "purchase", "pl_click", "pl_daction", "pl_purchase", "uf_count_raw")


def feature_spec():
    spec = train_worker.feature_spec()
    spec["uf_count_raw"] = tf.io.FixedLenFeature([1], tf.float32)
    return spec


def write_columnar(data_dir: str, n_train: int, n_eval: int, shards: int = 3, block: int = 40) -> None:
    """``train_worker.write_data``'s rows (row i in file i % shards) in the columnar format that
    ``pipeline.beam.preprocess`` writes: one record per ``block`` rows of a file (``columnar_record``)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.beam.preprocess import columnar_record

    for split, n, seed in (("train", n_train, 1), ("eval", n_eval, 2)):
        cols = train_worker.arrays(n, seed)
        os.makedirs(os.path.join(data_dir, split), exist_ok=True)
        for s in range(shards):
            rows = np.arange(s, n, shards)
            with tf.io.TFRecordWriter(os.path.join(data_dir, split, f"part-{s:05d}.tfrecord.gz"), options="GZIP") as w:
                for start in range(0, len(rows), block):
                    idx = rows[start:start + block]
                    batch = pa.RecordBatch.from_arrays(
                        [pa.array(v[idx].reshape(-1, 1).tolist(), pa.list_(pa.from_numpy_dtype(v.dtype)))
                         for v in cols.values()], list(cols))
                    w.write(columnar_record(batch))


def stan_with_mean_weights():
    model = train_worker.stan()
    model.stage.sample = lambda users, seed=None: model.stage.mean(users)  # see the module docstring
    return model


def main(out: str, opts: dict) -> None:
    from pipeline.training.train import TrainConfig, TrainData, fit_model, make_strategy

    strategy = make_strategy(opts["strategy"])  # first TensorFlow work of the process
    models = opts.pop("models")
    root = opts.pop("checkpoint_root", None)
    kill_at = opts.pop("kill_after_steps", None)
    batch_size = opts.pop("batch_size", 64)
    Kill = train_worker.kill_callback(kill_at)  # SIGKILLs this process after kill_at steps (after their backup)

    builds = {"esm2": (train_worker.esm2, train_worker.LABELS), "stan": (stan_with_mean_weights, STAN_LABELS)}
    result = {"workers": getattr(strategy.extended, "_num_workers", 1), "replicas": strategy.num_replicas_in_sync}
    for name, data_dir in models:
        build, labels = builds[name]
        data = TrainData(os.path.join(data_dir, "train", "*.gz"), os.path.join(data_dir, "eval", "*.gz"),
                         feature_spec(), tuple(train_worker.CATEGORICAL) + train_worker.DENSE, labels, batch_size)
        cfg = TrainConfig(**dict(opts, checkpoint_dir=os.path.join(root, name) if root else None))
        model, history, info = fit_model(build, data, cfg, 1e-2, strategy=strategy, callbacks=[Kill()], verbose=0)
        metric_vars = {id(v) for m in model.metrics for v in m.variables}
        result[name] = {"weights": {v.name: v.numpy().tolist() for v in model.weights if id(v) not in metric_vars},
                        "iterations": int(model.optimizer.iterations.numpy()), "info": info, "history": history}
    with open(out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
