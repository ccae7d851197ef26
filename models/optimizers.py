"""Adam with the update of each variable as one fused kernel (``ResourceApplyAdam``) instead of ~10 ops."""
from __future__ import annotations

import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from models.keras import keras


@keras.utils.register_keras_serializable(package="rankline")
class FusedAdam(keras.optimizers.Adam):
    """``keras.optimizers.Adam`` (same slots m, v, same config) whose update is TF's fused ``ResourceApplyAdam``.

    Same equations (Kingma & Ba, Algorithm 1 with the bias correction in the step size), t = iterations + 1:
        m <- m + (g - m)(1 - b1),  v <- v + (g^2 - v)(1 - b2),
        var <- var - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon).
    Keras applies them as ~10 separate ops over each variable; the fused kernel makes one pass. Sparse
    (embedding) gradients are summed into their dense form first (duplicate ids added): Keras' own sparse path
    also decays m and v of every row, so the update is the same. amsgrad, adaptive_epsilon and variables that are not
    plain resource variables fall back to Keras' update.
    """

    def _deduplicate_sparse_grad(self, grads):
        """Sparse gradients are left as they come: the fused update sums one straight into its dense form (one
        segment sum; duplicate ids add up as Keras' deduplication adds them), so Keras' unique + segment-sum pass
        over every embedding gradient would be wasted. The fallback update deduplicates its own."""
        return list(grads)

    def _internal_apply_gradients(self, grads_and_vars):
        """Without a distribution strategy: the step's scalars (beta powers, learning rate, ...) are computed once
        for all variables instead of once per variable (~7 ops each, ~50 variables in a default model). Under a
        strategy the updates run in a cross-replica merge, which must not see one replica's tensors."""
        if self.jit_compile or tf.distribute.has_strategy():
            return super()._internal_apply_gradients(grads_and_vars)
        self._step_scalars = self._scalars(tf.float32)
        try:
            return super()._internal_apply_gradients(grads_and_vars)
        finally:
            self._step_scalars = None

    def _scalars(self, dtype):
        """(beta1^t, beta2^t, lr, beta1, beta2, epsilon) as ``dtype``, t = iterations + 1."""
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        return (tf.pow(beta_1, local_step), tf.pow(beta_2, local_step), tf.cast(self.learning_rate, dtype), beta_1,
                beta_2, tf.cast(self.epsilon, dtype))

    def update_step(self, gradient, variable):
        if (self.amsgrad or self.adaptive_epsilon or not resource_variable_ops.is_resource_variable(variable)
                or not hasattr(variable, "handle")):
            if isinstance(gradient, tf.IndexedSlices):
                gradient = super()._deduplicate_sparse_grad([gradient])[0]
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        scalars = getattr(self, "_step_scalars", None)
        if scalars is None or scalars[0].dtype != dtype:
            scalars = self._scalars(dtype)
        beta1_power, beta2_power, lr, beta_1, beta_2, epsilon = scalars
        key = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[key], self._velocities[key]
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.math.unsorted_segment_sum(gradient.values, gradient.indices, gradient.dense_shape[0])
        return tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.handle, v=v.handle, beta1_power=beta1_power, beta2_power=beta2_power, lr=lr,
            beta1=beta_1, beta2=beta_2, epsilon=epsilon, grad=gradient, use_locking=False)
