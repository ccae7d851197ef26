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
    """Algorithm 1 state per user index u: alpha_u, beta_u [U, K] (init 1), and the events applied so far,
    count_u [U] and position_sum_u [U] (init 0; float64, exact to 2^53).

    An event is a row's (user u, position p), p = the number of the user's earlier events in time order
    (``uf_count_raw``, 0-based). ``update(users, y_tilde, positions)`` applies Algorithm 1's lines 6-8 to every
    new event with c_u = p + 1, the count Algorithm 1 reaches at that event when it passes over the user's
    events in time order ("a higher index indicates a time closer to the present"):
        alpha_u^k += y~^k (p + 1);  beta_u^k += (1 - y~^k) (p + 1);  count_u += 1;  position_sum_u += p + 1,
    so the state does not depend on the order in which events arrive (shuffled batches, replicas). After one
    pass over a user's n events, alpha_u + beta_u = 2 + n (n + 1) / 2 whatever the number of epochs.

    Each event updates the state once, keyed on the event (not on epochs): (u, p) is skipped when
    * the positions applied for u are exactly 0..count_u - 1 (position_sum_u = count_u (count_u + 1) / 2, the
      smallest sum of count_u distinct positive integers, reached only by 1..count_u) and p < count_u; or
    * an earlier row of the same (global) batch has the same (u, p).
    Why this is exact: within one pass over the training data every event arrives once, so while a user's pass is
    incomplete an arriving event is new (if the applied positions are 0..m-1, the new one has p >= m and is
    applied). Once the pass is complete the applied positions are the user's training positions, 0..n_u - 1,
    and every later arrival has p < n_u and is skipped. This needs each user's training rows to be the user's
    earliest rows, i.e. positions 0..n_u - 1: true for a time split (the built-in schema) and for a split keyed
    by user. With a split that interleaves a user's rows across splits (row hash, files), the positions have
    gaps, the test never holds and each epoch applies the user's events again. Users sharing an index (OOV
    buckets) share a state; rows with the same position count as one event (a bucket of one-event users keeps
    the first event that arrives: a new user's Beta(1 + y~, 2 - y~)).
    Chosen over the alternatives: a per-user "last position seen" watermark is exact only when each user's rows
    arrive in time order, and ``pipeline.training.train`` shuffles (a pass would apply only the running maxima, about
    ln n of a user's n events); a reset at each epoch needs a callback and breaks when a run resumes from a
    backup taken at an epoch's end or in mid-epoch. Here a resumed run (``pipeline.training.train`` restores the state
    with the backup and skips the batches it covers) applies the rest of the pass once, and a replayed batch is
    skipped too wherever the user's applied positions are 0..m-1 (always, when rows arrive in time order).
    All of it is tensor ops (graph mode, ``steps_per_execution``).

    ``sample(users)`` draws gamma_u^k ~ Beta(alpha_u^k, beta_u^k) per row (Gamma-ratio sampling).
    Only training touches this layer; it is never part of ``call`` (nor of serving).

    Under a ``tf.distribute`` strategy (MirroredStrategy, MultiWorkerMirroredStrategy) every replica
    all-gathers the global batch's users, positions and y~ and applies the same update, so the state is what a
    single-device pass over the global batch gives; the variables are mirrored with ``ONLY_FIRST_REPLICA``
    aggregation (all copies receive replica 0's identical update; checkpoints hold one).
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
        self.count = self.add_weight(name="count", shape=(self.num_users,), initializer="zeros", dtype=tf.float64,
                                     **state)
        self.position_sum = self.add_weight(name="position_sum", shape=(self.num_users,), initializer="zeros",
                                            dtype=tf.float64, **state)

    @staticmethod
    def _global_batch(x: tf.Tensor) -> tf.Tensor:
        """``x`` of every replica, concatenated in replica order (``x`` itself without a strategy)."""
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return x
        return ctx.all_gather(x, axis=0)

    def update(self, users: tf.Tensor, y_tilde: tf.Tensor, positions: tf.Tensor) -> None:
        """users [B] or [B, 1] (index), y_tilde [B, K], positions [B] or [B, 1] (0-based, time order)."""
        users = self._global_batch(tf.reshape(tf.cast(users, tf.int64), [-1]))
        y = self._global_batch(tf.stop_gradient(tf.cast(y_tilde, tf.float32)))
        pos = self._global_batch(tf.reshape(tf.cast(positions, tf.float64), [-1]))
        rows = tf.range(tf.shape(users)[0])
        same_event = tf.logical_and(tf.equal(users[:, None], users[None, :]), tf.equal(pos[:, None], pos[None, :]))
        copy_of_earlier_row = tf.reduce_any(tf.logical_and(same_event, rows[:, None] > rows[None, :]), axis=1)
        m = tf.gather(self.count, users)
        prefix_applied = tf.equal(tf.gather(self.position_sum, users), m * (m + 1.0) / 2.0)
        applied = tf.logical_and(prefix_applied, pos < m)
        new = tf.cast(tf.logical_not(tf.logical_or(applied, copy_of_earlier_row)), tf.float64)
        c = new * (pos + 1.0)  # Algorithm 1's c_u at this event; 0 for a skipped one
        c32 = tf.cast(c, tf.float32)[:, None]
        # scatter_add of IndexedSlices (duplicates summed): the one scatter form mirrored variables support.
        self.alpha.scatter_add(tf.IndexedSlices(y * c32, users))
        self.beta.scatter_add(tf.IndexedSlices((1.0 - y) * c32, users))
        self.count.scatter_add(tf.IndexedSlices(new, users))
        self.position_sum.scatter_add(tf.IndexedSlices(c, users))

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
