"""A training run's log holds no TensorFlow error lines.

With oneDNN (what train_model.py picks for batches of 2 or more on AVX2 CPUs), Grappler's
remapper fused a convolution, its bias and the leaky ReLU after it into one node, deleting the
add that the leaky ReLU's own gradient reads; it then rejected the pass and every level-0 run
printed "E0000 ... remapper failed: ... fanout '.../LeakyReluGrad' exist for missing node
'.../add'". model.leaky_relu's gradient reads the activation's output instead.

The line comes from TensorFlow's C++ logging at start-up settings the scripts use, and oneDNN is
chosen before TensorFlow starts: the step runs in a subprocess.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT

# One level-0 training step of the whole PyNET through the trainer's own step (Steps, the
# reference Adam, the level-0 loss without VGG), batch 2 of 32x32 packed crops.
LEVEL_0_STEP = """
import numpy as np, tensorflow as tf
import model
from adam import reference_adam
from steps import Steps
view = model.level_model(model.PyNET(init="he"), 0)
raw = tf.constant(np.random.RandomState(0).rand(2, 32, 32, 4).astype("float32"))
target = tf.constant(np.random.RandomState(1).rand(2, 64, 64, 3).astype("float32"))
optimizer = reference_adam(learning_rate=5e-5, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
steps = Steps(tf.distribute.get_strategy(), view, optimizer, 0, None, 2, 1)
loss, _ = steps.train_step(lambda: (raw, target))
print("step done", loss)
"""


@pytest.mark.slow
def test_a_level_0_training_step_with_onednn_prints_no_tensorflow_error():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", LEVEL_0_STEP], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "step done" in proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("E0000") or "remapper failed" in line]
    assert errors == []


def test_leaky_relu_and_its_gradient_are_tensorflows_bit_for_bit():
    """At 0, at signed zeros, at the smallest subnormals (where 0.2 x rounds to a signed zero)
    and on random values, in float32 and bfloat16."""
    import tensorflow as tf

    import model

    values = np.concatenate([np.array([0.0, -0.0, 1e-38, -1e-38, 1e-45, -1e-45, 3.0, -3.0], np.float32),
                             np.random.RandomState(0).standard_normal(1000).astype(np.float32)])
    upstream = np.random.RandomState(1).standard_normal(values.shape).astype(np.float32)
    for dtype in (tf.float32, tf.bfloat16):
        x, dy = tf.cast(values, dtype), tf.cast(upstream, dtype)
        results = []
        for fn in (model.leaky_relu, lambda t: tf.nn.leaky_relu(t, alpha=model.LEAKY_SLOPE)):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            grad = tape.gradient(y, x, output_gradients=dy)
            results.append((tf.cast(y, tf.float32).numpy(), tf.cast(grad, tf.float32).numpy()))
        (y_new, g_new), (y_ref, g_ref) = results
        np.testing.assert_array_equal(y_new, y_ref)
        np.testing.assert_array_equal(g_new, g_ref)
