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
the same result as the whole frame at once (render.py, strips.py).
"""

import os
import sys

from tqdm import tqdm

import camera
import checkpoints
import cli
import files
import images
import load_dataset
import runtime
import utils
from cli import Arg, UsageError, UserError


def _default_input(values):
    """{dataset_dir}/test/huawei_full_resolution/"""
    return os.path.join(values["dataset_dir"], "test", load_dataset.FULL_RES_FOLDER, "")


def _default_output_dir(values):
    """results_dir"""
    return values["results_dir"]


ARGS = [
    utils.level_arg(),
    Arg("orig", cli.BOOL, False, "use the authors' released weights, " + checkpoints.ORIGINAL_CHECKPOINT),
    utils.restore_iter_arg(),
    utils.dataset_dir_arg(),
    Arg("use_gpu", cli.BOOL, True, "run on the GPU when there is one"),
    Arg("stretch", cli.BOOL, False,
        "min-max stretch each picture as the reference did, instead of clipping to [0, 1]"),
    Arg("bits", int, 8, "bits per channel of the output PNG", choices=(8, 16)),
    Arg("models_dir", str, "models/", "folder of the trained checkpoints"),
    Arg("results_dir", str, "results/full-resolution/", "where the pictures go (the reference's name of output_dir)"),
    Arg("input", str, _default_input, "a PNG mosaic, several separated by commas, or a folder of them"),
    Arg("output_dir", str, _default_output_dir, "where the pictures go"),
    Arg("tile_size", cli.OPTIONAL_INT, None,
        "packed rows per strip of levels 1 and 0 (memory grows with it); 0 = the whole frame at once "
        "(the reference; most memory); none = automatic", check=cli.non_negative),
    Arg("crop", str, "none", "reference = the reference's top-left 1472x1984 packed crop (2944x3968 mosaic); "
        "none = the whole mosaic", choices=("none", "reference")),
    Arg("model", str, "none", "an exported SavedModel folder or .tflite file (export_model.py) to render with "
        "instead of a checkpoint (level, orig, restore_iter, tile_size are then its own); none = a checkpoint"),
    utils.precision_arg(),
    utils.force_bf16_arg(),
    Arg("range_check", cli.BOOL, True, "refuse mosaics with values above 1023 (PyNET's input is the P20's "
        "10-bit range); false = render them anyway"),
]


def list_mosaics(folder: str) -> list:
    """The PNG files of ``folder``, sorted by name; dotfiles and writers' temporary files are
    not inputs."""
    if not files.isdir(folder):
        raise UserError(f"{folder}: folder not found (expected the full-resolution PNG mosaics there)")
    names = sorted(f for f in files.listdir(folder) if f.lower().endswith(".png") and not files.is_hidden(f))
    if not names:
        raise UserError(f"{folder}: no PNG mosaics found")
    return [os.path.join(folder, f) for f in names]


def list_inputs(spec: str) -> list:
    """The mosaics named by ``input=``: a file, a folder (its PNGs), or several of either
    separated by commas; in that order, without duplicates."""
    paths = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if files.isdir(item) or item.endswith(("/", os.sep)):
            found = list_mosaics(item)
        elif files.isfile(item):
            found = [item]
        elif files.is_url(item) or not os.path.lexists(item):
            raise UserError(f"{item}: no such file or folder")
        else:
            files.require_file(item)  # says why: a link to nothing, a loop of links...
        paths.extend(p for p in found if p not in paths)
    if not paths:
        raise UsageError(f"input={cli.shown(spec)}: no mosaics given (a PNG file, a folder, or several separated by "
                         f"commas)")
    return paths


def output_path(output_dir: str, mosaic_path: str, level: int, iteration: str) -> str:
    name = os.path.splitext(os.path.basename(mosaic_path))[0]
    return os.path.join(output_dir, f"{name}_level_{level}_iteration_{iteration}.png")


def check_distinct_outputs(paths) -> None:
    """Refuse, before anything is rendered, two inputs whose pictures would have one name."""
    seen = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in seen:
            raise UserError(f"{seen[stem]} and {path} would both be written as {stem}_level_*.png: render them "
                            f"in two runs with different output_dir=, or rename one")
        seen[stem] = path


def check_mosaic_file(path: str) -> dict:
    """The cheap checks of an input, from its PNG header alone (before the model is loaded): a
    single-channel PNG of at least utils.MIN_MOSAIC pixels a side. Returns the header."""
    header = images.mosaic_header(path)
    width, height = header["width"], header["height"]
    if width < utils.MIN_MOSAIC or height < utils.MIN_MOSAIC:
        raise UserError(f"{path}: a {width}x{height} mosaic is too small: at least {utils.MIN_MOSAIC}x"
                        f"{utils.MIN_MOSAIC} (the network's smallest input, 16x16 packed pixels)")
    return header


def read_checked_mosaic(path: str, range_check: bool = True, log=print):
    """The mosaic of ``path`` (images.read_mosaic), refused when blank (camera.check_not_blank)
    or above the sensor's range unless ``range_check`` is off; an odd height or width is said
    to lose its last row or column."""
    mosaic = images.read_mosaic(path)
    camera.check_not_blank(mosaic, path)
    top = int(mosaic.max())
    if top > camera.WHITE_LEVEL:
        text = (f"{path}: values up to {top} exceed the {camera.BITS}-bit range (<= {camera.WHITE_LEVEL}) of the "
                f"mosaics PyNET is trained on")
        if range_check:
            raise UserError(f"{text}: scale it to {camera.BITS} bits (dng_to_png.py normalize=true), or render it "
                            f"anyway with range_check=false")
        print(f"warning: {text}; rendering it anyway (range_check=false)", file=sys.stderr)
    odd = [what for what, size in (("row", mosaic.shape[0]), ("column", mosaic.shape[1])) if size % 2]
    if odd:
        log(f"note: {path}: {mosaic.shape[1]}x{mosaic.shape[0]} mosaic: its last {' and last '.join(odd)} "
            f"{'are' if len(odd) == 2 else 'is'} dropped (the 2x2 Bayer packing needs even sizes)")
    return mosaic


def checked_inputs(paths, failed) -> dict:
    """The inputs that pass check_mosaic_file, each with its PNG header; the others reported
    and appended to ``failed`` (a single input's problem is its own error)."""
    good = {}
    for path in paths:
        try:
            good[path] = check_mosaic_file(path)
        except UserError as err:
            if len(paths) == 1:
                raise
            failed.append(path)
            print(f"warning: {err}", file=sys.stderr)
    return good


def render_files(to_picture, paths, args, iteration, failed=None) -> list:
    """Render and write every mosaic of ``paths`` with progress bars (on a terminal);
    ``to_picture(mosaic, progress)`` gives a float32 picture. Returns the written paths. A
    mosaic that cannot be rendered is reported as a warning and appended to ``failed`` (a list),
    and the others are rendered; without ``failed`` it stops the run. Ctrl-C or SIGTERM stops
    the run naming the pictures finished."""
    from render import output_rows  # here: render.py starts TensorFlow, after runtime's settings

    written = []
    with cli.signals_as_interrupts(), tqdm(total=len(paths), desc="photos", unit="photo", disable=None) as bar:
        try:
            for path in paths:
                try:
                    mosaic = read_checked_mosaic(path, args["range_check"], log=bar.write)
                    total = output_rows(mosaic.shape, args["level"], args["crop"])
                    with tqdm(total=total, desc=os.path.basename(path), unit="row", leave=False, disable=None) as rows:
                        picture = to_picture(mosaic, rows.update)
                except UserError as err:
                    if failed is None:
                        raise
                    failed.append(path)
                    bar.write(f"warning: {err}", file=sys.stderr)
                    bar.update(1)
                    continue
                target = output_path(args["output_dir"], path, args["level"], iteration)
                images.write_png(target, images.to_uint(picture, args["bits"], args["stretch"]))
                written.append(target)
                bar.write(f"{path} -> {target}")
                bar.update(1)
        except KeyboardInterrupt as stop:
            done = f"finished {len(written)} of {len(paths)}" + (f": {', '.join(written)}" if written else "")
            signal_name = stop.args[0] if stop.args else "SIGINT"
            raise cli.Interrupted(f"stopped by {signal_name} ({done}); the picture under way was not written") from None
    return written


def renderer(args, prefix, shapes):
    """(to_picture(mosaic, progress), level, iteration label) of the checkpoint ``prefix``, or of
    the exported model of ``model=``. Imports TensorFlow: runs after runtime's settings."""
    import render

    if args["model"] != "none":
        import deployed

        model = deployed.load_for_rendering(args["model"], args["bits"], args["stretch"])
        return (lambda mosaic, progress: model.picture(mosaic, args["crop"], progress)), model.level, model.iteration
    runtime.check_precision(args["precision"], args["force_bf16"])
    render.return_freed_memory_for(shapes, args["tile_size"], args["crop"])
    model = checkpoints.load_model(args["level"], prefix, args["precision"])
    return (lambda mosaic, progress: render.render(model, mosaic, args["level"], args["tile_size"], args["crop"],
                                                   progress)), args["level"], None


def parse_arguments(argv) -> dict:
    """The arguments, refusing those an exported model (model=) decides for itself."""
    args = cli.parse_args(argv, ARGS, "test_model.py", __doc__.strip().splitlines()[0])
    if args["model"] != "none" and args["precision"] != "fp32":
        raise UsageError(f"precision={args['precision']}: an exported model computes in the precision it was "
                         f"exported with (export_model.py precision=)")
    return args


def main(argv):
    args = parse_arguments(argv)
    paths = list_inputs(args["input"])
    check_distinct_outputs(paths)
    files.check_output_dir(args["output_dir"], "output_dir")
    prefix, iteration = (None, None) if args["model"] != "none" else checkpoints.resolve(args)
    failed = []
    good = checked_inputs(paths, failed)
    if good:
        files.remove_stale_temps(args["output_dir"])
        runtime.select_cpu_kernels(training=False)
        runtime.start_tensorflow()
        print(runtime.huge_pages_note())
        runtime.configure_devices(args["use_gpu"])
        shapes = [(header["height"], header["width"]) for header in good.values()]
        to_picture, level, own_iteration = renderer(args, prefix, shapes)
        render_files(to_picture, list(good), {**args, "level": level}, own_iteration or iteration,
                     failed if len(paths) > 1 else None)
    if failed:
        first = next(p for p in paths if p in failed)
        raise UserError(f"{len(failed)} of {len(paths)} mosaics could not be rendered (first: {first}; "
                        f"see the warnings above)")


if __name__ == "__main__":
    runtime.run_with_huge_pages()
    runtime.bound_memory()
    sys.exit(cli.run(main))
