"""Shared embedding module (ESM² "SEM", Eq. 5)."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import tensorflow as tf

from models.keras import keras


@keras.utils.register_keras_serializable(package="rankline")
class SharedEmbedding(keras.layers.Layer):
    """Per-field embeddings of categorical ids plus transformed numeric inputs, shared by all towers.

    ESM² Eq. 5: g_ij = P_j^T f_ij, i.e. an embedding lookup per field j. Numeric inputs (already z-scored
    by the transform graph) enter as tanh(z) = tanh((x - mu) / sigma) when ``dense_activation='tanh'``.

    Input: a dict with ``categorical`` keys -> int64 [B, 1] ids in [0, cardinality), ``dense`` keys ->
    float32 [B, 1]. Output of ``call``: [B, F * D + N] (F categorical fields, D = ``embedding_dim``,
    N dense inputs); ``field_embeddings`` gives the [B, F, D] stack for attention-style models.
    """

    def __init__(self, categorical: Mapping[str, int], dense: Sequence[str] = (), embedding_dim: int = 16,
                 dense_activation: str = "tanh", embeddings_l2: float = 0.0,
                 sequences: Mapping[str, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        if not categorical and not dense and not sequences:
            raise ValueError("SharedEmbedding needs at least one categorical or dense input")
        bad = {k: v for k, v in categorical.items() if int(v) < 1}
        if bad:
            raise ValueError(f"SharedEmbedding: cardinalities must be >= 1, got {bad}")
        if dense_activation not in ("tanh", "linear"):
            raise ValueError(f"dense_activation must be 'tanh' or 'linear', got {dense_activation!r}")
        self.categorical = {str(k): int(v) for k, v in sorted(categorical.items())}
        self.dense = [str(d) for d in dense]
        self.embedding_dim = int(embedding_dim)
        self.dense_activation = dense_activation
        self.embeddings_l2 = float(embeddings_l2)
        reg = keras.regularizers.l2(self.embeddings_l2) if self.embeddings_l2 else None
        self.sequences = {str(k): int(v) for k, v in sorted((sequences or {}).items())}
        self._tables = {name: keras.layers.Embedding(card, self.embedding_dim, embeddings_regularizer=reg,
                                                     name=f"emb_{name}")
                        for name, card in self.categorical.items()}
        # Sequence ids are 1-based (0 = padding): table size cardinality + 1, row 0 never contributes.
        self._seq_tables = {name: keras.layers.Embedding(card + 1, self.embedding_dim, embeddings_regularizer=reg,
                                                         name=f"emb_seq_{name}")
                            for name, card in self.sequences.items()}

    @property
    def num_fields(self) -> int:
        return len(self._tables) + len(self._seq_tables)

    @property
    def output_dim(self) -> int:
        return self.num_fields * self.embedding_dim + len(self.dense)

    def field_embeddings(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        """[B, F, D] embeddings, fields in sorted name order, then sequences (masked mean over [B, L])."""
        embs = []
        for name, table in self._tables.items():
            ids = tf.reshape(tf.cast(features[name], tf.int64), [-1])
            embs.append(table(ids))
        for name, table in self._seq_tables.items():
            ids = tf.cast(features[name], tf.int64)  # [B, L]
            mask = tf.cast(ids > 0, tf.float32)[..., None]
            total = tf.reduce_sum(table(ids) * mask, axis=1)
            embs.append(total / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0))
        return tf.stack(embs, axis=1)

    def dense_values(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        """[B, N] numeric inputs after the configured activation."""
        x = tf.concat([tf.reshape(tf.cast(features[n], tf.float32), [-1, 1]) for n in self.dense], axis=1)
        return tf.tanh(x) if self.dense_activation == "tanh" else x

    def call(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        parts = []
        if self.num_fields:
            fields = self.field_embeddings(features)
            parts.append(tf.reshape(fields, [-1, self.num_fields * self.embedding_dim]))
        if self.dense:
            parts.append(self.dense_values(features))
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]

    def get_config(self):
        cfg = super().get_config()
        cfg.update(categorical=self.categorical, dense=self.dense, embedding_dim=self.embedding_dim,
                   dense_activation=self.dense_activation, embeddings_l2=self.embeddings_l2,
                   sequences=self.sequences)
        return cfg
