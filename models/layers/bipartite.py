"""USSR's segmentation-specific representation (§3.3): bipartite neural interaction between K cluster
representations z_k and M segment embeddings u_m (paper: ../shared/papers/ussr-user-segmentation-bipartite-
interaction.txt, Eqs. 4-6).

Shapes: B batch, K clusters, M segments, Z latent width, Du segment-embedding width, H = ``units``.
"""
from __future__ import annotations

import tensorflow as tf

from models.keras import keras
from models.layers.mlp import MLP


@keras.utils.register_keras_serializable(package="rankline")
class SegmentEmbedding(keras.layers.Layer):
    """Segment-specific features u_m: a learned table [M, Du] (``params()``; ``call`` returns the same).

    A segment added later (§3.4) gets its own ``SegmentEmbedding(1, Du)`` so the old rows stay untouched.
    """

    def __init__(self, num_segments: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_segments = int(num_segments)
        self.dim = int(dim)
        self.table = self.add_weight(name="table", shape=(self.num_segments, self.dim),
                                     initializer=keras.initializers.RandomNormal(stddev=0.1))

    def params(self) -> tf.Tensor:
        return tf.identity(self.table)

    def call(self, inputs=None):
        return self.params()

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_segments=self.num_segments, dim=self.dim)
        return cfg


def _pairs(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """All (k, m) concatenations a_k || b_m: a [B, K, P], b [B, M, Q] (or [M, Q]) -> [B, K, M, P + Q]."""
    if b.shape.rank == 2:
        b = tf.broadcast_to(b[None], [tf.shape(a)[0], tf.shape(b)[0], tf.shape(b)[1]])
    k, m = tf.shape(a)[1], tf.shape(b)[1]
    a4 = tf.broadcast_to(a[:, :, None, :], [tf.shape(a)[0], k, m, tf.shape(a)[2]])
    b4 = tf.broadcast_to(b[:, None, :, :], [tf.shape(b)[0], k, m, tf.shape(b)[2]])
    return tf.concat([a4, b4], axis=-1)


@keras.utils.register_keras_serializable(package="rankline")
class BipartiteInteraction(keras.layers.Layer):
    """Eqs. 4-6 on the complete bipartite graph clusters x segments.

        h1_{k,m}   = f_e(z_k || u_m)                                            (Eq. 4)  [B, K, M, H]
        h2_k^{,M}  = f_v(sum_m h1_{k,m}),  h2_m^{,K} = f_v(sum_k h1_{k,m})      (Eq. 5)  [B, K, H], [B, M, H]
        e_{k,m}    = softmax_k( f_s(h2_k || h2_m) )                             (Eq. 6)  [B, K, M]
        h^_m       = sum_k e_{k,m} f^_e(z_k || u_m)                             (Eq. 6)  [B, M, H]

    f_e (edge encoder), f_v (one vertex encoder shared by both sides, as Eq. 5 writes it) and f^_e (edge
    decoder) are ReLU MLPs of width H. The paper scores edges with "the edge encoder again"; since f_e's output
    is H-wide, the edge score is a separate MLP f_s ending in one logit. The softmax runs over the clusters k,
    so each segment's weights e_{., m} sum to 1 (a segment draws on a sparse mix of clusters).

    ``call(z, u)``: z [B, K, Z], u [M, Du] -> h^ [B, M, H]; ``interaction(z, u)`` returns every intermediate.
    Nothing is sized by K or M, so the same layer serves a model that grows clusters or segments (§3.4).
    """

    def __init__(self, units: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.edge_encoder = MLP([self.units, self.units], name="edge_encoder")      # f_e
        self.vertex_encoder = MLP([self.units], name="vertex_encoder")             # f_v
        self.edge_scorer = MLP([self.units], output_units=1, name="edge_scorer")   # f_s
        self.edge_decoder = MLP([self.units, self.units], name="edge_decoder")     # f^_e

    def interaction(self, z: tf.Tensor, u: tf.Tensor):
        """dict: h1 [B,K,M,H], h2_k [B,K,H], h2_m [B,M,H], edge_logits / e [B,K,M], h_hat [B,M,H]."""
        zu = _pairs(z, u)
        h1 = self.edge_encoder(zu)
        h2_k = self.vertex_encoder(tf.reduce_sum(h1, axis=2))
        h2_m = self.vertex_encoder(tf.reduce_sum(h1, axis=1))
        logits = tf.squeeze(self.edge_scorer(_pairs(h2_k, h2_m)), axis=-1)
        e = tf.nn.softmax(logits, axis=1)
        h_hat = tf.reduce_sum(e[..., None] * self.edge_decoder(zu), axis=1)
        return {"h1": h1, "h2_k": h2_k, "h2_m": h2_m, "edge_logits": logits, "e": e, "h_hat": h_hat}

    def call(self, z: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
        return self.interaction(z, u)["h_hat"]

    def get_config(self):
        cfg = super().get_config()
        cfg.update(units=self.units)
        return cfg
