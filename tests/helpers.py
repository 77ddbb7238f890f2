"""What several test modules use: the repository's root, files written as the reference's tools
and the camera write them (TF1 checkpoints, MatConvNet VGG-19, DNG), an independent NumPy VGG,
weights for comparisons and the gradient a training step applies. Test modules import these
from here, never from one another.

Light at import (conftest imports it first): TensorFlow, Keras and the writers' packages are
imported by the functions that need them.
"""

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# checkpoints as the reference's TF1 Saver wrote them

def write_tf1_checkpoint(prefix, arrays):
    """Write ``{key: ndarray}`` with TF1's own Saver in a TF1 graph, as the reference did."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        variables = {key: tf.compat.v1.Variable(value, name=key.replace("/", "_")) for key, value in arrays.items()}
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, prefix, write_meta_graph=False, write_state=False)
    return prefix


# ---------------------------------------------------------------------------------------
# VGG-19 as the MatConvNet file imagenet-vgg-verydeep-19.mat holds it

# The 36 layers up to relu5_4 and the (in, out) channels of VGG-19's convolutions, written
# out here rather than taken from vgg.py.
BLOCKS = ((2, 3, 64), (2, 64, 128), (4, 128, 256), (4, 256, 512), (4, 512, 512))
RGB_MEAN = np.array([123.68, 116.779, 103.939])


def vgg19_layout():
    """[(name, cin, cout) for convs, (name,) for relu/pool] up to relu5_4, then the tail of the
    real file (pool5, fc6...), which the readers must ignore."""
    layers = []
    for block, (convs, cin, cout) in enumerate(BLOCKS, start=1):
        for c in range(1, convs + 1):
            layers.append((f"conv{block}_{c}", cin if c == 1 else cout, cout))
            layers.append((f"relu{block}_{c}",))
        if block < 5:
            layers.append((f"pool{block}",))
    return layers


def random_vgg_weights(seed=0):
    """Kernels (H x W x in x out) and biases with the real shapes, He-scaled so that 16
    layers neither explode nor vanish."""
    rng = np.random.default_rng(seed)
    weights = []
    for entry in vgg19_layout():
        if len(entry) == 3:
            _, cin, cout = entry
            kernel = rng.normal(0.0, np.sqrt(2.0 / (9 * cin)), (3, 3, cin, cout)).astype(np.float32)
            bias = rng.normal(0.0, 0.1, cout).astype(np.float32)
            weights.append((kernel, bias))
    return weights


def write_matconvnet_vgg(path, weights):
    """A MatConvNet SimpleNN file laid out as imagenet-vgg-verydeep-19.mat: ``layers`` is a
    1 x 43 cell of structs; a conv struct's first field ``weights`` is a 1 x 2 cell holding the
    W x H x in x out kernels (MatConvNet order, i.e. H and W swapped) and a 1 x out bias."""
    import scipy.io

    layout = vgg19_layout() + [("pool5",), ("fc6",), ("relu6",), ("fc7",), ("relu7",), ("fc8",), ("prob",)]
    cells = np.empty((1, len(layout)), dtype=object)
    conv = 0
    for i, entry in enumerate(layout):
        name = entry[0]
        if len(entry) == 3:
            kernel, bias = weights[conv]
            conv += 1
            pair = np.empty((1, 2), dtype=object)
            pair[0, 0] = np.transpose(kernel, (1, 0, 2, 3))
            pair[0, 1] = bias.reshape(1, -1)
            cells[0, i] = {"weights": pair, "pad": np.array([[1.0, 1, 1, 1]]), "type": "conv",
                           "name": name, "stride": np.array([[1.0, 1]])}
        elif name.startswith("pool"):
            cells[0, i] = {"name": name, "stride": np.array([[2.0, 2]]), "pad": np.array([[0.0, 1, 0, 1]]),
                           "type": "pool", "method": "max", "pool": np.array([[2.0, 2]])}
        else:
            cells[0, i] = {"type": "relu" if name.startswith("relu") else "other", "name": name}
    scipy.io.savemat(path, {"layers": cells, "classes": np.zeros((1, 1))})


# ---------------------------------------------------------------------------------------
# an independent NumPy VGG

def np_conv_same(x, kernel, bias):
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))  # n,h,w,c,3,3
    return np.einsum("nhwcij,ijco->nhwo", windows, kernel.astype(np.float64), optimize=True) + bias


def np_maxpool_same(x):
    n, h, w, c = x.shape
    x = np.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-np.inf)
    return x.reshape(n, x.shape[1] // 2, 2, x.shape[2] // 2, 2, c).max(axis=(2, 4))


def np_vgg_relu5_4(images01, weights, bgr=False):
    x = images01.astype(np.float64) * 255.0 - RGB_MEAN
    if bgr:
        x = x[..., ::-1]
    conv = 0
    for entry in vgg19_layout():
        name = entry[0]
        if name.startswith("conv"):
            x = np_conv_same(x, *weights[conv])
            conv += 1
        elif name.startswith("relu"):
            x = np.maximum(x, 0.0)
        else:
            x = np_maxpool_same(x)
    return x


# ---------------------------------------------------------------------------------------
# mosaics of a natural picture, as PNG files written independently of the code under test

def natural_mosaic(height, width):
    """A 10-bit RGGB mosaic of scikit-image's astronaut photograph (at most 512 x 512): the
    detail and noise of a real picture, not a synthetic pattern."""
    import skimage.data

    photo = skimage.data.astronaut()[:height, :width].astype(np.uint16)
    mosaic = np.empty((height, width), np.uint16)
    for row, column, channel in ((0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 2)):  # RGGB, written out here
        mosaic[row::2, column::2] = photo[row::2, column::2, channel]
    return mosaic * 4


def write_png_mosaic(path, mosaic, bitdepth=16):
    """A single-channel PNG written with pypng (not the project's encoder)."""
    import png  # pypng

    mosaic = np.asarray(mosaic)
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "wb") as handle:
        png.Writer(mosaic.shape[1], mosaic.shape[0], greyscale=True, bitdepth=bitdepth).write(
            handle, mosaic.astype(np.uint16 if bitdepth == 16 else np.uint8).tolist())
    return str(path)


# ---------------------------------------------------------------------------------------
# DNG files as cameras write them

CFA_CODES = {"R": 0, "G": 1, "B": 2}


def write_dng(path, mosaic, pattern="RGGB", bits=10, black=64, white=None, active=None, cfa=None, dims=(2, 2),
              linear=False):
    """An uncompressed DNG (LibRaw, like dcraw, ignores images under 22 pixels a side).

    pidng packs 10-bit samples when the width is a multiple of 4 and 12-bit ones when it is even;
    its 14-bit packer is broken, so 14-bit (and odd-width) data is stored in 16-bit samples, the
    bit depth being given by WhiteLevel, as many cameras do."""
    from pidng.core import RAW2DNG, DNGTags, Tag
    from pidng.defs import CalibrationIlluminant, DNGVersion, Orientation, PhotometricInterpretation

    mosaic = np.asarray(mosaic, dtype=np.uint16)
    height, width = mosaic.shape[:2]
    packable = (bits == 10 and width % 4 == 0) or (bits == 12 and width % 2 == 0)
    tags = DNGTags()
    tags.set(Tag.ImageWidth, width)
    tags.set(Tag.ImageLength, height)
    tags.set(Tag.TileWidth, width)
    tags.set(Tag.TileLength, height)
    tags.set(Tag.Orientation, Orientation.Horizontal)
    tags.set(Tag.BitsPerSample, bits if packable and not linear else 16)
    if linear:
        tags.set(Tag.PhotometricInterpretation, PhotometricInterpretation.Linear_Raw)
        tags.set(Tag.SamplesPerPixel, 3)
    else:
        tags.set(Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array)
        tags.set(Tag.SamplesPerPixel, 1)
        tags.set(Tag.CFARepeatPatternDim, list(dims))
        tags.set(Tag.CFAPattern, cfa if cfa is not None else [CFA_CODES[c] for c in pattern])
    if isinstance(black, (list, tuple)):
        tags.set(Tag.BlackLevelRepeatDim, [2, 2])
    tags.set(Tag.BlackLevel, black)
    tags.set(Tag.WhiteLevel, white if white is not None else (1 << bits) - 1)
    tags.set(Tag.ColorMatrix1, [[1, 1], [0, 1], [0, 1], [0, 1], [1, 1], [0, 1], [0, 1], [0, 1], [1, 1]])
    tags.set(Tag.CalibrationIlluminant1, CalibrationIlluminant.D65)
    tags.set(Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]])
    tags.set(Tag.Make, "Test")
    tags.set(Tag.Model, "Synthetic")
    tags.set(Tag.DNGVersion, DNGVersion.V1_4)
    tags.set(Tag.DNGBackwardVersion, DNGVersion.V1_2)
    if active:
        tags.set(Tag.ActiveArea, list(active))
    writer = RAW2DNG()
    writer.options(tags, path="", compress=False)
    folder, name = os.path.split(str(path))
    data = writer.convert(mosaic, filename="")
    with open(os.path.join(folder, name), "wb") as handle:
        handle.write(data)
    return str(path)


# ---------------------------------------------------------------------------------------
# weights and gradients of the full PyNET

def assign_sane_weights(model, rng):
    """Random weights scaled by fan-in, so activations stay of order 1 through the 150 layers:
    float32 rounding then stays near 1e-6 and a real difference between two ways of computing
    the same output shows. (The reference's 0.01 init gives a nearly constant output.)"""
    for var in model.weights:
        shape = var.shape
        if len(shape) == 4:
            is_up = var.path.split("/")[0].startswith(("conv_t", "conv_l0")) and not var.path.startswith("conv_l0_out")
            fan_in = 9 * shape[3] / 4 if is_up else shape[0] * shape[1] * shape[2]
            value = rng.normal(0, 1 / np.sqrt(fan_in), shape)
        elif var.path.endswith("scale"):
            value = rng.normal(1.0, 0.2, shape)
        else:
            value = rng.normal(0, 0.2, shape)
        var.assign(value.astype(np.float32))


def captured_gradient(model, view_level, batches, accum_steps, batch_size, strategy=None, xla=False):
    """The gradient that steps.Steps hands to the optimizer for one update made from
    ``batches`` (its micro-batches), caught by an optimizer that stores it instead of
    applying it (after Keras' all-reduce over replicas)."""
    import keras
    import tensorflow as tf

    import steps
    from model import level_model

    class Capture(keras.optimizers.Optimizer):
        def __init__(self):
            super().__init__(learning_rate=1.0, name="capture")

        def build(self, variables):
            super().build(variables)
            self.caught = [self.add_variable_from_reference(v, "caught") for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            self.assign(self.caught[self._get_variable_index(variable)], gradient)

    strategy = strategy or tf.distribute.get_strategy()
    view = level_model(model, view_level)
    with strategy.scope():
        optimizer = Capture()
        optimizer.build(view.trainable_variables)
    steps = steps.Steps(strategy, view, optimizer, view_level, None, batch_size, accum_steps, False, xla)
    feed = iter(batches)
    steps.train_step(lambda: next(feed))
    return {v.path: np.array(c.numpy()) for v, c in zip(view.trainable_variables, optimizer.caught)}
