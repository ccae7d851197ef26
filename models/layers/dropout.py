"""Dropout with half the random draws of ``keras.layers.Dropout``: two 16-bit uniforms per Philox uint32.

Keras' Dropout (``tf.nn.dropout``) draws one float32 uniform (one 32-bit Philox output) per unit, then compares,
scales and selects. Here one uint32 of ``stateless_uniform`` (full range, a fresh seed per call from the stateful
generator, so masks differ between steps and follow ``keras.utils.set_random_seed``) is bitcast into two
uint16 u ~ U{0..65535}; a unit is kept when u >= t with t = round(rate * 65536), so

    P(keep) = 1 - t / 65536 = 1 - rate_eff,   |rate_eff - rate| <= 2**-17,
    y = x * keep / (1 - rate_eff)   (training),   y = x   (inference),

hence E[y] = x and dy/dx = keep / (1 - rate_eff), as for inverted dropout with rate ``rate_eff``.
"""
from __future__ import annotations

import tensorflow as tf

from models.keras import keras

_LEVELS = 65536  # a 16-bit uniform


def keep_threshold(rate: float) -> int:
    """t such that u >= t, u ~ U{0..65535}, keeps a unit with probability 1 - t / 65536."""
    return int(round(float(rate) * _LEVELS))


def keep_scale(rate: float) -> float:
    """1 / (1 - rate_eff), the factor that keeps E[y] = x."""
    return _LEVELS / (_LEVELS - keep_threshold(rate))


def dropout16(x: tf.Tensor, rate: float, seed=None, scale: bool = True) -> tf.Tensor:
    """Inverted dropout of ``x`` (any shape, float) with 16-bit uniforms; ``seed`` a [2] int32 (None: drawn).

    ``scale=False`` returns the masked ``x`` without the factor ``keep_scale(rate)``, for a caller that folds
    it into the next linear map (mask(x) * s @ W = mask(x) @ (s * W), one [U, U'] product instead of [B, U])."""
    t = keep_threshold(rate)
    if t == 0:
        return x
    n = tf.size(x)
    if seed is None:
        seed = tf.random.uniform([2], minval=-2 ** 31, maxval=2 ** 31 - 1, dtype=tf.int32)
    bits = tf.random.stateless_uniform([(n + 1) // 2], seed, minval=None, maxval=None, dtype=tf.uint32)
    u = tf.reshape(tf.bitcast(bits, tf.uint16), [-1])[:n]                      # [2 * ceil(n/2)] -> [n]
    # The mask as 0/1 factors: one multiply forward and one backward (a select needs a zeros tensor each way).
    # Equal to selecting x or 0 for finite x (a dropped negative x gives -0.0).
    keep = tf.reshape(u >= tf.constant(t, tf.uint16), tf.shape(x))
    if not scale:
        return x * tf.cast(keep, x.dtype)
    return x * tf.where(keep, tf.constant(keep_scale(rate), x.dtype), tf.constant(0, x.dtype))


@keras.utils.register_keras_serializable(package="rankline")
class FastDropout(keras.layers.Dropout):
    """``keras.layers.Dropout(rate)`` (no noise_shape) with 16-bit draws: same rate to 2**-17, half the random bits.

    Input and output any shape. A subclass of Keras' Dropout with no variables, so code that looks for Dropout
    layers finds it and checkpoints of models built with Keras' Dropout restore unchanged.
    """

    def __init__(self, rate: float, **kwargs):
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"FastDropout.rate must be in [0, 1), got {rate}")
        if kwargs.get("noise_shape") is not None:
            raise ValueError("FastDropout.noise_shape is not supported (one draw per unit)")
        super().__init__(float(rate), **kwargs)

    def call(self, x: tf.Tensor, training=None) -> tf.Tensor:
        if training is None:
            training = keras.backend.learning_phase()
        return tf.__internal__.smart_cond.smart_cond(
            training, lambda: dropout16(x, self.rate), lambda: tf.identity(x))
