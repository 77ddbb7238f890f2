"""PyNET (Ignatov, Van Gool, Timofte, CVPRW 2020) as a Keras 3 model.

The graph is built level by level as in the paper's figure: a shared encoder
(conv_lX_d1 + max-pools), then levels 5 (1/16 of the packed input) up to 1 (packed
resolution) and level 0 (the full mosaic resolution). Names, order of creation and
every variable follow the reference TF1 code, so its checkpoints load by position.

    model = PyNET()                  # all levels; outputs [l0, l1, l2, l3, l4, l5]
    model = PyNET(level=3)           # only what level 3 needs; outputs [l3, l4, l5]
    view = level_model(model, 2)     # one output, sharing model's variables

Input: packed Bayer [B, Gb, R, Gr] (load_dataset.extract_bayer_channels), shape
(batch, H, W, 4) with H and W multiples of 16. Output of level L: (H, W) * 2 / 2**L.
"""

import os

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from utils import UserError

PARAMETER_COUNT = 47_548_170
TF1_VARIABLE_COUNT = 437
TF1_SCOPE = "generator"
LEAKY_SLOPE = 0.2
IN_EPSILON = 1e-3

# The reference seeds every op with 1 and sets no graph seed, so all weights of one shape
# start identical (e.g. conv_t4a == conv_t4b). A fixed-seed Keras initializer behaves the same.
_KERNEL_INIT = keras.initializers.TruncatedNormal(stddev=0.01, seed=1)
_BIAS_INIT = keras.initializers.Constant(0.01)


# ---------------------------------------------------------------------------------------
# primitives

class ConvLayer(keras.layers.Layer):
    """Convolution (zero 'same' padding, stride 1) + bias, then optional instance norm, then
    optional leaky ReLU 0.2. The bias is kept before instance norm, where it has no effect,
    because the reference checkpoint stores it."""

    def __init__(self, filters, kernel_size, instance_norm=False, relu=True, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.instance_norm = instance_norm
        self.relu = relu

    def build(self, input_shape):
        k, cin = self.kernel_size, input_shape[-1]
        self.kernel = self.add_weight(name="kernel", shape=(k, k, cin, self.filters), initializer=_KERNEL_INIT)
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer=_BIAS_INIT)
        if self.instance_norm:
            self.shift = self.add_weight(name="shift", shape=(self.filters,), initializer="zeros")
            self.scale = self.add_weight(name="scale", shape=(self.filters,), initializer="ones")

    def call(self, x):
        x = ops.conv(x, self.kernel, strides=1, padding="same") + self.bias
        if self.instance_norm:
            x = instance_norm(x, self.shift, self.scale)
        if self.relu:
            x = ops.leaky_relu(x, LEAKY_SLOPE)
        return x

    def tf1_variables(self):
        """This layer's variables in the reference's creation order: W, b[, shift, scale]."""
        return [self.kernel, self.bias] + ([self.shift, self.scale] if self.instance_norm else [])

    def tf1_variable_count(self):
        return 4 if self.instance_norm else 2

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "instance_norm": self.instance_norm, "relu": self.relu}


def instance_norm(x, shift, scale):
    """Per sample and channel over H, W; population variance; epsilon inside the square root."""
    mean, variance = ops.moments(x, axes=[1, 2], keepdims=True)
    return scale * (x - mean) / ops.sqrt(variance + IN_EPSILON) + shift


class UpConv(keras.layers.Layer):
    """3x3 transposed convolution with stride 2 ('same'), no bias, then leaky ReLU 0.2.
    The kernel is [3, 3, out, in], the layout of the reference and of Keras."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(3, 3, self.filters, input_shape[-1]),
                                      initializer=_KERNEL_INIT)

    def call(self, x):
        return ops.leaky_relu(ops.conv_transpose(x, self.kernel, strides=2, padding="same"), LEAKY_SLOPE)

    def tf1_variables(self):
        return [self.kernel]

    def tf1_variable_count(self):
        return 1

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class OutputHead(ConvLayer):
    """3x3 convolution to RGB, then tanh(x) * 0.58 + 0.5: range [-0.08, 1.08], never clipped."""

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
        for size in range(3, max_size + 1, 2):
            first = ConvLayer(filters, size, instance_norm, name=f"conv_{size}a")
            second = ConvLayer(filters, size, instance_norm, name=f"conv_{size}b")
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
    return keras.layers.MaxPooling2D(pool_size=2, strides=2, padding="valid", name=name)(x)


def cat(*tensors):
    return ops.concatenate(list(tensors), axis=-1)


class _Builder:
    """Creates the named layers and remembers their order and variable counts, which fix the
    checkpoint numbering. A partial build creates the upsampling layers of the next level
    too (as the reference does before its head), but Keras leaves them out of the model as
    nothing uses them; their variable counts keep the numbering of what follows."""

    def __init__(self):
        self.order = []

    def _add(self, layer):
        self.order.append((layer.name, layer.tf1_variable_count()))
        return layer

    def mb(self, name, max_size, filters, instance_norm):
        return self._add(MultiConvBlock(max_size, filters, instance_norm, name=name))

    def up(self, name, filters):
        return self._add(UpConv(filters, name=name))

    def head(self, name):
        return self._add(OutputHead(name=name))


# ---------------------------------------------------------------------------------------
# the graph, level by level

def PyNET(instance_norm=True, instance_norm_level_1=False, level=0, name="pynet"):
    """Build PyNET up to pyramid ``level`` (0 = everything, as the reference always builds).

    Returns a keras.Model whose outputs are ``[output_l{level}, ..., output_l5]``.
    """
    if level not in range(6):
        raise ValueError(f"level must be 0..5, got {level}")
    b = _Builder()
    IN, IN1 = instance_norm, instance_norm_level_1
    raw = keras.Input(shape=(None, None, 4), name="raw")

    # encoder
    conv_l1_d1 = b.mb("conv_l1_d1", 3, 32, False)(raw)
    pool1 = max_pool(conv_l1_d1, "pool1")
    conv_l2_d1 = b.mb("conv_l2_d1", 3, 64, IN)(pool1)
    pool2 = max_pool(conv_l2_d1, "pool2")
    conv_l3_d1 = b.mb("conv_l3_d1", 3, 128, IN)(pool2)
    pool3 = max_pool(conv_l3_d1, "pool3")
    conv_l4_d1 = b.mb("conv_l4_d1", 3, 256, IN)(pool3)
    pool4 = max_pool(conv_l4_d1, "pool4")

    # level 5: 1/16 of the packed input
    conv_l5_d1 = b.mb("conv_l5_d1", 3, 512, IN)(pool4)
    conv_l5_d2 = b.mb("conv_l5_d2", 3, 512, IN)(conv_l5_d1) + conv_l5_d1
    conv_l5_d3 = b.mb("conv_l5_d3", 3, 512, IN)(conv_l5_d2) + conv_l5_d2
    conv_l5_d4 = b.mb("conv_l5_d4", 3, 512, IN)(conv_l5_d3)
    conv_t4a = b.up("conv_t4a", 256)(conv_l5_d4)
    conv_t4b = b.up("conv_t4b", 256)(conv_l5_d4)
    outputs = [b.head("conv_l5_out")(conv_l5_d4)]

    # level 4: 1/8
    if level <= 4:
        conv_l4_d2 = cat(conv_l4_d1, conv_t4a)
        conv_l4_d3 = b.mb("conv_l4_d3", 3, 256, IN)(conv_l4_d2)
        conv_l4_d4 = b.mb("conv_l4_d4", 3, 256, IN)(conv_l4_d3) + conv_l4_d3
        conv_l4_d5 = b.mb("conv_l4_d5", 3, 256, IN)(conv_l4_d4) + conv_l4_d4
        conv_l4_d6 = cat(b.mb("conv_l4_d6", 3, 256, IN)(conv_l4_d5), conv_t4b)
        conv_l4_d7 = b.mb("conv_l4_d7", 3, 256, IN)(conv_l4_d6)
        conv_t3a = b.up("conv_t3a", 128)(conv_l4_d7)
        conv_t3b = b.up("conv_t3b", 128)(conv_l4_d7)
        outputs.insert(0, b.head("conv_l4_out")(conv_l4_d7))

    # level 3: 1/4
    if level <= 3:
        conv_l3_d2 = cat(conv_l3_d1, conv_t3a)
        conv_l3_d3 = b.mb("conv_l3_d3", 5, 128, IN)(conv_l3_d2) + conv_l3_d2
        conv_l3_d4 = b.mb("conv_l3_d4", 5, 128, IN)(conv_l3_d3) + conv_l3_d3
        conv_l3_d5 = b.mb("conv_l3_d5", 5, 128, IN)(conv_l3_d4) + conv_l3_d4
        conv_l3_d6 = cat(b.mb("conv_l3_d6", 5, 128, IN)(conv_l3_d5), conv_l3_d1)
        conv_l3_d7 = cat(conv_l3_d6, conv_t3b)
        conv_l3_d8 = b.mb("conv_l3_d8", 3, 128, IN)(conv_l3_d7)
        conv_t2a = b.up("conv_t2a", 64)(conv_l3_d8)
        conv_t2b = b.up("conv_t2b", 64)(conv_l3_d8)
        outputs.insert(0, b.head("conv_l3_out")(conv_l3_d8))

    # level 2: 1/2
    if level <= 2:
        conv_l2_d2 = cat(conv_l2_d1, conv_t2a)
        conv_l2_d3 = cat(b.mb("conv_l2_d3", 5, 64, IN)(conv_l2_d2), conv_l2_d1)
        conv_l2_d4 = b.mb("conv_l2_d4", 7, 64, IN)(conv_l2_d3) + conv_l2_d3
        conv_l2_d5 = b.mb("conv_l2_d5", 7, 64, IN)(conv_l2_d4) + conv_l2_d4
        conv_l2_d6 = b.mb("conv_l2_d6", 7, 64, IN)(conv_l2_d5) + conv_l2_d5
        conv_l2_d7 = cat(b.mb("conv_l2_d7", 7, 64, IN)(conv_l2_d6), conv_l2_d1)
        conv_l2_d8 = cat(b.mb("conv_l2_d8", 5, 64, IN)(conv_l2_d7), conv_t2b)
        conv_l2_d9 = b.mb("conv_l2_d9", 3, 64, IN)(conv_l2_d8)
        conv_t1a = b.up("conv_t1a", 32)(conv_l2_d9)
        conv_t1b = b.up("conv_t1b", 32)(conv_l2_d9)
        outputs.insert(0, b.head("conv_l2_out")(conv_l2_d9))

    # level 1: the packed resolution; no instance norm at all with the reference's flags
    if level <= 1:
        conv_l1_d2 = cat(conv_l1_d1, conv_t1a)
        conv_l1_d3 = cat(b.mb("conv_l1_d3", 5, 32, False)(conv_l1_d2), conv_l1_d1)
        conv_l1_d4 = b.mb("conv_l1_d4", 7, 32, False)(conv_l1_d3)
        conv_l1_d5 = b.mb("conv_l1_d5", 9, 32, IN1)(conv_l1_d4)
        conv_l1_d6 = b.mb("conv_l1_d6", 9, 32, IN1)(conv_l1_d5) + conv_l1_d5
        conv_l1_d7 = b.mb("conv_l1_d7", 9, 32, IN1)(conv_l1_d6) + conv_l1_d6
        conv_l1_d8 = b.mb("conv_l1_d8", 9, 32, IN1)(conv_l1_d7) + conv_l1_d7
        conv_l1_d9 = cat(b.mb("conv_l1_d9", 7, 32, False)(conv_l1_d8), conv_l1_d1)
        conv_l1_d10 = cat(b.mb("conv_l1_d10", 5, 32, False)(conv_l1_d9), conv_t1b)
        conv_l1_d11 = cat(conv_l1_d10, conv_l1_d1)
        conv_l1_d12 = b.mb("conv_l1_d12", 3, 32, False)(conv_l1_d11)
        outputs.insert(0, b.head("conv_l1_out")(conv_l1_d12))

    # level 0: x2 upsampling to the mosaic's resolution
    if level == 0:
        conv_l0 = b.up("conv_l0", 8)(conv_l1_d12)
        outputs.insert(0, b.head("conv_l0_out")(conv_l0))

    model = keras.Model(raw, outputs, name=name)
    model.tf1_order = tuple(b.order)
    return model


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
    present = {layer.name for layer in target.layers}
    for name, _ in target.tf1_order:
        if name in present:
            target.get_layer(name).set_weights(source.get_layer(name).get_weights())


# ---------------------------------------------------------------------------------------
# TF1 checkpoints: keys generator/Variable, generator/Variable_1, ... in creation order

def tf1_key(index: int) -> str:
    return f"{TF1_SCOPE}/Variable" if index == 0 else f"{TF1_SCOPE}/Variable_{index}"


_ROLES = {"kernel": "W", "bias": "b", "shift": "IN shift", "scale": "IN scale"}


def tf1_variables(model):
    """[(checkpoint key, variable, description)] for every variable of ``model`` in the
    reference's creation order. A level-N build holds a prefix of the full list."""
    present = {layer.name for layer in model.layers}
    entries, index = [], 0
    for name, count in model.tf1_order:
        if name not in present:  # an unused upsampling layer of a partial build
            index += count
            continue
        layer = model.get_layer(name)
        convs = layer.conv_layers() if isinstance(layer, MultiConvBlock) else [layer]
        for conv in convs:
            label = f"{name}/{conv.name}" if conv is not layer else name
            for var in conv.tf1_variables():
                entries.append((tf1_key(index), var, f"{label} {_ROLES[var.name]}"))
                index += 1
    return entries


def load_checkpoint(model, prefix: str) -> None:
    """Load a checkpoint with the reference's keys (the released TF1 weights or our own) into
    ``model``. The whole checkpoint is read and verified first (checkpoints.read_verified:
    every tensor readable, finite) and every key, dtype and shape checked against the model,
    before anything is assigned."""
    import checkpoints

    entries = tf1_variables(model)
    values = checkpoints.read_verified(prefix, labels={key: label for key, _, label in entries})
    for key, var, label in entries:
        if key not in values:
            raise UserError(f"{prefix}: key {key} ({label}, shape {list(var.shape)}) is missing from the checkpoint")
        value = values[key]
        if list(value.shape) != list(var.shape):
            raise UserError(f"{prefix}: {key} ({label}) has shape {list(value.shape)}, expected {list(var.shape)}")
        if value.dtype != np.dtype(var.dtype):
            raise UserError(f"{prefix}: {key} ({label}) has dtype {value.dtype}, expected {var.dtype}")
    for key, var, _ in entries:
        var.assign(values[key])


def check_finite(model, prefix: str) -> None:
    """NonFiniteWeights (naming ``prefix``, which is then not written) if a weight is NaN or Inf."""
    import checkpoints

    bad = checkpoints.nonfinite_count(model.weights)
    if bad:
        raise checkpoints.NonFiniteWeights(f"{prefix}: not written: the weights hold {bad} NaN or Inf values",
                                           count=bad)


def save_checkpoint(model, prefix: str) -> None:
    """Write all variables of a full PyNET under the reference's keys, as a TF V2 checkpoint
    (``prefix.index`` + ``prefix.data-00000-of-00001``) that TF1's Saver can restore too.

    Weights with NaN or Inf are refused. Written under a temporary prefix and renamed, the
    index last: a crash never leaves a checkpoint that looks complete but is not, and a
    failed write (a full disk) leaves nothing (checkpoints.all_or_nothing).
    """
    import checkpoints

    entries = tf1_variables(model)
    if len(entries) != TF1_VARIABLE_COUNT:
        raise ValueError(f"only a full model can be saved ({len(entries)} of {TF1_VARIABLE_COUNT} variables)")
    check_finite(model, prefix)
    import utils

    folder = os.path.dirname(prefix)
    if folder:
        utils.makedirs(folder)
    tmp_prefix = f"{prefix}.tmp{os.getpid()}"
    with checkpoints.all_or_nothing(prefix):
        tf.raw_ops.SaveV2(prefix=tmp_prefix, tensor_names=[key for key, _, _ in entries],
                          shape_and_slices=[""] * len(entries), tensors=[var.value for _, var, _ in entries])
        data = ".data-00000-of-00001"
        utils.rename(tmp_prefix + data, prefix + data)
        utils.rename(tmp_prefix + ".index", prefix + ".index")


def pad_to_multiple(packed, multiple=16):
    """Reflect-pad a packed (H, W, 4) or (B, H, W, 4) array at the bottom and right to
    multiples of ``multiple``; returns the padded array and the original (H, W)."""
    packed = np.asarray(packed)
    height, width = packed.shape[-3], packed.shape[-2]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        pads = [(0, 0)] * packed.ndim
        pads[-3], pads[-2] = (0, pad_h), (0, pad_w)
        # reflect needs more pixels than the pad; 'symmetric' works for any size >= 1
        packed = np.pad(packed, pads, mode="symmetric")
    return packed, (height, width)


# ---------------------------------------------------------------------------------------
# inference on frames of any size with bounded memory: row strips
#
# The whole-frame graph holds every feature map of the frame at once (a 12 MP frame peaks
# near 6.2 GiB on a CPU and does not fit 11 GB GPUs). Here the same graph, read from the
# Keras model and using its variables, runs over strips of rows spanning the whole width:
#
# * a layer without instance norm is computed strip by strip and keeps only the rows its
#   consumers still need (kernel-size - 1 rows, more across skip connections): with the
#   reference's flags that is all of level 1 and level 0, the bulk of the compute and of
#   the memory, never held for the whole frame;
# * a layer with instance norm (levels 2 to 5) needs statistics over the whole frame: its
#   pre-norm output is computed strip by strip and held, the mean and variance taken over
#   all of it, then each strip is normalised (replacing the pre-norm one). A map is dropped
#   strip by strip as soon as its last consumer has passed it.
#
# Zero padding is applied only at the frame's edges, every value is computed once (no
# overlapping tiles to recompute), and the output equals the whole-frame one up to float
# rounding. The input of pool1 (conv_l1_d1, no instance norm, 0.2% of the work) is computed
# twice rather than kept for the whole frame: once for the encoder, once for level 1.
# For a 12 MP frame at level 0 the peak RSS is 2.35 GiB (whole frame: ~6.2 GiB), reached
# while the maps of level 2 are held, where oneDNN allocates through malloc (see
# test_model.bound_memory); README "Inference" has the figures.

MIN_STRIP_PIXELS = 16384    # smallest convolution worth a call: low levels use taller strips


# Feature maps are held as (rows, W, C) tensors: slicing rows is then a slice of the first
# dimension, which TensorFlow serves without copying. Strips run eagerly: a tf.function per
# layer call cost more in argument matching than it saved, and tracing a steady strip once
# into a graph and replaying it was no faster on a 12 MP frame (240 s op by op, 249 s
# replayed, README "Inference"), so the simpler form stays.

def _conv_rows(x, layer, pad_top, pad_bottom, relu):
    """Conv + bias (+ leaky ReLU) of a strip of rows (rows, W, C): 'same' zero padding across
    the width, ``pad_top``/``pad_bottom`` zero rows above and below (only at the frame's edges)."""
    p = layer.kernel_size // 2
    y = tf.nn.conv2d(x[None], layer.kernel.value, 1, padding=[[0, 0], [pad_top, pad_bottom], [p, p], [0, 0]])
    y = tf.nn.bias_add(y, layer.bias.value)
    return (tf.nn.leaky_relu(y, LEAKY_SLOPE) if relu else y)[0]


def _up_rows(x, layer):
    """Stride-2 'same' transposed convolution + leaky ReLU of a strip of rows."""
    rows, width, _ = x.shape
    y = tf.nn.conv2d_transpose(x[None], layer.kernel.value, [1, 2 * rows, 2 * width, layer.filters], 2, "SAME")
    return tf.nn.leaky_relu(y, LEAKY_SLOPE)[0]


class _Rows:
    """One feature map (batch 1, whole width) computed in strips of rows.

    ``get(a, b)`` returns rows [a, b) as a (rows, W, C) tensor, computing what is missing;
    ``release(who, row)`` records that consumer ``who`` will not ask for rows below ``row``
    again. A map is computed as far as it is asked for and held as a list of chunks (one per
    computation), a chunk dropped once every consumer has passed it: nothing is ever copied
    to extend or trim a map, so holding a whole map costs the map and no more.
    """

    def __init__(self, height, sources=()):
        self.height = height
        self.sources = list(sources)
        self.consumers = []
        self.chunks = []          # [(first row, end row, tensor)], in order
        self.hi = 0               # rows computed so far
        self.marks = {}
        self.step = height
        for source in self.sources:
            source.marks[id(self)] = 0
            source.consumers.append(self)

    def low(self):
        return min(self.marks.values()) if self.marks else self.hi

    def get(self, a, b):
        if b > self.hi:
            new = self.produce(self.hi, min(b, self.height))
            end = self.hi + int(new.shape[0])
            self.chunks.append((self.hi, end, new))
            self.hi = end
        return self._rows(a, b)

    def _rows(self, a, b):
        parts = [data[max(a, start) - start: min(b, end) - start]
                 for start, end, data in self.chunks if start < b and end > a]
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)

    def _trim(self):
        low = self.low()
        while self.chunks and self.chunks[0][1] <= low:
            self.chunks.pop(0)

    def release(self, who, row):
        self.marks[id(who)] = row
        self._trim()

    def produce(self, a, b):  # rows [a, b') for some b' >= b
        raise NotImplementedError


class _SourceRows(_Rows):
    def __init__(self, array):
        super().__init__(int(array.shape[0]))
        self.array = array

    def get(self, a, b):
        return self.array[a:b]

    def release(self, who, row):
        pass


class _CatRows(_Rows):
    """A channel concatenation. Formed once per strip and kept for streaming consumers; for
    consumers that read the whole map (instance norm), formed on demand and never held, as
    its inputs are held whole already."""

    virtual = False

    def get(self, a, b):
        if self.virtual:
            return tf.concat([source.get(a, b) for source in self.sources], axis=-1)
        return super().get(a, b)

    def produce(self, a, b):
        parts = [source.get(a, b) for source in self.sources]
        for source in self.sources:
            source.release(self, b)
        return tf.concat(parts, axis=-1)

    def release(self, who, row):
        super().release(who, row)
        if self.virtual:
            for source in self.sources:
                source.release(self, self.low())


class _AddRows(_Rows):
    def produce(self, a, b):
        x, y = (source.get(a, b) for source in self.sources)
        for source in self.sources:
            source.release(self, b)
        return x + y


class _PoolRows(_Rows):
    def __init__(self, source):
        super().__init__(source.height // 2, [source])

    def produce(self, a, b):
        y = tf.nn.max_pool2d(self.sources[0].get(2 * a, 2 * b)[None], 2, 2, "VALID")[0]
        self.sources[0].release(self, 2 * b)
        return y


class _UpRows(_Rows):
    """Output rows 2m and 2m+1 need input rows m-1 and m (the kernel's centre sits on 2m)."""

    def __init__(self, layer, source):
        super().__init__(2 * source.height, [source])
        self.layer = layer

    def produce(self, a, b):
        source = self.sources[0]
        m0, m1 = a // 2, min((b + 1) // 2, source.height)
        first = max(m0 - 1, 0)
        y = _up_rows(source.get(first, m1), self.layer)
        source.release(self, m1 - 1)
        return y[2 * (m0 - first):]


class _ConvRows(_Rows):
    """A ConvLayer or OutputHead, streamed; see _NormConvRows for one with instance norm."""

    def __init__(self, layer, source):
        super().__init__(source.height, [source])
        self.layer = layer

    def _conv(self, a, b, relu):
        source, p, height = self.sources[0], self.layer.kernel_size // 2, self.height
        top, bottom = max(a - p, 0), min(b + p, height)
        y = _conv_rows(source.get(top, bottom), self.layer, top - (a - p), (b + p) - bottom, relu)
        source.release(self, b - p)
        return y

    def produce(self, a, b):
        y = self._conv(a, b, self.layer.relu)
        return tf.tanh(y) * 0.58 + 0.5 if isinstance(self.layer, OutputHead) else y


class _NormConvRows(_ConvRows):
    """A ConvLayer with instance norm: at the first request the whole map is computed before
    normalisation, strip by strip (``step`` rows), its mean and variance taken over all of it,
    then each strip normalised in place. Strips are dropped as the last consumer passes them."""

    def _materialise(self):
        chunks, total = self.chunks, 0.0
        for a in range(0, self.height, self.step):
            end = min(a + self.step, self.height)
            y = self._conv(a, end, relu=False)
            chunks.append((a, end, y))
            total = total + tf.reduce_sum(y, axis=[0, 1]).numpy().astype(np.float64)
        self.sources[0].release(self, self.height)
        count = float(self.height * int(chunks[0][2].shape[1]))
        mean = (total / count).astype(np.float32)
        spread = 0.0
        for _, _, y in chunks:
            spread = spread + tf.reduce_sum(tf.square(y - mean), axis=[0, 1]).numpy().astype(np.float64)
        multiplier = self.layer.scale.value / tf.sqrt((spread / count).astype(np.float32) + IN_EPSILON)
        offset = self.layer.shift.value - mean * multiplier
        del y
        for i, (a, end, _) in enumerate(chunks):  # one strip at a time: the map is never held twice
            chunks[i] = (a, end, tf.nn.leaky_relu(chunks[i][2] * multiplier + offset, LEAKY_SLOPE))
        self.hi = self.height

    def get(self, a, b):
        if self.hi < self.height:
            self._materialise()
        return self._rows(a, b)


_MALLOC_SET = []


def return_freed_memory(threshold=1 << 20):
    """Have glibc serve blocks of ``threshold`` bytes and more from mmap, so they go back to the
    system when freed. By default glibc raises that threshold up to 32 MiB as large blocks are
    freed, then keeps the strips of feature maps (1 to 30 MiB) in its heaps, where
    fragmentation holds freed memory in the process: a 12 MP frame's trunk then peaks at
    2.9 GiB instead of 2.2 GiB. Once per process; nothing where there is no glibc."""
    if _MALLOC_SET:
        return
    _MALLOC_SET.append(threshold)
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD (also stops its adjustment)
    except (OSError, AttributeError):
        pass


def _graph_inputs(tensor):
    op, node_index, _ = tensor._keras_history
    return op, op._inbound_nodes[node_index].input_tensors


def _scale_of(tensor, memo):
    """A tensor's height relative to the packed input (2 for level 0, 1/16 for level 5)."""
    if id(tensor) not in memo:
        op, inputs = _graph_inputs(tensor)
        scale = _scale_of(inputs[0], memo) if inputs else 1.0
        if isinstance(op, UpConv):
            scale *= 2
        elif isinstance(op, keras.layers.MaxPooling2D):
            scale /= 2
        memo[id(tensor)] = scale
    return memo[id(tensor)]


def _conv_node(layer, source):
    return _NormConvRows(layer, source) if layer.instance_norm else _ConvRows(layer, source)


def _graph_rows(output, packed):
    """Row streams for the Keras graph ending at ``output`` (a KerasTensor of a PyNET),
    with ``packed`` as its input."""
    made = {}

    def rows_of(tensor, private=False):
        if id(tensor) in made and not private:
            return made[id(tensor)]
        op, inputs = _graph_inputs(tensor)
        kind = type(op).__name__
        if isinstance(op, keras.layers.InputLayer):
            node = _SourceRows(packed)
        elif isinstance(op, MultiConvBlock):
            source = rows_of(inputs[0])
            branches = [_conv_node(second, _conv_node(first, source)) for first, second in op.branches]
            node = branches[0] if len(branches) == 1 else _CatRows(source.height, branches)
        elif isinstance(op, ConvLayer):  # OutputHead included
            node = _conv_node(op, rows_of(inputs[0]))
        elif isinstance(op, UpConv):
            node = _UpRows(op, rows_of(inputs[0]))
        elif isinstance(op, keras.layers.MaxPooling2D):
            # an input without instance norm is recomputed for the pool rather than held whole
            block, _ = _graph_inputs(inputs[0])
            recompute = isinstance(block, MultiConvBlock) and not block.instance_norm
            node = _PoolRows(rows_of(inputs[0], private=recompute))
        elif kind == "Concatenate" and op.axis in (-1, 3):
            sources = [rows_of(t) for t in inputs]
            node = _CatRows(sources[0].height, sources)
        elif kind == "Add":
            node = _AddRows(rows_of(inputs[0]).height, [rows_of(t) for t in inputs])
        else:
            raise ValueError(f"strips cannot run the operation {op.name} ({kind})")
        if not private:
            made[id(tensor)] = node
        return node

    head = rows_of(output)
    nodes, todo = {}, [head]
    while todo:
        node = todo.pop()
        if id(node) not in nodes:
            nodes[id(node)] = node
            todo.extend(node.sources)
    for node in nodes.values():  # a concatenation read whole is not held a second time
        if isinstance(node, _CatRows):
            node.virtual = any(_reads_whole(consumer) for consumer in node.consumers)
    return head, list(nodes.values())


def _reads_whole(node):
    """Whether ``node`` reads its inputs to the end at once (instance norm), directly or
    through concatenations and sums."""
    if isinstance(node, _NormConvRows):
        return True
    return isinstance(node, (_CatRows, _AddRows)) and any(_reads_whole(c) for c in node.consumers)


def level_output(model, level):
    """The output of ``model`` (a PyNET build, or a level_model view) for pyramid ``level``."""
    memo = {}
    for output in model.outputs:
        if _scale_of(output, memo) == 2.0 / 2 ** level:
            return output
    raise ValueError(f"{model.name} has no output for level {level}")


def render_in_strips(model, level, packed, rows, out_height=None, progress=None, min_strip_pixels=MIN_STRIP_PIXELS):
    """Output of pyramid ``level`` of ``model`` for one packed frame (H, W, 4; multiples of
    16) as float32 (H', W', 3), unclipped, computed in strips of ``rows`` packed rows with
    bounded memory (see above). ``out_height`` output rows are computed (default: all);
    ``progress(n)`` is called with the number of output rows added after each strip. Maps at
    lower resolutions use strips of at least ``min_strip_pixels`` pixels."""
    output_tensor = level_output(model, level)
    return_freed_memory()
    packed = tf.convert_to_tensor(np.asarray(packed, np.float32))
    height, width = int(packed.shape[0]), int(packed.shape[1])
    if height % 16 or width % 16:
        raise ValueError(f"the packed frame must be a multiple of 16 in both sides, not {height}x{width}")
    rows = max(1, int(rows))
    head, nodes = _graph_rows(output_tensor, packed)
    for node in nodes:
        ratio = node.height / height     # the node's resolution relative to the packed frame
        node.step = min(node.height, max(-(-rows * node.height // height),
                                         -(-min_strip_pixels // max(1, int(width * ratio)))))
    out_height = head.height if out_height is None else min(out_height, head.height)
    strip = max(1, -(-rows * head.height // height))
    output = None
    for start in range(0, out_height, strip):
        end = min(start + strip, out_height)
        data = head.get(start, end).numpy()
        head.release(render_in_strips, end)
        if output is None:  # after the whole-frame part has run and been dropped
            output = np.empty((out_height,) + data.shape[1:], np.float32)
        output[start:end] = data
        if progress is not None:
            progress(end - start)
    return output


# ---------------------------------------------------------------------------------------
# compute count

def conv_macs(model, height, width, level=None, batch=1):
    """Multiply-accumulates of every convolution of ``model`` for a packed input of
    ``height`` x ``width``, counted from the layers' shapes: k*k*Cin*Cout per output pixel
    of a convolution and per input pixel of a transposed one. ``level=None`` counts all the
    outputs' graphs (what the reference counts, 335.8 GMAC at 224 x 224), a level only what
    its output needs."""
    outputs = model.outputs if level is None else [level_output(model, level)]
    memo, counted, todo, total = {}, set(), list(outputs), 0
    while todo:
        tensor = todo.pop()
        if id(tensor) in counted:
            continue
        counted.add(id(tensor))
        op, inputs = _graph_inputs(tensor)
        todo.extend(inputs)
        if not inputs:
            continue
        scale = _scale_of(inputs[0], memo)
        cin = int(inputs[0].shape[-1])
        pixels = batch * int(height * scale) * int(width * scale)
        if isinstance(op, MultiConvBlock):
            total += pixels * sum(size * size * (cin + op.filters) * op.filters
                                  for size in range(3, op.max_size + 1, 2))
        elif isinstance(op, ConvLayer):
            total += pixels * op.kernel_size ** 2 * cin * op.filters
        elif isinstance(op, UpConv):
            total += pixels * 9 * cin * op.filters
    return total
