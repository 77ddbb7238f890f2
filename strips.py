"""PyNET's graph run over strips of rows: the output of a packed frame of any size with
bounded memory, equal to the whole frame's.

    padded, (height, width) = render.pad_to_multiple(packed)   # multiples of 16
    rgb = strips.run_in_strips(model, 0, padded, rows=64)       # == the whole frame's output

render.render chooses between this and the whole frame at once (render.level_function).
This one module holds the strip scheduler, the only algorithm of its kind here; at about 550
lines it stays whole, as its row bookkeeping is read together.
"""

import numpy as np
import tensorflow as tf
from keras import layers

from model import (
    IN_EPSILON,
    LEAKY_SLOPE,
    ConvLayer,
    MultiConvBlock,
    OutputHead,
    UpConv,
    graph_inputs,
    level_output,
    reduced,
)

# How it works.
#
# The whole-frame graph holds every feature map of the frame at once (a 12 MP frame needs
# several times the memory of a small GPU; benchmarks/README.md, "Inference"). Here the same graph, read from the
# Keras model and using its variables, runs over strips of rows spanning the whole width:
#
# * a layer without instance norm is computed strip by strip and keeps only the rows its
#   consumers still need (kernel-size - 1 rows, more across skip connections): with the
#   reference's flags that is all of level 1 and level 0, the bulk of the compute and of
#   the memory, never held for the whole frame. A map read by several branches is computed
#   once per strip, as far as the farthest-reaching branch reads (_look_ahead), and its rows
#   across a seam are copied once for all of them (_Rows._merge);
# * a layer with instance norm (levels 2 to 5) needs statistics over the whole frame: its
#   pre-norm output is computed strip by strip and held, the mean and variance taken over
#   all of it, then each strip is normalised (replacing the pre-norm one). A map is dropped
#   strip by strip as soon as its last consumer has passed it.
#
# * a few maps with instance norm are replayed instead of held (REPLAYED): their statistics
#   are gathered strip by strip, nothing kept, and their rows computed again, normalised, each
#   time a consumer reads them, as for a layer without instance norm. Those chosen are the
#   ones held while level 2 makes the peak that are cheapest to compute again.
#
# Zero padding is applied only at the frame's edges, and the output equals the whole-frame
# one up to float rounding. The input of pool1 (conv_l1_d1, no instance norm, a tiny share of
# the work) is computed again rather than kept for the whole frame.
# The peak memory is reached while the maps of level 2 are held; oneDNN allocates through
# malloc there (runtime.bound_memory). Strips free and allocate several times the whole frame's
# memory in blocks of 1-30 MiB, so faulting them in costs more than for the whole frame:
# test_model.py runs malloc on huge pages (runtime.run_with_huge_pages). The figures are in
# benchmarks/README.md, "Inference".

MIN_STRIP_PIXELS = 16384    # smallest convolution worth a call: low levels use taller strips


# Feature maps are held as (rows, W, C) tensors: slicing rows is then a slice of the first
# dimension, which TensorFlow serves without copying. Strips run eagerly, but for their
# convolutions (see _conv_function): tracing a steady strip once into a graph and replaying
# it was no faster on a 12 MP frame.

def _conv_rows(x, layer, pad_top, pad_bottom, relu, weights=None):
    """Conv + bias (+ leaky ReLU) of a strip of rows (rows, W, C): 'same' zero padding across
    the width, ``pad_top``/``pad_bottom`` zero rows above and below (only at the frame's edges).
    ``weights``: (kernel, bias) to use instead of the layer's. Computed in the layer's dtype, as
    the whole frame's layer computes (model.ConvLayer): the packed input and a reduced-precision
    map entering a float32 head are cast to it, and a reduced-precision layer with instance norm
    leaves out its bias."""
    dtype = tf.as_dtype(layer.compute_dtype)
    key = (pad_top, pad_bottom, layer.kernel_size // 2, relu, dtype)
    if key not in _CONV_FUNCTIONS:
        _CONV_FUNCTIONS[key] = _conv_function(*key)
    if weights is None:
        bias = layer.bias.value
        weights = (layer.kernel.value, tf.zeros_like(bias) if layer.instance_norm and reduced(layer) else bias)
    return _CONV_FUNCTIONS[key](tf.cast(x, dtype), *weights)


_CONV_FUNCTIONS = {}
_ANY = tf.TensorSpec(None, tf.float32)


def _conv_function(pad_top, pad_bottom, p, relu, dtype):
    """One graph per padding and dtype, for any strip and layer: Grappler fuses its conv, bias
    and leaky ReLU into one kernel, which writes one map where three eager ops wrote three. The
    float32 weights are cast inside, as a Keras layer casts its variables."""
    def conv(x, kernel, bias):
        y = tf.nn.conv2d(tf.expand_dims(x, 0), tf.cast(kernel, dtype), 1,
                         padding=[[0, 0], [pad_top, pad_bottom], [p, p], [0, 0]])
        y = tf.nn.bias_add(y, tf.cast(bias, dtype))
        return tf.squeeze(tf.nn.leaky_relu(y, LEAKY_SLOPE) if relu else y, 0)
    return tf.function(conv).get_concrete_function(tf.TensorSpec(None, dtype), _ANY, _ANY)


def _per_dtype(make):
    """``make(dtype)`` -> a concrete function, built once per dtype of its first argument."""
    made = {}

    def run(y, *args):
        if y.dtype not in made:
            made[y.dtype] = make(y.dtype)
        return made[y.dtype](y, *args)
    return run


@_per_dtype
def _strip_moments(dtype):
    """Per-channel mean and sum of squared deviations of a strip, in float32 and in one graph
    (no intermediate map is kept by Python, so the graph reuses its buffers)."""
    def moments(y):
        y = tf.cast(y, tf.float32)
        mean = tf.reduce_mean(y, axis=[0, 1])
        return mean, tf.reduce_sum(tf.square(y - mean), axis=[0, 1])
    return tf.function(moments).get_concrete_function(tf.TensorSpec(None, dtype))


@_per_dtype
def _affine_leaky(dtype):
    """Normalisation and leaky ReLU of a strip, in float32 (model.instance_norm), back in its dtype."""
    def affine(y, multiplier, offset):
        return tf.cast(tf.nn.leaky_relu(tf.cast(y, tf.float32) * multiplier + offset, LEAKY_SLOPE), dtype)
    return tf.function(affine).get_concrete_function(tf.TensorSpec(None, dtype), _ANY, _ANY)


def _up_rows(x, layer):
    """Stride-2 'same' transposed convolution + leaky ReLU of a strip of rows."""
    rows, width, _ = x.shape
    dtype = tf.as_dtype(layer.compute_dtype)
    y = tf.nn.conv2d_transpose(tf.expand_dims(tf.cast(x, dtype), 0), tf.cast(layer.kernel.value, dtype),
                               [1, 2 * rows, 2 * width, layer.filters], 2, "SAME")
    return tf.squeeze(tf.nn.leaky_relu(y, LEAKY_SLOPE), 0)


class _Rows:
    """One feature map (batch 1, whole width) computed in strips of rows.

    ``get(a, b)`` returns rows [a, b) as a (rows, W, C) tensor, computing what is missing;
    ``release(who, row)`` records that consumer ``who`` will not ask for rows below ``row``
    again. A map is computed as far as it is asked for and held as a list of chunks (one per
    computation), a chunk dropped once every consumer has passed it: nothing is ever copied
    to extend or trim a map, so holding a whole map costs the map and no more.
    """

    replay = False   # see _NormConvRows
    merge = False    # see _merge; set by _graph_rows for streamed maps

    def __init__(self, height, sources=()):
        self.height = height
        self.sources = list(sources)
        self.consumers = []
        self.chunks = []          # [(first row, end row, tensor)], in order
        self.hi = 0               # rows computed so far
        self.marks = {}
        self.step = height
        self.ahead = 0            # rows produced beyond a request: see _look_ahead
        for source in self.sources:
            source.marks[id(self)] = 0
            source.consumers.append(self)

    def low(self):
        marks = list(self.marks.values())
        if self.replay:
            # a consumer that has not read yet (mark 0) does not keep a replayed map's rows:
            # it will have them computed again
            marks = [mark for mark in marks if mark > 0]
        return min(marks) if marks else self.hi

    def get(self, a, b):
        if a < (self.chunks[0][0] if self.chunks else self.hi):
            self._restart(a)
        if b > self.hi:
            new = self.produce(self.hi, min(b + self.ahead, self.height))
            end = self.hi + int(new.shape[0])
            self.chunks.append((self.hi, end, new))
            self.hi = end
        return self._rows(a, b)

    def _rows(self, a, b):
        if not self.chunks or self.chunks[0][0] > a:
            raise RuntimeError(f"rows {a} to {b} of a held map were dropped before their last use")
        if self.merge and len(self._overlapping(a, b)) > 1:
            self._merge(a)
        return self._slice_rows(a, b)

    def _merge(self, a):
        """Join the rows still needed into one chunk when a request spans chunks: the
        requests of sibling consumers around the same seam (the branches of a block, with
        their different halos) are then slices of one copy instead of one copy each. Not
        when a consumer far behind would make the copy much larger than the request."""
        first = max(min(self.low(), a), self.chunks[0][0])
        if self.hi - first <= 2 * (self.hi - a):
            self.chunks = [(first, self.hi, self._slice_rows(first, self.hi))]

    def _overlapping(self, a, b):
        return [chunk for chunk in self.chunks if chunk[0] < b and chunk[1] > a]

    def _slice_rows(self, a, b):
        parts = [data if start >= a and end <= b else
                 tf.slice(data, [max(a, start) - start, 0, 0], [min(b, end) - max(a, start), -1, -1])
                 for start, end, data in self._overlapping(a, b)]
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)

    def _restart(self, a):
        """Rows from ``a`` are asked again after they were dropped: a replayed map (see
        _NormConvRows) reads its input a second time. Computed again from ``a``; the
        sources are told to keep what that needs until this node releases them again."""
        self.chunks, self.hi = [], self._aligned(a)
        for source in self.sources:
            source.marks[id(self)] = 0

    def _aligned(self, a):
        return a

    def _trim(self):
        low = self.low()
        while self.chunks and self.chunks[0][1] <= low:
            self.chunks.pop(0)
        if self.merge and self.chunks:
            start, end, data = self.chunks[0]
            if 2 * (low - start) >= end - start:
                # the few rows still needed of a mostly passed chunk (those computed ahead, the
                # halo of the next strip) are copied, so the chunk itself can go
                self.chunks[0] = (low, end, tf.raw_ops.DeepCopy(x=data[low - start:]))

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
        # a map upsampled from the level below first: its first rows run that whole level,
        # during which rows already taken from the other sources would be held
        order = sorted(range(len(self.sources)), key=lambda i: not isinstance(self.sources[i], _UpRows))
        parts = [None] * len(order)
        for i in order:
            parts[i] = self.sources[i].get(a, b)
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

    def _aligned(self, a):
        return a - a % 2

    def produce(self, a, b):
        source = self.sources[0]
        m0, m1 = a // 2, min((b + 1) // 2, source.height)
        first = max(m0 - 1, 0)
        y = _up_rows(source.get(first, m1), self.layer)
        source.release(self, source.height if 2 * m1 >= self.height else m1 - 1)
        return y[2 * (m0 - first):]


class _ConvRows(_Rows):
    """A ConvLayer or OutputHead, streamed; see _NormConvRows for one with instance norm."""

    def __init__(self, layer, source):
        super().__init__(source.height, [source])
        self.layer = layer

    def _conv(self, a, b, relu, release=True, weights=None):
        source, p, height = self.sources[0], self.layer.kernel_size // 2, self.height
        top, bottom = max(a - p, 0), min(b + p, height)
        y = _conv_rows(source.get(top, bottom), self.layer, top - (a - p), (b + p) - bottom, relu, weights)
        if release:
            source.release(self, height if b >= height else b - p)
        return y

    def produce(self, a, b):
        y = self._conv(a, b, self.layer.relu)
        return tf.tanh(y) * 0.58 + 0.5 if isinstance(self.layer, OutputHead) else y


class _Moments:
    """Per-channel mean and variance of a map seen strip by strip: Chan et al.'s pairwise
    update of the strips' own means and squared deviations, in float64, so that neither a
    second pass over the map nor the map itself is needed."""

    def __init__(self):
        self.count, self.mean, self.spread = 0, 0.0, 0.0

    def add(self, y):
        n = int(y.shape[0]) * int(y.shape[1])
        strip_mean, strip_spread = (t.numpy().astype(np.float64) for t in _strip_moments(y))
        delta = strip_mean - self.mean
        self.mean = self.mean + delta * n / (self.count + n)
        self.spread = self.spread + strip_spread + delta ** 2 * self.count * n / (self.count + n)
        self.count += n

    def variance(self):
        return self.spread / self.count


class _NormConvRows(_ConvRows):
    """A ConvLayer with instance norm: at the first request the whole map is computed before
    normalisation, strip by strip (``step`` rows), its mean and variance taken over all of it,
    then each strip normalised in place. Strips are dropped as the last consumer passes them.

    A ``replay`` map is never held: its statistics are gathered strip by strip (each strip
    dropped once counted), then its rows are computed again, normalised, as they are asked
    for, like a map without instance norm. Cheaper in memory, dearer in time: see REPLAYED."""

    def __init__(self, layer, source, replay=False):
        super().__init__(layer, source)
        self.replay = replay
        self.affine = None   # (multiplier, offset): normalisation and the layer's scale and shift
        self.folded = None   # replayed: (kernel, bias) with the normalisation folded in

    def _set_affine(self, mean, variance):
        multiplier = self.layer.scale.value / tf.sqrt(variance.astype(np.float32) + IN_EPSILON)
        self.affine = (multiplier, self.layer.shift.value - mean.astype(np.float32) * multiplier)
        if self.replay and not reduced(self.layer):
            # normalisation folded into the convolution: one fused kernel per replayed strip
            self.folded = (self.layer.kernel.value * multiplier,
                           (self.layer.bias.value - mean.astype(np.float32)) * multiplier + self.layer.shift.value)

    def _normalise(self, y):
        return _affine_leaky(y, *self.affine)

    def _materialise(self):
        chunks, moments = self.chunks, _Moments()
        for a in range(0, self.height, self.step):
            end = min(a + self.step, self.height)
            chunks.append((a, end, self._conv(a, end, relu=False)))
            moments.add(chunks[-1][2])
        self.sources[0].release(self, self.height)
        self._set_affine(moments.mean, moments.variance())
        for i, (a, end, _) in enumerate(chunks):  # one strip at a time: the map is never held twice
            chunks[i] = (a, end, self._normalise(chunks[i][2]))
        self.hi = self.height

    def _measure(self):
        """Mean and variance of the map, one strip at a time, nothing kept."""
        source, moments = self.sources[0], _Moments()
        held = not _restartable(source)   # then kept whole for the rows asked for later
        for a in range(0, self.height, self.step):
            moments.add(self._conv(a, min(a + self.step, self.height), relu=False, release=not held))
        if not held:
            source.release(self, self.height)
        self._set_affine(moments.mean, moments.variance())
        self.chunks, self.hi = [], self.height   # rows asked for from now on are computed again

    def produce(self, a, b):  # a replayed map's rows, normalised
        if self.folded is None:  # reduced precision: folded weights would be rounded again
            return self._normalise(self._conv(a, b, relu=False))
        return self._conv(a, b, relu=True, weights=self.folded)

    def get(self, a, b):
        if self.affine is None:
            (self._measure if self.replay else self._materialise)()
        return super().get(a, b) if self.replay else self._rows(a, b)


def _conv_node(layer, source, replay=False):
    if not layer.instance_norm:
        return _ConvRows(layer, source)
    return _NormConvRows(layer, source, replay)


def _restartable(node):
    """Whether ``node``'s rows can be computed again once dropped: a replayed map, or a map
    computed from such maps or the packed input alone. (A replayed map whose input is held
    needs that input kept until it is read for the last time: REPLAYED picks only maps
    whose held input another consumer keeps for as long.)"""
    if isinstance(node, _NormConvRows):
        return node.replay
    return all(_restartable(source) for source in node.sources)


def REPLAYED(block, size):
    """Whether branch ``size`` of MultiConvBlock ``block`` is replayed rather than held: the
    maps that make a 12 MP frame's peak (level 2, while conv_l2_d4..d7 hold their input and
    branches) and cost least to compute again: the 3x3 branch of those 7x7 blocks, and
    conv_l2_d1, held from the encoder to conv_l2_d7 otherwise (their memory and extra work:
    benchmarks/README.md, "Inference")."""
    if not block.instance_norm:
        return False
    return block.name == "conv_l2_d1" or (block.name in ("conv_l2_d4", "conv_l2_d5", "conv_l2_d6") and size == 3)


def _graph_rows(output, packed):
    """Row streams for the Keras graph ending at ``output`` (a KerasTensor of a PyNET),
    with ``packed`` as its input."""
    made = {}

    def rows_of(tensor, private=False):
        if id(tensor) in made and not private:
            return made[id(tensor)]
        op, inputs = graph_inputs(tensor)
        kind = type(op).__name__
        if isinstance(op, layers.InputLayer):
            node = _SourceRows(packed)
        elif isinstance(op, MultiConvBlock):
            source = rows_of(inputs[0])
            branches = []
            for first, second in op.branches:
                replay = REPLAYED(op, first.kernel_size)
                branches.append(_conv_node(second, _conv_node(first, source, replay), replay))
            node = branches[0] if len(branches) == 1 else _CatRows(source.height, branches)
        elif isinstance(op, ConvLayer):  # OutputHead included
            node = _conv_node(op, rows_of(inputs[0]))
        elif isinstance(op, UpConv):
            node = _UpRows(op, rows_of(inputs[0]))
        elif isinstance(op, layers.MaxPooling2D):
            # an input without instance norm is recomputed for the pool rather than held whole
            block, _ = graph_inputs(inputs[0])
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
    for node in nodes.values():
        # streamed maps only: a map with instance norm, or one read whole in steps by one,
        # would be joined into ever longer chunks that could not be dropped step by step
        node.merge = not isinstance(node, _NormConvRows) and not any(
            _held_reader(c) or c.replay for c in node.consumers)
    _look_ahead(nodes.values())
    return head, list(nodes.values())


def _look_ahead(nodes):
    """Set each map's ``ahead``: a map read by several streaming consumers is asked for rows
    up to different ends within one output strip (a 3x3 branch 1 row past the strip, a 9x9
    one 4), and would compute each request's few missing rows as a convolution of its own,
    most of them 1 to 4 rows, slow for their work. Asked for rows, a map computes as far as
    the farthest of its consumers asks."""
    far = {}

    def ends(node):  # how far past an output strip's end each streaming consumer reads node
        return [_asked(c, farthest(c)) for c in node.consumers if not _held_reader(c)]

    def farthest(node):
        if id(node) not in far:
            far[id(node)] = max(ends(node), default=0)
        return far[id(node)]

    for node in nodes:
        reads = ends(node)
        node.ahead = max(reads) - min(reads) if reads else 0


def _held_reader(node):
    """A consumer that reads its inputs whole, strip by strip, before any row is asked of it."""
    return isinstance(node, _NormConvRows) and not node.replay or isinstance(node, _CatRows) and node.virtual


def _asked(consumer, far):
    """The rows past a strip's end that ``consumer`` asks of its source when asked ``far``
    rows past it, in the source's rows."""
    if isinstance(consumer, _ConvRows):
        return far + consumer.layer.kernel_size // 2
    if isinstance(consumer, _PoolRows):
        return 2 * far
    if isinstance(consumer, _UpRows):
        return (far + 1) // 2 + 1
    return far


def _reads_whole(node):
    """Whether ``node`` reads its inputs to the end at once (instance norm), directly or
    through concatenations and sums."""
    if isinstance(node, _NormConvRows):
        return True
    return isinstance(node, (_CatRows, _AddRows)) and any(_reads_whole(c) for c in node.consumers)


def run_in_strips(model, level, packed, rows, out_height=None, progress=None, min_strip_pixels=MIN_STRIP_PIXELS):
    """Output of pyramid ``level`` of ``model`` for one packed frame (H, W, 4; multiples of
    16) as float32 (H', W', 3), unclipped, computed in strips of ``rows`` packed rows with
    bounded memory (see above). ``out_height`` output rows are computed (default: all);
    ``progress(n)`` is called with the number of output rows added after each strip. Maps at
    lower resolutions use strips of at least ``min_strip_pixels`` pixels."""
    output_tensor = level_output(model, level)
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
        head.release(run_in_strips, end)
        if output is None:  # after the whole-frame part has run and been dropped
            output = np.empty((out_height,) + data.shape[1:], np.float32)
        output[start:end] = data
        if progress is not None:
            progress(end - start)
    return output
