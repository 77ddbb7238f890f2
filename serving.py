"""The exported graph: a RAW mosaic in, the picture out, as test_model.py computes it.

Everything between the sensor's mosaic and the picture is inside: the Bayer packing of
camera.extract_bayer_channels, the mirrored padding of the packed input to multiples of 16 and
the crop back, the network, the clipping to [0, 1] and the 8-bit rounding of test_model.py's
PNGs (or float32 in [0, 1] with output_type=float). One signature:

    serving_default(mosaic: uint16 [H, W]) -> {"rgb": uint8 or float32 [H', W', 3],
                                               "level": int32, "iteration": int64}
"""

import tensorflow as tf

import camera

PAD_MULTIPLE = 16          # the network's four 2x poolings
SERVING = "serving_default"


def pack_mosaic(mosaic, exact=True):
    """camera.extract_bayer_channels as TensorFlow ops (the same camera.bayer_planes), divided
    by camera.RAW_SCALE. An odd last row or column is dropped, as there. ``exact=False`` for
    TFLite, whose converter turns the division into a multiplication by 1/1020 anyway (1 ulp
    off for some values)."""
    raw = tf.cast(mosaic, tf.float32)
    shape = tf.shape(raw)
    packed = tf.stack(camera.bayer_planes(raw[: shape[0] // 2 * 2, : shape[1] // 2 * 2]), axis=-1)
    if not exact:
        return packed / float(camera.RAW_SCALE)
    # Grappler rewrites a division by a constant into a multiplication by its reciprocal,
    # which is 1 ulp off for some values; DivNoNan is a true division it leaves alone.
    return tf.math.divide_no_nan(packed, float(camera.RAW_SCALE))


def _symmetric_indices(size, multiple):
    """Indices extending ``range(size)`` to a multiple of ``multiple`` by mirroring with the edge
    repeated, for any size >= 1: numpy's 'symmetric' padding (render.pad_to_multiple), which
    tf.pad's SYMMETRIC matches only for pads no larger than the image."""
    padded = (size + multiple - 1) // multiple * multiple
    phase = tf.range(padded) % (2 * size)
    return tf.where(phase < size, phase, 2 * size - 1 - phase)


def pad_packed(packed, multiple=PAD_MULTIPLE):
    """render.pad_to_multiple for one packed (H, W, 4) tensor, bottom and right."""
    shape = tf.shape(packed)
    packed = tf.gather(packed, _symmetric_indices(shape[0], multiple), axis=0)
    return tf.gather(packed, _symmetric_indices(shape[1], multiple), axis=1)


def mosaic_to_picture(network, level, mosaic, output_type, exact_rounding=True):
    """The whole pipeline of test_model.py for one mosaic, as TensorFlow ops. ``network`` is a
    single-output Keras model of ``level``. The 8-bit rounding is test_model.py's
    floor(x * 255 + 0.5) of images.to_uint, in float64 so that every pixel equals its PNG's;
    ``exact_rounding=False`` is for TFLite, which has neither float64 arithmetic nor DivNoNan:
    the rounding is then in float32 (a pixel can differ by 1 where x * 255 + 0.5 is within
    float32 rounding of an integer) and the packing's division a multiplication."""
    packed = pack_mosaic(mosaic, exact_rounding)
    shape = tf.shape(packed)
    rgb = network(pad_packed(packed)[None], training=False)[0]
    # level L's output is 2 / 2**L times the packed size, rounded down (render.render)
    rgb = rgb[: shape[0] * 2 // 2 ** level, : shape[1] * 2 // 2 ** level]
    rgb = tf.clip_by_value(rgb, 0.0, 1.0)
    if output_type == "float":
        return rgb
    if exact_rounding:
        rgb = tf.cast(rgb, tf.float64)
    return tf.cast(tf.floor(rgb * 255.0 + 0.5), tf.uint8)


class ServingModule:
    """The exported function around ``network`` (a single-output Keras model of ``level``).
    ``size``: a fixed (H, W) mosaic size, or None for any.

    One signature, as the LiteRT interpreter applies its XNNPACK delegate (several times faster,
    benchmarks/README.md) only to a model with a single subgraph. Its constant outputs ``level`` and
    ``iteration`` say what the pictures are; a SavedModel also has them as variables."""

    SIGNATURE = SERVING

    def __init__(self, network, level, iteration, output_type, size=None, exact_rounding=True):
        self.module = tf.Module()
        # the TensorFlow variables themselves: tracked only through the Keras model, they are
        # saved, but TFLite's converter does not freeze them (the .tflite then has no weights)
        self.module.weights = [weight.value for weight in network.weights]
        self.module.level = tf.Variable(level, trainable=False, dtype=tf.int32, name="level")
        self.module.iteration = tf.Variable(iteration, trainable=False, dtype=tf.int64, name="iteration")
        spec = tf.TensorSpec(list(size) if size else [None, None], tf.uint16, name="mosaic")

        def serving_default(mosaic):
            return {"rgb": mosaic_to_picture(network, level, mosaic, output_type, exact_rounding),
                    "level": tf.constant(level, tf.int32), "iteration": tf.constant(iteration, tf.int64)}

        self.module.serving_default = tf.function(serving_default, input_signature=[spec])

    def concrete_function(self):
        return self.module.serving_default.get_concrete_function()
