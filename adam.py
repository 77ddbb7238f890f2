"""Adam as the reference's tf.train.AdamOptimizer ran it: TensorFlow's fused update kernel."""

import keras
import tensorflow as tf


def reference_adam(**kwargs):
    """Keras' Adam whose update is TensorFlow's fused ResourceApplyAdam kernel, the one the
    reference's tf.train.AdamOptimizer ran. Keras 3 spells the update as some ten element-wise
    ops per variable, each a pass over the weights: at level 0 that is a few percent of the
    step on a CPU. Same formula (epsilon added to sqrt(v), the bias correction folded into
    the step size), same state variables, so checkpoints and resume are unchanged."""
    return ReferenceAdam(**kwargs)


class ReferenceAdam(keras.optimizers.Adam):
    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        var, m, v = (x.value if isinstance(x, keras.Variable) else x
                     for x in (variable, self._momentums[index], self._velocities[index]))
        dtype = var.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=tf.pow(beta_1, step),
                                     beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
                                     beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype),
                                     grad=tf.cast(gradient, dtype))
