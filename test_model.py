"""Render full-resolution RAW mosaics into RGB photos with a trained PyNET.

    python test_model.py level=0 orig=true                      # the authors' released weights
    python test_model.py level=1 restore_iter=35000
    python test_model.py orig=true input=shot.png output_dir=out/
    python test_model.py orig=true input=a.png,b.png crop=reference
    python test_model.py model=exported/pynet_level_0 input=shot.png   # an export_model.py artefact

Reads every PNG mosaic in {dataset_dir}/test/huawei_full_resolution/ (or the files and
folders of input=) and writes {output_dir}/{name}_level_{L}_iteration_{I}.png. A mosaic that
cannot be rendered (not a PNG mosaic, too small, values above 10 bits...) is reported and the
others are rendered; the run then ends with an error naming how many failed.

Any mosaic size works. Memory stays bounded: the instance-normalised levels 2 to 5 run on
the whole frame, levels 1 and 0 (no instance norm) in strips of tile_size packed rows, with
the same result as the whole frame at once (render.render_in_strips).
"""

import os
import sys

import numpy as np

import checkpoints
import utils
from utils import Arg, UserError

FULL_RES_FOLDER = os.path.join("test", "huawei_full_resolution")
# The reference's fixed input: the top-left 1472 x 1984 packed pixels (2944 x 3968 mosaic).
REFERENCE_CROP = (1472, 1984)
# Automatic choice (tile_size=none), for a peak RSS within about 2.5 GiB on a CPU:
# * the whole frame at once, the fastest, while it is small: that costs ~2.4 KiB per packed
#   pixel above the ~0.8 GiB of TensorFlow and the weights (measured: 736K packed pixels,
#   a 3 MP photo, peaked at 2.51 GiB with bench_inference.py frame_packed=736x1024), so
#   up to 640K packed pixels (~2.3 GiB);
# * otherwise strips of about STRIP_PIXELS packed pixels (64 rows of a 12 MP frame), a
#   multiple of 8 rows: a 12 MP frame then peaks at 1.92 GiB, reached while the
#   instance-normalised maps of level 2 are held (benchmarks/README.md, "Inference").
WHOLE_FRAME_PIXELS = 640 * 1024
STRIP_PIXELS = 128 * 1024
MIN_STRIP_ROWS, MAX_STRIP_ROWS = 8, 256
# The smallest mosaic rendered: one 16x16 packed block, the network's smallest input (one
# output pixel at level 5).
MIN_MOSAIC = 32


def _default_input(values):
    """{dataset_dir}/test/huawei_full_resolution/"""
    return os.path.join(values["dataset_dir"], FULL_RES_FOLDER, "")


def _default_output_dir(values):
    """results_dir"""
    return values["results_dir"]


ARGS = [
    utils.level_arg(),
    Arg("orig", utils.BOOL, False, "use the authors' released weights, " + utils.ORIGINAL_CHECKPOINT),
    utils.restore_iter_arg(),
    utils.dataset_dir_arg(),
    Arg("use_gpu", utils.BOOL, True, "run on the GPU when there is one"),
    Arg("stretch", utils.BOOL, False,
        "min-max stretch each picture as the reference did, instead of clipping to [0, 1]"),
    Arg("bits", int, 8, "bits per channel of the output PNG", choices=(8, 16)),
    Arg("models_dir", str, "models/", "folder of the trained checkpoints"),
    Arg("results_dir", str, "results/full-resolution/", "where the pictures go (the reference's name of output_dir)"),
    Arg("input", str, _default_input, "a PNG mosaic, several separated by commas, or a folder of them"),
    Arg("output_dir", str, _default_output_dir, "where the pictures go"),
    Arg("tile_size", utils.OPTIONAL_INT, None,
        "packed rows per strip of levels 1 and 0 (memory grows with it); 0 = the whole frame at once "
        "(the reference; most memory); none = automatic", check=utils.non_negative),
    Arg("crop", str, "none", "reference = the reference's top-left 1472x1984 packed crop (2944x3968 mosaic); "
        "none = the whole mosaic", choices=("none", "reference")),
    Arg("model", str, "none", "an exported SavedModel folder or .tflite file (export_model.py) to render with "
        "instead of a checkpoint (level, orig, restore_iter, tile_size are then its own); none = a checkpoint"),
    Arg("range_check", utils.BOOL, True, "refuse mosaics with values above 1023 (PyNET's input is the P20's "
        "10-bit range); false = render them anyway"),
]


def configure_devices(use_gpu: bool) -> None:
    """Hide the GPUs when asked; must run before TensorFlow touches a device."""
    import tensorflow as tf

    if not use_gpu:
        tf.config.set_visible_devices([], "GPU")


def list_mosaics(folder: str) -> list:
    """The PNG files of ``folder``, sorted by name; dotfiles and writers' temporary files are
    not inputs."""
    if not utils.isdir(folder):
        raise UserError(f"{folder}: folder not found (expected the full-resolution PNG mosaics there)")
    files = sorted(f for f in utils.listdir(folder) if f.lower().endswith(".png") and not utils.is_hidden(f))
    if not files:
        raise UserError(f"{folder}: no PNG mosaics found")
    return [os.path.join(folder, f) for f in files]


def list_inputs(spec: str) -> list:
    """The mosaics named by ``input=``: a file, a folder (its PNGs), or several of either
    separated by commas; in that order, without duplicates."""
    paths = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if utils.isdir(item) or item.endswith(("/", os.sep)):
            found = list_mosaics(item)
        elif utils.isfile(item):
            found = [item]
        else:
            raise UserError(f"{item}: no such file or folder")
        paths.extend(p for p in found if p not in paths)
    if not paths:
        raise UserError(f"input={spec}: no mosaics given")
    return paths


def load_model(level: int, prefix: str):
    from model import PyNET

    model = PyNET(level=level)
    checkpoints.load_weights(model, prefix)
    return model


def crop_mosaic(mosaic, crop: str = "none"):
    """The reference's top-left crop of a 2-D mosaic for ``crop="reference"``; else the mosaic."""
    if crop == "reference":
        height, width = 2 * REFERENCE_CROP[0], 2 * REFERENCE_CROP[1]
        if mosaic.shape[0] < height or mosaic.shape[1] < width:
            raise UserError(f"crop=reference needs a mosaic of at least {height}x{width}, "
                            f"this one is {mosaic.shape[0]}x{mosaic.shape[1]} (use crop=none)")
        mosaic = mosaic[:height, :width]
    return mosaic


def check_mosaic_file(path: str) -> dict:
    """The cheap checks of an input, from its PNG header alone (before the model is loaded): a
    single-channel PNG of at least MIN_MOSAIC x MIN_MOSAIC. Returns the header."""
    header = utils.mosaic_header(path)
    width, height = header["width"], header["height"]
    if width < MIN_MOSAIC or height < MIN_MOSAIC:
        raise UserError(f"{path}: a {width}x{height} mosaic is too small: at least {MIN_MOSAIC}x{MIN_MOSAIC} "
                        f"(the network's smallest input, 16x16 packed pixels)")
    return header


def read_checked_mosaic(path: str, range_check: bool = True, log=print):
    """The mosaic of ``path`` (utils.read_mosaic), refused above 10 bits unless ``range_check``
    is off; an odd height or width is said to lose its last row or column."""
    from load_dataset import MAX_RAW_VALUE

    mosaic = utils.read_mosaic(path)
    top = int(mosaic.max()) if mosaic.size else 0
    if top > MAX_RAW_VALUE:
        text = (f"{path}: values up to {top} exceed the 10-bit range (<= {MAX_RAW_VALUE}) of the mosaics PyNET "
                f"is trained on")
        if range_check:
            raise UserError(f"{text}: scale it to 10 bits (dng_to_png.py normalize=true), or render it anyway "
                            f"with range_check=false")
        print(f"warning: {text}; rendering it anyway (range_check=false)", file=sys.stderr)
    odd = [what for what, size in (("row", mosaic.shape[0]), ("column", mosaic.shape[1])) if size % 2]
    if odd:
        log(f"note: {path}: {mosaic.shape[1]}x{mosaic.shape[0]} mosaic: its last {' and last '.join(odd)} "
            f"{'are' if len(odd) == 2 else 'is'} dropped (the 2x2 Bayer packing needs even sizes)")
    return mosaic


def pack(mosaic, crop: str = "none"):
    """The network's input for a 2-D Bayer mosaic (load_dataset.extract_bayer_channels), with
    the reference's top-left crop for ``crop="reference"``."""
    from load_dataset import extract_bayer_channels

    return extract_bayer_channels(crop_mosaic(mosaic, crop))


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
    return REFERENCE_CROP if crop == "reference" else (mosaic_shape[0] // 2, mosaic_shape[1] // 2)


def strip_rows(mosaic_shape, tile_size=None, crop: str = "none") -> int:
    """The packed rows per strip that render uses for a mosaic of ``mosaic_shape`` (0: the
    whole frame at once), known before the mosaic is read."""
    if tile_size is not None:
        return tile_size
    height, width = packed_shape(mosaic_shape, crop)
    # as render.pad_to_multiple pads (not imported here: render.py starts TensorFlow)
    return auto_tile_size(-(-height // 16) * 16, -(-width // 16) * 16)


def return_freed_memory_for(mosaic_shapes, tile_size=None, crop: str = "none") -> None:
    """return_freed_memory if any mosaic of ``mosaic_shapes`` will be rendered in strips; call
    it before the checkpoint is restored (see return_freed_memory for why, and why not for
    small frames)."""
    if any(strip_rows(shape, tile_size, crop) for shape in mosaic_shapes):
        return_freed_memory()


def render(model, mosaic, level: int, tile_size=None, crop: str = "none", progress=None):
    """Run ``model`` (built for ``level`` or lower) on a 2-D Bayer mosaic of any size. The
    packed input is padded to a multiple of 16 (mirrored) and the output cropped back.
    ``tile_size``: packed rows per strip (None = automatic, see auto_tile_size; 0 = the whole
    frame at once). ``progress(n)`` is told of each n output rows done. Returns float32
    H x W x 3, unclipped. ``model`` may be an exported model (export_model.load), which holds
    the whole pipeline and returns its picture already clipped."""
    if hasattr(model, "render_mosaic"):
        return model.render_mosaic(mosaic, crop, progress)
    from render import level_function, pad_to_multiple, render_in_strips

    padded, (height, width) = pad_to_multiple(pack(mosaic, crop))
    scale = 2.0 / 2 ** level
    out_height, out_width = int(height * scale), int(width * scale)
    rows = strip_rows(mosaic.shape, tile_size, crop)
    if rows == 0:
        output = level_function(model, level)(padded[None])[0].numpy()
        if progress is not None:
            progress(out_height)
    else:
        return_freed_memory()
        output = render_in_strips(model, level, padded, rows, out_height=out_height, progress=progress)
    return np.asarray(output[:out_height, :out_width], dtype=np.float32)


def output_path(results_dir: str, mosaic_path: str, level: int, iteration: str) -> str:
    name = os.path.splitext(os.path.basename(mosaic_path))[0]
    return os.path.join(results_dir, f"{name}_level_{level}_iteration_{iteration}.png")


def output_rows(mosaic_shape, level: int, crop: str = "none") -> int:
    """Rows of the rendered picture of a mosaic of ``mosaic_shape``."""
    return int(packed_shape(mosaic_shape, crop)[0] * 2.0 / 2 ** level)


def render_files(model, files, params, iteration, failed=None) -> list:
    """Render and write every mosaic of ``files`` with progress bars (on a terminal); returns
    the written paths. A mosaic that cannot be rendered is reported as a warning and appended
    to ``failed`` (a list), and the others are rendered; without ``failed`` it stops the run."""
    from tqdm import tqdm

    written = []
    with tqdm(total=len(files), desc="photos", unit="photo", disable=None) as bar:
        for path in files:
            try:
                mosaic = read_checked_mosaic(path, params.get("range_check", True), log=bar.write)
                total = output_rows(mosaic.shape, params["level"], params["crop"])
                with tqdm(total=total, desc=os.path.basename(path), unit="row", leave=False, disable=None) as rows:
                    image = render(model, mosaic, params["level"], params["tile_size"], params["crop"], rows.update)
            except UserError as err:
                if failed is None:
                    raise
                failed.append(path)
                bar.write(f"warning: {err}", file=sys.stderr)
                bar.update(1)
                continue
            target = output_path(params["output_dir"], path, params["level"], iteration)
            utils.write_png(target, utils.to_uint(image, params["bits"], params["stretch"]))
            written.append(target)
            bar.write(f"{path} -> {target}")
            bar.update(1)
    return written


def checked_inputs(files, failed) -> dict:
    """The inputs that pass check_mosaic_file, each with its PNG header; the others reported
    and appended to ``failed`` (a single input's problem is its own error)."""
    good = {}
    for path in files:
        try:
            good[path] = check_mosaic_file(path)
        except UserError as err:
            if len(files) == 1:
                raise
            failed.append(path)
            print(f"warning: {err}", file=sys.stderr)
    return good


def main(argv):
    params = utils.parse_args(argv, ARGS, "test_model.py", __doc__.strip().splitlines()[0])
    files = list_inputs(params["input"])
    utils.check_output_dir(params["output_dir"], "output_dir")
    deployed = params["model"] != "none"
    prefix, iteration = (None, None) if deployed else checkpoints.resolve(params)
    failed = []
    good = checked_inputs(files, failed)
    if good:
        utils.remove_stale_temps(params["output_dir"])
        utils.select_cpu_kernels(training=False)
        print(utils.huge_pages_note())
        configure_devices(params["use_gpu"])
        if deployed:
            import export_model

            model = export_model.load_for_rendering(params["model"], params["bits"], params["stretch"])
            params, iteration = {**params, "level": model.level}, model.iteration
        else:
            shapes = [(header["height"], header["width"]) for header in good.values()]
            return_freed_memory_for(shapes, params["tile_size"], params["crop"])
            model = load_model(params["level"], prefix)
        render_files(model, list(good), params, iteration, failed if len(files) > 1 else None)
    if failed:
        first = next(p for p in files if p in failed)
        raise UserError(f"{len(failed)} of {len(files)} mosaics could not be rendered (first: {first}; "
                        f"see the warnings above)")


def bound_memory():
    """Where TensorFlow runs oneDNN kernels (its default on CPUs with AVX-512 VNNI), have them
    allocate through malloc rather than their own pool: the pool keeps the whole-frame peak
    of levels 2 to 5 for the rest of the run and fragments, about 3.3 GiB against under 2 GiB
    for a 12 MP frame, where malloc on huge pages (utils.run_with_huge_pages) is about as
    fast (250 s for the pool; benchmarks/README.md, "Inference"). Takes effect only before
    TensorFlow starts; a user's TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0 wins."""
    os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")


_MALLOC_SET = []


def return_freed_memory(threshold=1 << 20):
    """Have glibc serve blocks of ``threshold`` bytes and more from mmap, so they go back to the
    system when freed. By default glibc raises that threshold up to 32 MiB as large blocks are
    freed, then keeps the strips of feature maps (1 to 30 MiB) in its heaps, where
    fragmentation holds freed memory in the process: a 12 MP frame's trunk then peaks at
    2.9 GiB instead of 2.2 GiB. test_model.py sets it before the checkpoint is restored when
    a frame will go in strips: restoring frees 190 MB of blocks of up to 9 MiB, which raises
    the threshold, and the weights' copies then sit in the heaps among the freed blocks; a
    quarter frame peaked at 1.35 GiB that way against 1.16 GiB (benchmarks/README.md). Not
    for small frames rendered whole: mmapping each of their maps afresh costs about 10% per
    photo. Once per process; nothing where there is no glibc."""
    if _MALLOC_SET:
        return
    _MALLOC_SET.append(threshold)
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD (also stops its adjustment)
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    utils.run_with_huge_pages()
    bound_memory()
    sys.exit(utils.run(main))
