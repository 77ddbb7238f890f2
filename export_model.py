"""Export a trained PyNET as a deployable model: RAW Bayer mosaic in, RGB photo out.

    python export_model.py level=0 orig=true format=saved_model output=exported/pynet_level_0
    python export_model.py level=0 orig=true format=tflite size=1024x1024 precision=fp16
    python export_model.py level=0 orig=true precision=bf16       # a SavedModel computing in bfloat16
    python export_model.py level=1 restore_iter=35000 format=tflite quantize=dynamic

The exported graph (serving.py) holds everything between the sensor's mosaic and the picture,
as test_model.py computes it. ``level`` and ``iteration`` outputs name the checkpoint (iteration
-1: the released weights). At level 0 the picture has the mosaic's size; at level L, 1/2**L of
it, rounded down. A SavedModel takes mosaics of any size (an odd last row or column is
dropped, as the packing does); a .tflite model takes the one size it was exported for (size=).
deployed.py runs either (test_model.py model=PATH).
"""

import os
import shutil
import sys

import checkpoints
import cli
import files
import runtime
import utils
from cli import Arg, UsageError, UserError

FORMATS = ("saved_model", "tflite")
# LiteRT runs the whole frame at once and its memory grows with the mosaic, by about
# LITERT_GIB_PER_MEGAPIXEL (benchmarks/README.md, "Exported models"): the default is a size a
# machine with a few GiB runs; larger photos go in tiles, or through a SavedModel.
DEFAULT_TFLITE_SIZE = "1024x1024"
LITERT_GIB_PER_MEGAPIXEL = 4.5
# Beyond this no device runs the model (hundreds of GiB): refused rather than written.
MAX_TFLITE_MEGAPIXELS = 64
# An earlier SavedModel export holds these entries and nothing else (TensorFlow writes them).
SAVED_MODEL_ENTRIES = {"saved_model.pb", "fingerprint.pb", "variables", "assets"}
TFLITE_MAGIC = b"TFL3"  # at byte 4 of a TFLite flatbuffer


def parse_size(text: str) -> tuple:
    """``HEIGHTxWIDTH`` of a mosaic, both even and at least utils.MIN_MOSAIC (the network's
    smallest input), and below MAX_TFLITE_MEGAPIXELS, as a tuple of ints."""
    size = cli.parse_size(text, multiple=2)
    if size is None:
        raise UsageError(f"size={cli.shown(text)}: expected HEIGHTxWIDTH of the mosaic in pixels, both positive "
                         f"multiples of 2 (e.g. {DEFAULT_TFLITE_SIZE})")
    if min(size) < utils.MIN_MOSAIC:
        raise UsageError(f"size={text}: the network's smallest input is a {utils.MIN_MOSAIC}x{utils.MIN_MOSAIC} "
                         f"mosaic (16x16 packed pixels)")
    if size[0] * size[1] > MAX_TFLITE_MEGAPIXELS * 1e6:
        raise UsageError(f"size={text}: {size[0] * size[1] / 1e6:.0f} MP would need about "
                         f"{litert_gib(size):.0f} GiB to run in LiteRT; export at most {MAX_TFLITE_MEGAPIXELS} MP "
                         f"(tiles), or a SavedModel")
    return size


def litert_gib(size) -> float:
    """The memory LiteRT needs to run a model exported for a mosaic of ``size``, roughly."""
    return LITERT_GIB_PER_MEGAPIXEL * size[0] * size[1] / 1e6


def _default_size(values):
    """1024x1024 for format=tflite"""
    return DEFAULT_TFLITE_SIZE if values["format"] == "tflite" else "none"


def _default_output(values):
    """exported/pynet_level_{level}[_bf16|_fp16] (saved_model),
    exported/pynet_level_{level}_{size}[_fp16|_dynamic].tflite"""
    stem = os.path.join("exported", f"pynet_level_{values['level']}")
    if values["format"] == "saved_model":
        return stem if values["precision"] == "fp32" else f"{stem}_{values['precision']}"
    suffix = {"fp16": "_fp16"}.get(values["precision"], "") + {"dynamic": "_dynamic"}.get(values["quantize"], "")
    return f"{stem}_{values['size']}{suffix}.tflite"


ARGS = [
    utils.level_arg(),
    Arg("orig", cli.BOOL, False, "export the authors' released weights, " + checkpoints.ORIGINAL_CHECKPOINT),
    utils.restore_iter_arg(),
    Arg("models_dir", str, "models/", "folder of the trained checkpoints"),
    Arg("format", str, "saved_model", "saved_model (any mosaic size) or tflite (one size)", choices=FORMATS),
    Arg("output_type", str, "uint8", "the picture's type: uint8 (as test_model.py's 8-bit PNGs) or float "
        "(float32 in [0, 1])", choices=("uint8", "float")),
    Arg("size", str, _default_size, "format=tflite: HEIGHTxWIDTH of the mosaic it takes (multiples of 2, at "
        f"least {utils.MIN_MOSAIC}; LiteRT needs about {LITERT_GIB_PER_MEGAPIXEL} GiB per megapixel)"),
    Arg("precision", str, "fp32", "saved_model: the compute precision, fp32 (the reference's pictures), bf16 or "
        "fp16 (as test_model.py precision=); tflite: the weights as fp32, or fp16 (half the size)",
        choices=utils.PRECISIONS),
    Arg("quantize", str, "none", "format=tflite: none, or dynamic (int8 weights, a quarter of the size)",
        choices=("none", "dynamic")),
    Arg("output", str, _default_output, "the SavedModel folder or .tflite file to write; an earlier export "
        "there is replaced, anything else refused"),
    Arg("overwrite", cli.BOOL, False, "replace whatever output is, even a file or folder that is not an "
        "earlier export"),
]


# ---------------------------------------------------------------------------------------
# writing

def check_output(path: str, fmt: str, overwrite: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written or that holds something other
    than an earlier export (unless ``overwrite``)."""
    if fmt == "saved_model":
        if os.path.isfile(path):
            raise UserError(f"output={path}: is a file; a SavedModel is a folder (give a new folder name)")
        foreign = sorted(set(os.listdir(path)) - SAVED_MODEL_ENTRIES) if os.path.isdir(path) else []
        if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
            foreign = foreign or ["no saved_model.pb"]
        if foreign and not overwrite:
            raise UserError(f"output={path}: holds files that are not an earlier export's ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); refusing to replace the folder (give a new "
                            f"folder name, or overwrite=true)")
        return
    if os.path.isdir(path):
        raise UserError(f"output={path}: is a folder; format=tflite writes one file (e.g. {path.rstrip('/')}.tflite)")
    if os.path.lexists(path) and not overwrite and not is_tflite(path):
        raise UserError(f"output={path}: an existing file that is not a .tflite model; refusing to replace it "
                        f"(give a new name ending in .tflite, or overwrite=true)")
    files.check_output_file(path, "output")


def is_tflite(path: str) -> bool:
    """Whether ``path`` is a TFLite flatbuffer (its magic bytes), as an earlier export is."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8)[4:8] == TFLITE_MAGIC
    except OSError:
        return False


def _temporary_name(path: str, tag: str) -> str:
    folder, name = os.path.split(os.path.normpath(path))
    return os.path.join(folder, f".{name}.{tag}{os.getpid()}")


def save_saved_model(module, path: str) -> None:
    """Write the SavedModel of ``module`` (serving.ServingModule) under a temporary name, then
    swap it in: an interrupted export never leaves a half-written folder at ``path``, and an
    earlier export there is replaced only once the new one is complete."""
    import tensorflow as tf  # here: export_model.py's help and argument checks run without it

    folder = os.path.dirname(os.path.normpath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp, old = _temporary_name(path, "tmp"), _temporary_name(path, "old")
    try:
        tf.saved_model.save(module.module, tmp, signatures={module.SIGNATURE: module.concrete_function()})
        if os.path.isdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(old) and not os.path.exists(path):  # the swap failed half-way
            os.replace(old, path)
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)


def convert_tflite(module, precision: str = "fp32", quantize: str = "none") -> bytes:
    """``module`` (serving.ServingModule) as a TFLite flatbuffer: float32, float16 weights, or
    int8 weights (dynamic range: inputs and outputs stay float32; the interpreter may quantize
    activations on the fly)."""
    import tensorflow as tf  # here: export_model.py's help and argument checks run without it

    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.concrete_function()], module.module)
    if precision == "fp16" or quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def export(model, level, iteration, fmt, output, output_type="uint8", size=None, precision="fp32",
           quantize="none", overwrite=False) -> int:
    """Write ``model`` (a PyNET build for ``level`` or lower, weights loaded) as a SavedModel
    folder or a .tflite file at ``output``; ``size`` = (H, W) of the mosaic for TFLite.
    Returns the artefact's size in bytes."""
    from model import level_model  # here, as serving: they start TensorFlow
    from serving import ServingModule

    check_output(output, fmt, overwrite)
    network = level_model(model, level)
    if fmt == "saved_model":
        save_saved_model(ServingModule(network, level, iteration, output_type), output)
        return _disk_size(output)
    data = convert_tflite(ServingModule(network, level, iteration, output_type, size, exact_rounding=False),
                          precision, quantize)
    files.write_file(output, data)
    return len(data)


def _disk_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def checked_args(args) -> dict:
    """Arguments that only make sense together; ``size`` parsed into (H, W) or None."""
    if args["format"] == "saved_model":
        for key, default in (("size", "none"), ("quantize", "none")):
            if args[key] != default:
                raise UsageError(f"{key}={cli.shown(str(args[key]))}: applies to format=tflite only "
                                 f"(a SavedModel takes any size, with float32 weights)")
        return {**args, "size": None}
    if args["precision"] == "bf16":
        raise UsageError("precision=bf16: LiteRT has no bfloat16 convolutions; export a SavedModel "
                         "(format=saved_model precision=bf16), or format=tflite precision=fp16")
    if args["precision"] == "fp16" and args["quantize"] == "dynamic":
        raise UsageError("quantize=dynamic stores int8 weights: use it with precision=fp32, or precision=fp16 alone")
    return {**args, "size": parse_size(args["size"])}


def main(argv):
    args = checked_args(cli.parse_args(argv, ARGS, "export_model.py", __doc__.strip().splitlines()[0]))
    check_output(args["output"], args["format"], args["overwrite"])
    prefix, label = checkpoints.resolve(args)
    if args["size"] is not None:
        print(f"note: LiteRT needs about {litert_gib(args['size']):.1f} GiB to run a model for "
              f"{args['size'][0]}x{args['size'][1]} mosaics (about {LITERT_GIB_PER_MEGAPIXEL} GiB per megapixel)")
    runtime.start_tensorflow()
    compute = args["precision"] if args["format"] == "saved_model" else "fp32"  # TFLite converts float32
    model = checkpoints.load_model(args["level"], prefix, compute)
    iteration = checkpoints.RELEASED_ITERATION if label == "None" else int(label)
    size = export(model, args["level"], iteration, args["format"], args["output"], args["output_type"],
                  args["size"], args["precision"], args["quantize"], args["overwrite"])
    print(f"{prefix} -> {args['output']} ({size / 2 ** 20:.1f} MiB)")


if __name__ == "__main__":
    sys.exit(cli.run(main))
