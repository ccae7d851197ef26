"""Tasks own a loss and its metrics (after tensorflow_recommenders.tasks.Ranking)."""
from __future__ import annotations

import threading

import tensorflow as tf

from models.keras import keras

EPSILON = 1e-7


class BinaryTask:
    """Binary log-loss on a named probability output against a named 0/1 label, over all impressions.

    ESM² Eqs. 8-10: L = -sum_{i in +} log p_i - sum_{j in -} log(1 - p_j). We use the batch mean (the sum
    divided by B), which only rescales the learning rate. Probabilities are clipped to [eps, 1 - eps]
    because composed outputs (e.g. ctcvr = y1 * cvr) have no logit to work from.

    A plain object, deliberately not tracked by the model: its metrics never reach checkpoints or the
    exported SavedModel, so the serving graph carries no loss or metric state.
    """

    def __init__(self, output: str, label: str, weight: float = 1.0, name: str | None = None):
        self.name = name or f"{output}_task"
        if weight < 0:
            raise ValueError(f"task {output!r}: weight must be >= 0, got {weight}")
        self.output = output
        self.label = label
        self.weight = float(weight)
        self.auc = keras.metrics.AUC(name=f"{output}_auc", num_thresholds=1000)
        self.loss_metric = keras.metrics.Mean(name=f"{output}_loss")
        # Read while a step is traced: False leaves the AUC out of that step's graph (``MultiTaskModel``'s
        # ``train_metrics="loss"``); evaluation steps always update it. Per thread: MirroredStrategy traces each
        # replica's step in a thread of its own, and one replica restoring the flag must not change another's.
        self._flags = threading.local()

    @property
    def update_auc(self) -> bool:
        return getattr(self._flags, "update_auc", True)

    @update_auc.setter
    def update_auc(self, on: bool) -> None:
        self._flags.update_auc = bool(on)

    @staticmethod
    def log_loss(labels: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
        """Mean binary cross entropy; labels and probs [B, 1] (or [B])."""
        y = tf.reshape(tf.cast(labels, tf.float32), [-1])
        p = tf.clip_by_value(tf.reshape(probs, [-1]), EPSILON, 1.0 - EPSILON)
        return -tf.reduce_mean(y * tf.math.log(p) + (1.0 - y) * tf.math.log(1.0 - p))

    def compute_loss(self, labels, predictions) -> tf.Tensor:
        loss = self.log_loss(labels[self.label], predictions[self.output])
        self.loss_metric.update_state(loss)
        if self.update_auc:
            self.auc.update_state(tf.reshape(tf.cast(labels[self.label], tf.float32), [-1]),
                                  tf.reshape(predictions[self.output], [-1]))
        return loss

    @property
    def metrics(self):
        return [self.loss_metric, self.auc]
