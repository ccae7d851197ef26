"""Shared embedding module (ESM² "SEM", Eq. 5)."""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence

import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from models.keras import keras
from tf_keras.src.engine import base_layer_utils

# Tables of at most this many rows in all get one combined gradient (``SharedEmbedding.fused_gradient``).
FUSED_GRADIENT_MAX_ROWS = 1 << 21


def sequence_mean(lookup: Callable[[tf.Tensor], tf.Tensor], ids: tf.Tensor):
    """Masked mean of the embeddings of ids [B, L] (0 = padding, never looked up): mean_l e(ids[b, l]) over the
    non-zero ids of row b (zeros for an all-padding row).

    ``lookup`` maps K row ids [K] to [K, D] (a table's gather). Only the K non-padding positions are looked up,
    summed per row and (backward) given a gradient. Returns ([B, D] means, positions' rows [K] in [0, B), the
    looked-up ids [K], counts [B, 1] = max(#non-zero ids, 1))."""
    present = ids > 0                                                                           # [B, L]
    valid = tf.where(present)                                                                    # [K, 2]
    position, rows = valid[:, 0], tf.gather_nd(ids, valid)                                      # [K], [K]
    count = tf.maximum(tf.reduce_sum(tf.cast(present, tf.float32), axis=1, keepdims=True), 1.0)  # [B, 1]
    total = tf.math.unsorted_segment_sum(lookup(rows), position, tf.shape(ids, out_type=tf.int64)[0])
    return total / count, position, rows, count


@keras.utils.register_keras_serializable(package="rankline")
class SharedEmbedding(keras.layers.Layer):
    """Per-field embeddings of categorical ids plus transformed numeric inputs, shared by all towers.

    ESM² Eq. 5: g_ij = P_j^T f_ij, i.e. an embedding lookup per field j. Numeric inputs (already z-scored
    by the transform graph) enter as tanh(z) = tanh((x - mu) / sigma) when ``dense_activation='tanh'``.

    Input: a dict with ``categorical`` keys -> int64 [B, 1] ids in [0, cardinality), ``dense`` keys ->
    float32 [B, 1]. Output of ``call``: [B, F * D + N] (F categorical fields, D = ``embedding_dim``,
    N dense inputs); ``field_embeddings`` gives the [B, F, D] stack for attention-style models.

    Each field keeps its own table (a ``keras.layers.Embedding``: its own variable, checkpoint entry and, under
    parameter servers, its own shards). The gradient of all tables is one computation when
    ``fused_gradient`` holds (see there): the same values as one gradient per table, in 2 ops instead of ~3 per
    table.
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
        self.dense_gradients = False  # the optimizer takes dense table gradients (``fused_gradient``); not config
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

    def _all_tables(self) -> List[keras.layers.Embedding]:
        return list(self._tables.values()) + list(self._seq_tables.values())

    def fused_gradient(self) -> bool:
        """Whether the tables' gradient is computed as one: ``dense_gradients`` set (``MultiTaskModel.compile``
        sets it for ``FusedAdam``, which sums every sparse gradient into its dense form anyway), no
        ``tf.distribute`` strategy (its sparse exchange and split tables keep one sparse gradient per table), every
        table built with float32 weights and computation, and at most ``FUSED_GRADIENT_MAX_ROWS`` rows in all (the
        gradient is dense: a copy of every table, which larger tables should not pay each step).

        With it, the backward pass adds every looked-up row's gradient into one [sum of table rows, D] tensor
        (one ``unsorted_segment_sum``, padding positions of sequences left out) and splits it per table, the
        same values as one sparse gradient per table summed into its dense form (what ``FusedAdam`` would do,
        one sum per table, after Keras' per-gather bookkeeping ops)."""
        tables = self._all_tables()
        return (self.dense_gradients and bool(tables) and not tf.distribute.has_strategy()
                and all(t.built and t.compute_dtype == "float32" and t.embeddings.dtype == tf.float32
                        and resource_variable_ops.is_resource_variable(t.embeddings) for t in tables)
                and sum(int(t.input_dim) for t in tables) <= FUSED_GRADIENT_MAX_ROWS)

    def _ids(self, features: Dict[str, tf.Tensor]):
        cat_ids = [tf.reshape(tf.cast(features[n], tf.int64), [-1]) for n in self._tables]       # F x [B]
        seq_ids = [tf.cast(features[n], tf.int64) for n in self._seq_tables]                     # S x [B, L]
        return cat_ids, seq_ids

    def _fused_field_embeddings(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        """``field_embeddings`` with the tables' gradient as one (``fused_gradient``): the same forward values."""
        cats, seqs = list(self._tables.values()), list(self._seq_tables.values())
        cat_ids, seq_ids = self._ids(features)
        sizes = [int(t.input_dim) for t in cats + seqs]
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        dim, total, n_cat = self.embedding_dim, sum(sizes), len(cats)

        @tf.custom_gradient
        def lookup(*tables):
            embs = [tf.gather(t, ids) for t, ids in zip(tables[:n_cat], cat_ids)]                # F x [B, D]
            seq_parts = []
            for t, ids in zip(tables[n_cat:], seq_ids):
                mean, position, rows, count = sequence_mean(lambda r, t=t: tf.gather(t, r), ids)
                embs.append(mean)
                seq_parts.append((position, rows, count))
            out = tf.stack(embs, axis=1)                                                         # [B, F+S, D]

            def grad(dy):                                                                        # [B, F+S, D]
                values, rows = [], []
                if n_cat:
                    values.append(tf.reshape(dy[:, :n_cat], [-1, dim]))                         # [B*F, D]
                    rows.append(tf.reshape(tf.stack(cat_ids, axis=1) + tf.constant(starts[:n_cat], tf.int64),
                                           [-1]))
                for s, (position, seq_rows, count) in enumerate(seq_parts):
                    values.append(tf.gather(dy[:, n_cat + s] / count, position))                # [K, D]
                    rows.append(seq_rows + starts[n_cat + s])
                dense = tf.math.unsorted_segment_sum(tf.concat(values, 0), tf.concat(rows, 0), total)
                return tf.split(dense, sizes, axis=0)

            return out, grad

        return lookup(*[tf.convert_to_tensor(t.embeddings) for t in cats + seqs])

    def field_embeddings(self, features: Dict[str, tf.Tensor], training=None) -> tf.Tensor:
        """[B, F, D] embeddings, fields in sorted name order, then sequences (masked mean over [B, L]).

        ``training`` (None: the enclosing Keras call's) picks the combined gradient (``fused_gradient``) when
        true; the values are the same either way."""
        if training is None:
            training = base_layer_utils.call_context().training
        if training and self.fused_gradient():
            return self._fused_field_embeddings(features)
        cat_ids, seq_ids = self._ids(features)
        embs = [table(ids) for table, ids in zip(self._tables.values(), cat_ids)]
        embs += [sequence_mean(table, ids)[0] for table, ids in zip(self._seq_tables.values(), seq_ids)]
        return tf.stack(embs, axis=1)

    def dense_values(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        """[B, N] numeric inputs after the configured activation."""
        x = tf.concat([tf.reshape(tf.cast(features[n], tf.float32), [-1, 1]) for n in self.dense], axis=1)
        return tf.tanh(x) if self.dense_activation == "tanh" else x

    def call(self, features: Dict[str, tf.Tensor], training=None) -> tf.Tensor:
        parts = []
        if self.num_fields:
            fields = self.field_embeddings(features, training=training)
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
