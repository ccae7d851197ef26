"""MUSENET's scenario learner and repeat-intention module (Xu et al., WSDM 2023;
../shared/papers/musenet-multi-scenario-repeat-aware.txt).

Shapes: B = batch, N = width of the data-sample embedding x, P = width of the projected space f_omega(x),
K = number of scenarios.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import tensorflow as tf

from models.keras import keras
from models.layers.dropout import FastDropout

ASSIGNMENTS = ("soft", "hard")
PROTOTYPE_INITS = ("random", "kmeans++")


def kmeans_pp_seeds(points: tf.Tensor, k: int, seed=(0, 0)) -> tf.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): k rows of points [B, P] -> [k, P]. The first row is drawn
    uniformly, each next one with probability proportional to its squared distance to the nearest row drawn so
    far (a row already drawn has distance 0, so it is drawn again only when fewer than k rows are distinct).
    Stateless draws from ``seed`` (a pair of ints): the same points and seed give the same rows on any device."""
    points = tf.cast(points, tf.float32)
    n = tf.shape(points)[0]
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    first = tf.random.stateless_uniform([], seed, minval=0, maxval=n, dtype=tf.int32)
    seeds = [tf.gather(points, first)]
    d2 = tf.reduce_sum(tf.square(points - seeds[0]), axis=1)                           # [B]
    for i in range(1, int(k)):
        logits = tf.where(d2 > 0, tf.math.log(tf.maximum(d2, 1e-30)), tf.fill(tf.shape(d2), -1e30))
        pick = tf.random.stateless_categorical(logits[None, :], 1, seed + tf.constant([0, i], tf.int64),
                                               dtype=tf.int32)
        seeds.append(tf.gather(points, pick[0, 0]))
        d2 = tf.minimum(d2, tf.reduce_sum(tf.square(points - seeds[-1]), axis=1))
    return tf.stack(seeds)


@keras.utils.register_keras_serializable(package="rankline")
class ScenarioLearner(keras.layers.Layer):
    """Prototypical scenario assignment Q(c | x) in a learned metric space (§3.1.1, §3.2.1).

    * ``project``:  f_omega(x) = x omega, omega [N, P] trainable ("the transformation matrix omega"). With
      ``normalize_input`` (not in the paper) x is first standardised per sample, (x - mean_j x_j) /
      sqrt(var_j x_j + 1e-6) over its N entries, no parameters, so that the projected scale does not start far
      below the prototypes' N(0, 1) scale.
    * ``distances``: d(f_omega(x), c_k) = ||f_omega(x) - c_k||^2 [B, K] (squared Euclidean, the choice of §3.3.1).
    * ``soft``:     Q_s(c_k | x) = softmax_k(-d) [B, K] (Eq. 3); this is also pi_{k,i} of Eq. 7.
    * ``assign``:   a [B, K]: soft -> Q_s. hard -> Gumbel-softmax softmax((log pi + g) / tau), g ~ Gumbel(0, 1),
      while training (Eq. 7), and the one-hot arg max of Q_s otherwise (Eq. 4: no noise at inference).
    * ``update_prototypes``: c_k <- (1 - alpha) c_k + alpha * sum_i a_ki f_omega(x_i) / sum_i a_ki (Eq. 14, the
      batch minimiser of L_C, Eq. 8; the paper prints x_i, but c_k lives in the projected space of Eq. 3, so the
      projected sample is averaged). The prototypes Lambda [K, P] are a non-trainable weight: only this
      moving average changes them, never a gradient (Step 1 of the alternating optimisation of Eq. 13).
    * ``kl_to_uniform``: (1/B) sum_i sum_k a_ki (log a_ki + log K) (Eq. 12, P(C) = 1/K).
    * ``marginal_kl_to_uniform``: sum_k abar_k (log abar_k + log K), abar = (1/B) sum_i a_i [K]: the KL of the batch's
      aggregate assignment to the prior. Eq. 12's per-sample KL is this plus the mutual information between sample
      and scenario under a (mean_i KL(a_i || P) = I_a(X; C) + KL(abar || P)), so the marginal form keeps the
      scenarios in use at the prior's shares without charging an assignment for the information it carries.
    * ``prototype_init``: the paper does not say how Lambda starts. "random": N(0, 1) entries. "kmeans++": the
      first ``update_prototypes`` call first places them by k-means++ seeding on that batch's f_omega(x)
      (``kmeans_pp_seeds``), so that every prototype starts where the projected data is; a non-trainable flag
      records that it happened (saved with the weights). Under a distribution strategy the seeds come from the
      all-gathered global batch, with the same stateless draws on every replica.

    ``call(x, training)`` returns ``(a, q_soft, projected)``: [B, K], [B, K], [B, P].
    """

    SEED = 2023  # stateless seed of the k-means++ draws (the points differ from run to run, not this)

    def __init__(self, num_scenarios: int, projection_dim: int, assignment: str = "soft", temperature: float = 0.1,
                 momentum: float = 0.2, normalize_input: bool = True, prototype_init: str = "random", **kwargs):
        super().__init__(**kwargs)
        if int(num_scenarios) < 1 or int(projection_dim) < 1:
            raise ValueError(f"ScenarioLearner: num_scenarios and projection_dim must be >= 1, got "
                             f"{num_scenarios}, {projection_dim}")
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"ScenarioLearner: assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        if not temperature > 0:
            raise ValueError(f"ScenarioLearner: temperature must be > 0, got {temperature}")
        if prototype_init not in PROTOTYPE_INITS:
            raise ValueError(f"ScenarioLearner: prototype_init must be one of {PROTOTYPE_INITS}, got {prototype_init!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"ScenarioLearner: momentum (alpha) must be in [0, 1], got {momentum}")
        self.num_scenarios = int(num_scenarios)
        self.projection_dim = int(projection_dim)
        self.assignment = assignment
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.normalize_input = bool(normalize_input)
        self.prototype_init = prototype_init

    def build(self, input_shape):
        n = int(input_shape[-1])
        self.omega = self.add_weight(name="omega", shape=(n, self.projection_dim),
                                     initializer=keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(n)))
        self.prototypes = self.add_weight(name="prototypes", shape=(self.num_scenarios, self.projection_dim),
                                          initializer=keras.initializers.RandomNormal(stddev=1.0), trainable=False,
                                          aggregation=tf.VariableAggregation.MEAN)
        self.seeded = None
        if self.prototype_init == "kmeans++":
            self.seeded = self.add_weight(name="prototypes_seeded", shape=(), dtype=tf.bool, trainable=False,
                                          initializer="zeros", aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        super().build(input_shape)

    def project(self, x: tf.Tensor) -> tf.Tensor:
        """f_omega(x) [B, P] from x [B, N]."""
        x = tf.cast(x, tf.float32)
        if self.normalize_input:
            mean, var = tf.nn.moments(x, axes=[1], keepdims=True)
            x = (x - mean) * tf.math.rsqrt(var + 1e-6)
        return tf.matmul(x, self.omega)

    def distances(self, projected: tf.Tensor) -> tf.Tensor:
        """||f_omega(x) - c_k||^2 [B, K]."""
        c = tf.convert_to_tensor(self.prototypes)
        d = (tf.reduce_sum(tf.square(projected), 1, keepdims=True) - 2.0 * tf.matmul(projected, c, transpose_b=True)
             + tf.reduce_sum(tf.square(c), 1)[None, :])
        return tf.maximum(d, 0.0)

    def soft(self, projected: tf.Tensor) -> tf.Tensor:
        """Q_s(c | x) [B, K] (Eq. 3)."""
        return tf.nn.softmax(-self.distances(projected), axis=-1)

    def assign(self, projected: tf.Tensor, training=None):
        """(a, Q_s), both [B, K]: the assignment used by the prediction and the soft distribution."""
        logits = -self.distances(projected)
        q = tf.nn.softmax(logits, axis=-1)
        if self.assignment == "soft":
            return q, q
        if training:
            u = tf.random.uniform(tf.shape(logits), minval=1e-10, maxval=1.0)
            g = -tf.math.log(-tf.math.log(u))                                     # Gumbel(0, 1)
            return tf.nn.softmax((tf.nn.log_softmax(logits, axis=-1) + g) / self.temperature, axis=-1), q  # Eq. 7
        return tf.one_hot(tf.argmax(logits, axis=-1), self.num_scenarios, dtype=q.dtype), q              # Eq. 4

    def call(self, x: tf.Tensor, training=None):
        projected = self.project(x)
        a, q = self.assign(projected, training=training)
        return a, q, projected

    def prototype_targets(self, projected: tf.Tensor, a: tf.Tensor) -> tf.Tensor:
        """Per scenario the a-weighted batch mean of f_omega(x) [K, P] (the fraction in Eq. 14); a scenario
        with no mass in the batch keeps its prototype."""
        projected = tf.stop_gradient(projected)
        a = tf.stop_gradient(a)
        mass = tf.reduce_sum(a, axis=0)                                            # [K]
        means = tf.matmul(a, projected, transpose_a=True) / tf.maximum(mass, 1e-12)[:, None]
        return tf.where((mass > 1e-6)[:, None], means, tf.convert_to_tensor(self.prototypes))

    def seed_prototypes(self, projected: tf.Tensor):
        """With ``prototype_init='kmeans++'``: on the first call, Lambda <- k-means++ seeds of f_omega(x) [B, P]
        (a no-op afterwards, and always with "random"). Returns whether this call seeded."""
        if self.seeded is None:
            return tf.constant(False)
        # Unconditional assigns of selected values instead of a tf.cond around them: under a distribution
        # strategy a variable assign is a cross-replica synchronisation point, which may not sit inside a cond.
        # Every replica seeds from the global batch with the same stateless draws, so all replicas assign the
        # same seeds (the MEAN-aggregated prototypes then hold exactly them, as on one device).
        projected = tf.stop_gradient(projected)
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            projected = ctx.all_gather(projected, axis=0)
        done = tf.convert_to_tensor(self.seeded)
        seeds = kmeans_pp_seeds(projected, self.num_scenarios, seed=(self.SEED, 0))
        self.prototypes.assign(tf.where(done, tf.convert_to_tensor(self.prototypes), seeds))
        self.seeded.assign(tf.constant(True))
        return tf.logical_not(done)

    def update_prototypes(self, projected: tf.Tensor, a: tf.Tensor):
        """Eq. 14 in place; returns the assign op's value [K, P]."""
        target = self.prototype_targets(projected, a)
        return self.prototypes.assign((1.0 - self.momentum) * self.prototypes + self.momentum * target)

    @staticmethod
    def kl_to_uniform(a: tf.Tensor) -> tf.Tensor:
        """Eq. 12: mean_i sum_k a_ki (log a_ki + log K), with 0 log 0 = 0; a [B, K] -> scalar."""
        k = tf.cast(tf.shape(a)[-1], a.dtype)
        return tf.reduce_mean(tf.reduce_sum(tf.math.xlogy(a, a) + a * tf.math.log(k), axis=-1))

    @staticmethod
    def marginal_kl_to_uniform(a: tf.Tensor) -> tf.Tensor:
        """KL(abar || 1/K) of the batch's mean assignment abar = mean_i a_i; a [B, K] -> scalar (Eq. 12's sum for
        the single row abar)."""
        return ScenarioLearner.kl_to_uniform(tf.reduce_mean(a, axis=0, keepdims=True))

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_scenarios=self.num_scenarios, projection_dim=self.projection_dim, assignment=self.assignment,
                   temperature=self.temperature, momentum=self.momentum, normalize_input=self.normalize_input,
                   prototype_init=self.prototype_init)
        return cfg


@keras.utils.register_keras_serializable(package="rankline")
class ParallelMLP(keras.layers.Layer):
    """K independent ReLU MLPs over the same input, evaluated together (one einsum per layer).

    Input [B, N] -> output [B, K, output_units] (linear output; no activation). Head k is exactly
    ``MLP(hidden_units, output_units=output_units)`` with its own weights: kernels are stacked [K, in, out].
    """

    def __init__(self, heads: int, hidden_units: Sequence[int], output_units: int = 1, dropout: float = 0.0,
                 l2: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if int(heads) < 1 or int(output_units) < 1:
            raise ValueError(f"ParallelMLP: heads and output_units must be >= 1, got {heads}, {output_units}")
        self.heads = int(heads)
        self.hidden_units = [int(u) for u in hidden_units]
        self.output_units = int(output_units)
        self.dropout = float(dropout)
        self.l2 = float(l2)
        self._dropout = [FastDropout(self.dropout) for _ in self.hidden_units] if self.dropout else []

    def build(self, input_shape):
        reg = keras.regularizers.l2(self.l2) if self.l2 else None
        widths = [int(input_shape[-1])] + self.hidden_units + [self.output_units]
        self.kernels, self.biases = [], []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            name = "logit" if i == len(widths) - 2 else f"dense_{i}"
            limit = math.sqrt(6.0 / (w_in + w_out))  # Glorot-uniform of one head's [w_in, w_out] kernel
            self.kernels.append(self.add_weight(
                name=f"{name}_kernel", shape=(self.heads, w_in, w_out), regularizer=reg,
                initializer=keras.initializers.RandomUniform(-limit, limit)))
            self.biases.append(self.add_weight(name=f"{name}_bias", shape=(self.heads, w_out), initializer="zeros"))
        super().build(input_shape)

    def call(self, x: tf.Tensor, training=None) -> tf.Tensor:
        h = tf.einsum("bi,kio->bko", tf.cast(x, tf.float32), self.kernels[0]) + self.biases[0]
        for i in range(1, len(self.kernels)):
            h = tf.nn.relu(h)
            if self._dropout:
                h = self._dropout[i - 1](h, training=training)
            h = tf.einsum("bki,kio->bko", h, self.kernels[i]) + self.biases[i]
        return h

    def get_config(self):
        cfg = super().get_config()
        cfg.update(heads=self.heads, hidden_units=self.hidden_units, output_units=self.output_units,
                   dropout=self.dropout, l2=self.l2)
        return cfg


@keras.utils.register_keras_serializable(package="rankline")
class RepeatIntention(keras.layers.Layer):
    """One repeat-intention module per scenario (§3.2.2), all K evaluated together.

    * intention inference: p_r^k = sigma(MLP_k([p_u, B_u, o_u])) from user, history and context only;
    * repeat layer s_r^k = MLP_k([p_u, B_u, b_t, o_u]) and explore layer s_e^k = MLP_k(same): scores (logits);
    * Eq. 9: z_k = I[t in B_u] p_r^k s_r^k + (1 - I[t in B_u]) (1 - p_r^k) s_e^k (``combination='paper'``);
      ``combination='log_odds'`` takes Eq. 9's products in odds space instead,
      z_k = I[t in B_u] (log p_r^k + s_r^k) + (1 - I[t in B_u]) (log(1 - p_r^k) + s_e^k), i.e. the odds of a click
      are p_r e^{s_r} (repeat) or (1 - p_r) e^{s_e} (explore): the intention shifts the logit instead of scaling it.

    * ``scorers='separate'`` (the paper): s_r and s_e are two MLPs, each trained only on the impressions its
      indicator selects. ``'shared'``: one MLP per scenario with two outputs (s_r^k, s_e^k), so the hidden layers
      learn from every impression and only the output units are mode-specific.

    ``call(intention_x [B, Ni], sample_x [B, N], in_history [B, 1] or [B])`` returns a dict of [B, K] tensors
    ``p_r``, ``s_r``, ``s_e``, ``z``. With ``use_repeat=False`` (the "w/o M2" ablation) there is one scorer
    per scenario and z_k = s_k (``p_r`` is then absent).
    """

    COMBINATIONS = ("paper", "log_odds")
    SCORERS = ("separate", "shared")

    def __init__(self, num_scenarios: int, hidden_units: Sequence[int], dropout: float = 0.0, l2: float = 0.0,
                 use_repeat: bool = True, combination: str = "paper", scorers: str = "separate", **kwargs):
        super().__init__(**kwargs)
        if combination not in self.COMBINATIONS:
            raise ValueError(f"RepeatIntention: combination must be one of {self.COMBINATIONS}, got {combination!r}")
        if scorers not in self.SCORERS:
            raise ValueError(f"RepeatIntention: scorers must be one of {self.SCORERS}, got {scorers!r}")
        self.scorers = scorers
        self.combination = combination
        self.num_scenarios = int(num_scenarios)
        self.hidden_units = [int(u) for u in hidden_units]
        self.dropout = float(dropout)
        self.l2 = float(l2)
        self.use_repeat = bool(use_repeat)
        mlp = dict(heads=self.num_scenarios, hidden_units=self.hidden_units, dropout=self.dropout, l2=self.l2)
        if self.use_repeat:
            self.intention = ParallelMLP(**mlp, name="intention")
            if scorers == "shared":
                self.repeat_explore = ParallelMLP(**mlp, output_units=2, name="repeat_explore")
            else:
                self.repeat = ParallelMLP(**mlp, name="repeat")
                self.explore = ParallelMLP(**mlp, name="explore")
        else:
            self.scorer = ParallelMLP(**mlp, name="scorer")

    @staticmethod
    def combine(in_history: tf.Tensor, p_r: tf.Tensor, s_r: tf.Tensor, s_e: tf.Tensor,
                combination: str = "paper") -> tf.Tensor:
        """Eq. 9: in_history [B, 1] (0/1), p_r, s_r, s_e [B, K] -> z [B, K] (see the class docstring)."""
        i = tf.reshape(tf.cast(in_history, p_r.dtype), [-1, 1])
        if combination == "log_odds":
            eps = 1e-7
            return (i * (tf.math.log(tf.maximum(p_r, eps)) + s_r)
                    + (1.0 - i) * (tf.math.log(tf.maximum(1.0 - p_r, eps)) + s_e))
        return i * p_r * s_r + (1.0 - i) * (1.0 - p_r) * s_e

    def call(self, intention_x: tf.Tensor, sample_x: tf.Tensor, in_history: tf.Tensor, training=None) -> Dict:
        if not self.use_repeat:
            s = self.scorer(sample_x, training=training)[..., 0]
            return {"z": s}
        p_r = tf.sigmoid(self.intention(intention_x, training=training)[..., 0])
        if self.scorers == "shared":
            scores = self.repeat_explore(sample_x, training=training)                       # [B, K, 2]
            s_r, s_e = scores[..., 0], scores[..., 1]
        else:
            s_r = self.repeat(sample_x, training=training)[..., 0]
            s_e = self.explore(sample_x, training=training)[..., 0]
        return {"p_r": p_r, "s_r": s_r, "s_e": s_e,
                "z": self.combine(in_history, p_r, s_r, s_e, self.combination)}

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_scenarios=self.num_scenarios, hidden_units=self.hidden_units, dropout=self.dropout,
                   l2=self.l2, use_repeat=self.use_repeat, combination=self.combination, scorers=self.scorers)
        return cfg
