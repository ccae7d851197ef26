"""DCN's cross network from tensorflow-recommenders (``tfrs.layers.dcn.Cross``) on the project's tf_keras.

tensorflow-recommenders builds its layers on ``tf.keras``, which is tf_keras only while TF_USE_LEGACY_KERAS=1
(set by ``models.keras`` before anything resolves ``tf.keras``). The import below fails loudly if the Cross
layer ever comes out as a Keras 3 object, which would break saving and mixing with our layers.
"""
from __future__ import annotations

import tensorflow as tf

from models.keras import keras
from tensorflow_recommenders.layers.feature_interaction.dcn import Cross  # noqa: E402  (after models.keras)

if not issubclass(Cross, keras.layers.Layer):  # pragma: no cover - an environment problem, not a code path
    raise ImportError("tensorflow_recommenders' Cross is not a tf_keras layer; set TF_USE_LEGACY_KERAS=1 before "
                      "importing TensorFlow (import models.keras first)")


@keras.utils.register_keras_serializable(package="rankline")
class CrossNetwork(keras.layers.Layer):
    """A stack of DCN(-v2) cross layers: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, l = 0..L-1.

    Input x_0 [B, N] -> [B, N]. Each layer is a ``tfrs.layers.dcn.Cross`` (full rank unless
    ``projection_dim`` is set).
    """

    def __init__(self, num_layers: int = 3, projection_dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if int(num_layers) < 1:
            raise ValueError(f"CrossNetwork: num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)
        self.projection_dim = None if projection_dim is None else int(projection_dim)
        self._layers = [Cross(projection_dim=self.projection_dim, name=f"cross_{i}") for i in range(self.num_layers)]

    def call(self, x0: tf.Tensor) -> tf.Tensor:
        x = x0
        for layer in self._layers:
            x = layer(x0, x)
        return x

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_layers=self.num_layers, projection_dim=self.projection_dim)
        return cfg
