"""Export a trained PyNET as a deployable model: RAW Bayer mosaic in, RGB photo out.

    python export_model.py level=0 orig=true format=saved_model output=exported/pynet_level_0
    python export_model.py level=0 orig=true format=tflite size=1024x1024 precision=fp16
    python export_model.py level=1 restore_iter=35000 format=tflite quantize=dynamic

Everything between the sensor's mosaic and the picture is inside the exported graph, as
test_model.py computes it: the Bayer packing of load_dataset.extract_bayer_channels (/1020),
the mirrored padding of the packed input to multiples of 16 and the crop back, the network,
the clipping to [0, 1] and the 8-bit rounding of test_model.py's PNGs (or float32 in [0, 1]
with output_type=float). Both artefacts have one signature:

    serving_default(mosaic: uint16 [H, W]) -> {"rgb": uint8 or float32 [H', W', 3],
                                               "level": int32, "iteration": int64}

``level`` and ``iteration`` are constants naming the checkpoint (iteration -1: the released
weights). At level 0 the picture has the mosaic's size; at level L, 1/2**L of it, rounded down.

A SavedModel takes mosaics of any size (an odd last row or column is dropped, as the packing
does); a .tflite model takes the one size it was exported for (size=).
``load(path)`` runs either (test_model.py model=PATH uses it).
"""

import os
import shutil
import sys

import numpy as np

import checkpoints
import test_model
import utils
from utils import Arg, UsageError, UserError

FORMATS = ("saved_model", "tflite")
# The reference's fixed input: 2944x3968 mosaic pixels.
DEFAULT_TFLITE_SIZE = f"{2 * test_model.REFERENCE_CROP[0]}x{2 * test_model.REFERENCE_CROP[1]}"
PAD_MULTIPLE = 16          # the network's four 2x poolings
RELEASED_ITERATION = -1    # the "iteration" output for the released weights; file names say "None"
SERVING = "serving_default"


def parse_size(text: str) -> tuple:
    """``HEIGHTxWIDTH`` of a mosaic, both positive and even, as a tuple of ints."""
    size = utils.parse_size(text, multiple=2)
    if size is None:
        raise UsageError(f"size={text}: expected HEIGHTxWIDTH of the mosaic in pixels, both positive "
                         f"multiples of 2 (e.g. {DEFAULT_TFLITE_SIZE})")
    return size


def _default_size(values):
    """2944x3968 for format=tflite"""
    return DEFAULT_TFLITE_SIZE if values["format"] == "tflite" else "none"


def _default_output(values):
    """exported/pynet_level_{level} (saved_model), exported/pynet_level_{level}_{size}[_fp16|_dynamic].tflite"""
    stem = os.path.join("exported", f"pynet_level_{values['level']}")
    if values["format"] == "saved_model":
        return stem
    suffix = {"fp16": "_fp16"}.get(values["precision"], "") + {"dynamic": "_dynamic"}.get(values["quantize"], "")
    return f"{stem}_{values['size']}{suffix}.tflite"


ARGS = [
    utils.level_arg(),
    Arg("orig", utils.BOOL, False, "export the authors' released weights, " + utils.ORIGINAL_CHECKPOINT),
    utils.restore_iter_arg(),
    Arg("models_dir", str, "models/", "folder of the trained checkpoints"),
    Arg("format", str, "saved_model", "saved_model (any mosaic size) or tflite (one size)", choices=FORMATS),
    Arg("output_type", str, "uint8", "the picture's type: uint8 (as test_model.py's 8-bit PNGs) or float "
        "(float32 in [0, 1])", choices=("uint8", "float")),
    Arg("size", str, _default_size, "format=tflite: HEIGHTxWIDTH of the mosaic it takes (multiples of 2)"),
    Arg("precision", str, "fp32", "format=tflite: weights as fp32, or fp16 (half the size)", choices=("fp32", "fp16")),
    Arg("quantize", str, "none", "format=tflite: none, or dynamic (int8 weights, a quarter of the size)",
        choices=("none", "dynamic")),
    Arg("output", str, _default_output, "the SavedModel folder or .tflite file to write"),
]


# ---------------------------------------------------------------------------------------
# the graph: mosaic -> picture

def pack_mosaic(mosaic, exact=True):
    """load_dataset.extract_bayer_channels as TensorFlow ops: [B, Gb, R, Gr] at (1,1), (0,1),
    (0,0), (1,0), divided by load_dataset.RAW_SCALE. An odd last row or column is dropped, as
    there. ``exact=False`` for TFLite, whose converter turns the division into a multiplication
    by 1/1020 anyway (1 ulp off for some values)."""
    import tensorflow as tf

    from load_dataset import RAW_SCALE

    raw = tf.cast(mosaic, tf.float32)
    shape = tf.shape(raw)
    raw = raw[: shape[0] // 2 * 2, : shape[1] // 2 * 2]
    packed = tf.stack([raw[1::2, 1::2], raw[0::2, 1::2], raw[0::2, 0::2], raw[1::2, 0::2]], axis=-1)
    if not exact:
        return packed / float(RAW_SCALE)
    # Grappler rewrites a division by a constant into a multiplication by its reciprocal,
    # which is 1 ulp off for some values; DivNoNan is a true division it leaves alone.
    return tf.math.divide_no_nan(packed, float(RAW_SCALE))


def _symmetric_indices(size, multiple):
    """Indices extending ``range(size)`` to a multiple of ``multiple`` by mirroring with the edge
    repeated, for any size >= 1: numpy's 'symmetric' padding (render.pad_to_multiple), which
    tf.pad's SYMMETRIC matches only for pads no larger than the image."""
    import tensorflow as tf

    padded = (size + multiple - 1) // multiple * multiple
    phase = tf.range(padded) % (2 * size)
    return tf.where(phase < size, phase, 2 * size - 1 - phase)


def pad_packed(packed, multiple=PAD_MULTIPLE):
    """render.pad_to_multiple for one packed (H, W, 4) tensor, bottom and right."""
    import tensorflow as tf

    shape = tf.shape(packed)
    packed = tf.gather(packed, _symmetric_indices(shape[0], multiple), axis=0)
    return tf.gather(packed, _symmetric_indices(shape[1], multiple), axis=1)


def mosaic_to_picture(network, level, mosaic, output_type, exact_rounding=True):
    """The whole pipeline of test_model.py for one mosaic, as TensorFlow ops. ``network`` is a
    single-output Keras model of ``level``. The 8-bit rounding is test_model.py's
    floor(x * 255 + 0.5) of utils.to_uint, in float64 so that every pixel equals its PNG's;
    ``exact_rounding=False`` is for TFLite, which has neither float64 arithmetic nor DivNoNan:
    the rounding is then in float32 (a pixel can differ by 1 where x * 255 + 0.5 is within
    float32 rounding of an integer) and the packing's division a multiplication."""
    import tensorflow as tf

    packed = pack_mosaic(mosaic, exact_rounding)
    shape = tf.shape(packed)
    rgb = network(pad_packed(packed)[None], training=False)[0]
    # level L's output is 2 / 2**L times the packed size, rounded down (test_model.render)
    rgb = rgb[: shape[0] * 2 // 2 ** level, : shape[1] * 2 // 2 ** level]
    rgb = tf.clip_by_value(rgb, 0.0, 1.0)
    if output_type == "float":
        return rgb
    if exact_rounding:
        rgb = tf.cast(rgb, tf.float64)
    return tf.cast(tf.floor(rgb * 255.0 + 0.5), tf.uint8)


class Pipeline:
    """The exported function around ``network`` (a single-output Keras model of ``level``).
    ``size``: a fixed (H, W) mosaic size, or None for any.

    One signature, as the LiteRT interpreter applies its XNNPACK delegate (4-6 times faster
    here) only to a model with a single subgraph. Its constant outputs ``level`` and
    ``iteration`` say what the pictures are; a SavedModel also has them as variables."""

    def __init__(self, network, level, iteration, output_type, size=None, exact_rounding=True):
        import tensorflow as tf

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


def level_network(model, level):
    """A single-output view of ``model`` (a PyNET build for ``level`` or lower) for ``level``."""
    from model import level_model

    return level_model(model, level)


# ---------------------------------------------------------------------------------------
# writing

def check_output(path: str, fmt: str) -> None:
    """Refuse, before any work, an output that cannot be written or would destroy something
    that is not an earlier export."""
    if fmt == "saved_model":
        if os.path.isfile(path):
            raise UserError(f"output={path}: is a file; a SavedModel is a folder (give a new folder name)")
        if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise UserError(f"output={path}: a folder that is not a SavedModel (no saved_model.pb); "
                            f"refusing to replace it (give a new folder name)")
    elif os.path.isdir(path):
        raise UserError(f"output={path}: is a folder; format=tflite writes one file (e.g. {path.rstrip('/')}.tflite)")


def _temporary_name(path: str, tag: str) -> str:
    folder, name = os.path.split(os.path.normpath(path))
    return os.path.join(folder, f".{name}.{tag}{os.getpid()}")


def save_saved_model(pipeline: Pipeline, path: str) -> None:
    """Write the SavedModel under a temporary name, then swap it in: an interrupted export
    never leaves a half-written folder at ``path``, and an earlier export there is replaced
    only once the new one is complete."""
    import tensorflow as tf

    folder = os.path.dirname(os.path.normpath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp, old = _temporary_name(path, "tmp"), _temporary_name(path, "old")
    try:
        tf.saved_model.save(pipeline.module, tmp, signatures={SERVING: pipeline.concrete_function()})
        if os.path.isdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(old) and not os.path.exists(path):  # the swap failed half-way
            os.replace(old, path)
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)


def convert_tflite(pipeline: Pipeline, precision: str = "fp32", quantize: str = "none") -> bytes:
    """The pipeline as a TFLite flatbuffer: float32, float16 weights, or int8 weights
    (dynamic range: inputs and outputs stay float32; the interpreter may quantize activations
    on the fly)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([pipeline.concrete_function()], pipeline.module)
    if precision == "fp16" or quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def write_file(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with utils.atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def export(model, level, iteration, fmt, output, output_type="uint8", size=None, precision="fp32",
           quantize="none") -> int:
    """Write ``model`` (a PyNET build for ``level`` or lower, weights loaded) as a SavedModel
    folder or a .tflite file at ``output``; ``size`` = (H, W) of the mosaic for TFLite.
    Returns the artefact's size in bytes."""
    check_output(output, fmt)
    network = level_network(model, level)
    if fmt == "saved_model":
        save_saved_model(Pipeline(network, level, iteration, output_type), output)
        return _disk_size(output)
    data = convert_tflite(Pipeline(network, level, iteration, output_type, size, exact_rounding=False),
                          precision, quantize)
    write_file(output, data)
    return len(data)


def _disk_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def checked_params(params) -> dict:
    """Arguments that only make sense together; ``size`` parsed into (H, W) or None."""
    if params["format"] == "saved_model":
        for key, default in (("size", "none"), ("precision", "fp32"), ("quantize", "none")):
            if params[key] != default:
                raise UsageError(f"{key}={params[key]}: applies to format=tflite only "
                                 f"(a SavedModel takes any size, in float32)")
        return {**params, "size": None}
    if params["precision"] == "fp16" and params["quantize"] == "dynamic":
        raise UsageError("quantize=dynamic stores int8 weights: use it with precision=fp32, or precision=fp16 alone")
    return {**params, "size": parse_size(params["size"])}


def main(argv):
    params = checked_params(utils.parse_args(argv, ARGS, "export_model.py", __doc__.strip().splitlines()[0]))
    check_output(params["output"], params["format"])
    prefix, label = checkpoints.resolve(params)
    if not os.path.exists(prefix + ".index"):
        raise UserError(f"{prefix}: no checkpoint there (expected {prefix}.index and its .data files)")
    model = test_model.load_model(params["level"], prefix)
    iteration = RELEASED_ITERATION if label == "None" else int(label)
    size = export(model, params["level"], iteration, params["format"], params["output"], params["output_type"],
                  params["size"], params["precision"], params["quantize"])
    print(f"{prefix} -> {params['output']} ({size / 2 ** 20:.1f} MiB)")


# ---------------------------------------------------------------------------------------
# running an exported model (test_model.py model=PATH, the benchmark)

class Deployed:
    """An exported SavedModel or .tflite file. ``self(mosaic)`` returns what its signature
    returns (uint8 or float32 RGB); ``level``, ``iteration`` (the label of test_model.py's file
    names), ``float_output`` and ``size`` (the fixed mosaic size of a TFLite model, else None)
    describe it."""

    def __init__(self, path: str, threads: int = None):
        self.path = path
        if os.path.isdir(path):
            self._run, info, self.size, dtype = self._open_saved_model(path)
        elif os.path.isfile(path):
            self._run, info, self.size, dtype = self._open_tflite(path, threads or os.cpu_count() or 1)
        else:
            raise UserError(f"model={path}: no such SavedModel folder or .tflite file")
        self.level = int(info["level"])
        self.iteration = "None" if int(info["iteration"]) == RELEASED_ITERATION else str(int(info["iteration"]))
        self.float_output = np.dtype(dtype) != np.uint8

    @staticmethod
    def _open_saved_model(path):
        import tensorflow as tf

        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise UserError(f"model={path}: a folder without saved_model.pb, not a SavedModel")
        try:
            loaded = tf.saved_model.load(path)
            serve = loaded.signatures[SERVING]
            info = {"level": loaded.level.numpy(), "iteration": loaded.iteration.numpy()}
        except (KeyError, AttributeError, ValueError, OSError, tf.errors.OpError) as exc:
            raise UserError(f"model={path}: not a SavedModel written by export_model.py "
                            f"({exc.__class__.__name__})") from None
        dtype = serve.structured_outputs["rgb"].dtype.as_numpy_dtype
        return (lambda mosaic: serve(mosaic=tf.constant(mosaic, tf.uint16))["rgb"].numpy()), info, None, dtype

    @staticmethod
    def _open_tflite(path, threads):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise UserError("running a .tflite model needs the LiteRT interpreter: pip install -r requirements.txt "
                            "(ai-edge-litert)") from None
        try:
            interpreter = Interpreter(model_path=path, num_threads=threads)
            serve = interpreter.get_signature_runner(SERVING)
            outputs = serve.get_output_details()
            # constant outputs: their values are in the file, readable before any run
            info = {key: interpreter.get_tensor(outputs[key]["index"]) for key in ("level", "iteration")}
            size = tuple(int(d) for d in serve.get_input_details()["mosaic"]["shape"])
        except (ValueError, RuntimeError, KeyError) as exc:
            raise UserError(f"model={path}: not a TFLite model written by export_model.py "
                            f"({str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__})") from None
        dtype = outputs["rgb"]["dtype"]
        return (lambda mosaic: serve(mosaic=np.ascontiguousarray(mosaic, np.uint16))["rgb"]), info, size, dtype

    def __call__(self, mosaic):
        mosaic = np.asarray(mosaic)
        if self.size is not None and mosaic.shape != self.size:
            raise UserError(f"model={self.path}: takes {self.size[0]}x{self.size[1]} mosaics, not "
                            f"{mosaic.shape[0]}x{mosaic.shape[1]} (export one with format=tflite "
                            f"size={mosaic.shape[0]}x{mosaic.shape[1]}, or a SavedModel, which takes any size)")
        return self._run(mosaic)

    def render_mosaic(self, mosaic, crop="none", progress=None):
        """test_model.render's contract: float32 (H', W', 3) for ``to_uint``. The picture is
        already clipped (and rounded to 8 bits, which ``to_uint(x, 8)`` gives back exactly)."""
        picture = self(test_model.crop_mosaic(mosaic, crop))
        if progress is not None:
            progress(picture.shape[0])
        return picture.astype(np.float32) / (255 if picture.dtype == np.uint8 else 1)


def load(path: str, threads: int = None) -> Deployed:
    return Deployed(path, threads)


def load_for_rendering(path: str, bits: int, stretch: bool) -> Deployed:
    """An exported model for test_model.py, refusing options its clipped output cannot honour."""
    if stretch:
        raise UsageError("stretch=true: needs the network's unclipped output, which an exported model does not "
                         "return (render from the checkpoint instead)")
    deployed = load(path)
    if bits == 16 and not deployed.float_output:
        raise UsageError(f"bits=16: {path} returns 8-bit pictures (export it with output_type=float)")
    return deployed


if __name__ == "__main__":
    sys.exit(utils.run(main))
