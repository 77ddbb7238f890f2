"""PyNET (Ignatov, Van Gool, Timofte, CVPRW 2020) as a Keras 3 model.

The graph is built level by level as in the paper's figure: a shared encoder
(conv_lX_d1 + max-pools), then levels 5 (1/16 of the packed input) up to 1 (packed
resolution) and level 0 (the full mosaic resolution). Names, order of creation and
every variable follow the reference TF1 code, so its checkpoints load by position
(checkpoints.py maps the variables to the reference's keys).

    model = PyNET()                  # all levels; outputs [l0, l1, l2, l3, l4, l5]
    model = PyNET(level=3)           # only what level 3 needs; outputs [l3, l4, l5]
    view = level_model(model, 2)     # one output, sharing model's variables

Input: packed Bayer [B, Gb, R, Gr] (camera.extract_bayer_channels), shape
(batch, H, W, 4) with H and W multiples of 16. Output of level L: (H, W) * 2 / 2**L.
"""

import keras
import tensorflow as tf
from keras import ops

import utils

PARAMETER_COUNT = 47_548_170
LEAKY_SLOPE = 0.2
IN_EPSILON = 1e-3

# The reference seeds every op with 1 and sets no graph seed, so all weights of one shape
# start identical (e.g. conv_t4a == conv_t4b). A fixed-seed Keras initializer behaves the same.
_KERNEL_INIT = keras.initializers.TruncatedNormal(stddev=0.01, seed=1)
_BIAS_INIT = keras.initializers.Constant(0.01)

# PyNET(init="he"), not the reference's: He-normal kernels and zero biases for the hidden and
# transposed convolutions, the reference's small weights for the output heads. From the
# reference's N(0, 0.01) the signal through level 1 (no instance norm) starts near zero, so
# the output starts grey and hundreds of steps pass before it carries the picture; the quick
# start, with minutes to train, starts from He instead (README, "Quick start"). Seeded like
# the reference's, so again all weights of one shape start identical.
INITS = utils.INITS
_HE_KERNEL_INIT = keras.initializers.HeNormal(seed=1)

# PyNET(precision=): the Keras dtype policy of its layers. Variables stay float32 in every
# precision, so checkpoints are the same; "bf16" and "fp16" compute in bfloat16 / float16, but
# for the instance-norm statistics and normalisation and the output heads, which stay float32
# (ConvLayer, OutputHead).
POLICIES = {name: policy for name, policy in zip(utils.PRECISIONS, ("float32", "mixed_bfloat16", "mixed_float16"))}

# What the PyNET being built takes (its layers are made and built inside PyNET()).
_building = {"init": "reference", "dtype": "float32"}


def _initializers(layer):
    """(kernel, bias) initializers for a layer built now."""
    if _building["init"] == "he" and not isinstance(layer, OutputHead):
        return _HE_KERNEL_INIT, "zeros"
    return _KERNEL_INIT, _BIAS_INIT


def reduced(layer) -> bool:
    """Whether ``layer`` computes in bfloat16 or float16."""
    return layer.compute_dtype != "float32"


# ---------------------------------------------------------------------------------------
# primitives

class ConvLayer(keras.layers.Layer):
    """Convolution (zero 'same' padding, stride 1) + bias, then optional instance norm, then
    optional leaky ReLU 0.2. The bias is kept before instance norm, where it has no effect,
    because the reference checkpoint stores it; in reduced precision it is left out there
    (instance norm removes it exactly, and in bfloat16 it would round away the signal)."""

    def __init__(self, filters, kernel_size, instance_norm=False, relu=True, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.instance_norm = instance_norm
        self.relu = relu

    def build(self, input_shape):
        k, cin = self.kernel_size, input_shape[-1]
        kernel_init, bias_init = _initializers(self)
        self.kernel = self.add_weight(name="kernel", shape=(k, k, cin, self.filters), initializer=kernel_init)
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer=bias_init)
        if self.instance_norm:
            # read as float32 in a reduced-precision layer too: the normalisation runs in float32
            self.shift = self.add_weight(name="shift", shape=(self.filters,), initializer="zeros", autocast=False)
            self.scale = self.add_weight(name="scale", shape=(self.filters,), initializer="ones", autocast=False)

    def call(self, x):
        x = ops.conv(x, self.kernel, strides=1, padding="same")
        if not (self.instance_norm and reduced(self)):
            x = x + self.bias
        if self.instance_norm:
            x = instance_norm(x, self.shift, self.scale)
        if self.relu:
            x = leaky_relu(x)
        return x

    def tf1_variables(self):
        """This layer's variables in the reference's creation order: W, b[, shift, scale]."""
        return [self.kernel, self.bias] + ([self.shift, self.scale] if self.instance_norm else [])

    def tf1_variable_count(self):
        return 4 if self.instance_norm else 2

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "instance_norm": self.instance_norm, "relu": self.relu}


@tf.custom_gradient
def leaky_relu(x):
    """Leaky ReLU 0.2 whose gradient reads its output rather than its input: the same numbers,
    since with a positive slope the output is > 0 exactly where the input is. TensorFlow's own
    gradient reads the input, a convolution + bias; with oneDNN, Grappler's remapper fuses the
    convolution, the bias and then the activation into one node, deleting the add that gradient
    still reads, and rejects the whole pass (an "E0000 ... remapper failed" line on every
    training run). Read from the output, training gets the fused kernel as inference does."""
    y = tf.nn.leaky_relu(x, alpha=LEAKY_SLOPE)
    return y, lambda dy: tf.raw_ops.LeakyReluGrad(gradients=dy, features=y, alpha=LEAKY_SLOPE)


def instance_norm(x, shift, scale):
    """Per sample and channel over H, W; population variance; epsilon inside the square root.
    In float32 whatever ``x`` is: Keras clips the moments of a reduced-precision map to float16's
    range, and bfloat16 keeps too few bits for a mean subtracted from each pixel."""
    dtype = x.dtype
    if dtype != "float32":
        x = ops.cast(x, "float32")
    mean, variance = ops.moments(x, axes=[1, 2], keepdims=True)
    x = scale * (x - mean) / ops.sqrt(variance + IN_EPSILON) + shift
    return x if dtype == "float32" else ops.cast(x, dtype)


class UpConv(keras.layers.Layer):
    """3x3 transposed convolution with stride 2 ('same'), no bias, then leaky ReLU 0.2.
    The kernel is [3, 3, out, in], the layout of the reference and of Keras."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(3, 3, self.filters, input_shape[-1]),
                                      initializer=_initializers(self)[0])

    def call(self, x):
        return leaky_relu(ops.conv_transpose(x, self.kernel, strides=2, padding="same"))

    def tf1_variables(self):
        return [self.kernel]

    def tf1_variable_count(self):
        return 1

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class OutputHead(ConvLayer):
    """3x3 convolution to RGB, then tanh(x) * 0.58 + 0.5: range [-0.08, 1.08], never clipped.
    Always float32 (see head()): the picture and the losses are taken from it."""

    def __init__(self, **kwargs):
        kwargs.update(filters=3, kernel_size=3, instance_norm=False, relu=False)
        super().__init__(**kwargs)

    def call(self, x):
        return ops.tanh(super().call(x)) * 0.58 + 0.5

    def get_config(self):
        config = super().get_config()
        for key in ("filters", "kernel_size", "instance_norm", "relu"):
            config.pop(key)
        return config


class MultiConvBlock(keras.layers.Layer):
    """MB(k, n): parallel branches of two stacked k'xk' convolutions for k' = 3, 5, ..., k,
    each with n maps, concatenated in that order (n x number-of-branches channels)."""

    def __init__(self, max_size, filters, instance_norm, **kwargs):
        super().__init__(**kwargs)
        self.max_size = max_size
        self.filters = filters
        self.instance_norm = instance_norm
        self.branches = []
        # the branches compute as the block does: a sub-layer does not inherit its parent's policy
        policy = self.dtype_policy
        for size in range(3, max_size + 1, 2):
            first = ConvLayer(filters, size, instance_norm, name=f"conv_{size}a", dtype=policy)
            second = ConvLayer(filters, size, instance_norm, name=f"conv_{size}b", dtype=policy)
            self.branches.append((first, second))

    def build(self, input_shape):
        for first, second in self.branches:
            first.build(input_shape)
            second.build(tuple(input_shape[:-1]) + (self.filters,))

    def call(self, x):
        outputs = [second(first(x)) for first, second in self.branches]
        return outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=-1)

    def conv_layers(self):
        """Sub-layers in the reference's creation order: 3a, 3b, 5a, 5b, ..."""
        return [layer for pair in self.branches for layer in pair]

    def tf1_variable_count(self):
        return sum(layer.tf1_variable_count() for layer in self.conv_layers())

    def get_config(self):
        return {**super().get_config(), "max_size": self.max_size, "filters": self.filters,
                "instance_norm": self.instance_norm}


def max_pool(x, name):
    return keras.layers.MaxPooling2D(pool_size=2, strides=2, padding="valid", name=name, dtype=_building["dtype"])(x)


def cat(*tensors):
    return ops.concatenate(list(tensors), axis=-1)


# the figure's blocks, each under the reference's layer name (which fixes its checkpoint keys)

def mb(name, max_size, filters, instance_norm):
    return MultiConvBlock(max_size, filters, instance_norm, name=name, dtype=_building["dtype"])


def up(name, filters):
    return UpConv(filters, name=name, dtype=_building["dtype"])


def head(name):
    return OutputHead(name=name, dtype="float32")


# ---------------------------------------------------------------------------------------
# the graph, level by level

def PyNET(instance_norm=True, instance_norm_level_1=False, level=0, name="pynet", init="reference",
          precision="fp32"):
    """Build PyNET up to pyramid ``level`` (0 = everything, as the reference always builds),
    its weights initialised as the reference's (``init="he"``: see INITS), computing in
    ``precision`` (see POLICIES; float32 variables in every precision).

    Returns a keras.Model whose outputs are ``[output_l{level}, ..., output_l5]``.
    """
    if level not in range(6):
        raise ValueError(f"level must be 0..5, got {level}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if precision not in POLICIES:
        raise ValueError(f"precision must be one of {tuple(POLICIES)}, got {precision!r}")
    _building.update(init=init, dtype=keras.DTypePolicy(POLICIES[precision]))
    try:
        return _pynet_graph(instance_norm, instance_norm_level_1, level, name)
    finally:
        _building.update(init="reference", dtype="float32")


def precision_of(model) -> str:
    """The precision a PyNET build computes in (the name PyNET(precision=) takes)."""
    policy = model.get_layer("conv_l1_d1").dtype_policy.name
    return next(name for name, known in POLICIES.items() if known == policy)


def _pynet_graph(instance_norm, instance_norm_level_1, level, name):
    IN, IN1 = instance_norm, instance_norm_level_1
    raw = keras.Input(shape=(None, None, 4), name="raw")

    # encoder
    conv_l1_d1 = mb("conv_l1_d1", 3, 32, False)(raw)
    pool1 = max_pool(conv_l1_d1, "pool1")
    conv_l2_d1 = mb("conv_l2_d1", 3, 64, IN)(pool1)
    pool2 = max_pool(conv_l2_d1, "pool2")
    conv_l3_d1 = mb("conv_l3_d1", 3, 128, IN)(pool2)
    pool3 = max_pool(conv_l3_d1, "pool3")
    conv_l4_d1 = mb("conv_l4_d1", 3, 256, IN)(pool3)
    pool4 = max_pool(conv_l4_d1, "pool4")

    # level 5: 1/16 of the packed input
    conv_l5_d1 = mb("conv_l5_d1", 3, 512, IN)(pool4)
    conv_l5_d2 = mb("conv_l5_d2", 3, 512, IN)(conv_l5_d1) + conv_l5_d1
    conv_l5_d3 = mb("conv_l5_d3", 3, 512, IN)(conv_l5_d2) + conv_l5_d2
    conv_l5_d4 = mb("conv_l5_d4", 3, 512, IN)(conv_l5_d3)
    conv_t4a = up("conv_t4a", 256)(conv_l5_d4)
    conv_t4b = up("conv_t4b", 256)(conv_l5_d4)
    outputs = [head("conv_l5_out")(conv_l5_d4)]

    # level 4: 1/8
    if level <= 4:
        conv_l4_d2 = cat(conv_l4_d1, conv_t4a)
        conv_l4_d3 = mb("conv_l4_d3", 3, 256, IN)(conv_l4_d2)
        conv_l4_d4 = mb("conv_l4_d4", 3, 256, IN)(conv_l4_d3) + conv_l4_d3
        conv_l4_d5 = mb("conv_l4_d5", 3, 256, IN)(conv_l4_d4) + conv_l4_d4
        conv_l4_d6 = cat(mb("conv_l4_d6", 3, 256, IN)(conv_l4_d5), conv_t4b)
        conv_l4_d7 = mb("conv_l4_d7", 3, 256, IN)(conv_l4_d6)
        conv_t3a = up("conv_t3a", 128)(conv_l4_d7)
        conv_t3b = up("conv_t3b", 128)(conv_l4_d7)
        outputs.insert(0, head("conv_l4_out")(conv_l4_d7))

    # level 3: 1/4
    if level <= 3:
        conv_l3_d2 = cat(conv_l3_d1, conv_t3a)
        conv_l3_d3 = mb("conv_l3_d3", 5, 128, IN)(conv_l3_d2) + conv_l3_d2
        conv_l3_d4 = mb("conv_l3_d4", 5, 128, IN)(conv_l3_d3) + conv_l3_d3
        conv_l3_d5 = mb("conv_l3_d5", 5, 128, IN)(conv_l3_d4) + conv_l3_d4
        conv_l3_d6 = cat(mb("conv_l3_d6", 5, 128, IN)(conv_l3_d5), conv_l3_d1)
        conv_l3_d7 = cat(conv_l3_d6, conv_t3b)
        conv_l3_d8 = mb("conv_l3_d8", 3, 128, IN)(conv_l3_d7)
        conv_t2a = up("conv_t2a", 64)(conv_l3_d8)
        conv_t2b = up("conv_t2b", 64)(conv_l3_d8)
        outputs.insert(0, head("conv_l3_out")(conv_l3_d8))

    # level 2: 1/2
    if level <= 2:
        conv_l2_d2 = cat(conv_l2_d1, conv_t2a)
        conv_l2_d3 = cat(mb("conv_l2_d3", 5, 64, IN)(conv_l2_d2), conv_l2_d1)
        conv_l2_d4 = mb("conv_l2_d4", 7, 64, IN)(conv_l2_d3) + conv_l2_d3
        conv_l2_d5 = mb("conv_l2_d5", 7, 64, IN)(conv_l2_d4) + conv_l2_d4
        conv_l2_d6 = mb("conv_l2_d6", 7, 64, IN)(conv_l2_d5) + conv_l2_d5
        conv_l2_d7 = cat(mb("conv_l2_d7", 7, 64, IN)(conv_l2_d6), conv_l2_d1)
        conv_l2_d8 = cat(mb("conv_l2_d8", 5, 64, IN)(conv_l2_d7), conv_t2b)
        conv_l2_d9 = mb("conv_l2_d9", 3, 64, IN)(conv_l2_d8)
        conv_t1a = up("conv_t1a", 32)(conv_l2_d9)
        conv_t1b = up("conv_t1b", 32)(conv_l2_d9)
        outputs.insert(0, head("conv_l2_out")(conv_l2_d9))

    # level 1: the packed resolution; no instance norm at all with the reference's flags
    if level <= 1:
        conv_l1_d2 = cat(conv_l1_d1, conv_t1a)
        conv_l1_d3 = cat(mb("conv_l1_d3", 5, 32, False)(conv_l1_d2), conv_l1_d1)
        conv_l1_d4 = mb("conv_l1_d4", 7, 32, False)(conv_l1_d3)
        conv_l1_d5 = mb("conv_l1_d5", 9, 32, IN1)(conv_l1_d4)
        conv_l1_d6 = mb("conv_l1_d6", 9, 32, IN1)(conv_l1_d5) + conv_l1_d5
        conv_l1_d7 = mb("conv_l1_d7", 9, 32, IN1)(conv_l1_d6) + conv_l1_d6
        conv_l1_d8 = mb("conv_l1_d8", 9, 32, IN1)(conv_l1_d7) + conv_l1_d7
        conv_l1_d9 = cat(mb("conv_l1_d9", 7, 32, False)(conv_l1_d8), conv_l1_d1)
        conv_l1_d10 = cat(mb("conv_l1_d10", 5, 32, False)(conv_l1_d9), conv_t1b)
        conv_l1_d11 = cat(conv_l1_d10, conv_l1_d1)
        conv_l1_d12 = mb("conv_l1_d12", 3, 32, False)(conv_l1_d11)
        outputs.insert(0, head("conv_l1_out")(conv_l1_d12))

    # level 0: x2 upsampling to the mosaic's resolution
    if level == 0:
        conv_l0 = up("conv_l0", 8)(conv_l1_d12)
        outputs.insert(0, head("conv_l0_out")(conv_l0))

    return keras.Model(raw, outputs, name=name)


def as_list(outputs):
    """Model outputs as a list: Keras returns a bare tensor for a single-output (level 5) build."""
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def built_level(model) -> int:
    """The lowest level a PyNET model was built for (its first output)."""
    return 6 - len(model.outputs)


def level_model(model, level):
    """A single-output view of ``model`` for ``level``, sharing its variables; running it
    computes only what that level's output needs."""
    first = built_level(model)
    if not first <= level <= 5:
        raise ValueError(f"model is built for levels {first}..5, not {level}")
    return keras.Model(model.input, model.outputs[level - first], name=f"{model.name}_level_{level}")


def copy_weights(source, target):
    """Copy every weight layer of ``target`` from the same-named layer of ``source``
    (e.g. between a level-N build and the full model)."""
    for layer in target.layers:
        if layer.weights:
            layer.set_weights(source.get_layer(layer.name).get_weights())


# ---------------------------------------------------------------------------------------
# the graph's structure, read from the Keras model (render.py and the benchmarks walk it)

def graph_inputs(tensor):
    """The layer that produced a KerasTensor of the model, and that layer call's inputs."""
    op, node_index, _ = tensor._keras_history
    return op, op._inbound_nodes[node_index].input_tensors


def scale_of(tensor, memo):
    """A tensor's height relative to the packed input (2 for level 0, 1/16 for level 5)."""
    if id(tensor) not in memo:
        op, inputs = graph_inputs(tensor)
        scale = scale_of(inputs[0], memo) if inputs else 1.0
        if isinstance(op, UpConv):
            scale *= 2
        elif isinstance(op, keras.layers.MaxPooling2D):
            scale /= 2
        memo[id(tensor)] = scale
    return memo[id(tensor)]


def level_output(model, level):
    """The output of ``model`` (a PyNET build, or a level_model view) for pyramid ``level``."""
    memo = {}
    for output in model.outputs:
        if scale_of(output, memo) == 2.0 / 2 ** level:
            return output
    raise ValueError(f"{model.name} has no output for level {level}")
