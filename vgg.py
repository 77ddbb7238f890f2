"""VGG-19 features up to ``relu5_4`` for PyNET's content loss (the reference's vgg.py).

The reference (``vgg.py`` of aiff22/PyNET) reads the MatConvNet "imagenet-vgg-verydeep-19"
model with ``scipy.io.loadmat``, takes the first 36 entries of its ``layers`` array
(conv1_1 ... relu5_4), transposes each kernel from MatConvNet's W x H x in x out to
TensorFlow's H x W x in x out, and builds stride-1 'SAME' convolutions + bias, ReLUs and
2x2 stride-2 **'SAME'** max-pools.  Its input is ``image * 255`` minus the **RGB** means
``[123.68, 116.779, 103.939]``; there is no scaling by a standard deviation.

This module does the same.  It can also read the Keras ``VGG19`` weights file
(``vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5``, Keras' legacy HDF5 layout), which
differs in two ways that are handled here: Keras' first convolution expects **BGR** input
(its kernel's input channels are reversed so the network takes the same RGB input as the
MatConvNet one) and Keras' pools are 'valid' (this module always uses 'same' pools, which
the reference's level-3/4/5 feature sizes 4, 2, 1 need).  Both files derive from the same
Oxford Caffe model; that their values agree was not checked here.

Levels 3, 2, 1 and 0 need the file (their loss has a content term); levels 5 and 4 do not.
"""

import os

import h5py
import numpy as np
import scipy.io

from cli import UserError

DEFAULT_VGG_PATH = "vgg_pretrained/imagenet-vgg-verydeep-19.mat"
VGG_URL = "https://polybox.ethz.ch/index.php/s/7z5bHNg5r5a0g7k"

# image * 255 minus these, in RGB order (MatConvNet's average image colour).
MEAN_RGB = np.array([123.68, 116.779, 103.939], dtype=np.float32)

# The first 36 layers of VGG-19, as the reference lists them.
LAYERS = (
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "conv3_4", "relu3_4", "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "conv4_4", "relu4_4", "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "conv5_4", "relu5_4",
)
CONV_LAYERS = tuple(name for name in LAYERS if name.startswith("conv"))
CONTENT_LAYER = "relu5_4"

# (in, out) channels of the 16 convolutions.
CONV_CHANNELS = ((3, 64), (64, 64),
                 (64, 128), (128, 128),
                 (128, 256), (256, 256), (256, 256), (256, 256),
                 (256, 512), (512, 512), (512, 512), (512, 512),
                 (512, 512), (512, 512), (512, 512), (512, 512))

# Keras VGG19 layer names of the same 16 convolutions, in order.
KERAS_CONV_LAYERS = tuple(f"block{b}_conv{c}" for b, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))
                          for c in range(1, n + 1))


# The weights files vgg_dir= may name, or hold when it is a folder: MatConvNet's, then Keras'.
WEIGHT_FILES = (os.path.basename(DEFAULT_VGG_PATH), "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5")


def weights_file(path: str) -> str:
    """The weights file that ``vgg_dir=path`` names: ``path`` itself, or for a folder the
    MatConvNet or Keras file in it; a UserError saying what is missing otherwise."""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UserError(f"vgg_dir={path}: a folder without the VGG-19 weights ({' or '.join(WEIGHT_FILES)}); "
                        f"put the file there or give the file: vgg_dir={os.path.join(path, WEIGHT_FILES[0])}")
    if not os.path.isfile(path):
        raise UserError(missing_file_message(path))
    return path


def missing_file_message(path: str) -> str:
    return (f"{path}: VGG-19 weights not found; levels 3, 2, 1 and 0 need them for the content loss. "
            f"Download imagenet-vgg-verydeep-19.mat ({VGG_URL}) and put it there, pass vgg_dir=PATH, "
            f"or vgg_dir=none to train without the content loss")


# ---------------------------------------------------------------------------------------
# reading the weight files

def _field(record, name: str, position: int):
    """A field of a loadmat struct record: by name when the struct has names, else by position."""
    names = record.dtype.names if hasattr(record, "dtype") else None
    if names and name in names:
        return record[name]
    return record[position]


def load_matconvnet(path: str):
    """Kernels (H x W x in x out) and biases of the 16 convolutions up to conv5_4, from the
    MatConvNet ``.mat`` file, read as the reference reads it."""
    if not os.path.isfile(path):
        raise UserError(missing_file_message(path))
    try:
        data = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several types for a damaged file
        raise UserError(f"{path}: cannot read the MatConvNet VGG-19 file ({exc.__class__.__name__}: {exc})") from None
    if "layers" not in data:
        raise UserError(f"{path}: not a MatConvNet model (no 'layers' entry)")
    layers = data["layers"][0]
    if len(layers) < len(LAYERS):
        raise UserError(f"{path}: expected at least {len(LAYERS)} layers (up to relu5_4), found {len(layers)}")
    weights = []
    conv_index = 0
    for i, name in enumerate(LAYERS):
        if not name.startswith("conv"):
            continue
        record = layers[i][0][0]
        # The reference reads layers[0][i][0][0][0][0]: the first field ('weights', a 1x2 cell).
        # Reading the field by name also accepts files that store the fields in another order.
        names = record.dtype.names or ()
        stored_name = ""
        if "name" in names and np.asarray(record["name"]).size:
            stored_name = str(np.asarray(record["name"]).ravel()[0])
        if stored_name and stored_name != name:
            raise UserError(f"{path}: layer {i} is '{stored_name}', expected '{name}': not the VGG-19 model")
        try:
            kernels, bias = _field(record, "weights", 0)[0]
        except (IndexError, ValueError, TypeError):
            raise UserError(f"{path}: layer {i} ({name}) has no (kernels, bias) pair") from None
        kernels = np.transpose(np.asarray(kernels, dtype=np.float32), (1, 0, 2, 3))
        bias = np.asarray(bias, dtype=np.float32).reshape(-1)
        _check_shapes(path, name, conv_index, kernels, bias)
        weights.append((kernels, bias))
        conv_index += 1
    return weights


def load_keras_h5(path: str):
    """Kernels and biases of the 16 convolutions from Keras' VGG19 weights file (legacy HDF5
    layout, e.g. ``vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5``), converted so the
    network takes the same RGB, mean-subtracted input as the MatConvNet model."""
    if not os.path.isfile(path):
        raise UserError(missing_file_message(path))
    weights = []
    try:
        with h5py.File(path, "r") as handle:
            root = handle["model_weights"] if "model_weights" in handle else handle
            for index, layer in enumerate(KERAS_CONV_LAYERS):
                if layer not in root:
                    raise UserError(f"{path}: no layer '{layer}': not a Keras VGG19 weights file")
                group = root[layer]
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
                if len(names) != 2:
                    raise UserError(f"{path}: layer '{layer}' has {len(names)} weights, expected kernel and bias")
                kernels = np.asarray(group[names[0]], dtype=np.float32)
                bias = np.asarray(group[names[1]], dtype=np.float32).reshape(-1)
                if index == 0:
                    kernels = kernels[:, :, ::-1, :]  # Keras/Caffe VGG reads BGR; this network reads RGB
                kernels = np.ascontiguousarray(kernels)
                _check_shapes(path, CONV_LAYERS[index], index, kernels, bias)
                weights.append((kernels, bias))
    except OSError as exc:
        raise UserError(f"{path}: cannot read the HDF5 file ({exc})") from None
    return weights


def _check_shapes(path, name, index, kernels, bias):
    cin, cout = CONV_CHANNELS[index]
    if kernels.shape != (3, 3, cin, cout) or bias.shape != (cout,):
        raise UserError(f"{path}: {name} has kernel {kernels.shape} and bias {bias.shape}, "
                        f"expected (3, 3, {cin}, {cout}) and ({cout},): not the VGG-19 model")


def load_weights(path: str):
    """The 16 (kernel, bias) pairs from a MatConvNet ``.mat`` or a Keras ``.h5`` file, or from
    the one of them in the folder ``path`` (weights_file)."""
    path = weights_file(path)
    if path.lower().endswith((".h5", ".hdf5")):
        return load_keras_h5(path)
    return load_matconvnet(path)


# ---------------------------------------------------------------------------------------
# the network

def preprocess(image255):
    """``image * 255`` (RGB) to the network input: the RGB means are subtracted."""
    return image255 - MEAN_RGB


class VGG19:
    """VGG-19 up to ``relu5_4`` with fixed weights (non-trainable float32 variables, so a
    ``tf.distribute`` strategy places a copy on every replica when built in its scope)."""

    def __init__(self, weights):
        import tensorflow as tf  # here: preflight.py reads the weights file's name before TensorFlow starts

        if len(weights) != len(CONV_LAYERS):
            raise ValueError(f"expected {len(CONV_LAYERS)} (kernel, bias) pairs, got {len(weights)}")
        self.kernels = [tf.Variable(k, trainable=False, dtype=tf.float32, name=f"vgg_{n}_kernel")
                        for (k, _), n in zip(weights, CONV_LAYERS)]
        self.biases = [tf.Variable(b, trainable=False, dtype=tf.float32, name=f"vgg_{n}_bias")
                       for (_, b), n in zip(weights, CONV_LAYERS)]

    def net(self, input_image, up_to: str = CONTENT_LAYER) -> dict:
        """All layer outputs up to ``up_to`` for an already preprocessed NHWC input, by name."""
        import tensorflow as tf  # here: preflight.py reads the weights file's name before TensorFlow starts

        out = {}
        current = tf.cast(input_image, tf.float32)
        conv = 0
        for name in LAYERS:
            kind = name[:4]
            if kind == "conv":
                current = tf.nn.conv2d(current, self.kernels[conv], strides=1, padding="SAME")
                current = tf.nn.bias_add(current, self.biases[conv])
                conv += 1
            elif kind == "relu":
                current = tf.nn.relu(current)
            else:
                current = tf.nn.max_pool2d(current, ksize=2, strides=2, padding="SAME")
            out[name] = current
            if name == up_to:
                break
        return out

    def __call__(self, images, layer: str = CONTENT_LAYER):
        """Features of ``layer`` for NHWC RGB images in [0, 1] (the network's output scale)."""
        import tensorflow as tf  # here: preflight.py reads the weights file's name before TensorFlow starts

        return self.net(preprocess(tf.cast(images, tf.float32) * 255.0), up_to=layer)[layer]


def load_vgg(path: str = DEFAULT_VGG_PATH) -> VGG19:
    """Read the weights file and build the network; a missing or wrong file is a UserError."""
    return VGG19(load_weights(path))


def feature_size(target_size: int) -> int:
    """Side of the relu5_4 map for a square input: four 'SAME' 2x2 pools, i.e. ceil(n / 16)."""
    size = target_size
    for _ in range(4):
        size = -(-size // 2)
    return size
