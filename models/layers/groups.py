"""GPRec's group and individual user modelling layers (Wang et al., "GPRec: Bi-level User Modeling for Deep
Recommenders"; ../shared/papers/gprec-group-and-individual-user-modeling.txt).

Shapes: B batch, F_u user fields, D embedding size, G groups, R = dim(r_G) (G * D concatenated, D summed).

    GroupClassifier       Eq. 2      E_u [B, F_u * D] -> S [B, 2, G]; S[:, 0] = s^1 (in group), S[:, 1] = s^0.
    GumbelMask            Eqs. 3-4   S -> M [B, 2, G], M[:, 0] = m^1, M[:, 1] = m^0 = 1 - m^1 (noise: training).
    DualGroupEmbedding    Eqs. 5-6, 9  E_G = [p_1..p_G; n_1..n_G]; r_G = M (.) E_G, r_G^Con = (1 - M) (.) E_G.
    AuxiliaryTower        Eqs. 7, 10  f1 with a ``frozen`` forward pass (theta_1 fixed for L_G^Con).
    DynamicParameterTower Eqs. 15-16  f_y(r_b; theta_y + W_DP), W_DP = ReShape(f_DP(r_G, r_P)) (kernels and biases).
    cosine_similarity     Eq. 13     the orthogonal loss per example.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from models.keras import keras
from models.layers.mlp import MLP

EPSILON = 1e-7
GROUP_REDUCTIONS = ("concat", "sum")


@keras.utils.register_keras_serializable(package="rankline")
class GroupClassifier(keras.layers.Layer):
    """The learnable group classifier g(E_u; theta_g) of Eq. 2.

    Input: flattened user-field embeddings E_u [B, F_u * D]. Output: S [B, 2, G] where S[:, 0, i] = s_i^1 (the
    score for assigning the user to group i) and S[:, 1, i] = s_i^0 (for excluding them); each pair
    (s_i^1, s_i^0) is a softmax, so log s in Eq. 3 is defined.

    ``per_group=True``: one ReLU MLP ``hidden_units`` -> 2 per group (the paper's "[64, 32, 2] for each group",
    G times the cost). ``per_group=False``: one shared ReLU MLP ``hidden_units`` and a linear 2G head.
    """

    def __init__(self, num_groups: int, hidden_units: Sequence[int] = (64, 32), per_group: bool = False, **kwargs):
        super().__init__(**kwargs)
        if int(num_groups) < 1:
            raise ValueError(f"GroupClassifier: num_groups must be >= 1, got {num_groups}")
        self.num_groups = int(num_groups)
        self.hidden_units = [int(u) for u in hidden_units]
        self.per_group = bool(per_group)
        if not self.per_group:
            self._trunk = MLP(self.hidden_units, name="trunk") if self.hidden_units else None
            self._head = keras.layers.Dense(2 * self.num_groups, name="head")

    def build(self, input_shape):
        if self.per_group:
            G, units = self.num_groups, self.hidden_units + [2]
            fan_in = int(input_shape[-1])
            self._kernels, self._biases = [], []
            for i, u in enumerate(units):
                self._kernels.append(self.add_weight(
                    name=f"kernel_{i}", shape=(G, fan_in, u), initializer="glorot_uniform"))
                self._biases.append(self.add_weight(name=f"bias_{i}", shape=(G, u), initializer="zeros"))
                fan_in = u
        super().build(input_shape)

    def logits(self, e_u: tf.Tensor) -> tf.Tensor:
        """Unnormalised scores [B, 2, G] (row 0: in group, row 1: out of group)."""
        if self.per_group:
            h = tf.einsum("bi,gio->bgo", e_u, self._kernels[0]) + self._biases[0]
            for k, b in zip(self._kernels[1:], self._biases[1:]):
                h = tf.einsum("bgi,gio->bgo", tf.nn.relu(h), k) + b
            return tf.transpose(h, [0, 2, 1])  # [B, G, 2] -> [B, 2, G]
        h = self._trunk(e_u) if self._trunk is not None else e_u
        return tf.reshape(self._head(h), [-1, 2, self.num_groups])

    def call(self, e_u: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(self.logits(e_u), axis=1)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_groups=self.num_groups, hidden_units=self.hidden_units, per_group=self.per_group)
        return cfg


@keras.utils.register_keras_serializable(package="rankline")
class GumbelMask(keras.layers.Layer):
    """Binary-like group masks M from the scores S (Gumbel-softmax, Eqs. 3-4).

        m_i^1 = exp((log s_i^1 + gn^1) / tau) / (exp((log s_i^1 + gn^1) / tau) + exp((log s_i^0 + gn^0) / tau))
        m_i^0 = 1 - m_i^1,        gn^j = -log(-log u^j), u^j ~ Uniform(0, 1) i.i.d.

    Input S [B, 2, G]; output M [B, 2, G] with M[:, 0] = m^1, M[:, 1] = m^0. The Gumbel noise is drawn per
    example, group and j only when ``training`` (the paper: "not used during the inference").
    """

    def __init__(self, tau: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not float(tau) > 0:
            raise ValueError(f"GumbelMask: tau must be > 0, got {tau}")
        self.tau = float(tau)

    @staticmethod
    def gumbel_noise(shape) -> tf.Tensor:
        u = tf.random.uniform(shape, minval=EPSILON, maxval=1.0 - EPSILON)
        return -tf.math.log(-tf.math.log(u))

    def mask(self, scores: tf.Tensor, noise: tf.Tensor | None = None) -> tf.Tensor:
        """Eqs. 3-4 for given scores S [B, 2, G] and Gumbel noise gn [B, 2, G] (None: no noise)."""
        z = tf.math.log(tf.maximum(scores, EPSILON))
        if noise is not None:
            z = z + noise
        m1 = tf.sigmoid((z[:, 0] - z[:, 1]) / self.tau)  # the two-way softmax of Eq. 3
        return tf.stack([m1, 1.0 - m1], axis=1)

    def call(self, scores: tf.Tensor, training=None) -> tf.Tensor:
        if training:
            return self.mask(scores, self.gumbel_noise(tf.shape(scores)))
        return self.mask(scores)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(tau=self.tau)
        return cfg


@keras.utils.register_keras_serializable(package="rankline")
class DualGroupEmbedding(keras.layers.Layer):
    """The dual group embedding space E_G = [p_1..p_G; n_1..n_G] (Eq. 5) and r_G = M (.) E_G (Eq. 6).

    Input M [B, 2, G]; ``call`` gives r_G = [m_1^1 p_1 + m_1^0 n_1, ..., m_G^1 p_G + m_G^0 n_G], concatenated
    to [B, G * D] (``reduce='concat'``, Eq. 6) or summed over groups to [B, D] (``reduce='sum'``, the paper's
    alternative for large G). ``contrast`` gives r_G^Con = (1 - M) (.) E_G (Eq. 9).
    """

    def __init__(self, num_groups: int, dim: int, reduce: str = "concat", **kwargs):
        super().__init__(**kwargs)
        if reduce not in GROUP_REDUCTIONS:
            raise ValueError(f"DualGroupEmbedding: reduce must be one of {GROUP_REDUCTIONS}, got {reduce!r}")
        self.num_groups = int(num_groups)
        self.dim = int(dim)
        self.reduce = reduce
        self.positive = self.add_weight(name="positive", shape=(self.num_groups, self.dim),
                                        initializer="glorot_uniform")
        self.negative = self.add_weight(name="negative", shape=(self.num_groups, self.dim),
                                        initializer="glorot_uniform")

    @property
    def output_dim(self) -> int:
        return self.num_groups * self.dim if self.reduce == "concat" else self.dim

    def patterns(self, masks: tf.Tensor) -> tf.Tensor:
        """[B, G, D]: the per-group patterns m_i^1 p_i + m_i^0 n_i."""
        return masks[:, 0, :, None] * self.positive + masks[:, 1, :, None] * self.negative

    def _reduce(self, patterns: tf.Tensor) -> tf.Tensor:
        if self.reduce == "sum":
            return tf.reduce_sum(patterns, axis=1)
        return tf.reshape(patterns, [-1, self.num_groups * self.dim])

    def call(self, masks: tf.Tensor) -> tf.Tensor:
        return self._reduce(self.patterns(masks))

    def contrast(self, masks: tf.Tensor) -> tf.Tensor:
        """r_G^Con = (1 - M) (.) E_G (Eq. 9): every group takes the embedding of the other side."""
        return self._reduce(self.patterns(1.0 - masks))

    def pair_cosine(self) -> tf.Tensor:
        """[G]: cos(p_i, n_i), the diagonal the paper's Fig. 4 expects to be low."""
        p = tf.math.l2_normalize(self.positive, axis=1)
        n = tf.math.l2_normalize(self.negative, axis=1)
        return tf.reduce_sum(p * n, axis=1)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_groups=self.num_groups, dim=self.dim, reduce=self.reduce)
        return cfg


@keras.utils.register_keras_serializable(package="rankline")
class AuxiliaryTower(MLP):
    """f1 of Eqs. 7 and 10: an MLP with a logit unit and a second, ``frozen`` forward pass.

    ``call(x)`` is the ordinary MLP (y^_1 = sigmoid(f1(r_G, E_v)), Eq. 7). ``frozen(x)`` computes the same
    function with theta_1 behind ``tf.stop_gradient`` (Eq. 10, "f1 ... with theta_1 fixed"): a loss on its
    output sends gradients to the input (r_G^Con, hence E_G and g), never to f1's weights.
    """

    def frozen(self, x: tf.Tensor, training=None) -> tf.Tensor:
        for i, dense in enumerate(self._dense):
            x = tf.nn.relu(tf.matmul(x, tf.stop_gradient(dense.kernel)) + tf.stop_gradient(dense.bias))
            if self._dropout and training:
                x = tf.nn.dropout(x, rate=self.dropout)
        out = self._out
        return tf.matmul(x, tf.stop_gradient(out.kernel)) + tf.stop_gradient(out.bias)


@keras.utils.register_keras_serializable(package="rankline")
class DynamicParameterTower(keras.layers.Layer):
    """The dynamic parameter strategy (Eqs. 15-16): a ReLU MLP f_y whose parameters are theta_y + W_DP.

        W_DP = ReShape(f_DP(r_G, r_P; theta_DP))                        (Eq. 15)
        y^   = f_y(r_b; theta_y + W_DP)                                 (Eq. 16)

    theta_y is "the trainable parameter of f_y" (the paper, after Eq. 14): kernels and biases. W_DP is added to
    theta_y, so it has theta_y's shape and offsets both: layer l of f_y computes
    x (K_l + dK_l) + (b_l + db_l) with dK_l [B, n_in, n_out] and db_l [B, n_out] taken from W_DP.

    Inputs ``[r_b, c]``: r_b [B, N] the backbone representation, c [B, C] = [r_G, r_P]. f_DP (a ReLU MLP
    ``generator_units`` and a linear layer ``w_dp``) maps c to one flat vector per example [B, P],
    P = sum_l (n_in_l * n_out_l + n_out_l), laid out per layer as [dK_l (row-major), db_l]. f_y has the hidden
    layers ``hidden_units`` and one logit unit. Output: the logit [B, 1].
    """

    def __init__(self, hidden_units: Sequence[int], generator_units: Sequence[int] = (64,), **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = [int(u) for u in hidden_units]
        self.generator_units = [int(u) for u in generator_units]
        self._generator = MLP(self.generator_units, name="f_dp") if self.generator_units else None

    def build(self, input_shape):
        fan_in = int(input_shape[0][-1])
        self._shapes, self._kernels, self._biases = [], [], []
        for i, u in enumerate(self.hidden_units + [1]):
            self._shapes.append((fan_in, u))
            self._kernels.append(self.add_weight(name=f"kernel_{i}", shape=(fan_in, u), initializer="glorot_uniform"))
            self._biases.append(self.add_weight(name=f"bias_{i}", shape=(u,), initializer="zeros"))
            fan_in = u
        self._projection = keras.layers.Dense(sum(a * b + b for a, b in self._shapes), name="w_dp")
        super().build(input_shape)

    def offsets(self, c: tf.Tensor):
        """W_DP (Eq. 15): one (dK [B, n_in, n_out], db [B, n_out]) pair per layer of f_y."""
        h = self._generator(c) if self._generator is not None else c
        flat = self._projection(h)
        parts = tf.split(flat, [a * b + b for a, b in self._shapes], axis=1)
        return [(tf.reshape(part[:, :a * b], [-1, a, b]), part[:, a * b:]) for part, (a, b) in zip(parts, self._shapes)]

    def call(self, inputs) -> tf.Tensor:
        x, c = inputs
        last = len(self._kernels) - 1
        for i, (k, b, (dk, db)) in enumerate(zip(self._kernels, self._biases, self.offsets(c))):
            x = tf.einsum("bi,bio->bo", x, k + dk) + (b + db)  # Eq. 16: theta_y + W_DP, kernels and biases
            if i < last:
                x = tf.nn.relu(x)
        return x

    def get_config(self):
        cfg = super().get_config()
        cfg.update(hidden_units=self.hidden_units, generator_units=self.generator_units)
        return cfg


def cosine_similarity(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Eq. 13 per example: (a . b) / (||a||_2 ||b||_2) for a, b [B, R] -> [B]."""
    dot = tf.reduce_sum(a * b, axis=1)
    norms = tf.norm(a, axis=1) * tf.norm(b, axis=1)
    return dot / tf.maximum(norms, EPSILON)
