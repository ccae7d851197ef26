"""AutoInt: multi-head self-attention over field embeddings (Song et al., CIKM 2019, the USSR paper's ref. [36]).

Used as the feature-interaction encoder of USSR (§3.2, "we utilize AutoInt as the encoder") and of the plain
``autoint`` baseline. Shapes: B batch, F fields, D embedding width, H heads, d' = ``head_units``.
"""
from __future__ import annotations

import tensorflow as tf

from models.keras import keras


@keras.utils.register_keras_serializable(package="rankline")
class NumericFieldEmbedding(keras.layers.Layer):
    """AutoInt's numeric fields: e_m = v_m * x_m, one learned D-vector v_m per numeric input.

    Input [B, N] (already transformed values) -> output [B, N, D], to be stacked with the categorical fields.
    """

    def __init__(self, num_fields: int, embedding_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_fields = int(num_fields)
        self.embedding_dim = int(embedding_dim)
        self.vectors = self.add_weight(name="vectors", shape=(self.num_fields, self.embedding_dim),
                                       initializer=keras.initializers.RandomNormal(stddev=0.05))

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return x[:, :, None] * self.vectors[None, :, :]

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_fields=self.num_fields, embedding_dim=self.embedding_dim)
        return cfg


@keras.utils.register_keras_serializable(package="rankline")
class AutoIntEncoder(keras.layers.Layer):
    """``num_layers`` interacting layers (AutoInt Eqs. 5-8), the output flattened.

    One layer, for every head h and field m:
        alpha_{m,k}^h = softmax_k( <W_Q^h e_m, W_K^h e_k> )                     (Eqs. 5-6)
        e~_m^h       = sum_k alpha_{m,k}^h W_V^h e_k                            (Eq. 6)
        e~_m         = e~_m^1 || ... || e~_m^H                                  (Eq. 7)
        e_m^Res      = ReLU(e~_m + W_Res e_m)                                   (Eq. 8)
    Input [B, F, D] -> ``call`` output [B, F * H * d'] (the concatenated e^Res of the last layer, Eq. 9's input);
    ``fields(x)`` gives the [B, F, H * d'] stack. Dot products are unscaled, as in the paper.
    """

    def __init__(self, num_layers: int = 2, num_heads: int = 2, head_units: int = 16, use_residual: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.head_units = int(head_units)
        self.use_residual = bool(use_residual)
        width = self.num_heads * self.head_units
        dense = lambda n: keras.layers.Dense(width, use_bias=False, name=n)  # noqa: E731
        self._q = [dense(f"query_{i}") for i in range(self.num_layers)]
        self._k = [dense(f"key_{i}") for i in range(self.num_layers)]
        self._v = [dense(f"value_{i}") for i in range(self.num_layers)]
        self._res = [dense(f"residual_{i}") for i in range(self.num_layers)] if self.use_residual else []

    def _split(self, x: tf.Tensor) -> tf.Tensor:
        """[B, F, H * d'] -> [B, H, F, d']."""
        shape = tf.shape(x)
        x = tf.reshape(x, [shape[0], shape[1], self.num_heads, self.head_units])
        return tf.transpose(x, [0, 2, 1, 3])

    def attention(self, x: tf.Tensor, layer: int = 0) -> tf.Tensor:
        """alpha [B, H, F, F] of layer ``layer`` on its input x [B, F, D_in] (rows sum to 1)."""
        q, k = self._split(self._q[layer](x)), self._split(self._k[layer](x))
        return tf.nn.softmax(tf.matmul(q, k, transpose_b=True), axis=-1)

    def fields(self, x: tf.Tensor) -> tf.Tensor:
        for i in range(self.num_layers):
            alpha = self.attention(x, i)
            v = self._split(self._v[i](x))
            out = tf.matmul(alpha, v)                                       # [B, H, F, d']
            shape = tf.shape(out)
            out = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [shape[0], shape[2], self.num_heads * self.head_units])
            if self.use_residual:
                out = out + self._res[i](x)
            x = tf.nn.relu(out)
        return x

    def call(self, x: tf.Tensor) -> tf.Tensor:
        out = self.fields(x)
        return tf.reshape(out, [-1, out.shape[1] * self.num_heads * self.head_units])

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_layers=self.num_layers, num_heads=self.num_heads, head_units=self.head_units,
                   use_residual=self.use_residual)
        return cfg
