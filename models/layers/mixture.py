"""USSR's universal representation (§3.2): a mixture-of-Gaussians latent space learned through an information
bottleneck (paper: ../shared/papers/ussr-user-segmentation-bipartite-interaction.txt).

    q(c | x)            cluster posterior over K clusters (a softmax; the model owns its MLP);
    q(z | x, c = k)     one diagonal Gaussian head per cluster, ``GaussianHeads``;
    p(z | c = k)        a learnable Gaussian prior per cluster, ``GaussianPrior``;
    z~_k                reparameterised sample mu_k + sigma_k * eps (training only), ``reparameterize``;
    Eq. 3 KL terms      ``gaussian_kl`` (closed form) and ``categorical_kl``.

Shapes: B batch, K clusters, Z latent width. Variances are parameterised by their log (``logvar``).
"""
from __future__ import annotations

import tensorflow as tf

from models.keras import keras

LOGVAR_RANGE = (-10.0, 10.0)  # clip of predicted log-variances (exp stays finite in float32)


def gaussian_kl(mu_q: tf.Tensor, logvar_q: tf.Tensor, mu_p: tf.Tensor, logvar_p: tf.Tensor) -> tf.Tensor:
    """KL(N(mu_q, diag e^logvar_q) || N(mu_p, diag e^logvar_p)), summed over the last axis (Z).

    Per dimension: 1/2 [ logvar_p - logvar_q + (e^logvar_q + (mu_q - mu_p)^2) / e^logvar_p - 1 ].
    Inputs broadcast (e.g. [B, K, Z] against [K, Z]) -> [B, K].
    """
    return 0.5 * tf.reduce_sum(
        logvar_p - logvar_q + (tf.exp(logvar_q) + tf.square(mu_q - mu_p)) * tf.exp(-logvar_p) - 1.0, axis=-1)


def categorical_kl(logits_q: tf.Tensor, log_p: tf.Tensor) -> tf.Tensor:
    """KL(q(c|x) || p(c)) = sum_k q_k (log q_k - log p_k) with q = softmax(logits_q) [B, K], log p [K] -> [B]."""
    log_q = tf.nn.log_softmax(logits_q, axis=-1)
    return tf.reduce_sum(tf.exp(log_q) * (log_q - log_p), axis=-1)


def reparameterize(mu: tf.Tensor, logvar: tf.Tensor, training) -> tf.Tensor:
    """z~ = mu + exp(logvar / 2) * eps, eps ~ N(0, I), in training; the mean mu otherwise (serving is noise-free)."""
    if not training:
        return mu
    return mu + tf.exp(0.5 * logvar) * tf.random.normal(tf.shape(mu))


@keras.utils.register_keras_serializable(package="rankline")
class GaussianHeads(keras.layers.Layer):
    """q(z | x, c = k) for ``num_clusters`` clusters: one linear Gaussian head each on the encoder output h.

    Input h [B, N] -> (mu [B, K, Z], logvar [B, K, Z]); logvar clipped to ``LOGVAR_RANGE``. The K heads share
    one kernel [N, K * 2Z] (head k owns columns k*2Z .. (k+1)*2Z - 1), so an expansion adds a separate
    ``GaussianHeads(1, Z)`` block rather than resizing this one.
    """

    def __init__(self, num_clusters: int, latent_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_clusters = int(num_clusters)
        self.latent_dim = int(latent_dim)
        self.dense = keras.layers.Dense(self.num_clusters * 2 * self.latent_dim, name="heads")

    def call(self, h: tf.Tensor):
        out = tf.reshape(self.dense(h), [-1, self.num_clusters, 2, self.latent_dim])
        mu, logvar = out[:, :, 0, :], out[:, :, 1, :]
        return mu, tf.clip_by_value(logvar, *LOGVAR_RANGE)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_clusters=self.num_clusters, latent_dim=self.latent_dim)
        return cfg


@keras.utils.register_keras_serializable(package="rankline")
class GaussianPrior(keras.layers.Layer):
    """Learnable priors p(z | c = k) = N(mu_z(k), diag e^logvar_z(k)) for ``num_clusters`` clusters.

    ``params()`` -> (mu [K, Z], logvar [K, Z]) (``call`` ignores its input and returns the same). Means start apart (N(0, 1) draws) so the clusters differ, log
    variances at 0 (unit variance).
    """

    def __init__(self, num_clusters: int, latent_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_clusters = int(num_clusters)
        self.latent_dim = int(latent_dim)
        self.mu = self.add_weight(name="mu", shape=(self.num_clusters, self.latent_dim),
                                  initializer=keras.initializers.RandomNormal(stddev=1.0))
        self.logvar = self.add_weight(name="logvar", shape=(self.num_clusters, self.latent_dim),
                                      initializer="zeros")

    def params(self):
        return tf.identity(self.mu), tf.clip_by_value(self.logvar, *LOGVAR_RANGE)

    def call(self, inputs=None):
        return self.params()

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_clusters=self.num_clusters, latent_dim=self.latent_dim)
        return cfg
