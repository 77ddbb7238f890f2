"""Rendering: a RAW mosaic of any size into PyNET's picture, whole or in strips of rows.

    picture = render.render(model, mosaic, level=0)     # float32 H x W x 3, unclipped

The mosaic is packed (camera.extract_bayer_channels), padded to multiples of 16 (mirrored),
run through the network at once while the frame is small, or in strips of rows with bounded
memory (strips.run_in_strips, the same result) when it is large, and cropped back.
"""

import keras
import numpy as np
import tensorflow as tf

import camera
import cli
import runtime
import utils
from model import level_output
from strips import run_in_strips

_VIEWS = {}
_SHAPES_KEPT = 4  # compiled input sizes kept per model and level


def level_function(model, level: int, xla: bool = False):
    """``level``'s output of ``model`` (a PyNET build for ``level`` or lower, or a view) as a
    function of a batch of packed frames, compiled once per input size and kept, so that the
    next photo or batch of that size reuses it: what test_model.py and evaluate_accuracy.py
    run, and training's visual results (``xla``: compiled with XLA, as train_model.py's
    xla=true). A graph of fixed shapes, faster than one of any size; a plain tf.function
    rather than Keras' predict_on_batch, which is slower, and a graph keeps fewer maps alive
    than running the layers eagerly (benchmarks/README.md, "Inference")."""
    key = (id(model), level, xla)
    if key not in _VIEWS or _VIEWS[key][0] is not model:
        view = keras.Model(model.inputs, level_output(model, level), name=f"{model.name}_level_{level}")
        _VIEWS[key] = (model, view, {})
    _, view, compiled = _VIEWS[key]

    def run(frames):
        frames = tf.convert_to_tensor(frames, tf.float32)
        shape = tuple(frames.shape)
        if shape not in compiled:
            if len(compiled) >= _SHAPES_KEPT:
                compiled.pop(next(iter(compiled)))
            function = tf.function(lambda x: view(x, training=False), jit_compile=xla or None)  # one per size
            compiled[shape] = function.get_concrete_function(tf.TensorSpec(shape, tf.float32))
        return compiled[shape](frames)

    return run


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


def crop_mosaic(mosaic, crop: str = "none"):
    """The reference's top-left crop of a 2-D mosaic for ``crop="reference"``; else the mosaic."""
    if crop == "reference":
        height, width = 2 * utils.REFERENCE_CROP[0], 2 * utils.REFERENCE_CROP[1]
        if mosaic.shape[0] < height or mosaic.shape[1] < width:
            raise cli.UserError(f"crop=reference needs a mosaic of at least {height}x{width}, "
                            f"this one is {mosaic.shape[0]}x{mosaic.shape[1]} (use crop=none)")
        mosaic = mosaic[:height, :width]
    return mosaic


def pack(mosaic, crop: str = "none"):
    """The network's input for a 2-D Bayer mosaic (camera.extract_bayer_channels), with
    the reference's top-left crop for ``crop="reference"``."""
    return camera.extract_bayer_channels(crop_mosaic(mosaic, crop))


# Automatic choice (tile_size=none), so that a photo of any size renders within the memory
# stated in benchmarks/README.md, "Inference":
# * the whole frame at once, the fastest, while it is small: its memory grows with the frame,
#   so up to WHOLE_FRAME_PIXELS packed pixels (bench_inference.py frame_packed= measures it);
# * otherwise strips of about STRIP_PIXELS packed pixels, a multiple of 8 rows, whose peak is
#   reached while the instance-normalised maps of level 2 are held and no longer grows with
#   the strips' height.
WHOLE_FRAME_PIXELS = 640 * 1024
STRIP_PIXELS = 128 * 1024
MIN_STRIP_ROWS, MAX_STRIP_ROWS = 8, 256


def auto_tile_size(height: int, width: int) -> int:
    """tile_size=none for a packed frame of ``height`` x ``width``: 0 (the whole frame) when
    it is small, else strips of about STRIP_PIXELS packed pixels, so memory does not grow
    with the frame."""
    if height * width <= WHOLE_FRAME_PIXELS:
        return 0
    rows = STRIP_PIXELS // max(1, width) // 8 * 8
    return int(min(MAX_STRIP_ROWS, max(MIN_STRIP_ROWS, rows)))


def packed_shape(mosaic_shape, crop: str = "none") -> tuple:
    """(height, width) of pack's output for a mosaic of ``mosaic_shape``, before padding."""
    return utils.REFERENCE_CROP if crop == "reference" else (mosaic_shape[0] // 2, mosaic_shape[1] // 2)


def strip_rows(mosaic_shape, tile_size=None, crop: str = "none") -> int:
    """The packed rows per strip that render uses for a mosaic of ``mosaic_shape`` (0: the
    whole frame at once), known before the mosaic is read."""
    if tile_size is not None:
        return tile_size
    height, width = packed_shape(mosaic_shape, crop)
    # as pad_to_multiple pads
    return auto_tile_size(-(-height // 16) * 16, -(-width // 16) * 16)


def return_freed_memory_for(mosaic_shapes, tile_size=None, crop: str = "none") -> None:
    """return_freed_memory if any mosaic of ``mosaic_shapes`` will be rendered in strips; call
    it before the checkpoint is restored (see return_freed_memory for why, and why not for
    small frames)."""
    if any(strip_rows(shape, tile_size, crop) for shape in mosaic_shapes):
        runtime.return_freed_memory()


def render(model, mosaic, level: int, tile_size=None, crop: str = "none", progress=None):
    """Run ``model`` (built for ``level`` or lower) on a 2-D Bayer mosaic of any size. The
    packed input is padded to a multiple of 16 (mirrored) and the output cropped back.
    ``tile_size``: packed rows per strip (None = automatic, see auto_tile_size; 0 = the whole
    frame at once). ``progress(n)`` is told of each n output rows done. Returns float32
    H x W x 3, unclipped."""
    padded, (height, width) = pad_to_multiple(pack(mosaic, crop))
    scale = 2.0 / 2 ** level
    out_height, out_width = int(height * scale), int(width * scale)
    rows = strip_rows(mosaic.shape, tile_size, crop)
    if rows == 0:
        output = level_function(model, level)(padded[None])[0].numpy()
        if progress is not None:
            progress(out_height)
    else:
        runtime.return_freed_memory()
        output = run_in_strips(model, level, padded, rows, out_height=out_height, progress=progress)
    return np.asarray(output[:out_height, :out_width], dtype=np.float32)


def output_rows(mosaic_shape, level: int, crop: str = "none") -> int:
    """Rows of the rendered picture of a mosaic of ``mosaic_shape``."""
    return int(packed_shape(mosaic_shape, crop)[0] * 2.0 / 2 ** level)
