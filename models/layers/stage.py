"""STAN building blocks (Cao et al., RecSys 2023; ../shared/papers/stan-stage-adaptive-multitask.txt).

* ``UserPreference``: user preference learning, Eqs. 7-9 — self-attention over the user's feature
  embeddings, a task-specific attention per task, and a single-layer MLP + sigmoid per task.
* ``BetaStageState``: latent user stage detection, Algorithm 1 — a per-user, per-task Beta(alpha, beta)
  state updated with the preference outputs, from which the loss weights gamma are drawn (Eqs. 12-13).
"""
from __future__ import annotations

import tensorflow as tf

from models.keras import keras


@keras.utils.register_keras_serializable(package="rankline")
class UserPreference(keras.layers.Layer):
    """User features U [B, d1, d2] (d1 fields, d2 embedding dim) -> preferences y~ [B, K] in (0, 1).

    Eq. 7:  U' = Softmax(W_Q U (W_K U)^T / sqrt(d1)) W_V U, with W_Q, W_K, W_V in R^{d1 x d1} acting on the
            field axis (so the attention matrix is d1 x d1, field-to-field).
    Eq. 8:  s^k = U' ⊙ Softmax(U' W^k), W^k in R^{d2 x d2}; the softmax runs over the field axis, weighing
            fields by their importance for task k (the paper writes W^k · U'; with W^k being d2 x d2 the
            product that conforms is U' W^k).
    Eq. 9:  y~^k = Sigmoid(MLP^k(vec(s^k))), MLP^k a single dense layer.
    """

    def __init__(self, num_fields: int, embedding_dim: int, num_tasks: int, **kwargs):
        super().__init__(**kwargs)
        self.num_fields = int(num_fields)
        self.embedding_dim = int(embedding_dim)
        self.num_tasks = int(num_tasks)
        d1, d2 = self.num_fields, self.embedding_dim
        init = "glorot_uniform"
        self.w_q = self.add_weight(name="w_q", shape=(d1, d1), initializer=init)
        self.w_k = self.add_weight(name="w_k", shape=(d1, d1), initializer=init)
        self.w_v = self.add_weight(name="w_v", shape=(d1, d1), initializer=init)
        self.w_task = self.add_weight(name="w_task", shape=(self.num_tasks, d2, d2), initializer=init)
        self.mlp_kernel = self.add_weight(name="mlp_kernel", shape=(self.num_tasks, d1 * d2), initializer=init)
        self.mlp_bias = self.add_weight(name="mlp_bias", shape=(self.num_tasks,), initializer="zeros")

    def attend(self, u: tf.Tensor) -> tf.Tensor:
        """Eq. 7: [B, d1, d2] -> U' [B, d1, d2]."""
        q = tf.einsum("ij,bjd->bid", self.w_q, u)
        k = tf.einsum("ij,bjd->bid", self.w_k, u)
        v = tf.einsum("ij,bjd->bid", self.w_v, u)
        scores = tf.matmul(q, k, transpose_b=True) / tf.sqrt(float(self.num_fields))
        return tf.matmul(tf.nn.softmax(scores, axis=-1), v)

    def task_embeddings(self, u_prime: tf.Tensor) -> tf.Tensor:
        """Eq. 8: U' [B, d1, d2] -> s [B, K, d1, d2]."""
        logits = tf.einsum("bid,kde->bkie", u_prime, self.w_task)
        return u_prime[:, None] * tf.nn.softmax(logits, axis=2)

    def call(self, u: tf.Tensor) -> tf.Tensor:
        s = self.task_embeddings(self.attend(u))
        flat = tf.reshape(s, [-1, self.num_tasks, self.num_fields * self.embedding_dim])
        return tf.sigmoid(tf.einsum("bkn,kn->bk", flat, self.mlp_kernel) + self.mlp_bias)  # Eq. 9

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_fields=self.num_fields, embedding_dim=self.embedding_dim, num_tasks=self.num_tasks)
        return cfg


@keras.utils.register_keras_serializable(package="rankline")
class BetaStageState(keras.layers.Layer):
    """Algorithm 1 state: alpha, beta [U, K] (init 1) and the per-user count c [U] (init 0).

    ``update(users, y_tilde)`` processes a batch in row order: for each row i of user u,
    c_u += 1; alpha_u^k += y~_i^k * c_u; beta_u^k += (1 - y~_i^k) * c_u. Rows of the same user within one
    batch get consecutive counts, exactly as a sequential pass would.
    ``sample(users)`` draws gamma_u^k ~ Beta(alpha_u^k, beta_u^k) per row (Gamma-ratio sampling).
    Only training touches this layer; it is never part of ``call`` (nor of serving).

    Under a ``tf.distribute`` strategy (MirroredStrategy, MultiWorkerMirroredStrategy) every replica
    all-gathers the global batch's users and y~ and applies the same update, in global row order, so the
    state is what a single-device pass over the global batch gives; the variables are mirrored with
    ``ONLY_FIRST_REPLICA`` aggregation (all copies receive replica 0's identical update; checkpoints hold one).
    """

    def __init__(self, num_users: int, num_tasks: int, **kwargs):
        super().__init__(**kwargs)
        self.num_users = int(num_users)
        self.num_tasks = int(num_tasks)
        state = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.alpha = self.add_weight(name="alpha", shape=(self.num_users, self.num_tasks), initializer="ones",
                                     **state)
        self.beta = self.add_weight(name="beta", shape=(self.num_users, self.num_tasks), initializer="ones",
                                    **state)
        self.count = self.add_weight(name="count", shape=(self.num_users,), initializer="zeros", **state)

    @staticmethod
    def _global_batch(x: tf.Tensor) -> tf.Tensor:
        """``x`` of every replica, concatenated in replica order (``x`` itself without a strategy)."""
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return x
        return ctx.all_gather(x, axis=0)

    def update(self, users: tf.Tensor, y_tilde: tf.Tensor) -> None:
        users = self._global_batch(tf.reshape(tf.cast(users, tf.int64), [-1]))
        y = self._global_batch(tf.stop_gradient(tf.cast(y_tilde, tf.float32)))
        same = tf.cast(tf.equal(users[:, None], users[None, :]), tf.float32)
        earlier_in_batch = tf.reduce_sum(tf.linalg.band_part(same, -1, 0), axis=1)  # includes the row itself
        c = tf.gather(self.count, users) + earlier_in_batch  # c_u after this row's increment
        # scatter_add of IndexedSlices (duplicates summed): the one scatter form mirrored variables support.
        self.alpha.scatter_add(tf.IndexedSlices(y * c[:, None], users))
        self.beta.scatter_add(tf.IndexedSlices((1.0 - y) * c[:, None], users))
        self.count.scatter_add(tf.IndexedSlices(tf.ones_like(c), users))

    def sample(self, users: tf.Tensor, seed=None) -> tf.Tensor:
        users = tf.reshape(tf.cast(users, tf.int64), [-1])
        a = tf.gather(self.alpha, users)
        b = tf.gather(self.beta, users)
        x = tf.random.gamma([], a, seed=seed)
        y = tf.random.gamma([], b, seed=None if seed is None else seed + 1)
        return x / (x + y)

    def mean(self, users: tf.Tensor) -> tf.Tensor:
        users = tf.reshape(tf.cast(users, tf.int64), [-1])
        a = tf.gather(self.alpha, users)
        return a / (a + tf.gather(self.beta, users))

    def call(self, users):  # not used in serving; the state is read through ``mean``/``sample``
        return self.mean(users)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_users=self.num_users, num_tasks=self.num_tasks)
        return cfg
