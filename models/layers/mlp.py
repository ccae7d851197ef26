"""Feed-forward towers."""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from models.keras import keras


@keras.utils.register_keras_serializable(package="rankline")
class MLP(keras.layers.Layer):
    """ReLU MLP with dropout and an optional linear output unit (a logit).

    Input [B, N] -> output [B, hidden_units[-1]] or, with ``output_units``, [B, output_units] (no activation).
    This is the prediction network phi_k of ESM² Eq. 6 (the sigmoid is applied by the model).
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
        self._dropout = [keras.layers.Dropout(self.dropout) for _ in self.hidden_units] if self.dropout else []
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
