"""Training wiring: transform output -> model inputs -> Keras fit.

The loop (``fit_model``) is Keras ``fit`` over the gzip TFRecords with

* a progress bar (one line per epoch when stdout is not a terminal), TensorBoard logs;
* the best weights by the main task's eval AUC (``val_<first task>_auc``, e.g. ``val_ctr_auc``) kept in
  ``checkpoint_dir/best`` and early stopping on the same metric (the best weights are restored at the end);
* ``BackupAndRestore`` every ``backup_every_steps`` steps in ``checkpoint_dir/backup``: a run killed mid-epoch
  and started again continues from the last backup. The training input is one endless stream of epochs
  (``steps_per_epoch`` batches each) and a resumed run skips the batches the interrupted run finished, so
  the two runs together take exactly the steps (and, with ``deterministic``, the batches) of one
  uninterrupted run. The monitored value of every finished epoch is kept in ``checkpoint_dir/monitor.json``,
  so the best checkpoint and early stopping (patience, the weights restored at the end) continue from the
  interrupted run's epochs instead of starting over;
* a distribution strategy: ``default``, ``mirrored`` (all GPUs, else all logical CPU devices) or
  ``multiworker`` (``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``; create it with ``make_strategy``
  at program start, before other TensorFlow work);
* the training state at the end (the restored best weights, the optimizer's slots and step, non-trainable state
  such as STAN's Beta state) in ``checkpoint_dir/final`` (``tf.train.Checkpoint`` of model and optimizer), from
  which ``warm_start`` continues training on new data (``pipeline.retrain``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import tensorflow as tf

from models import registry
from models.keras import keras
from models.optimizers import FusedAdam
from pipeline.training.data import count_records, make_dataset, make_in_memory_dataset
from pipeline.files import write_json_atomically
from transforms import features as F
from transforms.features import FeatureContract

logger = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multiworker", "parameter_server")
PS_MIN_SHARD_BYTES = 256 << 10  # parameter_server: embedding tables of at least 2x this are split across the PS tasks
# Training steps per Keras call when not given, without a distribution strategy: Keras' per-call Python and the
# step function's setup are paid once per 10 steps (~10% more examples/s at the default shape; python -m
# pipeline.bench.train). Per-step callbacks then run after every 10th step (backups still count steps:
# StepBackup). Under a strategy it stays 1: MirroredStrategy's collectives inside Keras' multi-step loop fail
# on a short last batch.
AUTO_STEPS_PER_EXECUTION = 10


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's own settings, batch size and learning rate included, are its config)."""

    epochs: int = 3
    seed: int = 0
    shuffle: bool = True
    strategy: str = "default"
    early_stopping_patience: int = 2      # epochs without a better main-task eval AUC; 0 = off
    checkpoint_dir: Optional[str] = None  # best weights + mid-epoch backups; None = neither
    backup_every_steps: int = 200         # BackupAndRestore save_freq, in steps
    resume: bool = True                   # continue from checkpoint_dir/backup when one is there
    tensorboard_dir: Optional[str] = None
    deterministic: bool = False           # ordered tf.data + op determinism: same seed -> same run
    steps_per_execution: Optional[int] = None  # steps per Keras call; None: AUTO_STEPS_PER_EXECUTION on one device
    jit_compile: bool = False             # XLA-compile the train/eval steps
    train_metrics: str = "loss"           # "auc": also AUCs of the training batches (slower; eval AUCs either way)
    in_memory: bool = False               # parse the training TFRecords once into memory (data that fits)
    warm_start: Optional[str] = None      # a ``final`` checkpoint (model + optimizer) to start from

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        if self.backup_every_steps < 1:
            raise ValueError(f"backup_every_steps must be >= 1, got {self.backup_every_steps}")
        if self.steps_per_execution is not None and self.steps_per_execution < 1:
            raise ValueError(f"steps_per_execution must be >= 1, got {self.steps_per_execution}")
        if self.train_metrics not in ("auc", "loss"):
            raise ValueError(f"train_metrics must be 'auc' or 'loss', got {self.train_metrics!r}")


def make_strategy(name: str, ps_min_shard_bytes: int = PS_MIN_SHARD_BYTES) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy called ``name`` (see ``STRATEGIES``).

    ``parameter_server``: ``ParameterServerStrategy`` for the chief of the ``TF_CONFIG`` cluster (workers and
    PS tasks run ``python -m pipeline.cluster --serve``). Embedding tables are split (``TablePartitioner``).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = ([d.name for d in tf.config.list_logical_devices("GPU")]
                   or [d.name for d in tf.config.list_logical_devices("CPU")])
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()  # cluster from TF_CONFIG (one worker without it)
    if name == "parameter_server":
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        if resolver.task_type != "chief" or not resolver.cluster_spec().num_tasks("ps"):
            raise ValueError(f"strategy parameter_server: TF_CONFIG must describe a cluster with ps tasks and this "
                             f"process as its chief (task type {resolver.task_type!r}); worker and ps tasks run "
                             "python -m pipeline.cluster --serve, python -m pipeline.cluster starts a local cluster")
        partitioner = TablePartitioner(ps_min_shard_bytes, resolver.cluster_spec().num_tasks("ps"))
        return tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)
    raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


class TablePartitioner:
    """``ParameterServerStrategy``'s ``variable_partitioner``: an embedding table [N, D] of V bytes (a variable
    created in a ``emb_*`` name scope: ``SharedEmbedding``'s tables) is split along N into
    min(#PS, V // ``min_shard_bytes``) shards on different PS tasks (``MinSizePartitioner``), so a table and
    its Adam slots can outgrow any one task's memory. Every other variable stays whole: layers use dense
    kernels as plain tensors (e.g. GPRec's ``tf.stop_gradient(dense.kernel)``), which a split variable is not."""

    def __init__(self, min_shard_bytes: int, max_shards: int):
        self._split = tf.distribute.experimental.partitioners.MinSizePartitioner(min_shard_bytes=min_shard_bytes,
                                                                                  max_shards=max_shards)

    def __call__(self, shape, dtype, axis=0):
        if tf.get_current_name_scope().rsplit("/", 1)[-1].startswith("emb_"):
            return self._split(shape, dtype, axis)
        return [1] * len(shape)


@dataclass(frozen=True)
class TrainData:
    """Where the training and eval batches come from."""

    train_pattern: str
    eval_pattern: str
    feature_spec: Dict
    feature_keys: Tuple[str, ...]
    label_keys: Tuple[str, ...]
    batch_size: int
    train_examples: Optional[int] = None  # counted from the files when None


def model_inputs(contract: FeatureContract, tft_output) -> Tuple[Dict[str, int], Tuple[str, ...], Dict[str, int]]:
    """(categorical name -> cardinality, dense names, sequence name -> cardinality) of the model inputs."""
    categorical = dict(contract.model_categorical)
    for f in contract.vocab_features:
        size = tft_output.vocabulary_size_by_name(f.vocab_name)
        categorical[F.categorical_id(f.name)] = int(size) + f.num_oov_buckets
    sequences = {F.sequence_ids(f.name): int(tft_output.vocabulary_size_by_name(f.vocab_name)) + f.num_oov_buckets
                 for f in contract.sequences}
    return categorical, contract.model_dense, sequences


class ModelDataMismatch(ValueError):
    """The model needs a feature or label the transformed data does not have."""


def check_transform_output(contract: FeatureContract, tft_output, label_keys, model_name: str = "model") -> None:
    """Fails before training, naming the feature, when the model needs what the transform does not make."""
    spec = tft_output.transformed_feature_spec()
    missing_labels = [k for k in label_keys if k not in spec]
    if missing_labels:
        raise ModelDataMismatch(f"model {model_name!r} needs label(s) {', '.join(missing_labels)} which dataset "
                                f"{contract.name!r} does not provide (it has: {', '.join(contract.labels.transformed)})")
    missing = [k for k in contract.model_feature_names() if k not in spec]
    if missing:
        raise ModelDataMismatch(f"transform output lacks feature(s) the model needs: {', '.join(missing)}")


def train_model(model_name: str, model_config, contract: FeatureContract, tft_output, train_pattern: str,
                eval_pattern: str, cfg: TrainConfig, strategy: tf.distribute.Strategy | None = None,
                train_examples: int | None = None, info: Dict | None = None):
    """Builds ``model_name`` for the transformed data and trains it; returns (model, history).

    ``info``, when given, receives ``fit_model``'s facts about the run (steps, resume point, replicas).
    """
    label_keys = tuple(registry.required_labels(model_name))
    check_transform_output(contract, tft_output, label_keys, model_name)
    categorical, dense, sequences = model_inputs(contract, tft_output)
    try:
        model_config = registry.model_class(model_name).bind_to_contract(
            model_config, contract, tuple(categorical) + tuple(sequences) + tuple(dense))
    except ValueError as exc:
        raise ModelDataMismatch(f"model {model_name!r}: {exc}") from exc
    data = TrainData(train_pattern, eval_pattern, tft_output.transformed_feature_spec(),
                     tuple(contract.model_feature_names()), label_keys, model_config.batch_size, train_examples)
    model, history, facts = fit_model(lambda: registry.build(model_name, categorical, dense, model_config, sequences),
                                      data, cfg, model_config.learning_rate, strategy,
                                      adam_epsilon=model_config.adam_epsilon)
    if info is not None:
        info.update(facts)
    return model, history


FINAL_DIR = "final"


def final_checkpoint(checkpoint_dir: str) -> str:
    """The prefix of the end-of-training checkpoint in ``checkpoint_dir`` (see ``save_final``)."""
    return os.path.join(checkpoint_dir, FINAL_DIR, "ckpt")


def save_final(model, checkpoint_dir: str) -> str:
    """Writes the model's variables and its optimizer's (slots, iterations) to ``final_checkpoint``."""
    prefix = final_checkpoint(checkpoint_dir)
    strategy = model.distribute_strategy
    if not strategy.extended.should_checkpoint:  # a multi-worker non-chief: writes too (reading sync-on-read
        # variables takes every worker), to a scratch copy it deletes; the chief's copy is the checkpoint
        scratch = os.path.join(checkpoint_dir, FINAL_DIR, f"worker{strategy.cluster_resolver.task_id}")
        tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(os.path.join(scratch, "ckpt"))
        tf.io.gfile.rmtree(scratch)
        return prefix
    tmp = prefix + ".tmp"
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(tmp)
    for name in tf.io.gfile.glob(tmp + "*"):  # publish the files of a complete write only
        tf.io.gfile.rename(name, prefix + name[len(tmp):], overwrite=True)
    return path.replace(tmp, prefix)


def restore_warm_start(model, prefix: str) -> None:
    """Loads model weights and optimizer slots saved by ``save_final`` into a built, compiled ``model``.
    Every saved variable must find its place (a model of another shape is an error naming the checkpoint)."""
    if not tf.io.gfile.glob(prefix + ".index"):
        raise FileNotFoundError(f"warm start: no checkpoint at {prefix} (expected {prefix}.index)")
    model.optimizer.build(model.trainable_variables)
    status = tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(prefix)
    try:
        status.assert_existing_objects_matched()
    except AssertionError as exc:
        raise ValueError(f"warm start from {prefix}: the checkpoint does not match this model ({exc})") from None
    logger.info("warm start from %s (optimizer step %d)", prefix, int(model.optimizer.iterations.numpy()))


def main_metric(model) -> str:
    """The early-stopping / best-checkpoint metric: eval AUC of the model's first (main) task."""
    return f"val_{model.tasks[0].output}_auc"


def _barrier(strategy) -> None:
    """Waits for every worker of a multi-worker strategy (one all-reduce); no-op in one process."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode():
        strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)


def backup_position(backup_dir: str, steps_per_epoch: int) -> Tuple[int, int]:
    """(epoch, step) a run resumed from ``backup_dir`` starts at (Keras' own rule); (0, 0) without a backup."""
    latest = tf.train.latest_checkpoint(os.path.join(backup_dir, "chief"))
    if not latest:
        return 0, 0
    reader = tf.train.load_checkpoint(latest)
    epoch = int(reader.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    batch = int(reader.get_tensor("ckpt_saved_batch/.ATTRIBUTES/VARIABLE_VALUE"))
    if batch < 0:
        return (epoch + 1, 0) if epoch >= 0 else (0, 0)
    return (epoch + 1, 0) if batch == steps_per_epoch - 1 else (epoch, batch + 1)


class StepBackup(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` every ``save_freq`` *steps* that records the *last* step a backup covers.

    Keras counts calls of the train function (a backup every ``save_freq`` calls, so every ``save_freq`` x
    ``steps_per_execution`` steps) and records the first step of a call at ``on_train_batch_begin``, which is
    only right for ``steps_per_execution=1``: with several steps per call a resumed run would redo all but the
    first of them. Here a backup is due after the call that completes ``save_freq`` steps since the last one
    (at the next multiple of ``steps_per_execution`` when they do not divide).
    """

    def on_train_batch_begin(self, batch, logs=None):
        self._first_step = int(batch)

    def on_train_batch_end(self, batch, logs=None):
        self._training_state._ckpt_saved_batch.assign(batch)
        self._training_state.backup_if_preempted()
        self._batches_count += int(batch) - getattr(self, "_first_step", int(batch)) + 1  # steps, not calls
        if self._batches_count >= self.save_freq:
            self._batches_count = 0
            self._backup(epoch=self._current_epoch, batch=batch)


MONITOR_LOG = "monitor.json"


class MonitorLog(keras.callbacks.Callback):
    """Records the monitored value of every finished epoch in ``path`` ({epoch: value}, JSON, replaced
    atomically). Placed after the best-checkpoint and early-stopping callbacks, so an epoch is recorded only
    once its best checkpoint, if any, is written; a resumed run reads it back (``epochs_before``)."""

    def __init__(self, path: str, monitor: str, values: Dict[int, float]):
        super().__init__()
        self.path, self.monitor = path, monitor
        self.values = dict(values)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        self.values[int(epoch)] = float(value)
        strategy = getattr(self.model, "distribute_strategy", None)
        if strategy is None or strategy.extended.should_checkpoint:  # multi-worker: the chief writes
            write_json_atomically(self.path, {str(k): v for k, v in sorted(self.values.items())})

    @staticmethod
    def epochs_before(path: str, epoch: int) -> Dict[int, float]:
        """The recorded values of the epochs before ``epoch`` (those a run resuming at ``epoch`` keeps)."""
        try:
            with tf.io.gfile.GFile(path) as fh:
                values = {int(k): float(v) for k, v in json.loads(fh.read()).items()}
        except (tf.errors.NotFoundError, ValueError):
            return {}
        return {k: v for k, v in values.items() if k < epoch}


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """``EarlyStopping`` (mode max) that continues from the epochs an interrupted run finished.

    ``earlier``: {epoch: monitored value} of those epochs. At the start of training the best value, its epoch
    and the epochs waited since are set from them, and the best weights are read from ``best_weights_path``
    (the best checkpoint, written by ``ModelCheckpoint`` in the same epoch), so patience and the final
    restore behave as in one uninterrupted run.
    """

    def __init__(self, earlier: Dict[int, float], best_weights_path: str | None, **kwargs):
        super().__init__(mode="max", **kwargs)
        self.earlier = dict(earlier)
        self.best_weights_path = best_weights_path

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if not self.earlier:
            return
        best_epoch = max(sorted(self.earlier), key=lambda e: self.earlier[e])  # the first of equal bests
        self.best, self.best_epoch = self.earlier[best_epoch], best_epoch
        self.wait = max(self.earlier) - best_epoch
        if (self.restore_best_weights and self.best_weights_path
                and tf.io.gfile.glob(self.best_weights_path + "*")):
            current = self.model.get_weights()  # BackupAndRestore (earlier in the list) has restored them
            self.model.load_weights(self.best_weights_path)
            self.best_weights = self.model.get_weights()
            self.model.set_weights(current)


def fit_model(build: Callable[[], keras.Model], data: TrainData, cfg: TrainConfig, learning_rate: float,
              strategy: tf.distribute.Strategy | None = None, callbacks: Sequence = (), verbose=None,
              adam_epsilon: float = 1e-7):
    """Builds (inside the strategy's scope), compiles and fits a ``MultiTaskModel``.

    Returns (model, history dict, info) where info has ``steps_per_epoch``, ``initial_epoch``/``initial_step``
    (where a resumed run started) and ``steps_run`` (steps this call ran).
    """
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = strategy or make_strategy(cfg.strategy)
    n = data.train_examples if data.train_examples is not None else count_records(data.train_pattern)
    if n < 1:
        raise ValueError(f"no training examples in {data.train_pattern}")
    steps_per_epoch = math.ceil(n / data.batch_size)
    sample, _ = next(iter(make_dataset(data.train_pattern, data.feature_spec, data.feature_keys, data.label_keys,
                                       batch_size=2).take(1)))
    steps_per_execution = cfg.steps_per_execution or (
        AUTO_STEPS_PER_EXECUTION if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy() else 1)
    with strategy.scope():
        model = build()
        model(sample)  # built before fit: BackupAndRestore restores into existing variables
        model.compile(optimizer=FusedAdam(learning_rate, epsilon=adam_epsilon), steps_per_execution=steps_per_execution,
                      jit_compile=cfg.jit_compile, train_metrics=cfg.train_metrics)
        if cfg.warm_start:
            restore_warm_start(model, cfg.warm_start)
    monitor = main_metric(model)
    # Parameter servers: Keras allows epoch-level callbacks only and runs no exact evaluation of these models
    # (custom test_step); the chief evaluates a one-machine copy instead (``ChiefEvaluation``).
    ps = isinstance(strategy, tf.distribute.ParameterServerStrategy)

    cbs = []
    start_epoch, start_step = 0, 0
    # The epochs an interrupted run finished (none for a fresh run): the best checkpoint and early stopping
    # continue from their monitored values instead of starting over.
    earlier: Dict[int, float] = {}
    best_path = monitor_path = None
    if cfg.checkpoint_dir:
        backup_dir = os.path.join(cfg.checkpoint_dir, "backup")
        if not cfg.resume:
            # Multi-worker: the chief alone deletes the shared backup, and no worker reads the backup's position
            # (or restores it) before the deletion is done.
            if strategy.extended.should_checkpoint and tf.io.gfile.exists(backup_dir):
                tf.io.gfile.rmtree(backup_dir)
            _barrier(strategy)
        start_epoch, start_step = backup_position(backup_dir, steps_per_epoch)
        if start_epoch or start_step:
            logger.info("resuming from %s at epoch %d step %d", backup_dir, start_epoch + 1, start_step)
        cbs.append(keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch") if ps
                   else StepBackup(backup_dir, save_freq=cfg.backup_every_steps))
        monitor_path = os.path.join(cfg.checkpoint_dir, MONITOR_LOG)
        earlier = MonitorLog.epochs_before(monitor_path, start_epoch)
        if earlier:
            logger.info("resumed after epoch(s) %s: best %s %.4f so far", sorted(e + 1 for e in earlier), monitor,
                        max(earlier.values()))
        best_path = os.path.join(cfg.checkpoint_dir, "best", "weights")
        cbs.append(keras.callbacks.ModelCheckpoint(best_path, monitor=monitor, mode="max", save_best_only=True,
                                                   save_weights_only=True,
                                                   initial_value_threshold=max(earlier.values(), default=None)))
    if cfg.early_stopping_patience:
        cbs.append(ResumableEarlyStopping(earlier, best_path, monitor=monitor, patience=cfg.early_stopping_patience,
                                          restore_best_weights=True))
    if monitor_path:  # after the checkpoint and early stopping: an epoch is recorded once they have seen it
        cbs.append(MonitorLog(monitor_path, monitor, earlier))
    if cfg.tensorboard_dir:
        cbs.append(keras.callbacks.TensorBoard(cfg.tensorboard_dir, write_graph=False, profile_batch=0))
    counter = _StepCounter()
    cbs += ([] if ps else [counter]) + list(callbacks)  # the caller's last: they see this step's backup already written

    # One endless stream of epochs; a resumed run skips what the interrupted one finished.
    skip = 0 if ps else start_epoch * steps_per_epoch + start_step
    if cfg.in_memory:
        train_ds = make_in_memory_dataset(data.train_pattern, data.feature_spec, data.feature_keys, data.label_keys,
                                          data.batch_size, shuffle=cfg.shuffle, seed=cfg.seed, epochs=None,
                                          skip_batches=skip, rows=n)
    else:
        train_ds = make_dataset(data.train_pattern, data.feature_spec, data.feature_keys, data.label_keys,
                                data.batch_size, shuffle=cfg.shuffle, seed=cfg.seed, epochs=None, skip_batches=skip,
                                deterministic=cfg.deterministic)
    eval_ds = make_dataset(data.eval_pattern, data.feature_spec, data.feature_keys, data.label_keys,
                           data.batch_size, deterministic=cfg.deterministic)
    # A known size: Keras then re-iterates the eval set every epoch, also with steps_per_execution > 1.
    eval_ds = eval_ds.apply(tf.data.experimental.assert_cardinality(
        math.ceil(count_records(data.eval_pattern) / data.batch_size)))
    # Multi-worker: every worker reads the whole stream and keeps its replicas' slices of each global batch
    # (DATA sharding after Keras splits the batch), so the workers' slices together are one process's batch,
    # in its order, and a resumed run's skip counts global batches. AUTO would shard by file instead.
    sharding = tf.data.Options()
    sharding.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_ds, eval_ds = train_ds.with_options(sharding), eval_ds.with_options(sharding)
    local = None
    if ps:
        train_ds = per_worker_start(train_ds, steps_per_epoch)
        local = build()
        local(sample)
        local.compile(optimizer=FusedAdam(learning_rate, epsilon=adam_epsilon))
        cbs.insert(0, ChiefEvaluation(local, eval_ds))
        iterations_before = int(model.optimizer.iterations.numpy())
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    history = model.fit(train_ds, validation_data=None if ps else eval_ds, epochs=cfg.epochs,
                        steps_per_epoch=steps_per_epoch, callbacks=cbs, verbose=verbose)
    steps_run = int(model.optimizer.iterations.numpy()) - iterations_before if ps else counter.steps
    if steps_per_execution > 1:  # the trained model evaluates and predicts a step per call, as any Keras model
        model._configure_steps_per_execution(1)  # noqa: SLF001
        model.train_function = model.test_function = model.predict_function = None  # traced with several
    info = {"steps_per_epoch": int(steps_per_epoch), "train_examples": int(n), "initial_epoch": start_epoch,
            "steps_per_execution": steps_per_execution,
            "initial_step": start_step, "steps_run": steps_run, "monitor": monitor,
            "replicas": strategy.num_replicas_in_sync, "strategy": type(strategy).__name__}
    stopped = next((cb.stopped_epoch for cb in cbs if isinstance(cb, keras.callbacks.EarlyStopping)), 0)
    if stopped:
        info["early_stopped_after_epoch"] = int(stopped) + 1
    if cfg.checkpoint_dir:
        info["final_checkpoint"] = save_final(model, cfg.checkpoint_dir)
    if cfg.warm_start:
        info["warm_start"] = cfg.warm_start
    if ps:  # evaluation and export run on the chief: a one-machine model holding the final weights, tables whole
        copy_weights(model, local)
        info["ps_tasks"] = strategy.extended._num_ps  # noqa: SLF001
        info["workers"] = strategy.extended._num_workers  # noqa: SLF001
        # where each variable (each shard of a split one: ``<name>/part_<k>``) lives: [device, shape]
        info["variable_devices"] = {v.name: [v.device, v.shape.as_list()] for v in model.variables}
        model = local
    return model, {k: [float(v) for v in vs] for k, vs in history.history.items()}, info


def copy_weights(src, dst) -> None:
    """Loads ``src``'s variables into ``dst`` (same architecture) through a checkpoint, which holds every
    partitioned variable as one whole tensor: a parameter-server model into a one-machine model."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rankline-weights-") as tmp:
        path = tf.train.Checkpoint(model=src).write(os.path.join(tmp, "ckpt"))
        status = tf.train.Checkpoint(model=dst).read(path)
        status.assert_existing_objects_matched()
        status.expect_partial()  # the source's optimizer slots: not part of a model copy


class ChiefEvaluation(keras.callbacks.Callback):
    """Parameter-server training: at the end of every epoch, copies the weights into ``local`` (a compiled
    one-machine model of the same architecture) and evaluates it on ``eval_ds`` on the chief, adding
    ``val_<metric>`` to the epoch's logs (placed first: the best checkpoint and early stopping read them).
    It runs in a thread of its own: outside ``fit``'s strategy scope (thread-local), so Keras does not send
    the one-machine model's evaluation to the workers."""

    def __init__(self, local, eval_ds):
        super().__init__()
        self.local, self.eval_ds = local, eval_ds

    def on_epoch_end(self, epoch, logs=None):
        results, errors = {}, []

        def evaluate():
            try:
                copy_weights(self.model, self.local)
                results.update(self.local.evaluate(self.eval_ds, verbose=0, return_dict=True))
            except Exception as exc:  # noqa: BLE001  (re-raised in the caller's thread)
                errors.append(exc)

        thread = threading.Thread(target=evaluate, name="chief-evaluation")
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        if logs is not None:
            logs.update({f"val_{k}": float(v) for k, v in results.items()})


def per_worker_start(ds: tf.data.Dataset, period: int) -> tf.data.Dataset:
    """``ds`` (an endless stream of batches) started at a batch in [0, ``period``) picked from the clock when a
    worker creates its copy. ``ClusterCoordinator`` runs the same dataset graph on every worker (no worker
    index reaches it), so seeded streams would make all workers train on the same batches at once."""
    start = tf.data.Dataset.range(1).map(lambda _: tf.cast(tf.timestamp() * 1e6, tf.int64) % period)
    return start.flat_map(lambda k: ds.skip(k))


class _StepCounter(keras.callbacks.Callback):
    """Counts the training steps this process ran (``steps_per_execution`` aware)."""

    def __init__(self):
        super().__init__()
        self._supports_tf_logs = True  # reads no logs: Keras need not turn them into numpy after every step
        self.steps = 0
        self._begin = 0

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = batch

    def on_train_batch_end(self, batch, logs=None):
        self.steps += int(batch) - int(self._begin) + 1
