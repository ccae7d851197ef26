"""Feed-forward towers."""
from __future__ import annotations

from typing import List, Sequence

import tensorflow as tf

from models.keras import keras
from models.layers.dropout import FastDropout, dropout16, keep_scale


@keras.utils.register_keras_serializable(package="rankline")
class MLP(keras.layers.Layer):
    """ReLU MLP with dropout and an optional linear output unit (a logit).

    Input [B, N] -> output [B, hidden_units[-1]] or, with ``output_units``, [B, output_units] (no activation).
    This is the prediction network phi_k of ESM² Eq. 6 (the sigmoid is applied by the model). Dropout after
    every hidden layer is ``FastDropout`` (Keras' inverted dropout at the same rate, half the random bits).
    """

    def __init__(self, hidden_units: Sequence[int], dropout: float = 0.0, output_units: int | None = None,
                 l2: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = [int(u) for u in hidden_units]
        self.dropout = float(dropout)
        self.output_units = None if output_units is None else int(output_units)
        self.l2 = float(l2)
        reg = keras.regularizers.l2(self.l2) if self.l2 else None
        self._dense = [keras.layers.Dense(u, activation="relu", kernel_regularizer=reg, name=f"dense_{i}")
                       for i, u in enumerate(self.hidden_units)]
        self._dropout = [FastDropout(self.dropout) for _ in self.hidden_units] if self.dropout else []
        self._out = (keras.layers.Dense(self.output_units, kernel_regularizer=reg, name="logit")
                     if self.output_units else None)

    def call(self, x: tf.Tensor, training=None) -> tf.Tensor:
        for i, dense in enumerate(self._dense):
            x = dense(x)
            if self._dropout:
                x = self._dropout[i](x, training=training)
        return self._out(x) if self._out is not None else x

    def get_config(self):
        cfg = super().get_config()
        cfg.update(hidden_units=self.hidden_units, dropout=self.dropout, output_units=self.output_units, l2=self.l2)
        return cfg


def _fusable(towers: Sequence[MLP]) -> bool:
    first = towers[0]
    return (len(towers) > 1 and all(t.built and t._dense and t._dense[0].built for t in towers)
            and all(type(t) is MLP and t.hidden_units == first.hidden_units and t.dropout == first.dropout
                    and t.output_units == first.output_units for t in towers))


def run_towers(towers: Sequence[MLP], x: tf.Tensor, training=None) -> List[tf.Tensor]:
    """``[tower(x) for tower in towers]`` computed as one fused network: T towers, each [B, N] -> [B, out].

    For T built ``MLP`` of the same widths and dropout: layer 1 is one matmul of x [B, N] with the towers'
    kernels concatenated [N, T*U1]; deeper layers are one batched matmul [T, B, U] @ [T, U, U'] with the kernels
    stacked [T, U, U']; one dropout draw covers all towers. The variables stay the towers' own (concatenated and
    stacked here, per call), so checkpoints, saved models and per-tower code read them as before; the result
    equals the per-tower computation up to float rounding and the dropout mask's random draw. Any other case
    (unbuilt, different shapes, a subclass) runs the towers one by one.
    """
    towers = list(towers)
    if not _fusable(towers):
        return [t(x, training=training) for t in towers]
    if training is None:
        training = keras.backend.learning_phase()
    first, n = towers[0], len(towers)
    rate = first.dropout

    # Dropout without its scale s = 1 / (1 - rate): s is folded into the next layer's kernel (s * W, [U, U']).
    def drop(h):
        return tf.__internal__.smart_cond.smart_cond(
            training, lambda: dropout16(h, rate, scale=False), lambda: h) if rate else h

    def scaled(kernel):
        if not rate:
            return kernel
        return tf.__internal__.smart_cond.smart_cond(
            training, lambda: kernel * tf.cast(keep_scale(rate), kernel.dtype), lambda: kernel)

    x = tf.cast(x, first._dense[0].kernel.dtype)
    kernel = tf.concat([t._dense[0].kernel for t in towers], axis=1)                     # [N, T*U1]
    bias = tf.concat([t._dense[0].bias for t in towers], axis=0)                         # [T*U1]
    h = drop(tf.nn.relu(tf.nn.bias_add(tf.matmul(x, kernel), bias)))                    # [B, T*U1]
    h = tf.transpose(tf.reshape(h, [-1, n, first.hidden_units[0]]), [1, 0, 2])          # [T, B, U1]
    layers = [[t._dense[i] for t in towers] for i in range(1, len(first._dense))]
    if first._out is not None:
        layers.append([t._out for t in towers])
    for i, dense in enumerate(layers):
        kernel = scaled(tf.stack([d.kernel for d in dense]))                             # [T, U, U']
        h = tf.matmul(h, kernel) + tf.stack([d.bias for d in dense])[:, None, :]         # [T, B, U']
        if i < len(first._dense) - 1:
            h = drop(tf.nn.relu(h))
    if first._out is None and rate:  # no output unit: the last hidden layer's scale is still due
        h = scaled(h)
    return tf.unstack(h, axis=0)                                                         # T x [B, out]
