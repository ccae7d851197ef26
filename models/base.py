"""Base class of the multi-task models (after tensorflow_recommenders.models.Model)."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Sequence

import tensorflow as tf

from models.keras import keras
from models.layers import MLP, SharedEmbedding
from models.optimizers import FusedAdam
from models.tasks import BinaryTask
from transforms.features import CLICK, CTAVR, CTCVR, CTR, DACTION, PURCHASE


class MultiTaskModel(keras.Model):
    """A model whose ``call(features)`` returns a dict of named probabilities [B, 1].

    Subclasses build layers, implement ``call`` and set ``self.tasks``. Training runs
    ``compute_loss(features, labels)`` = sum_t w_t * L_t (e.g. ESM² Eq. 11); ``call`` itself never touches
    losses, so the serving path is loss-free. ``fit``/``evaluate`` take ``(features, labels)`` pairs, both
    dicts of [B, 1] tensors.

    ``compile(..., train_metrics=...)``: ``"auc"`` (default) updates every task's loss mean and AUC in each
    training step; ``"loss"`` leaves the training AUCs out of the train step (their history keys
    ``<output>_auc`` disappear). Evaluation (``evaluate``, ``fit``'s ``val_*``) always updates all metrics, and
    the weights a step computes do not depend on this choice.
    """

    TRAIN_METRICS = ("auc", "loss")

    # ---- builders shared by the concrete models (all read ``self.config``, a ``ModelConfig``) ------------
    def shared_embedding(self, categorical, dense, sequences) -> SharedEmbedding:
        """The shared embedding module (ESM² "SEM", Eq. 5) configured from ``self.config``."""
        c = self.config
        return SharedEmbedding(categorical, dense, embedding_dim=c.embedding_dim,
                               dense_activation=c.dense_activation, sequences=sequences or {}, name="sem")

    def tower(self, name: str) -> MLP:
        """One prediction tower: ``hidden_units`` ReLU layers and a logit unit (ESM² Eq. 6 without sigmoid)."""
        c = self.config
        return MLP(c.hidden_units, dropout=c.dropout, output_units=1, l2=c.l2, name=name)

    def entire_space_tasks(self) -> List[BinaryTask]:
        """ESM²'s three entire-space losses (Eqs. 8-10) with the config's weights (Eq. 11)."""
        c = self.config
        return [BinaryTask(CTR, CLICK, c.w_ctr), BinaryTask(CTAVR, DACTION, c.w_ctavr),
                BinaryTask(CTCVR, PURCHASE, c.w_ctcvr)]

    @classmethod
    def bind_to_contract(cls, config, contract, inputs: Sequence[str]):
        """The config with dataset-dependent fields filled in from the feature contract (default: unchanged).

        ``inputs`` are the model's transformed input names (categorical ids, sequences, dense). Models that
        read role-specific fields (STAN's user side, MUSENET's history, USSR's segment) override this and
        raise ``ValueError`` naming what the dataset lacks. The pipeline calls it before ``build``.
        """
        return config

    def __init__(self, tasks: Sequence[BinaryTask] = (), **kwargs):
        super().__init__(**kwargs)
        self._tasks = self._no_dependency(list(tasks))
        self._total_loss = self._no_dependency(keras.metrics.Mean(name="loss"))
        self._train_auc = True

    def compile(self, *args, train_metrics: str = "auc", **kwargs):
        if train_metrics not in self.TRAIN_METRICS:
            raise ValueError(f"train_metrics must be one of {', '.join(self.TRAIN_METRICS)}, got {train_metrics!r}")
        self._train_auc = train_metrics == "auc"
        super().compile(*args, **kwargs)
        # FusedAdam sums each embedding gradient into its dense form: the shared embedding can then hand it the
        # tables' gradients dense, computed as one (SharedEmbedding.fused_gradient). Other optimizers keep
        # Keras' sparse gradients (same values, but their sparse updates round differently from their dense ones).
        dense = isinstance(self.optimizer, FusedAdam)
        for layer in self._flatten_layers():
            if isinstance(layer, SharedEmbedding):
                layer.dense_gradients = dense

    @contextlib.contextmanager
    def _auc_updates(self, on: bool):
        """While a step is traced: the tasks update their AUC metrics only when ``on``."""
        before = [task.update_auc for task in self._tasks]
        for task in self._tasks:
            task.update_auc = on
        try:
            yield
        finally:
            for task, value in zip(self._tasks, before):
                task.update_auc = value

    @property
    def tasks(self):
        return list(self._tasks)

    @property
    def output_names_(self) -> Sequence[str]:
        """Names of the outputs of ``call`` (the serving signature's outputs)."""
        raise NotImplementedError

    def compute_loss(self, features, labels, training: bool = False) -> tf.Tensor:  # noqa: D401
        predictions = self(features, training=training)
        loss = tf.add_n([task.weight * task.compute_loss(labels, predictions) for task in self._tasks])
        if self.losses:
            loss += tf.add_n(self.losses)
        return loss

    def training_loss(self, features, labels) -> tf.Tensor:
        """The loss of one training step; models with training-only updates (MUSENET's Eq. 14) override it."""
        return self.compute_loss(features, labels, training=True)

    def train_step(self, data):
        features, labels = data
        with self._auc_updates(self._train_auc):
            with tf.GradientTape() as tape:
                loss = self.training_loss(features, labels)
                # Each replica's loss is a mean over its share of the global batch and the optimizer sums the
                # replicas' gradients: scale by 1/replicas so the step is the global batch mean's (as Keras does).
                scaled = loss / tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, loss.dtype)
            grads = tape.gradient(scaled, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            self._total_loss.update_state(loss)
            skipped = {id(task.auc) for task in self._tasks if not task.update_auc}
        return {m.name: m.result() for m in self.metrics if id(m) not in skipped}

    def test_step(self, data):
        features, labels = data
        loss = self.compute_loss(features, labels, training=False)
        self._total_loss.update_state(loss)
        return {m.name: m.result() for m in self.metrics}

    @property
    def metrics(self):
        out = [self._total_loss]
        for task in self._tasks:
            out.extend(task.metrics)
        return out

    def diagnostics(self) -> Dict[str, float]:
        """Scalar figures about the trained model itself, not its predictions (benchmark reports list them)."""
        return {}

    def predict_dict(self, features: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        return self(features, training=False)

    # Every model is built from (categorical, dense, config, sequences) around a ``SharedEmbedding`` named
    # ``self.embedding`` and a typed ``self.config``; that is all it takes to rebuild it.
    def get_config(self):
        return {"categorical": self.embedding.categorical, "dense": self.embedding.dense,
                "sequences": self.embedding.sequences, "config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
